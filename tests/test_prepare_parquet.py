"""prepare.py on Speech-MASSIVE and ITALIC as Hugging Face distributes them: parquet shards (and the
save_to_disk arrow folder), the audio column a struct {bytes, path} holding each encoded file. The
fixtures are written with pyarrow in the schema `datasets` writes (ClassLabel columns as int64 with their
names in the b"huggingface" schema metadata), with real FLAC/WAV bytes from soundfile."""
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

import prepare
from model.manifest import read_manifest

# Speech-MASSIVE's ClassLabel names for `scenario`, in the order of its dataset card.
SCENARIOS = ["social", "transport", "calendar", "play", "news", "datetime", "recommendation", "email", "iot",
             "general", "audio", "lists", "qa", "cooking", "takeaway", "music", "alarm", "weather"]
INTENTS = ["alarm_query", "alarm_remove", "alarm_set", "weather_query", "play_music"]

AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SPEECH_MASSIVE_SCHEMA = [
    ("id", pa.string()), ("locale", pa.string()), ("partition", pa.string()), ("scenario", pa.int64()),
    ("scenario_str", pa.string()), ("intent_idx", pa.int64()), ("intent_str", pa.string()), ("utt", pa.string()),
    ("annot_utt", pa.string()), ("worker_id", pa.string()), ("tokens", pa.list_(pa.string())),
    ("labels", pa.list_(pa.string())), ("audio", AUDIO), ("path", pa.string()),
    ("is_transcript_reported", pa.bool_()), ("is_validated", pa.bool_()), ("speaker_id", pa.string()),
    ("speaker_sex", pa.string()), ("speaker_age", pa.string()),
]
SPEECH_MASSIVE_FEATURES = {
    **{name: {"dtype": "string", "_type": "Value"} for name, t in SPEECH_MASSIVE_SCHEMA if t == pa.string()},
    "scenario": {"names": SCENARIOS, "_type": "ClassLabel"},
    "intent_idx": {"names": INTENTS, "_type": "ClassLabel"},
    "audio": {"sampling_rate": 16000, "_type": "Audio"},
}


def encoded(seconds, freq, fmt):
    """A tone encoded as a `fmt` file: (file bytes, the samples a decoder must give back)."""
    t = np.arange(int(16000 * seconds)) / 16000
    x = (0.25 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format=fmt, subtype="PCM_16")
    data = buf.getvalue()
    return data, sf.read(io.BytesIO(data), dtype="float32")[0]


def smassive_row(mid, intent, annot, speaker, clip, fmt="FLAC", seconds=0.3):
    scenario = intent.split("_")[0]
    utt = prepare.annot_text(prepare.parse_annot(annot))
    data, _ = encoded(seconds, 200 + 40 * int(mid), fmt)
    return {"id": mid, "locale": "fr-FR", "partition": "dev", "scenario": SCENARIOS.index(scenario),
            "scenario_str": scenario, "intent_idx": INTENTS.index(intent), "intent_str": intent, "utt": utt,
            "annot_utt": annot, "worker_id": "7", "tokens": utt.split(), "labels": ["Other"] * len(utt.split()),
            "audio": {"bytes": data, "path": clip}, "path": clip, "is_transcript_reported": False,
            "is_validated": True, "speaker_id": speaker, "speaker_sex": "Female", "speaker_age": "31"}


def write_table(path, rows, schema, features, metadata=True):
    """rows as `datasets` writes them: explicit arrow types, the feature types in the schema metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"huggingface": json.dumps({"info": {"features": features}})} if metadata else None
    table = pa.Table.from_pylist(rows, schema=pa.schema(schema, metadata=meta))
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:  # save_to_disk: Arrow IPC stream
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return rows


A = "réveille-moi à [time : sept heures]"
B = "mets une alarme [date : demain]"
C = "quel temps fait-il à [place_name : paris]"


def speech_massive(root):
    """A fr-FR folder as on the Hub: train_115 in one shard, validation in two, test (from the separate
    Speech-MASSIVE-test repository) in one. Utterance 1 is recorded twice."""
    loc = root / "fr-FR"
    shards = {
        "train_115-00000-of-00001.parquet": [smassive_row("1", "alarm_set", A, "s1", "aa.flac"),
                                             smassive_row("1", "alarm_set", A, "s2", "ab.wav", fmt="WAV")],
        "validation-00000-of-00002.parquet": [smassive_row("2", "alarm_set", B, "s3", "v0.flac")],
        "validation-00001-of-00002.parquet": [smassive_row("3", "weather_query", C, "s3", "v1.flac"),
                                              smassive_row("4", "alarm_set", A, "s4", "v2.flac")],
        "test-00000-of-00001.parquet": [smassive_row("5", "weather_query", C, "s5", "t0.flac")],
    }
    return {name: write_table(loc / name, rows, SPEECH_MASSIVE_SCHEMA, SPEECH_MASSIVE_FEATURES)
            for name, rows in shards.items()}


def run(argv, capsys):
    code = prepare.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_no_output(tmp_path, out="o"):
    assert not (tmp_path / out).exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staged audio left behind


def raw_lines(path):
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------- Speech-MASSIVE

def test_speech_massive_parquet_gives_labels_ids_and_audio_identical_to_the_source(tmp_path, capsys):
    shards = speech_massive(tmp_path / "sm")
    code, out, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--check-audio",
                          "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    rows = {s: read_manifest(tmp_path / "o" / f"{s}.jsonl", check_audio_exists=True) for s in ("train", "devel", "test")}
    # one transcript row per utterance id, one speech row per recording, shards read in order
    assert [(r["id"], r["audio"] is None) for r in rows["devel"]] == [
        ("speech-massive-fr-FR-2", True), ("speech-massive-fr-FR-v0.flac", False),
        ("speech-massive-fr-FR-3", True), ("speech-massive-fr-FR-v1.flac", False),
        ("speech-massive-fr-FR-4", True), ("speech-massive-fr-FR-v2.flac", False)]
    assert [r["id"] for r in rows["train"]] == ["speech-massive-fr-FR-1", "speech-massive-fr-FR-aa.flac",
                                                "speech-massive-fr-FR-ab.wav"]
    weather = rows["devel"][3]
    assert (weather["scenario"], weather["action"], weather["text"], weather["entities"], weather["speaker"],
            weather["utt_id"], weather["lang"]) == \
        ("weather", "query", "quel temps fait-il à paris", [{"type": "place_name", "filler": "paris"}], "s3",
         "speech-massive-fr-FR-3", "fr")
    # every clip written once under audio/<corpus>/<locale>/, byte-identical, referenced relative to --out
    source = {r["path"]: r["audio"]["bytes"] for rs in shards.values() for r in rs}
    speech = [r for rs in rows.values() for r in rs if r["audio"] is not None]
    assert len(speech) == len(source) == 6
    for r in speech:
        name = Path(r["audio"]).name
        assert r["audio"] == str(tmp_path / "o" / "audio" / "speech-massive" / "fr-FR" / name)
        assert Path(r["audio"]).read_bytes() == source[name]
        np.testing.assert_array_equal(sf.read(r["audio"], dtype="float32")[0],
                                      sf.read(io.BytesIO(source[name]), dtype="float32")[0])
    assert {l["audio"] for l in raw_lines(tmp_path / "o" / "test.jsonl")} == {None, "audio/speech-massive/fr-FR/t0.flac"}
    assert sorted(os.listdir(tmp_path / "o" / "audio" / "speech-massive" / "fr-FR")) == sorted(source)
    assert "6 files decoded" in out and "train_115" in out
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_speech_massive_full_train_split_is_read_without_few_shot_and_its_absence_explained(tmp_path, capsys):
    shards = speech_massive(tmp_path / "sm")
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "split 'train' not found" in err and "--few-shot" in err
    assert_no_output(tmp_path)
    rows = [smassive_row(str(10 + i), "alarm_set", A, "s9", f"tr{i}.flac") for i in range(3)]
    write_table(tmp_path / "sm" / "fr-FR" / "train-00000-of-00009.parquet", rows, SPEECH_MASSIVE_SCHEMA,
                SPEECH_MASSIVE_FEATURES)
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    train = read_manifest(tmp_path / "o" / "train.jsonl")
    assert [r["id"] for r in train if r["audio"]] == [f"speech-massive-fr-FR-tr{i}.flac" for i in range(3)]
    assert not any("aa.flac" in r["id"] for r in train)  # train_115 is not mixed in
    assert len(shards["train_115-00000-of-00001.parquet"]) == 2


def test_two_rows_with_one_clip_name_keep_both_clips_numbered(tmp_path, capsys):
    speech_massive(tmp_path / "sm")
    rows = [smassive_row("5", "weather_query", C, "s5", "same.flac"), smassive_row("6", "alarm_set", B, "s6", "same.flac")]
    write_table(tmp_path / "sm" / "fr-FR" / "test-00000-of-00001.parquet", rows, SPEECH_MASSIVE_SCHEMA,
                SPEECH_MASSIVE_FEATURES)
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--out", tmp_path / "o"],
                       capsys)
    assert code == 0, err
    speech = [r for r in read_manifest(tmp_path / "o" / "test.jsonl") if r["audio"]]
    assert [Path(r["audio"]).name for r in speech] == ["same.flac", "same-1.flac"]
    assert [Path(r["audio"]).read_bytes() for r in speech] == [r["audio"]["bytes"] for r in rows]
    assert [r["utt_id"] for r in speech] == ["speech-massive-fr-FR-5", "speech-massive-fr-FR-6"]


def test_missing_column_is_named_with_its_file_and_nothing_is_written(tmp_path, capsys):
    speech_massive(tmp_path / "sm")
    path = tmp_path / "sm" / "fr-FR" / "validation-00001-of-00002.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["annot_utt"]), path)
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--out", tmp_path / "o"],
                       capsys)
    assert code == 2 and f"{path}: missing column 'annot_utt'" in err
    assert_no_output(tmp_path)


def test_malformed_annot_utt_in_row_k_names_file_row_and_field_and_leaves_no_audio(tmp_path, capsys):
    speech_massive(tmp_path / "sm")
    path = tmp_path / "sm" / "fr-FR" / "validation-00001-of-00002.parquet"
    table = pq.read_table(path)
    annot = table.column("annot_utt").to_pylist()
    annot[1] = "mets une alarme [date : demain"
    pq.write_table(table.set_column(table.schema.get_field_index("annot_utt"), "annot_utt", pa.array(annot)), path)
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--out", tmp_path / "o"],
                       capsys)
    # rows before it (train_115, the first shard) already had their audio staged: it must be gone too
    assert code == 2 and f"{path}: row 1: field 'annot_utt': unbalanced '['" in err
    assert_no_output(tmp_path)


def test_undecodable_audio_bytes_are_named_by_file_and_row_with_check_audio(tmp_path, capsys):
    speech_massive(tmp_path / "sm")
    path = tmp_path / "sm" / "fr-FR" / "test-00000-of-00001.parquet"
    rows = [smassive_row("5", "weather_query", C, "s5", "t0.flac")]
    rows[0]["audio"]["bytes"] = b"fLaC but not really"
    write_table(path, rows, SPEECH_MASSIVE_SCHEMA, SPEECH_MASSIVE_FEATURES)
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--check-audio",
                        "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{path}: row 0: field 'audio': cannot decode" in err
    assert_no_output(tmp_path)


def test_rows_without_audio_bytes_or_file_are_missing_audio_unless_skipped(tmp_path, capsys):
    speech_massive(tmp_path / "sm")
    path = tmp_path / "sm" / "fr-FR" / "test-00000-of-00001.parquet"
    rows = [smassive_row("5", "weather_query", C, "s5", "t0.flac"), smassive_row("6", "alarm_set", B, "s6", "t1.flac")]
    rows[1]["audio"] = {"bytes": None, "path": "/nonexistent/t1.flac"}
    write_table(path, rows, SPEECH_MASSIVE_SCHEMA, SPEECH_MASSIVE_FEATURES)
    argv = ["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--out", tmp_path / "o"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "1 audio file(s) not found" in err and f"/nonexistent/t1.flac  (from {path}: row 1)" in err
    assert_no_output(tmp_path)
    code, out, err = run(argv + ["--skip-missing-audio"], capsys)
    assert code == 0, err
    test = read_manifest(tmp_path / "o" / "test.jsonl", check_audio_exists=True)
    assert [r["id"] for r in test] == ["speech-massive-fr-FR-5", "speech-massive-fr-FR-t0.flac", "speech-massive-fr-FR-6"]
    assert "dropped 1 speech rows" in out


def test_a_rerun_replaces_its_earlier_output_but_a_foreign_folder_is_refused_untouched(tmp_path, capsys):
    speech_massive(tmp_path / "sm")
    argv = ["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--out", tmp_path / "o"]
    assert run(argv, capsys)[0] == 0
    first = (tmp_path / "o" / "devel.jsonl").read_bytes()
    (tmp_path / "o" / "audio" / "speech-massive" / "fr-FR" / "stale.flac").write_bytes(b"old")
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "devel.jsonl").read_bytes() == first
    assert not (tmp_path / "o" / "audio" / "speech-massive" / "fr-FR" / "stale.flac").exists()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    code, _, err = run(argv, capsys)
    assert code == 2 and "notes.txt" in err and "refusing to replace" in err
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine" and (tmp_path / "o" / "devel.jsonl").read_bytes() == first


def test_a_file_that_is_not_parquet_is_named(tmp_path, capsys):
    speech_massive(tmp_path / "sm")
    path = tmp_path / "sm" / "fr-FR" / "validation-00000-of-00002.parquet"
    path.write_bytes(b"PAR1 truncated")
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--out", tmp_path / "o"],
                       capsys)
    assert code == 2 and f"{path}: cannot read it as parquet" in err
    assert_no_output(tmp_path)


def test_save_to_disk_folder_is_read_like_the_parquet_shards(tmp_path, capsys):
    """DatasetDict.save_to_disk per locale: <split>/data-0000x-of-0000y.arrow (IPC stream), the order in
    state.json, the features in dataset_info.json (here only there, so the ClassLabel names come from it)."""
    shards = speech_massive(tmp_path / "pq")
    loc = tmp_path / "disk" / "fr-FR"
    for split, names in {"train_115": ["train_115-00000-of-00001.parquet"],
                         "validation": ["validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet"],
                         "test": ["test-00000-of-00001.parquet"]}.items():
        files = [f"data-{i:05d}-of-{len(names):05d}.arrow" for i in range(len(names))]
        for name, f in zip(names, files):
            write_table(loc / split / f, shards[name], SPEECH_MASSIVE_SCHEMA, SPEECH_MASSIVE_FEATURES, metadata=False)
        (loc / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": f} for f in files],
                                                            "_split": split, "_format_type": None}))
        (loc / split / "dataset_info.json").write_text(json.dumps({"features": SPEECH_MASSIVE_FEATURES}))
    (tmp_path / "disk" / "fr-FR" / "dataset_dict.json").write_text(json.dumps({"splits": ["train_115", "validation", "test"]}))
    for src, out in (("pq", "a"), ("disk", "b")):
        code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / src, "--few-shot", "--out", tmp_path / out],
                           capsys)
        assert code == 0, err
    for s in ("train", "devel", "test"):
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
    for p in (tmp_path / "a" / "audio").rglob("*.*"):
        assert (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes() == p.read_bytes()


def test_class_label_indices_become_their_names_from_the_schema_metadata(tmp_path):
    path = tmp_path / "x.parquet"
    write_table(path, [smassive_row("2", "weather_query", C, "s", "w.flac")], SPEECH_MASSIVE_SCHEMA,
                SPEECH_MASSIVE_FEATURES)
    (k, rec), = prepare.iter_columnar(path, ("id",))
    assert (k, rec["scenario"], rec["intent_idx"], rec["speaker_id"]) == (0, "weather", "weather_query", "s")


# ---------------------------------------------------------------------------------------------- ITALIC

ITALIC_INTENTS = ["alarm_query", "alarm_set", "weather_query"]
# The columns of ITALIC's card, in its order: no id.
ITALIC_SCHEMA = [("utt", pa.string()), ("audio", AUDIO), ("intent", pa.int64()), ("speaker", pa.string()),
                 ("age", pa.int64()), ("is_native", pa.bool_()), ("gender", pa.string()), ("region", pa.string()),
                 ("nationality", pa.string()), ("lisp", pa.string()), ("education", pa.string()),
                 ("environment", pa.string()), ("device", pa.string())]
ITALIC_FEATURES = {**{n: {"dtype": "string", "_type": "Value"} for n, t in ITALIC_SCHEMA if t == pa.string()},
                   "age": {"dtype": "int64", "_type": "Value"}, "is_native": {"dtype": "bool", "_type": "Value"},
                   "intent": {"names": ITALIC_INTENTS, "_type": "ClassLabel"},
                   "audio": {"sampling_rate": 16000, "_type": "Audio"}}


def italic_row(utt, intent, speaker, clip, freq):
    data, _ = encoded(0.2, freq, "WAV")
    return {"utt": utt, "audio": {"bytes": data, "path": clip}, "intent": ITALIC_INTENTS.index(intent),
            "speaker": speaker, "age": 30, "is_native": True, "gender": "female", "region": "Piemonte",
            "nationality": "italiana", "lisp": "", "education": "laurea", "environment": "silenzioso",
            "device": "smartphone"}


def italic_hub(tmp_path, extra_test_rows=()):
    """MASSIVE it-IT and an ITALIC `massive` config as the Hub's parquet conversion lays it out
    (<config>/<split>/0000.parquet); utterance 1 is read by two speakers, spelt two ways."""
    data = tmp_path / "massive" / "data"
    data.mkdir(parents=True)
    massive = [("0", "train", "alarm", "alarm_set", "svegliami alle [time : sette]"),
               ("1", "dev", "weather", "weather_query", "che tempo fa a [place_name : roma]"),
               ("2", "test", "alarm", "alarm_query", "quali sveglie ho [date : domani]")]
    with open(data / "it-IT.jsonl", "w", encoding="utf-8") as f:
        for mid, part, scenario, intent, annot in massive:
            f.write(json.dumps({"id": mid, "locale": "it-IT", "partition": part, "scenario": scenario, "intent": intent,
                                "utt": prepare.annot_text(prepare.parse_annot(annot)), "annot_utt": annot}) + "\n")
    cfg = tmp_path / "ITALIC" / "massive"
    splits = {"train": [italic_row("svegliami alle sette", "alarm_set", "spk1", "a/0_spk1.wav", 300)],
              "validation": [italic_row("che tempo fa a roma", "weather_query", "spk2", "1_spk2.wav", 310),
                             italic_row("Che tempo fa a Roma?", "weather_query", "spk3", "1_spk3.wav", 320)],
              "test": [italic_row("quali sveglie ho domani", "alarm_query", "spk4", "2_spk4.wav", 330),
                       *extra_test_rows]}
    for split, rows in splits.items():
        write_table(cfg / split / "0000.parquet", rows, ITALIC_SCHEMA, ITALIC_FEATURES)
    return cfg, tmp_path / "massive", splits


def test_italic_hub_parquet_without_id_and_class_label_intent_gets_slots_from_massive(tmp_path, capsys):
    cfg, massive, splits = italic_hub(tmp_path)
    code, out, err = run(["italic", "--italic-dir", cfg, "--massive-dir", massive, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    devel = read_manifest(tmp_path / "o" / "devel.jsonl", check_audio_exists=True)
    assert [r["id"] for r in devel] == ["italic-massive-validation-0", "italic-massive-validation-0-1_spk2.wav",
                                        "italic-massive-validation-1", "italic-massive-validation-1-1_spk3.wav"]
    assert {(r["scenario"], r["action"], r["lang"], r["locale"]) for r in devel} == {("weather", "query", "it", "it-IT")}
    assert [r["entities"] for r in devel] == [[{"type": "place_name", "filler": "roma"}]] * 4
    assert [r.get("speaker") for r in devel] == [None, "spk2", None, "spk3"]
    for r, src in zip(devel[1::2], splits["validation"]):
        assert Path(r["audio"]).read_bytes() == src["audio"]["bytes"]
    train = read_manifest(tmp_path / "o" / "train.jsonl")
    assert train[1]["audio"] == str(tmp_path / "o" / "audio" / "italic" / "it-IT" / "0_spk1.wav")
    assert "4 rows joined to MASSIVE it-IT (4 by text): 3 exact, 1 after normalising" in out


def test_italic_unjoined_row_skipped_leaves_no_clip_in_the_output(tmp_path, capsys):
    cfg, massive, _ = italic_hub(tmp_path, [italic_row("che ore sono", "alarm_query", "spk5", "9_spk5.wav", 340)])
    code, _, err = run(["italic", "--italic-dir", cfg, "--massive-dir", massive, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{cfg / 'test' / '0000.parquet'}: row 1: 'che ore sono': no MASSIVE it-IT utterance" in err
    assert_no_output(tmp_path)
    code, out, err = run(["italic", "--italic-dir", cfg, "--massive-dir", massive, "--out", tmp_path / "o",
                          "--skip-unjoined"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o" / "audio" / "italic" / "it-IT").iterdir()) == \
        ["0_spk1.wav", "1_spk2.wav", "1_spk3.wav", "2_spk4.wav"]


def test_italic_join_reads_no_audio_before_reporting_an_error(tmp_path, capsys, monkeypatch):
    """The join is checked on the text columns first: a bad row stops the run before any clip is staged."""
    cfg, massive, _ = italic_hub(tmp_path, [italic_row("che ore sono", "alarm_query", "spk5", "9_spk5.wav", 340)])
    staged = []
    monkeypatch.setattr(prepare.AudioStage, "write", lambda self, *a: staged.append(a))
    code, _, err = run(["italic", "--italic-dir", cfg, "--massive-dir", massive, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "1 ITALIC row(s) not found" in err and staged == []


# ------------------------------------------------------------------------------------------ permissions

def test_prepared_folder_and_its_files_get_the_umask_modes_not_mkdtemp_privacy(tmp_path, capsys):
    speech_massive(tmp_path / "sm")
    old = os.umask(0o022)
    try:
        code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot",
                            "--out", tmp_path / "o"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
    assert mode(tmp_path / "o") == 0o755 and mode(tmp_path / "o" / "audio" / "speech-massive" / "fr-FR") == 0o755
    assert {mode(p) for p in (tmp_path / "o").rglob("*") if p.is_file()} == {0o644}
