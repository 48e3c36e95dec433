"""prepare.py: every corpus into the manifest format, labels as the official definitions give them,
and bad input stopped with the file, line and field named and no output folder left behind."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import prepare
from model.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
SLURP = Path(__file__).resolve().parents[2] / "shared" / "data" / "slurp"
needs_slurp = pytest.mark.skipif(not (SLURP / "test.jsonl").is_file(),
                                 reason=f"SLURP annotations not found in {SLURP} (see that folder's SOURCE.md)")


def run(argv, capsys):
    """prepare.main in-process; returns (exit code, stdout, stderr)."""
    code = prepare.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def slurp_lines(split):
    return (SLURP / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()


def placeholder_audio(folder, lines):
    """Empty files named like the recordings: the default check is existence only."""
    folder.mkdir(exist_ok=True)
    for line in lines:
        for rec in json.loads(line)["recordings"]:
            (folder / rec["file"]).touch()
    return folder


def official_gold(example):
    """The official SLURP scorer's gold for one release line (scripts/evaluation/util.py,
    release2prediction), keyed by recording file name as the scorer keys it."""
    tokens = example["tokens"]
    res = {"scenario": example["scenario"], "action": example["action"],
           "entities": [{"type": e["type"], "filler": " ".join(tokens[i]["surface"].lower() for i in e["span"])}
                        for e in example["entities"]]}
    return {rec["file"]: res for rec in example["recordings"]}


# ---------------------------------------------------------------------------------------------- SLURP

@pytest.fixture(scope="module")
def prepared_slurp(tmp_path_factory):
    """The real devel and test annotations through `prepare.py slurp`, once for the tests below
    (placeholder files stand in for the 21,768 recordings)."""
    if not (SLURP / "test.jsonl").is_file():
        pytest.skip(f"SLURP annotations not found in {SLURP} (see that folder's SOURCE.md)")
    tmp = tmp_path_factory.mktemp("slurp")
    ann = tmp / "ann"
    ann.mkdir()
    lines = []
    for split in ("devel", "test"):
        shutil.copy(SLURP / f"{split}.jsonl", ann)
        lines += slurp_lines(split)
    audio = placeholder_audio(tmp / "slurp_real", lines)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = prepare.main(["slurp", "--annotations", str(ann), "--audio-dir", str(audio),
                             "--splits", "devel", "test", "--out", str(tmp / "out")])
    assert code == 0
    return tmp / "out", audio, stdout.getvalue()


def test_slurp_devel_and_test_counts_equal_the_papers_table_1(prepared_slurp):
    out_dir, _, out = prepared_slurp
    counts = {}
    for split in ("devel", "test"):
        rows = read_manifest(out_dir / f"{split}.jsonl", check_audio_exists=True)
        counts[split] = (sum(r["audio"] is None for r in rows), sum(r["audio"] is not None for r in rows))
    assert counts == {"devel": (2033, 8690), "test": (2974, 13078)}
    table = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:3]}
    assert table == {"devel": ["2033", "8690"], "test": ["2974", "13078"]}  # the printed summary


def test_slurp_every_test_recording_has_the_official_scorers_gold_labels(prepared_slurp):
    out_dir, audio, _ = prepared_slurp
    gold, transcripts = {}, {}
    for line in slurp_lines("test"):
        ex = json.loads(line)
        gold.update(official_gold(ex))
        transcripts[f"slurp-{ex['slurp_id']}"] = ex["sentence"]
    rows = read_manifest(out_dir / "test.jsonl")
    speech = {r["id"]: r for r in rows if r["audio"] is not None}
    assert set(speech) == set(gold)
    for name, r in speech.items():
        assert {k: r[k] for k in ("scenario", "action", "entities")} == gold[name], name
        assert r["audio"] == str((audio / name).resolve())
        assert r["text"] == transcripts[r["utt_id"]]
    # The filler rule matters: tokens split "jessica's" and keep capitals ("Friday") in the release.
    fillers = {e["filler"] for r in rows for e in r["entities"]}
    assert not any(c.isupper() for f in fillers for c in f)
    assert any(" 's" in f for f in fillers)


def slurp_fixture(tmp_path, edit=None, split_lines=None):
    """A small SLURP release (first lines of the real test file) in tmp_path/ann, with placeholder audio."""
    base = [json.loads(l) for l in slurp_lines("test")[:6]]
    splits = split_lines or {"train": base[:2], "devel": base[2:4], "test": base[4:6]}
    ann = tmp_path / "ann"
    ann.mkdir()
    texts = {s: [json.dumps(ex) for ex in exs] for s, exs in splits.items()}
    if edit:
        edit(texts)
    for s, ls in texts.items():
        (ann / f"{s}.jsonl").write_text("".join(l + "\n" for l in ls))
    audio = placeholder_audio(tmp_path / "audio", [json.dumps(ex) for exs in splits.values() for ex in exs])
    return ann, audio


def bad_slurp(tmp_path, capsys, edit, extra=()):
    ann, audio = slurp_fixture(tmp_path, edit)
    code, out, err = run(["slurp", "--annotations", ann, "--audio-dir", audio, "--out", tmp_path / "out", *extra],
                         capsys)
    assert code == 2
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folder either
    return err


def set_line(split, i, fn):
    def edit(texts):
        texts[split][i] = fn(texts[split][i])
    return edit


def change_json(fn):
    def apply(line):
        ex = json.loads(line)
        fn(ex)
        return json.dumps(ex)
    return apply


@needs_slurp
def test_slurp_malformed_json_line_is_named(tmp_path, capsys):
    err = bad_slurp(tmp_path, capsys, set_line("devel", 1, lambda l: l[:-5]))
    assert "devel.jsonl:2: malformed JSON" in err


@needs_slurp
def test_slurp_missing_required_field_is_named(tmp_path, capsys):
    err = bad_slurp(tmp_path, capsys, set_line("test", 0, change_json(lambda ex: ex.pop("scenario"))))
    assert "test.jsonl:1: missing required field 'scenario'" in err


@needs_slurp
def test_slurp_entity_span_outside_the_tokens_is_named(tmp_path, capsys):
    def outside(ex):
        ex["entities"][0]["span"] = [len(ex["tokens"])]
    err = bad_slurp(tmp_path, capsys, set_line("train", 1, change_json(outside)))
    assert "train.jsonl:2: field 'entities[0].span': token index" in err and "outside the" in err


@needs_slurp
def test_slurp_duplicate_id_is_named_with_its_first_place(tmp_path, capsys):
    def dup(texts):
        texts["test"].append(texts["devel"][0])
    err = bad_slurp(tmp_path, capsys, dup)
    assert "test.jsonl:3: field 'id': duplicate id" in err and "devel.jsonl:1" in err


@needs_slurp
def test_slurp_empty_split_is_an_error_naming_the_file(tmp_path, capsys):
    def empty(texts):
        texts["devel"] = []
    err = bad_slurp(tmp_path, capsys, empty)
    assert "split 'devel' is empty" in err and "devel.jsonl" in err


@needs_slurp
def test_slurp_missing_audio_lists_count_and_paths_unless_skipped(tmp_path, capsys):
    ann, audio = slurp_fixture(tmp_path)
    gone = sorted(audio.iterdir())[:3]
    for p in gone:
        p.unlink()
    code, _, err = run(["slurp", "--annotations", ann, "--audio-dir", audio, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "3 audio file(s) not found" in err and str(gone[0]) in err
    assert not (tmp_path / "out").exists()
    code, out, err = run(["slurp", "--annotations", ann, "--audio-dir", audio, "--out", tmp_path / "out",
                          "--skip-missing-audio"], capsys)
    assert code == 0, err
    ids = {r["id"] for s in ("train", "devel", "test") for r in read_manifest(tmp_path / "out" / f"{s}.jsonl")}
    assert not ids & {p.name for p in gone} and "dropped 3 speech rows" in out


@needs_slurp
def test_slurp_check_audio_reports_hours_and_names_an_undecodable_file(tmp_path, capsys):
    ann, audio = slurp_fixture(tmp_path)
    files = sorted(audio.iterdir())
    seconds = 0.0
    for k, p in enumerate(files):
        n = 1600 * (k + 1)
        sf.write(p, np.zeros(n, np.float32), 16000, format="FLAC")
        seconds += n / 16000
    code, out, err = run(["slurp", "--annotations", ann, "--audio-dir", audio, "--out", tmp_path / "out",
                          "--check-audio"], capsys)
    assert code == 0, err
    hours = [float(line.split()[3]) for line in out.splitlines() if line.split()[:1] in (["train"], ["devel"], ["test"])]
    assert sum(hours) == pytest.approx(seconds / 3600, abs=2e-4)
    assert f"{len(files)} files decoded" in out
    files[4].write_bytes(b"not a flac file")
    shutil.rmtree(tmp_path / "out")
    code, out, err = run(["slurp", "--annotations", ann, "--audio-dir", audio, "--out", tmp_path / "out",
                          "--check-audio"], capsys)
    assert code == 2 and ".jsonl:" in err and "field 'audio': cannot decode" in err and files[4].name in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- MASSIVE

MASSIVE_LINES = {
    "en-US": [
        ("train", "alarm", "alarm_set", "wake me up at [time : five am] [date : this week]"),
        ("train", "music", "music_query", "who sings [song_name : don't stop me now]"),
        ("dev", "play", "play_music", "play [artist_name : guns n' roses] on [device_type : mike's speaker]"),
        ("test", "calendar", "calendar_set", "remind me at [time : 5:30 p.m.] about [event_name : q&a (part 2)]"),
        ("test", "general", "general_joke", "tell me a joke"),
    ],
    "ja-JP": [
        ("train", "alarm", "alarm_set", "[date : 今週] の [time : 午前五時] に起こして"),
        ("dev", "weather", "weather_query", "[place_name : 東京] の天気は？"),
        ("test", "iot", "iot_hue_lightoff", "[house_place : 寝室] の電気を消して"),
    ],
    "ar-SA": [
        ("train", "alarm", "alarm_set", "أيقظني [time : الساعة الخامسة صباحا]"),
        ("dev", "weather", "weather_query", "كيف الطقس في [place_name : الرياض]؟"),
        ("test", "email", "email_query", "هل لدي رسائل من [person : أحمد]"),
    ],
    "ru-RU": [
        ("train", "alarm", "alarm_set", "разбуди меня в [time : пять утра]"),
        ("dev", "news", "news_query", "новости [news_topic : «спорт-экспресс»]"),
        ("test", "qa", "qa_factoid", "кто такой [person : д'артаньян]"),
    ],
}


def massive_dir(tmp_path, lines=MASSIVE_LINES):
    data = tmp_path / "massive" / "data"
    data.mkdir(parents=True)
    for locale, recs in lines.items():
        with open(data / f"{locale}.jsonl", "w", encoding="utf-8") as f:
            for i, (part, scenario, intent, annot) in enumerate(recs):
                utt = prepare.annot_text(prepare.parse_annot(annot))
                f.write(json.dumps({"id": str(i), "locale": locale, "partition": part, "scenario": scenario,
                                    "intent": intent, "utt": utt, "annot_utt": annot, "worker_id": "7"},
                                   ensure_ascii=False) + "\n")
    return tmp_path / "massive"


@pytest.mark.parametrize("annot", [a for recs in MASSIVE_LINES.values() for *_, a in recs])
def test_annot_utt_parse_then_render_gives_the_string_back(annot):
    assert prepare.render_annot(prepare.parse_annot(annot)) == annot


def test_annot_utt_entities_and_text_keep_fillers_verbatim():
    segs = prepare.parse_annot("play [artist_name : guns n' roses] at [time : 5 : 30 p.m.]")
    assert prepare.annot_entities(segs) == [{"type": "artist_name", "filler": "guns n' roses"},
                                            {"type": "time", "filler": "5 : 30 p.m."}]
    assert prepare.annot_text(segs) == "play guns n' roses at 5 : 30 p.m."


@pytest.mark.parametrize("annot, problem", [
    ("wake me at [time : five am", "unbalanced '['"),
    ("wake me at time : five am]", "unbalanced ']'"),
    ("wake me at [time : [date : five]]", "unbalanced '['"),
    ("wake me at [time: five am]", "unknown markup"),
    ("wake me at [Time : five am]", "unknown markup"),
    ("wake me at [time : ]", "unknown markup"),
    ("wake me at [five am]", "unknown markup"),
])
def test_bad_annot_utt_markup_is_an_error_naming_file_line_and_field(tmp_path, capsys, annot, problem):
    lines = {"fr-FR": [("train", "alarm", "alarm_set", "réveille-moi à [time : sept heures]"),
                       ("dev", "alarm", "alarm_set", "réveille-moi à [time : huit heures]"),
                       ("test", "alarm", "alarm_set", "réveille-moi [date : demain]")]}
    root = massive_dir(tmp_path, lines)
    path = root / "data" / "fr-FR.jsonl"
    recs = path.read_text(encoding="utf-8").splitlines()
    bad = json.loads(recs[1])
    bad["annot_utt"] = annot
    recs[1] = json.dumps(bad)
    path.write_text("\n".join(recs) + "\n", encoding="utf-8")
    code, _, err = run(["massive", "--massive-dir", root, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"fr-FR.jsonl:2: field 'annot_utt': {problem}" in err
    assert not (tmp_path / "out").exists()


def test_massive_rows_per_partition_with_labels_from_the_markup(tmp_path, capsys):
    root = massive_dir(tmp_path)
    code, out, err = run(["massive", "--massive-dir", root, "--locales", "en-US", "ja-JP", "--out", tmp_path / "o"],
                         capsys)
    assert code == 0, err
    rows = {s: read_manifest(tmp_path / "o" / f"{s}.jsonl") for s in ("train", "devel", "test")}
    assert [len(rows[s]) for s in ("train", "devel", "test")] == [3, 2, 3]
    assert all(r["audio"] is None for rs in rows.values() for r in rs)
    r = next(r for r in rows["devel"] if r["id"] == "massive-en-US-2")
    assert (r["lang"], r["locale"], r["scenario"], r["action"]) == ("en", "en-US", "play", "music")
    assert r["text"] == "play guns n' roses on mike's speaker"
    assert r["entities"] == [{"type": "artist_name", "filler": "guns n' roses"},
                             {"type": "device_type", "filler": "mike's speaker"}]
    ja = next(r for r in rows["train"] if r["locale"] == "ja-JP")
    assert ja["entities"] == [{"type": "date", "filler": "今週"}, {"type": "time", "filler": "午前五時"}]
    assert "en,ja" in out


def test_massive_markup_that_disagrees_with_utt_is_an_error(tmp_path, capsys):
    root = massive_dir(tmp_path, {"en-US": MASSIVE_LINES["en-US"]})
    path = root / "data" / "en-US.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    recs[0]["utt"] = "wake me up at six am this week"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, _, err = run(["massive", "--massive-dir", root, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "en-US.jsonl:1: field 'annot_utt'" in err and "differs from utt" in err


# ------------------------------------------------------------------------------- Speech-MASSIVE, ITALIC

def tone(path, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)


def export_split(path, recs):
    """Speech-MASSIVE / ITALIC rows in the JSONL export form: dataset fields plus an audio file path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(recs):
            name = f"audio/{path.stem}-{i}.wav"
            tone(path.parent / name, 0.5 + 0.25 * i)
            f.write(json.dumps({**rec, "audio": name}, ensure_ascii=False) + "\n")


def smassive_rec(mid, annot, speaker):
    utt = prepare.annot_text(prepare.parse_annot(annot))
    # Speech-MASSIVE keeps class indices in scenario/intent_idx and the names in *_str.
    return {"id": mid, "locale": "fr-FR", "partition": "dev", "scenario": 3, "scenario_str": "alarm",
            "intent_idx": 11, "intent_str": "alarm_set", "utt": utt, "annot_utt": annot, "speaker_id": speaker}


def test_speech_massive_export_gives_one_transcript_per_utterance_and_one_speech_row_per_recording(tmp_path, capsys):
    root = tmp_path / "sm"
    a, b = "réveille-moi à [time : sept heures]", "mets une alarme [date : demain]"
    export_split(root / "fr-FR" / "train_115.jsonl", [smassive_rec("1", a, "s1"), smassive_rec("1", a, "s2")])
    export_split(root / "fr-FR" / "validation.jsonl", [smassive_rec("2", b, "s3")])
    export_split(root / "fr-FR" / "test.jsonl", [smassive_rec("3", b, "s4"), smassive_rec("4", a, "s4")])
    code, out, err = run(["speech-massive", "--speech-massive-dir", root, "--few-shot", "--check-audio",
                          "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    train = read_manifest(tmp_path / "o" / "train.jsonl", check_audio_exists=True)
    assert [r["audio"] is None for r in train] == [True, False, False]
    assert {r["speaker"] for r in train[1:]} == {"s1", "s2"} and {r["utt_id"] for r in train[1:]} == {train[0]["id"]}
    assert (train[0]["scenario"], train[0]["action"], train[0]["entities"]) == \
        ("alarm", "set", [{"type": "time", "filler": "sept heures"}])
    assert "train_115" in out
    # --few-shot off: the full train split is required and its absence is explained
    code, _, err = run(["speech-massive", "--speech-massive-dir", root, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "fr-FR split 'train' not found" in err and "train.jsonl" in err and "--few-shot" in err


def test_speech_massive_file_that_is_not_parquet_is_named(tmp_path, capsys):
    """(The parquet form itself is tested in tests/test_prepare_parquet.py.)"""
    (tmp_path / "sm" / "fr-FR").mkdir(parents=True)
    (tmp_path / "sm" / "fr-FR" / "validation-00000.parquet").write_bytes(b"PAR1")
    export_split(tmp_path / "sm" / "fr-FR" / "train_115.jsonl", [smassive_rec("1", "mets une alarme [date : demain]", "s")])
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "sm", "--few-shot", "--out", tmp_path / "o"],
                       capsys)
    assert code == 2 and "validation-00000.parquet: cannot read it as parquet" in err
    assert not (tmp_path / "o").exists()


def test_speech_massive_missing_folder_is_a_message_and_exit_2_not_a_traceback(tmp_path, capsys):
    code, _, err = run(["speech-massive", "--speech-massive-dir", tmp_path / "nowhere", "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{tmp_path / 'nowhere'}: --speech-massive-dir is not a folder" in err


@pytest.mark.parametrize("argv, message", [
    (["massive", "--massive-dir", "{d}", "--locales", "it-IT"], "it-IT.jsonl: not found"),
    (["massive", "--massive-dir", "{d}"], "no <locale>.jsonl files"),
    (["italic", "--italic-dir", "{d}", "--massive-dir", "{d}"], "--italic-dir is not a folder"),
    (["slurp", "--annotations", "{d}", "--audio-dir", "{d}"], "train.jsonl: not found"),
    (["demo", "--demo-dir", "{d}"], "train.jsonl: cannot open"),
])
def test_every_corpus_given_a_missing_folder_exits_2_with_a_message(tmp_path, capsys, argv, message):
    missing = str(tmp_path / "nowhere")
    code, _, err = run([a.replace("{d}", missing) for a in argv] + ["--out", tmp_path / "o"], capsys)
    assert code == 2 and err.startswith("prepare.py: error: ") and message in err


def test_skip_missing_audio_that_leaves_a_split_without_recordings_warns_with_counts(tmp_path, capsys):
    root = tmp_path / "sm"
    a, b = "réveille-moi à [time : sept heures]", "mets une alarme [date : demain]"
    export_split(root / "fr-FR" / "train_115.jsonl", [smassive_rec("1", a, "s1"), smassive_rec("2", b, "s2")])
    export_split(root / "fr-FR" / "validation.jsonl", [smassive_rec("3", b, "s3")])
    export_split(root / "fr-FR" / "test.jsonl", [smassive_rec("4", b, "s4"), smassive_rec("5", a, "s5")])
    for clip in ("test-0.wav", "test-1.wav", "train_115-1.wav"):
        (root / "fr-FR" / "audio" / clip).unlink()
    code, out, err = run(["speech-massive", "--speech-massive-dir", root, "--few-shot", "--skip-missing-audio",
                          "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "warning: split 'test' has no recordings left" in err and "all 2 of its speech rows" in err
    assert "only its 2 transcript rows remain" in err and "split 'train'" not in err
    assert "dropped 3 speech rows whose audio is missing (train 1 of 2, test 2 of 2)" in out


# ---------------------------------------------------------------------------------------------- demo

def test_demo_corpus_loads_with_unseen_devel_and_test_and_its_audio_decodes(tmp_path, capsys):
    code, out, err = run(["demo", "--out", tmp_path / "demo"], capsys)
    assert code == 0, err
    rows = {s: read_manifest(tmp_path / "demo" / f"{s}.jsonl", check_audio_exists=True)
            for s in ("train", "devel", "test")}
    texts = {s: {r["text"] for r in rs} for s, rs in rows.items()}
    assert not texts["devel"] & texts["train"] and not texts["test"] & texts["train"]
    assert not texts["devel"] & texts["test"]
    for s, rs in rows.items():
        assert {r["lang"] for r in rs} == {"en", "fr"}
        assert any(r["audio"] is None for r in rs) and any(r["audio"] is not None for r in rs)
        assert len({(r["scenario"], r["action"]) for r in rs}) == 10
    for r in rows["train"] + rows["devel"] + rows["test"]:
        if r["audio"] is not None:
            assert os.path.isabs(r["audio"])
            x, sr = sf.read(r["audio"], dtype="float32")
            assert sr == 16000 and 0.5 < len(x) / sr < 4.0 and np.abs(x).max() > 0.05


def tiny_templates(tmp_path, seed, extra_test=1):
    spec = json.loads((REPO / "data" / "demo" / "templates.json").read_text(encoding="utf-8"))
    spec["seed"] = seed
    spec["utterances_per_intent"] = 4
    spec["heldout_per_intent"] = {"devel": 1, "test": 1}
    spec["extra_test"] = {**spec["extra_test"], "utterances_per_intent": extra_test}
    if not extra_test:
        del spec["extra_test"]
    spec["languages"] = {lang: {**ls, "templates": dict(list(ls["templates"].items())[:2])}
                         for lang, ls in spec["languages"].items()}
    path = tmp_path / f"templates-{seed}-{extra_test}.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng CLI not installed")
def test_demo_regeneration_is_deterministic_given_the_seed(tmp_path, capsys):
    runs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        code, _, err = run(["demo", "--regenerate", "--demo-dir", tmp_path / name,
                            "--templates", tiny_templates(tmp_path, seed)], capsys)
        assert code == 0, err
        runs.append(tmp_path / name)
    a, b, c = ([(p / f"{s}.jsonl").read_bytes() for s in ("train", "devel", "test")] for p in runs)
    assert a == b and a != c
    for r in read_manifest(runs[0] / "test.jsonl"):
        if r["audio"] is not None:
            twin = runs[1] / "audio" / Path(r["audio"]).name
            np.testing.assert_array_equal(sf.read(r["audio"])[0], sf.read(twin)[0])
    assert sorted(os.listdir(runs[0])) == ["audio", "devel.jsonl", "test.jsonl", "train.jsonl"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng CLI not installed")
def test_extra_test_utterances_leave_every_earlier_row_as_it_was_and_are_texts_no_split_had(tmp_path, capsys):
    # The bundled test split was enlarged this way after models and figures were made from train and devel.
    for name, extra in (("plain", 0), ("extended", 3)):
        code, _, err = run(["demo", "--regenerate", "--demo-dir", tmp_path / name,
                            "--templates", tiny_templates(tmp_path, 1, extra_test=extra)], capsys)
        assert code == 0, err
    plain, extended = ({s: read_manifest(tmp_path / name / f"{s}.jsonl") for s in ("train", "devel", "test")}
                       for name in ("plain", "extended"))
    for s in ("train", "devel"):
        assert (tmp_path / "plain" / f"{s}.jsonl").read_bytes() == (tmp_path / "extended" / f"{s}.jsonl").read_bytes()
    n = len(plain["test"])
    assert [r["id"] for r in extended["test"][:n]] == [r["id"] for r in plain["test"]]
    added = extended["test"][n:]
    transcripts = [r for r in added if r["audio"] is None]
    # 2 languages x 2 intents x 3, each spoken once; the texts are new to the corpus and to each other
    assert len(transcripts) == 12 and len(added) == 24
    assert sorted(r["utt_id"] for r in added if r["audio"]) == sorted(r["id"] for r in transcripts)
    earlier = {r["text"] for rows in plain.values() for r in rows}
    assert len({r["text"] for r in transcripts}) == 12 and not {r["text"] for r in transcripts} & earlier
    assert len({r["id"] for rows in extended.values() for r in rows}) == sum(map(len, extended.values()))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng CLI not installed")
@pytest.mark.parametrize("extra, message", [({"utterances_per_intent": 2, "speech_rows_per_utterance": 1},
                                             "extra_test: missing required field 'seed'"),
                                            ({"seed": 1, "utterances_per_intent": 2, "speech_rows_per_utterance": 5},
                                             "speech_rows_per_utterance in 1..4")])
def test_bad_extra_test_is_an_error_naming_the_field_and_nothing_is_written(tmp_path, capsys, extra, message):
    path = tiny_templates(tmp_path, 1)
    spec = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**spec, "extra_test": extra}), encoding="utf-8")
    code, _, err = run(["demo", "--regenerate", "--demo-dir", tmp_path / "d", "--templates", path], capsys)
    assert code == 2 and message in err and str(path) in err
    assert os.listdir(tmp_path / "d") == []


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng CLI not installed")
@pytest.mark.parametrize("field, value, message", [
    ("seed", None, "missing required field 'seed'"),
    ("speech_rows_per_utterance", {"train": 9, "devel": 1, "test": 1}, "speech_rows_per_utterance.train: expected 0..4"),
    ("heldout_per_intent", {"devel": 1}, "heldout_per_intent: missing required field 'test'"),
    ("languages", {"en": {"voices": ["en-us"], "values": {}, "templates": {"alarm_set": ["wake me at {time}"]}}},
     "languages.en.templates.alarm_set: slot '{time}' has no non-empty list in the language's 'values'"),
])
def test_a_broken_templates_file_is_an_error_naming_the_field_before_any_audio(tmp_path, capsys, field, value, message):
    path = tiny_templates(tmp_path, 1)
    spec = json.loads(path.read_text(encoding="utf-8"))
    if value is None:
        del spec[field]
    else:
        spec[field] = value
    path.write_text(json.dumps(spec), encoding="utf-8")
    code, _, err = run(["demo", "--regenerate", "--demo-dir", tmp_path / "d", "--templates", path], capsys)
    assert code == 2 and message in err and str(path) in err
    assert os.listdir(tmp_path / "d") == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng CLI not installed")
def test_bundled_demo_corpus_is_what_its_templates_produce(tmp_path, capsys):
    code, _, err = run(["demo", "--regenerate", "--demo-dir", tmp_path / "d",
                        "--templates", REPO / "data" / "demo" / "templates.json"], capsys)
    assert code == 0, err
    for s in ("train", "devel", "test"):
        assert (tmp_path / "d" / f"{s}.jsonl").read_bytes() == (REPO / "data" / "demo" / f"{s}.jsonl").read_bytes()


def test_a_killed_runs_staging_folders_are_removed_by_the_next_run_and_no_others(tmp_path, capsys):
    # kill -9 skips every cleanup: a corpus's worth of staged audio would stay next to --out for good
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "synth"
    left = [tmp_path / f".synth.{dead.pid}.abcd1234.tmp", tmp_path / f".synth.{dead.pid}.efgh5678.old"]
    kept = [tmp_path / f".synth.{os.getppid()}.abcd1234",  # a live process's stage
            tmp_path / f".synth.5.{dead.pid}.abcd1234.tmp",  # the stage of another --out, named "synth.5"
            tmp_path / ".synth.notes"]
    for d in left + kept:
        d.mkdir()
    rows = [r for r in prepare.read_manifest(REPO / "data" / "demo" / "devel.jsonl") if r["audio"]][:1]
    prepare.write_manifest(tmp_path / "one.jsonl", [{**r, "audio": str(REPO / "data" / "demo" / r["audio"])}
                                                    for r in rows])
    assert run(["synth", "--manifest", tmp_path / "one.jsonl", "--out", out], capsys)[0] == 0
    assert not any(d.exists() for d in left) and all(d.is_dir() for d in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".synth.")) == sorted(d.name for d in kept)


def test_help_lists_every_corpus():
    out = subprocess.run([sys.executable, "prepare.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True)
    for corpus in ("slurp", "massive", "speech-massive", "italic", "demo"):
        assert corpus in out.stdout
