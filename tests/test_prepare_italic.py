"""prepare.py italic: ITALIC as documented (columns utt, audio, intent, speaker, ...; no id) gets its slot
markup from MASSIVE it-IT by the utterance text. The join is reported (exact / normalised / ambiguous /
unjoined), ITALIC's intent is checked row by row, and every row gets a stable id. The parquet form is
tested in tests/test_prepare_parquet.py; these use the JSONL export form (audio as file paths)."""
import contextlib
import io
import json

import numpy as np
import pytest
import soundfile as sf

import prepare
from model.manifest import read_manifest

# MASSIVE it-IT: (id, partition, intent, annot_utt). Ids 13-15 are one text with three label sets, as
# MASSIVE has (the same utterance written by two workers, or annotated twice).
MASSIVE_IT = [
    ("10", "train", "alarm_set", "svegliami alle [time : sette] dell'[date : indomani]"),
    ("11", "dev", "weather_query", "che tempo fa all'[place_name : isola d'elba]"),
    ("12", "test", "weather_query", "è previsto vento a [place_name : forlì] [date : domani]"),
    ("13", "train", "calendar_set", "ricordami la [event_name : riunione] di [date : domani]"),
    ("14", "test", "calendar_set", "ricordami la riunione di [date : domani]"),
    ("15", "test", "calendar_query", "ricordami la riunione di [date : domani]"),
]

# ITALIC rows as its card documents them: (utt, intent, speaker), the texts as a reader's transcript
# may differ from MASSIVE's: capitals, a typographic apostrophe, an accented capital, a double space.
ITALIC = {
    "train": [("Svegliami alle sette dell’indomani", "alarm_set", "spk1"),
              ("ricordami la riunione di domani", "calendar_query", "spk2")],
    "validation": [("che tempo fa all'isola d'elba", "weather_query", "spk3")],
    "test": [("È previsto  vento a Forlì domani", "weather_query", "spk4"),
             ("ricordami la riunione di domani", "calendar_set", "spk5")],
}


def run(argv):
    """prepare.main in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = prepare.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def write_massive_it(root, recs=MASSIVE_IT):
    (root / "data").mkdir(parents=True)
    with open(root / "data" / "it-IT.jsonl", "w", encoding="utf-8") as f:
        for mid, part, intent, annot in recs:
            f.write(json.dumps({"id": mid, "locale": "it-IT", "partition": part, "scenario": intent.split("_")[0],
                                "intent": intent, "utt": prepare.annot_text(prepare.parse_annot(annot)),
                                "annot_utt": annot, "worker_id": "3"}, ensure_ascii=False) + "\n")
    return root


def italic_rec(utt, intent, speaker):
    """One row with ITALIC's documented columns (audio added by write_italic)."""
    return {"utt": utt, "intent": intent, "speaker": speaker, "age": "31", "is_native": "yes", "gender": "female",
            "region": "Emilia-Romagna", "nationality": "italiana", "lisp": "no", "education": "laurea",
            "environment": "silenzioso", "device": "smartphone"}


def write_italic(cfg, splits=ITALIC, extra=None):
    """An ITALIC configuration folder in the JSONL export form: {split}.jsonl, audio/<split>-<i>.wav."""
    (cfg / "audio").mkdir(parents=True)
    for split, recs in splits.items():
        with open(cfg / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, rec in enumerate(recs):
                rec = italic_rec(*rec) if isinstance(rec, tuple) else rec
                sf.write(cfg / "audio" / f"{split}-{i}.wav", np.zeros(1600, np.float32), 16000)
                f.write(json.dumps({**rec, **(extra or {}), "audio": f"audio/{split}-{i}.wav"},
                                   ensure_ascii=False) + "\n")
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The fixture corpus through `prepare.py italic`, once: (output folder, stdout)."""
    tmp = tmp_path_factory.mktemp("italic")
    massive = write_massive_it(tmp / "massive")
    cfg = write_italic(tmp / "ITALIC" / "massive")
    code, out, err = run(["italic", "--italic-dir", cfg, "--massive-dir", massive, "--out", tmp / "o"])
    assert code == 0, err
    return tmp / "o", out


def split_rows(out, split):
    return read_manifest(out / f"{split}.jsonl", check_audio_exists=True)


def test_rows_without_id_get_massive_markup_by_normalised_text_and_keep_their_own_text(prepared):
    out, _ = prepared
    train = split_rows(out, "train")
    speech = train[1]
    assert speech["text"] == "Svegliami alle sette dell’indomani"  # what was read aloud, not MASSIVE's spelling
    assert (speech["scenario"], speech["action"], speech["massive_id"]) == ("alarm", "set", "10")
    assert speech["entities"] == [{"type": "time", "filler": "sette"}, {"type": "date", "filler": "indomani"}]
    test = split_rows(out, "test")
    assert test[1]["entities"] == [{"type": "place_name", "filler": "forlì"}, {"type": "date", "filler": "domani"}]


def test_ids_are_config_split_row_index_and_audio_name_with_one_transcript_per_row(prepared):
    out, _ = prepared
    assert [(r["id"], r.get("utt_id")) for r in split_rows(out, "train")] == [
        ("italic-massive-train-0", None), ("italic-massive-train-0-train-0.wav", "italic-massive-train-0"),
        ("italic-massive-train-1", None), ("italic-massive-train-1-train-1.wav", "italic-massive-train-1")]
    assert [r["id"] for r in split_rows(out, "devel")] == ["italic-massive-validation-0",
                                                          "italic-massive-validation-0-validation-0.wav"]
    assert [r.get("speaker") for r in split_rows(out, "devel")] == [None, "spk3"]


def test_ambiguous_text_takes_the_massive_row_with_its_intent_then_its_split_and_says_so(prepared):
    out, stdout = prepared
    by_intent = split_rows(out, "train")[2]  # calendar_query: only MASSIVE 15 has it
    assert (by_intent["action"], by_intent["massive_id"]) == ("query", "15")
    by_split = split_rows(out, "test")[2]  # calendar_set: 13 (train) and 14 (test) differ in entities
    assert by_split["massive_id"] == "14" and by_split["entities"] == [{"type": "date", "filler": "domani"}]
    assert "took MASSIVE id 14 over id(s) 13, 15 (different labels), by MASSIVE partition" in stdout
    assert "took MASSIVE id 15 over id(s) 13, 14 (different labels), by intent" in stdout


def test_join_report_counts_exact_normalised_ambiguous_and_unjoined(prepared):
    _, stdout = prepared
    assert ("5 rows joined to MASSIVE it-IT (5 by text): 3 exact, 2 after normalising case, accents, "
            "apostrophes, punctuation and spaces; 2 ambiguous (1 by MASSIVE partition, 1 by intent); 0 unjoined") in stdout


@pytest.mark.parametrize("italic, massive", [
    ("È previsto vento a Forlì", "è previsto vento a forlì"),   # accented capital
    ("e\u0300 previsto", "\u00e8 previsto"),                    # decomposed vs composed accent
    ("perche' no", "perché no"),                                # accent typed as an apostrophe
    ("dell’indomani", "dell'indomani"),                         # typographic apostrophe
    ("dell' indomani", "dell'indomani"),                        # elision written with a space
    ("metti  la sveglia ", "metti la sveglia"),                 # double and trailing spaces
    ("sveglia, domani!", "sveglia domani"),                     # punctuation
])
def test_join_key_equates_the_spellings_italic_and_massive_differ_in(italic, massive):
    assert prepare.join_key(italic) == prepare.join_key(massive)


@pytest.mark.parametrize("a, b", [("sveglia alle sette", "sveglia alle otto"), ("l'anno", "l'anno scorso")])
def test_join_key_keeps_different_utterances_apart(a, b):
    assert prepare.join_key(a) != prepare.join_key(b)


def cand(mid, line, intent, text, partition, entity):
    scenario, action = intent.split("_", 1)
    return {"id": mid, "line": line, "intent": intent, "scenario": scenario, "action": action, "text": text,
            "partition": partition, "entities": [{"type": "date", "filler": entity}]}


@pytest.mark.parametrize("cands, want, rule", [
    ([cand("a", 1, "alarm_set", "x", "train", "oggi"), cand("b", 2, "alarm_set", "X", "test", "oggi")], "a", None),
    ([cand("a", 1, "alarm_query", "x", "test", "oggi"), cand("b", 2, "alarm_set", "X", "train", "domani")], "b", "intent"),
    ([cand("a", 1, "alarm_set", "X", "test", "oggi"), cand("b", 2, "alarm_set", "x", "train", "domani")], "b", "exact text"),
    ([cand("a", 1, "alarm_set", "x", "train", "oggi"), cand("b", 2, "alarm_set", "x", "test", "domani")], "b",
     "MASSIVE partition"),
    ([cand("a", 2, "alarm_set", "x", "train", "oggi"), cand("b", 1, "alarm_set", "x", "train", "domani")], "b",
     "order in MASSIVE's file"),
])
def test_pick_massive_rules_apply_in_order_only_when_labels_differ(cands, want, rule):
    m, why = prepare.pick_massive(cands, "x", "alarm_set", "test")
    assert (m["id"], why) == (want, rule)


def test_unjoined_rows_stop_the_run_listed_unless_skipped_and_counted(tmp_path):
    massive = write_massive_it(tmp_path / "massive")
    splits = {**ITALIC, "test": ITALIC["test"] + [("metti la sveglia alle nove", "alarm_set", "spk6")]}
    cfg = write_italic(tmp_path / "ITALIC" / "massive", splits)
    argv = ["italic", "--italic-dir", cfg, "--massive-dir", massive, "--out", tmp_path / "o"]
    code, _, err = run(argv)
    assert code == 2 and "1 ITALIC row(s) not found in MASSIVE it-IT" in err
    assert f"{cfg / 'test.jsonl'}:3: 'metti la sveglia alle nove': no MASSIVE it-IT utterance has this text" in err
    assert "--skip-unjoined" in err and not (tmp_path / "o").exists()
    code, out, err = run(argv + ["--skip-unjoined"])
    assert code == 0, err
    assert len(split_rows(tmp_path / "o", "test")) == 4  # the two joined rows, each transcript + speech
    assert "1 unjoined (dropped by --skip-unjoined)" in out and "unjoined: " in out


def test_intent_that_disagrees_with_the_joined_massive_row_is_an_error_for_every_such_row(tmp_path):
    massive = write_massive_it(tmp_path / "massive")
    splits = {**ITALIC, "validation": [("che tempo fa all'isola d'elba", "weather_query", "spk3"),
                                       ("Che tempo fa all'isola d'Elba?", "alarm_set", "spk7")],
              "train": [("svegliami alle sette dell'indomani", "alarm_query", "spk1")]}
    cfg = write_italic(tmp_path / "ITALIC" / "massive", splits)
    code, _, err = run(["italic", "--italic-dir", cfg, "--massive-dir", massive, "--out", tmp_path / "o",
                        "--skip-unjoined"])  # skipping unjoined rows never skips a disagreement
    assert code == 2 and "2 ITALIC row(s) whose intent differs" in err
    assert f"{cfg / 'train.jsonl'}:1: field 'intent': alarm_query differs from MASSIVE's alarm_set at " \
           f"{massive / 'data' / 'it-IT.jsonl'}:1" in err
    assert f"{cfg / 'validation.jsonl'}:2: field 'intent': alarm_set differs from MASSIVE's weather_query" in err
    assert not (tmp_path / "o").exists()


def test_an_id_column_where_present_joins_by_id_and_its_text_must_match(tmp_path):
    massive = write_massive_it(tmp_path / "massive")
    splits = {"train": [{**italic_rec("svegliami alle sette dell'indomani", "alarm_set", "a"), "id": "10"}],
              "validation": [{**italic_rec("che tempo fa all'isola d'elba", "weather_query", "b"), "id": "11"},
                             {**italic_rec("che tempo fa all'isola d'elba", "weather_query", "c"), "id": "11"}],
              "test": [{**italic_rec("ricordami la riunione di domani", "calendar_set", "d"), "id": "13"}]}
    cfg = write_italic(tmp_path / "ITALIC" / "massive", splits)
    argv = ["italic", "--italic-dir", cfg, "--massive-dir", massive, "--out", tmp_path / "o"]
    code, out, err = run(argv)
    assert code == 0, err
    devel = split_rows(tmp_path / "o", "devel")  # two recordings of utterance 11: one transcript row
    assert [r["id"] for r in devel] == ["italic-it-IT-11", "italic-massive-validation-0-validation-0.wav",
                                        "italic-massive-validation-1-validation-1.wav"]
    test = split_rows(tmp_path / "o", "test")  # by id: 13's labels, no ambiguity
    assert test[0]["entities"] == [{"type": "event_name", "filler": "riunione"}, {"type": "date", "filler": "domani"}]
    assert "4 rows joined to MASSIVE it-IT (4 by id): 4 exact" in out
    (cfg / "test.jsonl").write_text((cfg / "test.jsonl").read_text(encoding="utf-8").replace('"13"', '"12"'),
                                    encoding="utf-8")
    code, _, err = run(argv)
    assert code == 2 and "MASSIVE's id '12'" in err and "is 'è previsto vento a forlì domani', another text" in err


def test_massive_dir_is_required(tmp_path, capsys):
    cfg = write_italic(tmp_path / "ITALIC" / "massive")
    with pytest.raises(SystemExit) as e:
        prepare.main(["italic", "--italic-dir", str(cfg), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--massive-dir" in capsys.readouterr().err
