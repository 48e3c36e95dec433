"""grid.py: the paper's experiment grid as train.py / infer.py / report.py commands.

Fast tests check the command lines (--dry-run) and each cross-lingual setting's --train-manifest entries, read
back through train.py's own parser and epoch plan. The slow test runs a reduced grid for real (tiny model, a
4-utterance corpus cut from data/demo, text-only + direct + oracle, one fraction, two seeds) and checks the
layout, that a rerun skips every finished cell, that deleting one pred.jsonl redoes only that cell, and that the
report's numbers are score.py's on the same prediction files.
"""
import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import grid
import report
import score
import train
from model.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"


def _dry_run(capsys, *argv):
    assert grid.main(["--dry-run", *argv]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def _entries(cmd):
    """The --train-manifest values of a train.py command line."""
    at = cmd.index("--train-manifest") + 1
    end = next((i for i in range(at, len(cmd)) if cmd[i].startswith("--")), len(cmd))
    return cmd[at:end]


# ----------------------------------------------------------------------------------------------------------------
# Command construction

def test_dry_run_builds_one_train_and_infer_per_cell_with_seed_flags_and_text_only_at_p0(capsys, tmp_path):
    cmds = _dry_run(capsys, "--corpus-dir", "corpus", "--grid", str(tmp_path / "g"), "--fractions", "0.05", "0.5",
                    "0.50", "--seeds", "0", "3", "--oracle", "--epochs", "2", "--num-beams", "1",
                    "--", "--fsdp", "8", "--remat", "full")
    trains = [c for c in cmds if c[1].endswith("train.py")]
    infers = [c for c in cmds if c[1].endswith("infer.py")]
    reports = [c for c in cmds if c[1].endswith("report.py")]
    # per seed: text-only once + {direct, curriculum} x {0.05, 0.5} (0.50 is the same fraction) = 5 trainings,
    # and their 5 decodings + the oracle's
    assert (len(trains), len(infers), len(reports)) == (10, 12, 1)
    g = tmp_path / "g"
    for cmd in trains:
        scheme, p, seed = _flag(cmd, "--scheme"), float(_flag(cmd, "--speech-fraction")), int(_flag(cmd, "--seed"))
        assert _flag(cmd, "--subset-seed") == str(seed) and seed in (0, 3)
        assert (scheme == "text-only") == (p == 0)
        assert _flag(cmd, "--run-dir") == str(g / scheme / report.fraction_name(p) / f"seed{seed}" / "run")
        assert _entries(cmd) == [f"{Path('corpus') / 'train.jsonl'}:{p:g}"]
        assert _flag(cmd, "--epochs") == "2" and cmd[-4:] == ["--fsdp", "8", "--remat", "full"]
    assert {(_flag(c, "--scheme"), _flag(c, "--speech-fraction")) for c in trains} == {
        ("text-only", "0"), ("direct", "0.05"), ("direct", "0.5"), ("curriculum", "0.05"), ("curriculum", "0.5")}
    # every decoding is of the filtered speech test set, with the model its own run exported
    for cmd in infers:
        assert _flag(cmd, "--manifest") == str(g / "test_speech.jsonl") and _flag(cmd, "--num-beams") == "1"
        assert "--fsdp" not in cmd
    oracle = [c for c in infers if "/oracle/" in _flag(c, "--out")]
    assert [(_flag(c, "--model"), _flag(c, "--out")) for c in oracle] == [
        (str(g / "text-only" / "p0" / f"seed{k}" / "run" / "hf"), str(g / "oracle" / "p0" / f"seed{k}" / "pred.jsonl"))
        for k in (0, 3)]
    assert all(_flag(c, "--input") == "text" for c in oracle)
    assert not any("--input" in c for c in infers if c not in oracle)
    # each model's decoding comes after its training; the report comes last
    flat = [(c[1].rsplit("/", 1)[-1], _flag(c, "--run-dir") if "--run-dir" in c else _flag(c, "--model"))
            for c in cmds[:-1]]
    for k, (script, where) in enumerate(flat):
        if script == "infer.py":
            assert ("train.py", str(Path(where).parent)) in flat[:k]
    assert reports[0] == reports[0][:2] + ["--grid", str(g), "--gold", str(g / "test_speech.jsonl"),
                                           "--out", str(tmp_path / "g-report")] and cmds[-1] == reports[0]


def test_dry_run_without_oracle_or_text_only_has_neither(capsys, tmp_path):
    cmds = _dry_run(capsys, "--corpus-dir", "c", "--grid", str(tmp_path / "g"), "--fractions", "1.0",
                    "--seeds", "0", "--schemes", "curriculum")
    assert [(c[1].rsplit("/", 1)[-1], _flag(c, "--run-dir" if "--run-dir" in c else "--out")) for c in cmds[:2]] == [
        ("train.py", str(tmp_path / "g" / "curriculum" / "p1" / "seed0" / "run")),
        ("infer.py", str(tmp_path / "g" / "curriculum" / "p1" / "seed0" / "pred.jsonl"))]
    assert len(cmds) == 3


@pytest.mark.parametrize("argv, message", [
    (["--corpus-dir", "c", "--", "--seed", "4"], "--seed after `--`"),
    (["--corpus-dir", "c", "--", "--train_manifest=x"], "--train-manifest after `--`"),
    (["--corpus-dir", "c", "--oracle", "--schemes", "direct"], "keep text-only"),
    (["--corpus-dir", "c", "--fractions", "0"], "--fractions: 0 is not in (0, 1]"),
    (["--corpus-dir", "c", "--fractions", "1.5"], "--fractions: 1.5 is not in (0, 1]"),
    (["--setting", "few-shot-T", "--target-dirs", "t"], "needs --source-dir"),
    (["--setting", "few-shot-T+M", "--source-dir", "s", "--target-dirs", "t"], "needs --massive-dir"),
    (["--setting", "zero-shot", "--source-dir", "s"], "needs --target-dirs"),
    (["--source-dir", "s"], "give --corpus-dir"),
])
def test_contradictory_flags_are_an_error_naming_the_flag(capsys, tmp_path, argv, message):
    assert grid.main(["--grid", str(tmp_path / "g"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_missing_manifest_is_named_before_anything_runs(capsys, tmp_path):
    assert grid.main(["--grid", str(tmp_path / "g"), "--corpus-dir", str(tmp_path / "nowhere")]) == 2
    assert f"missing manifest(s): {tmp_path / 'nowhere' / 'train.jsonl'}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Cross-lingual settings

def _row(id_, lang, audio=None):
    return {"id": id_, "lang": lang, "text": f"text {id_}", "audio": audio, "scenario": "alarm", "action": "set",
            "entities": []}


def _corpus(folder: Path, prefix: str, lang: str, n_utt: int, speech_per_utt: int, splits=("train", "test")):
    """A manifest folder of n_utt transcripts, each with speech_per_utt recordings (paths need not exist)."""
    for split in splits:
        rows = []
        for u in range(n_utt):
            rows.append(_row(f"{prefix}-{split}-{u}", lang))
            rows += [_row(f"{prefix}-{split}-{u}-{k}.wav", lang, f"{prefix}-{u}-{k}.wav") for k in range(speech_per_utt)]
        write_manifest(folder / f"{split}.jsonl", rows)


@pytest.fixture
def xl(tmp_path):
    """Source fr (20 utterances, 1 recording each), targets de and es (5, 2 each), MASSIVE text de+es (30)."""
    _corpus(tmp_path / "src", "fr", "fr", 20, 1, ("train", "devel", "test"))
    _corpus(tmp_path / "de", "de", "de", 5, 2)
    _corpus(tmp_path / "es", "es", "es", 5, 2)
    _corpus(tmp_path / "mas", "mas", "de", 30, 0, ("train",))
    return tmp_path


# setting -> per manifest in order: (folder, transcripts used, speech rows used at p = 0.5)
EXPECTED = {
    "zero-shot": [("src", 20, 10)],
    "few-shot-T": [("src", 20, 10), ("de", 5, 0), ("es", 5, 0)],
    "few-shot-TS": [("src", 20, 10), ("de", 5, 10), ("es", 5, 10)],
    "few-shot-T+M": [("src", 20, 10), ("de", 5, 0), ("es", 5, 0), ("mas", 30, 0)],
    "no-source": [("de", 5, 5), ("es", 5, 5)],
}


@pytest.mark.parametrize("setting", grid.SETTINGS)
def test_setting_trains_on_the_documented_manifests_per_train_py_plan(capsys, xl, setting):
    argv = ["--grid", str(xl / "g"), "--setting", setting, "--target-dirs", str(xl / "de"), str(xl / "es"),
            "--fractions", "0.5", "--seeds", "0", "--schemes", "text-only", "direct", "--oracle"]
    if setting != "no-source":
        argv += ["--source-dir", str(xl / "src")]
    if setting == "few-shot-T+M":
        argv += ["--massive-dir", str(xl / "mas")]
    cmds = _dry_run(capsys, *argv)
    direct = next(c for c in cmds if c[1].endswith("train.py") and _flag(c, "--scheme") == "direct")
    text_only = next(c for c in cmds if c[1].endswith("train.py") and _flag(c, "--scheme") == "text-only")
    # train.py's own reading of the entries, and its epoch plan on these manifests
    sources = [train.parse_source(e, float(_flag(direct, "--speech-fraction"))) for e in _entries(direct)]
    assert [Path(s.path).parent.name for s in sources] == [m for m, _, _ in EXPECTED[setting]]
    plan = json.loads(subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--plan-only", "--scheme", "direct", "--epochs", "1",
         "--speech-fraction", _flag(direct, "--speech-fraction"), "--train-manifest", *_entries(direct)],
        cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert [(Path(m["path"]).parent.name, m["n_text"], m["n_p"]) for m in plan["manifests"]] == EXPECTED[setting]
    # text-only reads the same manifests (their transcripts), at p0
    assert [Path(e.rsplit(":", 1)[0]) for e in _entries(text_only)] == [Path(s.path) for s in sources]
    assert _flag(text_only, "--speech-fraction") == "0"
    # dev set: the source's devel split; scored per language on the targets' test speech
    assert _flag(direct, "--dev-manifest") == ("none" if setting == "no-source" else str(xl / "src" / "devel.jsonl"))
    assert cmds[-1][-2:] == ["--by", "lang"]


def test_test_speech_holds_exactly_the_targets_speech_rows_with_absolute_audio(xl):
    args = SimpleNamespace(setting="few-shot-TS", target_dirs=[str(xl / "de"), str(xl / "es")])
    out = xl / "g" / "test_speech.jsonl"
    assert grid.write_test_speech(args, out) == 20
    rows = read_manifest(out)
    expected = [r for d in ("de", "es") for r in read_manifest(xl / d / "test.jsonl") if r["audio"] is not None]
    assert rows == expected  # read_manifest makes both absolute: the same files
    assert all(Path(json.loads(line)["audio"]).is_absolute() for line in out.read_text().splitlines())
    before = out.stat().st_mtime_ns
    grid.write_test_speech(args, out)  # unchanged: not rewritten
    assert out.stat().st_mtime_ns == before
    assert [p.name for p in out.parent.iterdir()] == ["test_speech.jsonl"]  # no temporary left


def test_a_test_id_in_two_targets_is_an_error_naming_it(xl):
    args = SimpleNamespace(setting="zero-shot", target_dirs=[str(xl / "de"), str(xl / "de")])
    with pytest.raises(ValueError, match="duplicate id 'de-test-0-0.wav'"):
        grid.write_test_speech(args, xl / "g" / "test_speech.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# A real reduced grid

def _small_demo(folder: Path):
    """2 English + 2 French training utterances (transcript + one recording each), 2 test utterances (two
    recordings each): every training run is one optimizer step on a global batch of 8."""
    train_rows, test_rows = read_manifest(DEMO / "train.jsonl"), read_manifest(DEMO / "test.jsonl")

    def take(rows, langs):
        utts = [r["id"] for r in rows if r["audio"] is None]
        keep = {u for lang, n in langs for u in [u for u in utts if u.startswith(f"demo-{lang}-")][:n]}
        return [r for r in rows if (r["id"] if r["audio"] is None else r["utt_id"]) in keep]

    write_manifest(folder / "train.jsonl", take(train_rows, [("en", 2), ("fr", 2)]))
    write_manifest(folder / "test.jsonl", take(test_rows, [("en", 1), ("fr", 1)]))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The grid run once; every grid.run_command call recorded."""
    tmp = tmp_path_factory.mktemp("grid")
    _small_demo(tmp / "corpus")
    argv = ["--corpus-dir", str(tmp / "corpus"), "--grid", str(tmp / "g" / "demo"), "--schemes", "text-only",
            "direct", "--oracle", "--fractions", "0.5", "--seeds", "0", "1", "--epochs", "1", "--num-beams", "1",
            "--max-new-tokens", "8", "--infer-flag=--dtype", "--infer-flag=float32",
            "--", "--per-device-batch", "8", "--grad-accum", "1", "--no-progress"]
    calls = []
    real = grid.run_command

    def spy(cmd):
        calls.append(cmd)
        real(cmd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # the subprocesses: one device
        # The 10 subprocesses compile the same few programs again and again: share JAX's persistent cache
        # (a test-time saving only; the grid itself runs as a user would run it).
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp / "jax-cache"))
        mp.setattr(grid, "run_command", spy)
        assert grid.main(argv) == 0
        first = list(calls)
        yield SimpleNamespace(tmp=tmp, grid=tmp / "g" / "demo", argv=argv, first=first, calls=calls,
                              run=lambda: grid.main(argv))


def _script(cmd):
    return Path(cmd[1]).name


CELLS = [f"{s}/seed{k}" for k in (0, 1) for s in ("text-only/p0", "direct/p0.5", "oracle/p0")]


@pytest.mark.slow
def test_grid_writes_the_pinned_layout_with_seed_and_scheme_per_cell(ran):
    g = ran.grid
    assert sorted(str(p.relative_to(g).parent) for p in g.rglob("pred.jsonl")) == sorted(CELLS)
    assert [_script(c) for c in ran.first] == ["train.py", "infer.py", "train.py", "infer.py", "infer.py"] * 2 + [
        "report.py"]
    gold_speech = [r["id"] for r in read_manifest(ran.tmp / "corpus" / "test.jsonl") if r["audio"] is not None]
    assert [r["id"] for r in read_manifest(g / "test_speech.jsonl")] == gold_speech and len(gold_speech) == 4
    for cell in ("text-only/p0", "direct/p0.5"):
        for k in (0, 1):
            config = json.loads((g / cell / f"seed{k}" / "run" / "config.json").read_text())
            assert (config["args"]["seed"], config["args"]["subset_seed"]) == (k, k)
            # 4 transcripts + round(0.5 * 4) recordings for direct; none for text-only
            assert config["plan"]["n_p"] == (2 if cell.startswith("direct") else 0)
    for k in (0, 1):
        preds = {cell: [json.loads(l) for l in (g / cell / f"seed{k}" / "pred.jsonl").read_text().splitlines()]
                 for cell in ("text-only/p0", "oracle/p0")}
        assert [p["id"] for p in preds["oracle/p0"]] == gold_speech
        # the oracle decodes the transcripts (no audio in its prompts); the others decode the audio
        assert all("<|AUDIO|>" not in p["prompt"] for p in preds["oracle/p0"])
        assert all("<|AUDIO|>" in p["prompt"] for p in preds["text-only/p0"])
    assert (ran.tmp / "g" / "demo-report" / "table.md").is_file()


@pytest.mark.slow
def test_rerun_skips_every_finished_cell_and_only_reports(ran):
    ran.calls.clear()
    mtimes = {p: p.stat().st_mtime_ns for p in ran.grid.rglob("pred.jsonl")}
    assert ran.run() == 0
    assert [_script(c) for c in ran.calls] == ["report.py"]
    assert {p: p.stat().st_mtime_ns for p in ran.grid.rglob("pred.jsonl")} == mtimes


@pytest.mark.slow
def test_deleting_one_pred_redoes_only_that_cells_decoding(ran):
    pred = ran.grid / "direct" / "p0.5" / "seed1" / "pred.jsonl"
    old = pred.read_text()
    pred.unlink()
    ran.calls.clear()
    assert ran.run() == 0
    assert [(_script(c), c[c.index("--out") + 1]) for c in ran.calls[:-1]] == [("infer.py", str(pred))]
    assert _script(ran.calls[-1]) == "report.py"
    assert pred.read_text() == old  # the same finished model, decoded again


@pytest.mark.slow
def test_report_table_equals_score_py_on_the_same_prediction_files(ran):
    gold_path = ran.grid / "test_speech.jsonl"
    gold = score.load_gold(gold_path)
    ids = {r["id"] for r in gold}
    out = ran.tmp / "g" / "demo-report"
    table = {(r["scheme"], float(r["speech_fraction"]), r["metric"]): r
             for r in csv.DictReader(open(out / "table.csv")) if r["group"] == "all"}
    results = {}
    for cell, fraction in (("text-only/p0", 0.0), ("direct/p0.5", 0.5), ("oracle/p0", 0.0)):
        preds = [score.load_predictions(ran.grid / cell / f"seed{k}" / "pred.jsonl", ids) for k in (0, 1)]
        results[(cell.split("/")[0], fraction)] = result = score.evaluate(gold, preds)
        for metric in report.DEFAULT_METRICS:
            row = table[(cell.split("/")[0], fraction, metric)]
            assert int(row["runs"]) == 2
            assert float(row["mean"]) == pytest.approx(result["mean"][metric], abs=1e-12)
            assert float(row["ci95"]) == pytest.approx(result["ci95"][metric], abs=1e-12)
    assert len(table) == 3 * len(report.DEFAULT_METRICS)
    runs = {cell: [(f"seed{k}", ran.grid / cell[0] / report.fraction_name(cell[1]) / f"seed{k}" / "pred.jsonl")
                   for k in (0, 1)] for cell in results}
    cells = report.build_cells(results, runs, report.DEFAULT_METRICS)
    assert (out / "table.md").read_text() == report.format_markdown(cells, f"sluice report: {ran.grid}")
