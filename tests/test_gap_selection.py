"""--subset-selection gap: the speech subset ranked by the text-speech gap of a reference model (the shipped
miniature) on espeak-ng speech of the transcripts (prepare.py synth)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import prepare
import train

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "train.jsonl"
INTENTS = ("weather_query", "alarm_set", "iot_lights_on", "email_query")
MUTED = "alarm_set"  # its synthetic speech is replaced by 3 s of silence: nothing for the reference model to hear


def test_gap_order_shares_places_among_intents_by_median_gap_so_one_outlier_row_buys_its_intent_nothing():
    rows = [{"id": f"{k}{i}", "scenario": k, "action": "x"} for k in "abc" for i in range(4)]
    gaps = {"a0": 100.0, "a1": 0.0, "a2": 0.0, "a3": 0.0,  # a: one outlier, median 0
            "b0": 5.0, "b1": 5.0, "b2": 5.0, "b3": 5.0,    # b: median 5
            "c0": 2.0, "c1": 2.0, "c2": 2.0, "c3": 2.0}    # c: median 2
    # D'Hondt on medians: b 5, b 2.5, c 2, b 1.67, b 1.25, then c, c, c (b exhausted), then a (median 0)
    assert train.gap_order(rows, gaps) == ["b0", "b1", "c0", "b2", "b3", "c1", "c2", "c3", "a0", "a1", "a2", "a3"]
    # ranking rows by their own gap instead would have spent the first place on a's outlier


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 English recordings of 4 intents with their transcripts, and their synthetic speech, MUTED's as noise."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    root = tmp_path_factory.mktemp("gap")
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    speech = []
    for intent in INTENTS:
        speech += [r for r in rows if r["audio"] and r["lang"] == "en"
                   and f"{r['scenario']}_{r['action']}" == intent][:4]
    texts = {r["utt_id"] for r in speech}
    chosen = [r for r in rows if r["id"] in texts] + [{**r, "audio": str(DEMO.parent / r["audio"])} for r in speech]
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    synthetic = prepare.synthesize(manifest, root / "synth")
    for row in synthetic:
        if f"{row['scenario']}_{row['action']}" == MUTED:
            sf.write(root / "synth" / row["audio"], np.zeros(48000, np.float32), 16000)
    return {"manifest": manifest, "synth": root / "synth" / prepare.SYNTH_MANIFEST,
            "muted": sorted(r["id"] for r in speech if f"{r['scenario']}_{r['action']}" == MUTED)}


def plan(corpus, fraction, *flags):
    args = train.parse_args(["--train-manifest", str(corpus["manifest"]), "--scheme", "direct", "--speech-fraction",
                             str(fraction), "--global-batch", "4", "--per-device-batch", "4", *flags])
    sources, manifests = train.load_sources(args)
    return train.build_plan(args, sources, manifests, 4)


def test_gap_selection_puts_the_intent_whose_synthetic_speech_is_unintelligible_first(corpus, monkeypatch):
    # The muted intent's median gap is about 3x the next one's (measured: 0.96 vs 0.32 nats per answer token), so
    # D'Hondt gives it the first 2 places (its third ties with the next intent's first) and all 4 within 8.
    gap = ("--subset-selection", "gap", "--gap-speech", str(corpus["synth"]))
    quarter = plan(corpus, 2 / 16, *gap)
    assert len(quarter.subset_keys) == 2 and {k[1] for k in quarter.subset_keys} < set(corpus["muted"])
    random = plan(corpus, 2 / 16)
    assert not {k[1] for k in random.subset_keys} < set(corpus["muted"])
    # nested: a larger fraction keeps the smaller one's rows, in order
    half = plan(corpus, 0.5, *gap)
    assert [k[1] for k in half.subset_keys][:2] == [k[1] for k in quarter.subset_keys]
    assert set(corpus["muted"]) < {k[1] for k in half.subset_keys}
    record = quarter.to_json()["subset_selection"]
    assert record["method"] == "gap" and record["reference"].endswith("models/mini")
    ranking = json.loads(Path(record["manifests"][0]["ranking"]).read_text())
    muted_gap = min(ranking["gaps"][i] for i in corpus["muted"])
    assert muted_gap > max(g for i, g in ranking["gaps"].items() if i not in corpus["muted"])
    # computed once: the same inputs read the cached ranking (no model runs) ...
    monkeypatch.setattr(train, "gap_scores", lambda *a, **k: pytest.fail("recomputed a cached ranking"))
    assert plan(corpus, 2 / 16, *gap).subset_keys == quarter.subset_keys
    # ... and a changed synthetic recording is a new fingerprint, never the old ranking
    monkeypatch.undo()
    one = corpus["synth"].parent / json.loads(corpus["synth"].read_text().splitlines()[0])["audio"]
    audio, rate = sf.read(one)
    sf.write(one, audio[::-1].copy(), rate)
    changed = plan(corpus, 2 / 16, *gap).to_json()["subset_selection"]["manifests"][0]["fingerprint"]
    assert changed != record["manifests"][0]["fingerprint"]


def test_gap_selection_without_synthetic_speech_for_every_recording_is_refused_naming_the_file(corpus, tmp_path):
    lines = corpus["synth"].read_text().splitlines()
    short = tmp_path / "synthetic.jsonl"
    base = corpus["synth"].parent
    short.write_text("".join(json.dumps({**json.loads(l), "audio": str(base / json.loads(l)["audio"])}) + "\n"
                             for l in lines[1:]))
    with pytest.raises(train.InputError, match=r"synthetic.jsonl: no synthetic recording for 1 of the 16"):
        plan(corpus, 0.25, "--subset-selection", "gap", "--gap-speech", str(short))
    with pytest.raises(train.InputError, match="one synthetic-speech manifest per --train-manifest"):
        plan(corpus, 0.25, "--subset-selection", "gap")


def test_a_manifest_with_nothing_to_choose_takes_none_and_one_with_a_subset_to_choose_needs_its_speech(corpus,
                                                                                                     tmp_path):
    texts = tmp_path / "texts.jsonl"  # transcripts only, like MASSIVE text in a cross-lingual setting
    texts.write_text("".join(line + "\n" for line in corpus["manifest"].read_text().splitlines()
                             if json.loads(line)["audio"] is None))
    args = train.parse_args(["--train-manifest", f"{corpus['manifest']}:0.125", f"{texts}:0", "--scheme", "direct",
                             "--subset-selection", "gap", "--gap-speech", str(corpus["synth"]), "none"])
    sources, manifests = train.load_sources(args)
    p = train.build_plan(args, sources, manifests, 4)
    assert {k[1] for k in p.subset_keys} < set(corpus["muted"]) and len(p.subset_keys) == 2
    args = train.parse_args(["--train-manifest", f"{corpus['manifest']}:0.125", "--scheme", "direct",
                             "--subset-selection", "gap", "--gap-speech", "none"])
    sources, manifests = train.load_sources(args)
    with pytest.raises(train.InputError, match="leaves a subset to choose"):
        train.build_plan(args, sources, manifests, 4)
