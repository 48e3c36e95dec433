"""grid.py: the paper's experiment grid as train.py / infer.py / report.py commands.

Fast tests check the command lines (--dry-run) and each cross-lingual setting's --train-manifest entries, read
back through train.py's own parser and epoch plan. The slow test runs a reduced grid for real (tiny model, a
4-utterance corpus cut from data/demo, text-only + direct + oracle, one fraction, two seeds) and checks the
layout and the commands each cell records, that a rerun skips every finished cell and a rerun with other settings
refuses, that deleting one pred.jsonl redoes only that cell, and that the report's numbers are score.py's on the
same prediction files. Fast tests also drive the rerun rules with stand-ins for the stage scripts (which changes
refuse, what --redo-changed redoes), and dry runs of docs/EXPERIMENTS.md's own command lines enumerate Table 3's 22 rows
and Fig. 2's eleven targets.
"""
import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import grid
from model.answer import MAX_NEW_TOKENS
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


def _script(cmd):
    return Path(cmd[1]).name


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


def test_without_epochs_every_training_gets_the_models_own_epoch_count_written_out(capsys, tmp_path):
    # written out, so that a cell's record compares to a later command whatever the model's default is then
    model = tmp_path / "model"
    model.mkdir()
    (model / "pretraining.json").write_text(json.dumps({"finetune_defaults": {"epochs": 4}}))
    base = ("--corpus-dir", "c", "--grid", str(tmp_path / "g"), "--fractions", "0.5", "--seeds", "0")
    trains = [c for c in _dry_run(capsys, *base, "--model", str(model)) if c[1].endswith("train.py")]
    assert [_flag(c, "--epochs") for c in trains] == ["4", "4", "4"]
    trains = [c for c in _dry_run(capsys, *base, "--model", "tiny") if c[1].endswith("train.py")]
    assert [_flag(c, "--epochs") for c in trains] == ["3", "3", "3"]  # the paper's
    (model / "pretraining.json").write_text(json.dumps({"finetune_defaults": {"epochs": "many"}}))
    assert grid.main(["--dry-run", *base, "--model", str(model)]) == 2
    assert "finetune_defaults.epochs must be a positive number" in capsys.readouterr().err


def test_dry_run_without_oracle_or_text_only_has_neither(capsys, tmp_path):
    cmds = _dry_run(capsys, "--corpus-dir", "c", "--grid", str(tmp_path / "g"), "--fractions", "1.0",
                    "--seeds", "0", "--schemes", "curriculum")
    assert [(c[1].rsplit("/", 1)[-1], _flag(c, "--run-dir" if "--run-dir" in c else "--out")) for c in cmds[:2]] == [
        ("train.py", str(tmp_path / "g" / "curriculum" / "p1" / "seed0" / "run")),
        ("infer.py", str(tmp_path / "g" / "curriculum" / "p1" / "seed0" / "pred.jsonl"))]
    assert len(cmds) == 3


def test_variant_rows_run_their_scheme_with_the_variant_flags_in_their_own_cells(capsys, tmp_path):
    cmds = _dry_run(capsys, "--corpus-dir", "c", "--grid", str(tmp_path / "g"), "--fractions", "0.1", "--seeds", "2",
                    "--schemes", "curriculum+gap", "curriculum", "direct+distill-frozen")
    trains = {Path(_flag(c, "--run-dir")).parents[2].name: c for c in cmds if _script(c) == "train.py"}
    assert list(trains) == ["curriculum", "direct+distill-frozen", "curriculum+gap"]  # the report's row order
    assert _flag(trains["curriculum+gap"], "--scheme") == "curriculum"
    assert _flag(trains["curriculum+gap"], "--subset-selection") == "gap"
    assert _flag(trains["curriculum+gap"], "--gap-speech") == str(Path("c") / "synth" / "synthetic.jsonl")
    assert _flag(trains["direct+distill-frozen"], "--scheme") == "direct"
    assert _flag(trains["direct+distill-frozen"], "--distill-weight") == "1"
    assert _flag(trains["direct+distill-frozen"], "--distill-teacher") == "frozen"
    assert "--distill-weight" not in trains["curriculum"] and "--subset-selection" not in trains["curriculum"]
    assert _flag(trains["curriculum+gap"], "--subset-seed") == "2"


@pytest.mark.parametrize("argv, message", [
    (["--setting", "few-shot-T+S", "--source-dir", "s", "--target-dirs", "t", "--schemes", "curriculum+gap"],
     "gap selection in a grid is for a monolingual"),
    (["--corpus-dir", "c", "--", "--seed", "4"], "--seed after `--`"),
    (["--corpus-dir", "c", "--", "--train_manifest=x"], "--train-manifest after `--`"),
    (["--corpus-dir", "c", "--", "--dry-run"], "--dry-run after `--`: grid.py's own flag(s)"),
    (["--corpus-dir", "c", "--", "--per-device-batch", "2", "--redo-changed"], "--redo-changed after `--`"),
    (["--corpus-dir", "c", "--oracle", "--schemes", "direct"], "keep text-only"),
    (["--corpus-dir", "c", "--fractions", "0"], "--fractions: 0 is not in (0, 1]"),
    (["--corpus-dir", "c", "--fractions", "1.5"], "--fractions: 1.5 is not in (0, 1]"),
    (["--setting", "few-shot-T", "--source-dir", "s", "--target-dirs", "t", "--fractions", "0"],
     "0 is a fraction only in a setting with target speech"),
    (["--setting", "few-shot-T", "--target-dirs", "t"], "needs --source-dir"),
    (["--setting", "no-source-T", "--source-dir", "s", "--target-dirs", "t"], "uses no source data"),
    (["--setting", "no-source-T+S", "--target-dirs", "t", "--fractions", "0.5"], "no source speech"),
    (["--setting", "no-source-T", "--target-dirs", "t", "--schemes", "curriculum"], "has no speech for it"),
    (["--setting", "few-shot-T+M", "--source-dir", "s", "--target-dirs", "t"], "needs --massive-dir"),
    (["--setting", "few-shot-T", "--source-dir", "s", "--target-dirs", "t", "--massive-dir", "m"],
     "uses no MASSIVE text"),
    (["--setting", "zero-shot", "--source-dir", "s"], "needs --target-dirs"),
    (["--setting", "zero-shot", "--source-dir", "s", "--target-dirs", "t", "--per-target"], "one model serves"),
    (["--setting", "no-source-T+M", "--target-dirs", "a/de", "b/de", "--massive-dir", "m", "m2", "--per-target"],
     "these names repeat"),
    (["--setting", "no-source-T+M", "--target-dirs", "de", "es", "--massive-dir", "m", "--per-target"],
     "got 2 and 1"),
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


# setting -> the last training of its default schemes at p = 0.5 (p0 without a source): its scheme and, per
# manifest in order, (folder, transcripts used, speech rows used)
EXPECTED = {
    "zero-shot": ("curriculum", [("src", 20, 10)]),
    "few-shot-T": ("curriculum", [("src", 20, 10), ("de", 5, 0), ("es", 5, 0)]),
    "few-shot-T+S": ("curriculum", [("src", 20, 10), ("de", 5, 10), ("es", 5, 10)]),
    "few-shot-T+M": ("curriculum", [("src", 20, 10), ("de", 5, 0), ("es", 5, 0), ("mas", 30, 0)]),
    "few-shot-T+S+M": ("curriculum", [("src", 20, 10), ("de", 5, 10), ("es", 5, 10), ("mas", 30, 0)]),
    "no-source-T": ("text-only", [("de", 5, 0), ("es", 5, 0)]),
    "no-source-T+S": ("curriculum", [("de", 5, 10), ("es", 5, 10)]),
    "no-source-T+M": ("text-only", [("de", 5, 0), ("es", 5, 0), ("mas", 30, 0)]),
    "no-source-T+S+M": ("curriculum", [("de", 5, 10), ("es", 5, 10), ("mas", 30, 0)]),
}


def _xl_argv(xl, setting, *extra):
    argv = ["--grid", str(xl / "g"), "--setting", setting, "--target-dirs", str(xl / "de"), str(xl / "es"),
            "--seeds", "0", *extra]
    if grid.SETTINGS[setting].source:
        argv += ["--source-dir", str(xl / "src"), "--fractions", "0.5"]
    if grid.SETTINGS[setting].massive:
        argv += ["--massive-dir", str(xl / "mas")]
    return argv


@pytest.mark.parametrize("setting", grid.SETTINGS)
def test_setting_trains_on_the_documented_manifests_per_train_py_plan(capsys, xl, setting):
    cmds = _dry_run(capsys, *_xl_argv(xl, setting))
    last = [c for c in cmds if c[1].endswith("train.py")][-1]
    scheme, expected = EXPECTED[setting]
    assert _flag(last, "--scheme") == scheme
    # train.py's own reading of the entries, and its epoch plan on these manifests
    sources = [train.parse_source(e, float(_flag(last, "--speech-fraction"))) for e in _entries(last)]
    assert [Path(s.path).parent.name for s in sources] == [m for m, _, _ in expected]
    plan = json.loads(subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--plan-only", "--fsdp", "1", "--scheme", scheme, "--epochs", "1",
         "--speech-fraction", _flag(last, "--speech-fraction"), "--train-manifest", *_entries(last)],
        cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert [(Path(m["path"]).parent.name, m["n_text"], m["n_p"]) for m in plan["manifests"]] == [
        (m, n_text, n_p if scheme != "text-only" else 0) for m, n_text, n_p in expected]
    # dev set: the source's devel split; scored per language on the targets' test speech
    source = grid.SETTINGS[setting].source
    assert _flag(last, "--dev-manifest") == (str(xl / "src" / "devel.jsonl") if source else "none")
    assert cmds[-1][-2:] == ["--by", "lang"]


def test_text_only_reads_the_same_manifests_as_curriculum_and_no_speech(capsys, xl):
    cmds = _dry_run(capsys, *_xl_argv(xl, "few-shot-T"))
    by_scheme = {_flag(c, "--scheme"): c for c in cmds if c[1].endswith("train.py")}
    assert set(by_scheme) == {"text-only", "curriculum"}  # the paper's rule: no direct mixing in Table 3
    paths = {s: [e.rsplit(":", 1)[0] for e in _entries(c)] for s, c in by_scheme.items()}
    assert paths["text-only"] == paths["curriculum"] and _flag(by_scheme["text-only"], "--speech-fraction") == "0"


def test_per_target_trains_one_model_per_target_folder_with_its_own_test_set_and_report(capsys, xl):
    cmds = _dry_run(capsys, *_xl_argv(xl, "few-shot-T+S", "--per-target"))
    trains = [c for c in cmds if c[1].endswith("train.py")]
    assert [(Path(_flag(c, "--run-dir")).relative_to(xl / "g").parts[0], _entries(c)) for c in trains] == [
        (t, [f"{xl / 'src' / 'train.jsonl'}:0.5", f"{xl / t / 'train.jsonl'}:1.0"]) for t in ("de", "es")]
    infers = [c for c in cmds if c[1].endswith("infer.py")]
    assert [_flag(c, "--manifest") for c in infers] == [str(xl / "g" / t / "test_speech.jsonl") for t in ("de", "es")]
    reports = [c for c in cmds if c[1].endswith("report.py")]
    assert [(_flag(c, "--grid"), _flag(c, "--out")) for c in reports] == [
        (str(xl / "g" / t), str(xl / "g-report" / t)) for t in ("de", "es")]


def test_test_speech_holds_exactly_the_targets_speech_rows_with_absolute_audio(xl):
    args = SimpleNamespace(setting="few-shot-T+S", target_dirs=[str(xl / "de"), str(xl / "es")])
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
# The paper's Table 3 and Fig. 2, as docs/EXPERIMENTS.md runs them

# Speech-MASSIVE's locales (../shared/papers/datasets.md); the paper's source is fr-FR.
SPEECH_MASSIVE = ("ar-SA", "de-DE", "es-ES", "fr-FR", "hu-HU", "ko-KR", "nl-NL", "pl-PL", "pt-PT", "ru-RU", "tr-TR",
                  "vi-VN")
TABLE3_TARGETS = ("de-DE", "es-ES", "ko-KR", "pt-PT", "vi-VN")
# Table 3's rows, top to bottom: source speech (or no source) and the target data
SOURCES = ("0%", "2%", "5%", "10%", "25%", "50%", "100%")
TABLE3_ROWS = (["No Source T"] + [f"{p} T" for p in SOURCES] + ["No Source T+S"] + [f"{p} T+S" for p in SOURCES]
               + ["No Source T+M", "No Source T+S+M", "0% T+M", "0% T+S+M", "100% T+M", "100% T+S+M"])


def _doc_commands(marker: str) -> list[list[str]]:
    """The `python grid.py` lines of docs/EXPERIMENTS.md whose --grid contains `marker`, with the shell variables
    the document defines (NAME="value" lines) expanded; a variable it does not define fails the test."""
    doc = (REPO / "docs" / "EXPERIMENTS.md").read_text()
    variables = dict(re.findall(r'^([A-Z][A-Z0-9_]*)="([^"]*)"', doc, re.M))

    def expand(text):
        return re.sub(r"\$([A-Z][A-Z0-9_]*)", lambda m: expand(variables[m[1]]), text)

    lines = re.sub(r"\\\n\s*", " ", doc).splitlines()
    return [shlex.split(expand(line))[2:] for line in lines if line.startswith("python grid.py") and marker in line]


def _row_of(cmd) -> str:
    """The Table 3 row a train.py command trains: its source speech and its target data, read from the entries."""
    entries = {Path(e.rsplit(":", 1)[0]).parent: float(e.rsplit(":", 1)[1]) for e in _entries(cmd)}
    source = next((f"{100 * p:g}%" for folder, p in entries.items() if folder.name == "sm-fr"), "No Source")
    targets = [(folder.name, p) for folder, p in entries.items() if folder.parent.name == "sm115"]
    massive = [folder.name for folder in entries if folder.parent.name == "massive"]
    assert [t for t, _ in targets] == list(TABLE3_TARGETS) and massive in ([], list(TABLE3_TARGETS)), entries
    assert len({p for _, p in targets}) == 1  # T (0) or T+S (1.0) for every target alike
    return f"{source} T" + ("+S" if targets[0][1] == 1.0 else "") + ("+M" if massive else "")


def test_every_table_3_row_is_one_cell_of_the_documented_commands_with_the_papers_scheme(capsys):
    rows = []
    for argv in _doc_commands("grids/t3-"):
        for cmd in _dry_run(capsys, *argv):
            if cmd[1].endswith("train.py"):
                row = _row_of(cmd)
                # "when only text data are available, we adopt a text-only scheme, while the presence of speech
                # data leads to curriculum learning"
                speech = "+S" in row or row.split()[0] not in ("0%", "No")
                assert _flag(cmd, "--scheme") == ("curriculum" if speech else "text-only"), row
                rows.append(row)
    assert sorted(rows) == sorted(TABLE3_ROWS) and len(TABLE3_ROWS) == 22  # each row once, none missing


def test_fig_2_zero_shot_is_scored_on_every_speech_massive_locale_but_the_source(capsys):
    [argv] = _doc_commands("grids/fig2")
    out = grid.main(["--dry-run", *argv])
    lines = capsys.readouterr().out.splitlines()
    assert out == 0
    tests = lines[0].split(": the speech rows of ")[1].split()
    assert sorted(Path(t).parent.name for t in tests) == [loc for loc in SPEECH_MASSIVE if loc != "fr-FR"]
    trains = [shlex.split(line) for line in lines if "train.py" in line.split(" ", 2)[1]]
    # one model per scheme and fraction, trained on the source alone: text-only and curriculum at every fraction
    assert all(len(_entries(c)) == 1 and "sm-fr" in _entries(c)[0] for c in trains)
    assert sorted({(_flag(c, "--scheme"), float(_flag(c, "--speech-fraction"))) for c in trains}) == sorted(
        [("text-only", 0.0)] + [("curriculum", p) for p in grid.PAPER_FRACTIONS])
    assert shlex.split(lines[-1])[-2:] == ["--by", "lang"]


# ----------------------------------------------------------------------------------------------------------------
# Reruns: a cell made by other commands is never reused (the stage scripts replaced by stand-ins that write what
# they would: hf/ with train.py's training_run.json, pred.jsonl)

def _stand_in(calls):
    def run(cmd):
        calls.append(cmd)
        if _script(cmd) == "train.py":
            hf = Path(_flag(cmd, "--run-dir")) / "hf"
            hf.mkdir(parents=True, exist_ok=True)
            (hf / "config.json").write_text("{}")
            stop = int(_flag(cmd, "--max-steps")) if "--max-steps" in cmd else None
            (hf / "training_run.json").write_text(json.dumps(
                {"finished": stop is None, "steps": stop or 10, "planned_steps": 10}))
        elif _script(cmd) == "infer.py":
            Path(_flag(cmd, "--out")).write_text(json.dumps({"model": _flag(cmd, "--model")}) + "\n")
    return run


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A finished grid of text-only + direct at p0.5 + oracle, one seed; .run(*argv) reruns it with changes."""
    _corpus(tmp_path / "corpus", "en", "en", 4, 1)
    calls = []
    monkeypatch.setattr(grid, "run_command", _stand_in(calls))
    base = ["--corpus-dir", str(tmp_path / "corpus"), "--grid", str(tmp_path / "g"), "--schemes", "text-only",
            "direct", "--oracle", "--fractions", "0.5", "--seeds", "0"]

    def run(*extra, train_flags=()):
        calls.clear()
        return grid.main([*base, *extra, *(["--", *train_flags] if train_flags else [])])

    assert run() == 0
    return SimpleNamespace(run=run, calls=calls, grid=tmp_path / "g", corpus=tmp_path / "corpus")


def _ran(calls):
    return [(_script(c), _flag(c, "--run-dir") if _script(c) == "train.py" else _flag(c, "--out"))
            for c in calls if _script(c) != "report.py"]


def test_rerun_of_the_same_command_reuses_every_cell(fake):
    assert fake.run() == 0
    assert [_script(c) for c in fake.calls] == ["report.py"]


@pytest.mark.parametrize("change, train_flags, expected", [
    (["--epochs", "2"], (), "trained with other settings: --epochs 5 -> 2"),  # mini: its own 5
    (["--model", "/ckpt/other"], (), "--model mini -> /ckpt/other"),
    ([], ("--peak-lr", "1e-3"), "--peak-lr (absent) -> 1e-3"),
    (["--num-beams", "1"], (), "made with other settings: decoding: --num-beams 3 -> 1"),
])
def test_rerun_with_other_settings_refuses_naming_each_change_and_runs_nothing(fake, capsys, change, train_flags,
                                                                              expected):
    capsys.readouterr()
    assert fake.run(*change, train_flags=train_flags) == 2
    err = capsys.readouterr().err
    assert expected in err and "--redo-changed" in err
    assert fake.calls == []


def test_a_decoding_change_names_only_the_predictions_not_the_trainings(fake, capsys):
    capsys.readouterr()
    assert fake.run("--max-new-tokens", "9") == 2
    err = capsys.readouterr().err
    assert "3 finished part(s)" in err and "run:" not in err
    assert err.count(f"decoding: --max-new-tokens {MAX_NEW_TOKENS} -> 9") == 3


def test_redo_changed_redecodes_only_the_changed_predictions_and_records_the_new_command(fake):
    assert fake.run("--max-new-tokens", "9", "--redo-changed") == 0
    assert [s for s, _ in _ran(fake.calls)] == ["infer.py"] * 3
    record = json.loads((fake.grid / "oracle" / "p0" / "seed0" / grid.INFER_RECORD).read_text())
    assert _flag(record["infer"], "--max-new-tokens") == "9" and record["infer"][0] == "infer.py"
    assert fake.run("--max-new-tokens", "9") == 0 and _ran(fake.calls) == []  # now the same command


def test_redo_changed_after_a_training_change_retrains_and_redecodes_its_models_oracle_included(fake):
    assert fake.run("--epochs", "2", "--redo-changed") == 0
    g = fake.grid
    assert _ran(fake.calls) == [("train.py", str(g / "text-only/p0/seed0/run")),
                                ("infer.py", str(g / "text-only/p0/seed0/pred.jsonl")),
                                ("train.py", str(g / "direct/p0.5/seed0/run")),
                                ("infer.py", str(g / "direct/p0.5/seed0/pred.jsonl")),
                                ("infer.py", str(g / "oracle/p0/seed0/pred.jsonl"))]
    assert _flag(json.loads((g / "direct/p0.5/seed0" / grid.TRAIN_RECORD).read_text())["train"], "--epochs") == "2"


def test_a_smoke_grid_stopped_by_max_steps_is_reused_by_itself_but_refused_by_the_real_command(tmp_path, monkeypatch,
                                                                                               capsys):
    _corpus(tmp_path / "corpus", "en", "en", 4, 1)
    calls = []
    monkeypatch.setattr(grid, "run_command", _stand_in(calls))
    argv = ["--corpus-dir", str(tmp_path / "corpus"), "--grid", str(tmp_path / "g"), "--schemes", "direct",
            "--fractions", "0.5", "--seeds", "0"]
    assert grid.main([*argv, "--", "--max-steps", "2"]) == 0
    calls.clear()
    assert grid.main([*argv, "--", "--max-steps", "2"]) == 0 and [_script(c) for c in calls] == ["report.py"]
    capsys.readouterr()
    assert grid.main(argv) == 2
    assert "--max-steps 2 -> (absent)" in capsys.readouterr().err and [_script(c) for c in calls] == ["report.py"]


def test_an_export_without_training_run_json_is_of_unknown_finish_and_refused(fake, capsys):
    (fake.grid / "direct/p0.5/seed0/run/hf/training_run.json").unlink()
    capsys.readouterr()
    assert fake.run() == 2
    assert "no training_run.json (exported by an older train.py)" in capsys.readouterr().err
    assert fake.run("--redo-changed") == 0
    assert _ran(fake.calls) == [("train.py", str(fake.grid / "direct/p0.5/seed0/run")),
                                ("infer.py", str(fake.grid / "direct/p0.5/seed0/pred.jsonl"))]


def test_a_cell_without_records_from_an_older_grid_py_is_refused(fake, capsys):
    (fake.grid / "oracle/p0/seed0" / grid.INFER_RECORD).unlink()
    (fake.grid / "direct/p0.5/seed0" / grid.TRAIN_RECORD).unlink()
    capsys.readouterr()
    assert fake.run() == 2
    err = capsys.readouterr().err
    assert f"no {grid.INFER_RECORD} (made by an older grid.py" in err and f"no {grid.TRAIN_RECORD}" in err


def test_a_changed_test_set_refuses_every_prediction(fake, capsys):
    rows = read_manifest(fake.corpus / "test.jsonl")
    write_manifest(fake.corpus / "test.jsonl", rows[:-1])
    capsys.readouterr()
    assert fake.run() == 2
    assert capsys.readouterr().err.count("test_speech.jsonl changed") == 3


def test_a_changed_training_manifest_refuses_its_trainings_and_their_predictions(fake, capsys):
    rows = read_manifest(fake.corpus / "train.jsonl")
    write_manifest(fake.corpus / "train.jsonl", [{**rows[0], "action": "other"}] + rows[1:])  # same ids and paths
    capsys.readouterr()
    assert fake.run() == 2
    err = capsys.readouterr().err
    assert err.count("its training data changed since it was trained") == 2  # text-only and direct
    assert err.count("its model's training data changed since") == 3  # their decodings and the oracle's
    assert fake.calls == []  # refused before running anything
    assert fake.run("--redo-changed") == 0 and [s for s, _ in _ran(fake.calls)].count("train.py") == 2


def test_a_changed_model_directory_refuses_its_trainings_and_their_predictions(tmp_path, monkeypatch, capsys):
    # a rebuilt models/mini (or a re-downloaded checkpoint) keeps the command and the path: only its hash tells;
    # the same for a --gap-reference among the train flags
    _corpus(tmp_path / "corpus", "en", "en", 4, 1)
    model, reference = tmp_path / "model", tmp_path / "reference"
    for d in (model, reference):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights one")
    calls = []
    monkeypatch.setattr(grid, "run_command", _stand_in(calls))
    argv = ["--corpus-dir", str(tmp_path / "corpus"), "--grid", str(tmp_path / "g"), "--schemes", "text-only",
            "direct", "--fractions", "0.5", "--seeds", "0", "--model", str(model), "--", "--gap-reference",
            str(reference)]
    assert grid.main(argv) == 0
    calls.clear()
    assert grid.main(argv) == 0 and [_script(c) for c in calls] == ["report.py"]  # unchanged: reused
    capsys.readouterr()
    for changed in (model, reference):
        (changed / "model.safetensors").write_bytes(b"weights two")
        assert grid.main(argv) == 2
        flag = "--model" if changed == model else "--gap-reference"
        assert capsys.readouterr().err.count(f"its {flag} {changed} changed since it was trained") == 2
        (changed / "model.safetensors").write_bytes(b"weights one")
    for name in (grid.TRAIN_RECORD, grid.INFER_RECORD):  # as an older grid.py wrote them: no model hash
        for record in (tmp_path / "g").rglob(name):
            record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                          if k != "model_sha256"}))
    (model / "model.safetensors").write_bytes(b"weights two")
    assert grid.main(argv) == 0  # reused on the command alone, and said so
    assert capsys.readouterr().err.count("holds no hash of its --model (an older grid.py)") == 2


def test_a_prediction_whose_run_was_deleted_is_refused_when_its_training_data_changed(fake, capsys):
    # run/ deleted to save disk: the decoding's own record still knows what its model was trained from
    shutil.rmtree(fake.grid / "direct/p0.5/seed0/run")
    rows = read_manifest(fake.corpus / "train.jsonl")
    write_manifest(fake.corpus / "train.jsonl", [{**rows[0], "action": "other"}] + rows[1:])
    capsys.readouterr()
    assert fake.run() == 2
    err = capsys.readouterr().err
    assert f"direct/p0.5/seed0/pred.jsonl: made with other settings: its model's training data changed" in err


def test_cells_outside_the_command_made_with_other_settings_are_refused_as_the_report_would_score_them(fake, capsys):
    # seed 0 was decoded with 3 beams; a command for seed 1 with 1 beam would report both seeds as one cell
    capsys.readouterr()
    assert fake.run("--seeds", "1", "--num-beams", "1") == 2
    err = capsys.readouterr().err
    assert "3 finished part(s) of the grid are not among this command's cells" in err
    assert err.count("decoding: --num-beams 3 -> 1") == 3 and "seed0" in err and "seed1" not in err
    assert fake.calls == []
    assert fake.run("--seeds", "1", "--num-beams", "1", "--redo-changed") == 2  # not this command's to redo


def test_a_grid_grown_by_a_command_for_another_fraction_keeps_the_earlier_cells(fake):
    assert fake.run("--schemes", "text-only", "direct", "curriculum", "--fractions", "0.25") == 0
    assert _ran(fake.calls) == [("train.py", str(fake.grid / "direct/p0.25/seed0/run")),
                                ("infer.py", str(fake.grid / "direct/p0.25/seed0/pred.jsonl")),
                                ("train.py", str(fake.grid / "curriculum/p0.25/seed0/run")),
                                ("infer.py", str(fake.grid / "curriculum/p0.25/seed0/pred.jsonl"))]
    assert (fake.grid / "direct/p0.5/seed0/pred.jsonl").is_file()


def test_a_moved_grid_is_the_same_grid(fake):
    moved = fake.grid.parent / "elsewhere"
    fake.grid.rename(moved)
    fake.calls.clear()
    assert grid.main(["--corpus-dir", str(fake.corpus), "--grid", str(moved), "--schemes", "text-only", "direct",
                      "--oracle", "--fractions", "0.5", "--seeds", "0"]) == 0
    assert [_script(c) for c in fake.calls] == ["report.py"]


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
    argv = ["--corpus-dir", str(tmp / "corpus"), "--grid", str(tmp / "g" / "demo"), "--model", "tiny",
            "--schemes", "text-only", "direct", "--oracle", "--fractions", "0.5", "--seeds", "0", "1", "--epochs", "1", "--num-beams", "1",
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
def test_each_cell_records_the_commands_that_made_it_and_train_py_says_its_run_finished(ran):
    g = ran.grid
    trains = {_flag(c, "--run-dir"): c for c in ran.first if _script(c) == "train.py"}
    infers = {_flag(c, "--out"): c for c in ran.first if _script(c) == "infer.py"}
    for run_dir, cmd in trains.items():
        record = json.loads((Path(run_dir).parent / grid.TRAIN_RECORD).read_text())
        assert record["train"] == ["train.py"] + [a.replace(str(g), "GRID") for a in cmd[2:]]
        run = json.loads((Path(run_dir) / "hf" / "training_run.json").read_text())
        assert run["finished"] is True and run["steps"] == run["planned_steps"] > 0
    for out, cmd in infers.items():
        record = json.loads((Path(out).parent / grid.INFER_RECORD).read_text())
        assert record["infer"] == ["infer.py"] + [a.replace(str(g), "GRID") for a in cmd[2:]]
        model_run = str(Path(_flag(cmd, "--model")).parent)
        assert record["train"] == json.loads((Path(model_run).parent / grid.TRAIN_RECORD).read_text())["train"]


@pytest.mark.slow
def test_rerun_with_other_beams_refuses_before_running_anything(ran, capsys):
    at = ran.argv.index("--")
    ran.calls.clear()
    capsys.readouterr()
    assert grid.main([*ran.argv[:at], "--num-beams", "2", *ran.argv[at:]]) == 2
    assert capsys.readouterr().err.count("decoding: --num-beams 1 -> 2") == 6 and ran.calls == []


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
