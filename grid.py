"""Run the paper's experiment grid: train.py, then infer.py, for every (scheme, speech fraction, seed); then report.py.

    python grid.py --corpus-dir data/prepared/demo --grid grids/demo --fractions 0.05 0.25 --seeds 0 1 --oracle
    python grid.py --corpus-dir data/prepared/slurp --grid grids/slurp --fractions 0.02 0.05 0.10 0.25 0.50 1.0 \
        --seeds 0 1 2 3 4 --oracle --model /ckpt/Qwen2-Audio-7B-Instruct -- --fsdp 8
    python grid.py --setting few-shot-T+S --source-dir sm/fr-FR --target-dirs sm115/de-DE sm115/es-ES \
        --grid grids/xl-few-shot-T+S --fractions 0 0.02 0.10 1.0 --seeds 0 --model /ckpt/Qwen2-Audio-7B-Instruct
    python grid.py ... --dry-run          # print every command, run none

The stage scripts stay standalone; this file only builds their command lines and runs them as subprocesses,
so every run of a grid can be reproduced by hand from the printed command. Arguments after `--` go to every
train.py call unchanged (mesh flags, batch size, --remat, ...); grid.py's own flags belong before `--`.

The grid directory (report.py reads exactly this layout):

    GRID/test_speech.jsonl                      the SPEECH rows of the test manifest(s): the paper scores speech
                                                input; the transcript rows are only used by the oracle
    GRID/<scheme>/p<fraction>/seed<k>/run/      train.py's run directory (checkpoints, metrics.jsonl, hf/)
    GRID/<scheme>/p<fraction>/seed<k>/train_command.json   the train.py command that made run/
    GRID/<scheme>/p<fraction>/seed<k>/pred.jsonl infer.py's predictions on test_speech.jsonl
    GRID/<scheme>/p<fraction>/seed<k>/infer_command.json   the commands that made pred.jsonl (its model's
                                                training, its decoding) and the test set's hash
    GRID/oracle/p0/seed<k>/pred.jsonl           the text-only model of seed k decoded from the transcripts of the
                                                same rows (infer.py --input text): the no-ASR-error upper bound
    GRID-report/                                report.py's tables and figures (outside GRID: report.py treats
                                                every folder inside GRID as part of the layout)
    CORPUS/synth/synthetic.jsonl                with a +gap row (--schemes curriculum+gap): espeak-ng speech of the
                                                corpus' train transcripts (prepare.py synth), made once

text-only uses no speech, so it runs once per seed, under p0. Seed k means `--seed k --subset-seed k`: the speech
subsets of one seed are nested across fractions (train.py takes the first round(p*N) rows of one permutation).

Rerunning a grid. Each cell records the commands that produced it (the *_command.json files, written before the
command runs). A cell whose pred.jsonl was made by the same commands is skipped; a run directory trained by the
same command whose export is finished (hf/training_run.json says so) is not trained again; an interrupted
training resumes from its run directory (train.py does that itself). So rerunning the same command finishes an
interrupted grid without redoing finished runs. A cell made by OTHER commands (other epochs, beams, learning rate,
model, --max-steps, test set, a training manifest or --model / --gap-reference directory whose content changed since:
train_command.json holds the sha256 of each, and a record from before those hashes is reused on its command with a
note) or by an older grid.py / train.py that recorded nothing is never reused: the grid refuses before running
anything, naming each difference, and `--redo-changed` deletes those cells' run/ or pred.jsonl and redoes them.
infer_command.json also holds the hashes of what the cell's model was trained from, so a pred.jsonl whose run/ was
deleted to save disk is still checked. A run stopped by --max-steps counts as trained only for a command with that
same --max-steps (a smoke grid); the real command differs from it and so redoes it. report.py scores every
pred.jsonl in GRID: a grid may grow by later commands (another fraction, more schemes or seeds), but a cell there
that the command does not list and would make differently (other beams, epochs, data, ...) is refused, even with
--redo-changed, since that command would not redo it.

Cross-lingual settings (paper Fig. 2 / Table 3), --setting NAME. Source: Speech-MASSIVE fr-FR prepared with
`prepare.py speech-massive --locales fr-FR --out SRC`; targets: Speech-MASSIVE few-shot, `prepare.py speech-massive
--locales de-DE --few-shot --out TGT/de-DE` (train = train_115: 115 transcripts and their recordings; one folder per
target, or one folder with all targets); MASSIVE target text: `prepare.py massive --locales de-DE --out MAS/de-DE`
(transcripts only). p is the grid's speech fraction: the share of the SOURCE's recordings. Each setting's
--train-manifest entries (PATH:FRACTION = that manifest's transcripts, always all of them, plus that fraction of
its speech rows), one TGT / MAS entry per --target-dirs / --massive-dir folder:

    zero-shot        SRC/train.jsonl:p                                    source only (Fig. 2)
    few-shot-T       SRC/train.jsonl:p  TGT/train.jsonl:0                 + target transcripts T
    few-shot-T+S     SRC/train.jsonl:p  TGT/train.jsonl:1.0               + target transcripts and speech T+S
    few-shot-T+M     SRC/train.jsonl:p  TGT/train.jsonl:0    MAS/train.jsonl:0   + T + MASSIVE target text M
    few-shot-T+S+M   SRC/train.jsonl:p  TGT/train.jsonl:1.0  MAS/train.jsonl:0   + T+S + M
    no-source-T      TGT/train.jsonl:0                                    the target data alone (Table 3's
    no-source-T+S    TGT/train.jsonl:1.0                                  "No Source" rows): one cell per
    no-source-T+M    TGT/train.jsonl:0    MAS/train.jsonl:0               scheme and seed, at p0 (there is
    no-source-T+S+M  TGT/train.jsonl:1.0  MAS/train.jsonl:0               no source speech to take p of)

Schemes: by default the paper's rule for Table 3 ("when only text data are available, we adopt a text-only
scheme, while the presence of speech data leads to curriculum learning"): text-only at p0 where the setting has
no target speech, curriculum wherever a cell has speech. A setting with target speech (T+S) also accepts the
fraction 0 (curriculum on the target recordings alone: Table 3's 0% T+S rows). Text-only runs pass the same
entries and use none of their speech. By default one model is trained on all targets together (--target-dirs
all in one run); --per-target trains one model per --target-dirs folder instead, in GRID/<folder name>/ with its
own report in GRID-report/<folder name>/ (--massive-dir folders pair with the target folders in order).
Evaluation: the speech rows of every TGT/test.jsonl, reported per language (report.py --by lang); dev: the
source's devel.jsonl (none without a source: the targets' few-shot data has no dev split worth the name).
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from model.answer import MAX_NEW_TOKENS
from model.checkpoint import TRAINING_RUN_FILE
from model.config import resolve_model
from model.manifest import ManifestError, atomic_write_text, jsonl_text, read_manifest, write_manifest
from report import FRACTION_DIR, SEED_DIR, fraction_name  # the directory names report.py parses: p0.02, seed1
from report import SCHEMES as LAYOUT_SCHEMES  # its scheme folders: the schemes, their variants and oracle
from train import SCHEMES, VARIANT_SCHEMES, VARIANTS, file_digest, model_digest, resolve_epochs
from train import Args as TrainArgs, InputError as TrainInputError

REPO = Path(__file__).resolve().parent
PAPER_FRACTIONS = (0.02, 0.05, 0.10, 0.25, 0.50, 1.0)
# train.py flags that grid.py sets per cell; passing them after `--` would contradict the layout.
OWNED_TRAIN_FLAGS = ("--scheme", "--speech-fraction", "--epochs", "--model", "--run-dir", "--seed", "--subset-seed",
                     "--train-manifest", "--plan-only")
TRAIN_RECORD = "train_command.json"  # in a trained cell: the train.py command that made run/, its data's hashes
INFER_RECORD = "infer_command.json"  # beside pred.jsonl: the commands that made it and the test set's hash


class GridError(ValueError):
    """Bad flags or inputs; main prints the message and exits with status 2."""


# ----------------------------------------------------------------------------------------------------------------
# What each run trains on and is scored on.

@dataclass(frozen=True)
class Setting:
    """The data of a cross-lingual setting (paper Table 3's row labels)."""
    source: bool         # the source's train split: all its transcripts + p of its recordings
    target_text: bool    # T: the targets' few-shot transcripts
    target_speech: bool  # S: all the targets' few-shot recordings too
    massive: bool        # M: MASSIVE target-language text


SETTINGS = {
    "zero-shot": Setting(source=True, target_text=False, target_speech=False, massive=False),
    "few-shot-T": Setting(source=True, target_text=True, target_speech=False, massive=False),
    "few-shot-T+S": Setting(source=True, target_text=True, target_speech=True, massive=False),
    "few-shot-T+M": Setting(source=True, target_text=True, target_speech=False, massive=True),
    "few-shot-T+S+M": Setting(source=True, target_text=True, target_speech=True, massive=True),
    "no-source-T": Setting(source=False, target_text=True, target_speech=False, massive=False),
    "no-source-T+S": Setting(source=False, target_text=True, target_speech=True, massive=False),
    "no-source-T+M": Setting(source=False, target_text=True, target_speech=False, massive=True),
    "no-source-T+S+M": Setting(source=False, target_text=True, target_speech=True, massive=True),
}


def train_entries(args, fraction: float) -> list[str]:
    """The --train-manifest entries (PATH:FRACTION) of one run at speech fraction `fraction`."""
    if args.setting is None:
        return [f"{Path(args.corpus_dir) / 'train.jsonl'}:{fraction:g}"]
    setting = SETTINGS[args.setting]
    entries = [f"{Path(args.source_dir) / 'train.jsonl'}:{fraction:g}"] if setting.source else []
    if setting.target_text:
        entries += [f"{Path(d) / 'train.jsonl'}:{'1.0' if setting.target_speech else '0'}" for d in args.target_dirs]
    if setting.massive:
        entries += [f"{Path(d) / 'train.jsonl'}:0" for d in args.massive_dirs]
    return entries


def has_speech(args, fraction: float) -> bool:
    """Whether a mixing-scheme cell at `fraction` has any recordings to train on."""
    return fraction > 0 or (args.setting is not None and SETTINGS[args.setting].target_speech)


def test_manifests(args) -> list[Path]:
    """The manifests whose speech rows make GRID/test_speech.jsonl."""
    if args.setting is None:
        return [Path(args.corpus_dir) / "test.jsonl"]
    return [Path(d) / "test.jsonl" for d in args.target_dirs]


def dev_manifest(args) -> str:
    """train.py's epoch-end dev set: the corpus' (or source's) devel.jsonl if there is one."""
    folder = args.corpus_dir if args.setting is None else (args.source_dir if SETTINGS[args.setting].source else None)
    if folder is not None and (Path(folder) / "devel.jsonl").is_file():
        return str(Path(folder) / "devel.jsonl")
    return "none"


def test_speech_text(args) -> str:
    """GRID/test_speech.jsonl's content: the speech rows of the test manifest(s), audio paths absolute (as
    read_manifest gives them), so the file works from the grid directory."""
    rows = []
    for path in test_manifests(args):
        speech = [r for r in read_manifest(path) if r["audio"] is not None]
        if not speech:
            raise GridError(f"{path}: no speech rows (audio set): nothing to score speech input on")
        rows += speech
    return jsonl_text(rows)


def test_speech_hash(args) -> str:
    """Identifies the test set a prediction file was decoded from (recorded beside it)."""
    return hashlib.sha256(test_speech_text(args).encode("utf-8")).hexdigest()


def write_test_speech(args, out: Path) -> int:
    """Write test_speech_text to `out` (atomically; left alone if already identical); the number of rows."""
    text = test_speech_text(args)
    rows = [json.loads(line) for line in text.splitlines()]
    if not (out.is_file() and out.read_text(encoding="utf-8") == text):
        write_manifest(out, rows)  # validates (a duplicate id across targets is an error naming the row) and renames
    return len(rows)


# ----------------------------------------------------------------------------------------------------------------
# Command lines.

@dataclass(frozen=True)
class Cell:
    scheme: str       # text-only, direct, curriculum or oracle
    fraction: float   # 0 for text-only and oracle
    seed: int

    def dir(self, grid: Path) -> Path:
        return grid / self.scheme / fraction_name(self.fraction) / f"seed{self.seed}"

    def model_cell(self) -> Cell:
        """The cell whose run/ this cell decodes: the oracle decodes the text-only model of its seed."""
        return Cell("text-only", 0.0, self.seed) if self.scheme == "oracle" else self


def synthetic_manifest(args) -> Path:
    """The espeak-ng speech of the corpus' train transcripts that the +gap rows rank by (prepare.py synth),
    beside the corpus (not in GRID, whose every folder report.py reads)."""
    return Path(args.corpus_dir) / "synth" / "synthetic.jsonl"


def variant_flags(args, scheme: str) -> list[str]:
    """train.py flags of a SCHEME+VARIANT row (train.VARIANTS), [] for a plain scheme."""
    if "+" not in scheme:
        return []
    variant = scheme.split("+", 1)[1]
    return [*VARIANTS[variant], *(["--gap-speech", str(synthetic_manifest(args))] if variant == "gap" else [])]


def train_command(args, cell: Cell, grid: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--scheme", cell.scheme.split("+")[0],
            *variant_flags(args, cell.scheme), "--speech-fraction", f"{cell.fraction:g}", "--epochs", str(args.epochs),
            "--model", args.model, "--run-dir", str(cell.dir(grid) / "run"), "--seed", str(cell.seed),
            "--subset-seed", str(cell.seed),
            "--train-manifest", *train_entries(args, cell.fraction),
            *([] if "--dev-manifest" in flag_names(args.train_flags) else ["--dev-manifest", dev_manifest(args)]),
            *args.train_flags]


def infer_command(args, cell: Cell, grid: Path) -> list[str]:
    """Decode GRID/test_speech.jsonl with the model of cell.model_cell() into the cell's pred.jsonl."""
    return [sys.executable, str(REPO / "infer.py"), "--model", str(cell.model_cell().dir(grid) / "run" / "hf"),
            "--manifest", str(grid / "test_speech.jsonl"), "--out", str(cell.dir(grid) / "pred.jsonl"),
            "--num-beams", str(args.num_beams), "--max-new-tokens", str(args.max_new_tokens),
            *(["--input", "text"] if cell.scheme == "oracle" else []), *args.infer_flags]


def report_command(args, grid: Path) -> list[str]:
    return [sys.executable, str(REPO / "report.py"), "--grid", str(grid), "--gold", str(grid / "test_speech.jsonl"),
            "--out", str(report_dir(args)), *(["--by", "lang"] if args.setting else [])]


def report_dir(args) -> Path:
    grid = Path(args.grid)
    return Path(args.report_out) if args.report_out else grid.parent / f"{grid.name}-report"


def flag_names(flags: Sequence[str]) -> set[str]:
    return {f.split("=", 1)[0].replace("_", "-") for f in flags if f.startswith("--")}


def cells(args) -> list[Cell]:
    """Every cell in run order: seed by seed (a partial grid already has whole seeds), text-only first."""
    out = []
    for seed in args.seeds:
        for scheme in args.schemes:
            for fraction in ([0.0] if scheme == "text-only" else args.fractions):
                out.append(Cell(scheme, fraction, seed))
        if args.oracle:
            out.append(Cell("oracle", 0.0, seed))
    return out


def per_target_grids(args) -> list:
    """--per-target: one grid (args copy) per --target-dirs folder, in GRID/<folder name>/, with that target's
    MASSIVE folder (paired in order) and its report in GRID-report/<folder name>/."""
    out = []
    massive = args.massive_dirs or [None] * len(args.target_dirs)
    for target, mas in zip(args.target_dirs, massive):
        sub = copy.copy(args)
        name = Path(target).name
        sub.target_dirs, sub.massive_dirs = [target], [mas] if mas else []
        sub.grid, sub.report_out, sub.per_target = str(Path(args.grid) / name), str(report_dir(args) / name), False
        out.append(sub)
    return out


# ----------------------------------------------------------------------------------------------------------------
# What made a cell: the records, compared with what this grid would run.

def portable(cmd: list[str], grid: Path) -> list[str]:
    """A command as recorded: the script's name, not the interpreter's or the checkout's path (a new virtual
    environment is the same experiment), and paths inside the grid relative to it (a moved grid is the same grid)."""
    prefix = str(grid)
    return [Path(cmd[1]).name] + ["GRID" + a[len(prefix):] if a == prefix or a.startswith(prefix + os.sep) else a
                                   for a in cmd[2:]]


def flag_values(cmd: list[str]) -> dict[str, list[str]]:
    """{--flag: its values} of a recorded command (a bare switch has none; a repeated flag collects them all)."""
    out, flag = {}, None
    for arg in cmd[1:]:
        if arg.startswith("--"):
            flag, _, value = arg.partition("=")
            out.setdefault(flag, []).extend([value] if value else [])
        elif flag is not None:
            out[flag].append(arg)
    return out


def changed_keys(a: dict, b: dict) -> list:
    """The keys of either dict whose values differ (absent counts as a value), in order of appearance."""
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def differences(old: list[str], new: list[str]) -> list[str]:
    """What changed from the recorded command `old` to `new`, flag by flag: '--epochs 1 -> 3'."""
    a, b = flag_values(old), flag_values(new)

    def show(values):
        return "(absent)" if values is None else " ".join(values) or "(set)"

    out = [f"{flag} {show(a.get(flag))} -> {show(b.get(flag))}" for flag in changed_keys(a, b)]
    if not out and old != new:  # the same flags in another order
        out.append(f"{shlex.join(old)} -> {shlex.join(new)}")
    return out


def read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GridError(f"{path}: not a JSON record ({e}); delete it and rerun with --redo-changed") from e


def write_record(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def export_state(run_dir: Path) -> tuple[str, dict]:
    """(state, train.py's training_run.json): state 'none' (no export yet), 'unknown' (an export without
    training_run.json: an older train.py, which exported at --max-steps too), 'finished', or 'stopped' (an
    export that --max-steps ended before its plan's end)."""
    hf = run_dir / "hf"
    if not (hf / "config.json").is_file():
        return "none", {}
    record = read_record(hf / TRAINING_RUN_FILE)
    if record is None:
        return "unknown", {}
    return ("finished" if record.get("finished") is True else "stopped"), record


def trained(args, run_dir: Path) -> bool:
    """The run's export is what its command asks for: its plan's end, or --max-steps when the train flags have it."""
    state, _ = export_state(run_dir)
    return state == "finished" or (state == "stopped" and "--max-steps" in flag_names(args.train_flags))


def stale_training(args, cell: Cell, grid: Path) -> str | None:
    """Why cell's run/ (a trained cell's) cannot be reused by this grid's train command; None if it can, or if
    there is nothing to reuse."""
    run_dir = cell.dir(grid) / "run"
    if not run_dir.exists():
        return None
    record = read_record(cell.dir(grid) / TRAIN_RECORD)
    if record is None:
        return f"{run_dir}: no {TRAIN_RECORD} (made by an older grid.py or by hand): its settings are unknown"
    cmd = train_command(args, cell, grid)
    changed = differences(record["train"], portable(cmd, grid))
    if changed:
        return f"{run_dir}: trained with other settings: {'; '.join(changed)}"
    recorded, now = record.get("train_data_sha256"), train_data_hashes(args, cell)
    if recorded is None:  # a grid.py before the hashes: the command matched, the data may have changed since
        print(f"grid.py: note: {cell.dir(grid) / TRAIN_RECORD} holds no hash of its training manifests (an older "
              f"grid.py); reused on its command alone", file=sys.stderr)
    elif recorded != now:
        return f"{run_dir}: its training data changed since it was trained: {', '.join(changed_keys(recorded, now))}"
    recorded, now = record.get("model_sha256"), model_hashes(cmd)
    if recorded is None:  # a grid.py before the models' hashes: the models are taken as they are now
        print(f"grid.py: note: {cell.dir(grid) / TRAIN_RECORD} holds no hash of its --model (an older grid.py); "
              f"reused on its command alone", file=sys.stderr)
    elif recorded != now:
        values = flag_values(cmd)
        names = [f"{flag} {values[flag][-1]}" for flag in changed_keys(recorded, now)]
        return f"{run_dir}: its {', '.join(names)} changed since it was trained (other files or weights)"
    if export_state(run_dir)[0] == "unknown":
        return (f"{run_dir / 'hf'}: no {TRAINING_RUN_FILE} (exported by an older train.py): whether its training "
                f"finished is unknown")
    return None


def train_data_hashes(args, cell: Cell) -> dict[str, str]:
    """{manifest: sha256 of its file} of what the cell's training reads (the train manifests; +gap's synthetic
    speech manifest): the command names them by path, and a re-prepared corpus keeps the paths."""
    paths = [entry.rsplit(":", 1)[0] for entry in train_entries(args, cell.fraction)]
    if cell.scheme.endswith("+gap"):
        paths.append(str(synthetic_manifest(args)))
    return {p: file_digest(p) if Path(p).is_file() else "missing" for p in paths}


MODEL_FLAGS = ("--model", "--gap-reference")  # train.py flags naming a model directory that the training reads


@functools.cache
def directory_hash(model: str) -> str | None:
    """train.model_digest of a model directory, once per grid.py run (a 7B directory is 16 GB; main clears the
    cache); None for a preset."""
    path = resolve_model(model)
    return model_digest(path) if os.path.isdir(path) else None


def model_hashes(cmd: list[str]) -> dict[str, str | None]:
    """{flag: sha256} of the model directories a train command reads (MODEL_FLAGS it has): the paths stay the same
    when a model is rebuilt or re-downloaded, so the command alone cannot tell."""
    values = flag_values(cmd)
    return {flag: directory_hash(values[flag][-1]) for flag in MODEL_FLAGS if values.get(flag)}


def train_record(args, cell: Cell, grid: Path) -> dict:
    cmd = train_command(args, cell, grid)
    return {"train": portable(cmd, grid), "train_data_sha256": train_data_hashes(args, cell),
            "model_sha256": model_hashes(cmd)}


def infer_record(args, cell: Cell, grid: Path, test_hash: str) -> dict:
    """The commands that make cell's pred.jsonl, the hashes of what its model was trained from (they hold when
    run/ has been deleted to save disk) and the test set's hash."""
    trained_from = train_record(args, cell.model_cell(), grid)
    return {"train": trained_from["train"], "infer": portable(infer_command(args, cell, grid), grid),
            "train_data_sha256": trained_from["train_data_sha256"], "model_sha256": trained_from["model_sha256"],
            "test_speech_sha256": test_hash}


def stale_prediction(args, cell: Cell, grid: Path, test_hash: str) -> str | None:
    """Why cell's pred.jsonl cannot be reused: made by another model training (its command, data or --model),
    decoding or test set."""
    pred = cell.dir(grid) / "pred.jsonl"
    if not pred.is_file():
        return None
    record = read_record(cell.dir(grid) / INFER_RECORD)
    if record is None:
        return f"{pred}: no {INFER_RECORD} (made by an older grid.py or by hand): its settings are unknown"
    want = infer_record(args, cell, grid, test_hash)
    changed = ([f"model training: {d}" for d in differences(record["train"], want["train"])]
               + [f"decoding: {d}" for d in differences(record["infer"], want["infer"])])
    for key, what in (("train_data_sha256", "training data"), ("model_sha256", "--model")):
        if key not in record:  # a grid.py before these hashes: run/, if kept, has them (stale_training)
            if not (cell.model_cell().dir(grid) / "run").exists():
                print(f"grid.py: note: {cell.dir(grid) / INFER_RECORD} holds no hash of its model's {what} (an "
                      f"older grid.py), and run/ is gone; reused on its commands alone", file=sys.stderr)
        elif record[key] != want[key]:
            changed.append(f"its model's {what} changed since: {', '.join(changed_keys(record[key], want[key]))}")
    if record.get("test_speech_sha256") != test_hash:
        changed.append(f"the test set {grid / 'test_speech.jsonl'} changed")
    return f"{pred}: made with other settings: {'; '.join(changed)}" if changed else None


def cells_on_disk(grid: Path) -> list[Cell]:
    """The cells of the grid directory with a pred.jsonl: what report.py scores, listed by this command or not."""
    found = []
    for pred in sorted(grid.glob("*/*/*/pred.jsonl")):
        seed_dir, fraction_dir, scheme_dir = pred.parent, pred.parent.parent, pred.parent.parent.parent
        fraction, seed = FRACTION_DIR.fullmatch(fraction_dir.name), SEED_DIR.fullmatch(seed_dir.name)
        if scheme_dir.name in LAYOUT_SCHEMES and fraction and seed:
            found.append(Cell(scheme_dir.name, float(fraction[1]), int(seed[1])))
    return found


def foreign_cells(args, grid: Path, test_hash: str) -> list[str]:
    """Why, for each cell this command does not list but whose pred.jsonl its report would score with its own,
    that cell differs from what this command would make of it (a grid grown by later commands, e.g. more
    schemes at one fraction, is fine; one made with other beams, epochs or data is not)."""
    listed = set(cells(args))
    out = []
    for cell in cells_on_disk(grid):
        if cell not in listed:
            why = stale_training(args, cell.model_cell(), grid) or stale_prediction(args, cell, grid, test_hash)
            if why:
                out.append(why)
    return out


def stale_cells(args, grid: Path, test_hash: str) -> list[tuple[Path, str]]:
    """(path to delete to redo it, why) for every run/ and pred.jsonl of this command's cells that it would not
    reuse."""
    out, retrained = [], set()
    for cell in cells(args):
        if cell.scheme != "oracle":
            why = stale_training(args, cell, grid)
            if why:
                out.append((cell.dir(grid) / "run", why))
                retrained.add(cell)
        pred = cell.dir(grid) / "pred.jsonl"
        why = stale_prediction(args, cell, grid, test_hash)
        if not why and cell.model_cell() in retrained and pred.is_file():
            why = f"{pred}: decoded from {cell.model_cell().dir(grid) / 'run'}, which is not reused"
        if why:
            out.append((pred, why))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Running.

def run_command(cmd: list[str]) -> None:
    """Run one stage script; a failure stops the grid (the finished cells stay finished)."""
    print("+ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_cell(args, cell: Cell, grid: Path, test_hash: str) -> bool:
    """Train (or resume) and decode one cell unless its pred.jsonl exists; True if anything ran.

    stale_cells has already run: an existing pred.jsonl or run/ is the one this command would make. Each record
    is written before its command runs, so an interrupted command is resumed under the record that started it."""
    if (cell.dir(grid) / "pred.jsonl").is_file():
        return False
    model_cell = cell.model_cell()
    run_dir = model_cell.dir(grid) / "run"
    if not trained(args, run_dir):
        cmd = train_command(args, model_cell, grid)
        write_record(model_cell.dir(grid) / TRAIN_RECORD, train_record(args, model_cell, grid))
        run_command(cmd)  # resumes from run/checkpoints if interrupted
        state, info = export_state(run_dir)
        if not trained(args, run_dir):
            raise GridError(f"{run_dir}: train.py exited 0 but " + {
                "none": "wrote no hf/ (was --no-export among the train flags? a grid cell must export its model "
                        "to be decoded)",
                "unknown": f"its hf/ has no {TRAINING_RUN_FILE} (is train.py older than grid.py?)",
                "stopped": f"stopped at step {info.get('steps')} of {info.get('planned_steps')} (--max-steps is "
                           f"not among the train flags)"}[state])
    write_record(cell.dir(grid) / INFER_RECORD, infer_record(args, cell, grid, test_hash))
    run_command(infer_command(args, cell, grid))
    return True


def redo(stale: list[tuple[Path, str]]) -> None:
    """--redo-changed: delete what stale_cells found, so that run_cell makes it again."""
    for path, why in stale:
        print(f"grid.py: redoing {path}: {why.split(': ', 1)[1]}", flush=True)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def listing(whys: list[str]) -> str:
    """The first 10 reasons, one per line, and how many more."""
    more = [f"  ... and {len(whys) - 10} more"] if len(whys) > 10 else []
    return "\n".join([f"  {why}" for why in whys[:10]] + more)


def refuse_foreign(foreign: list[str]) -> GridError:
    return GridError(f"{len(foreign)} finished part(s) of the grid are not among this command's cells, yet its "
                     f"report would score them with its results, and they were made by other commands:\n"
                     + listing(foreign) + "\nDelete those cells, add them to this command (--schemes, --fractions, "
                     "--seeds, --oracle) to redo them with --redo-changed, or use another --grid.")


def refuse(stale: list[tuple[Path, str]]) -> GridError:
    return GridError(f"{len(stale)} finished part(s) of the grid were made by other commands than this one, and "
                     f"would be reused as if they were its results:\n" + listing([why for _, why in stale]) + "\n"
                     "Rerun with --redo-changed to delete and redo them, rerun the original command, or use "
                     "another --grid.")


def print_commands(args) -> None:
    grid = Path(args.grid)
    print(f"# {grid / 'test_speech.jsonl'}: the speech rows of {' '.join(map(str, test_manifests(args)))}")
    for cell in cells(args):
        if cell.scheme != "oracle":
            print(shlex.join(train_command(args, cell, grid)))
        print(shlex.join(infer_command(args, cell, grid)))
    print(shlex.join(report_command(args, grid)))


def run_grid(args, test_hash: str) -> tuple[int, int]:
    """Run every cell of one grid, then report.py; (cells run, cells skipped)."""
    grid = Path(args.grid)
    test = grid / "test_speech.jsonl"
    todo = cells(args)
    n_test = write_test_speech(args, test)
    print(f"grid.py: {grid}: {len(todo)} cells, {n_test} test speech rows in {test}", flush=True)
    if any(c.scheme.endswith("+gap") for c in todo) and not synthetic_manifest(args).is_file():
        import prepare  # once per corpus: espeak-ng speech of its train transcripts (train.py caches the ranking)
        prepare.synthesize(Path(args.corpus_dir) / "train.jsonl", synthetic_manifest(args).parent)
    ran = 0
    for k, cell in enumerate(todo, 1):
        if run_cell(args, cell, grid, test_hash):
            ran += 1
            print(f"grid.py: [{k}/{len(todo)}] {cell.dir(grid)} done", flush=True)
        else:
            print(f"grid.py: [{k}/{len(todo)}] {cell.dir(grid)}: pred.jsonl made by this command, skipped",
                  flush=True)
    run_command(report_command(args, grid))
    return ran, len(todo) - ran


def check_args(args) -> None:
    if args.setting is None:
        if not args.corpus_dir:
            raise GridError("give --corpus-dir (a prepared corpus: DIR/{train,devel,test}.jsonl) or --setting")
        if args.source_dir or args.target_dirs or args.massive_dirs or args.per_target:
            raise GridError("--source-dir / --target-dirs / --massive-dir / --per-target need --setting")
    else:
        setting = SETTINGS[args.setting]
        if args.corpus_dir:
            raise GridError(f"--setting {args.setting} takes its data from --source-dir / --target-dirs, "
                            f"not --corpus-dir")
        if not args.target_dirs:
            raise GridError(f"--setting {args.setting} needs --target-dirs (the targets' few-shot manifests)")
        if setting.source != bool(args.source_dir):
            raise GridError(f"--setting {args.setting} " + ("needs --source-dir (Speech-MASSIVE fr-FR manifests)"
                            if setting.source else "uses no source data: drop --source-dir"))
        if setting.massive != bool(args.massive_dirs):
            raise GridError(f"--setting {args.setting} " + ("needs --massive-dir (MASSIVE target-language text)"
                            if setting.massive else "uses no MASSIVE text: drop --massive-dir"))
        if args.per_target:
            if not setting.target_text:
                raise GridError("--per-target: zero-shot trains on the source alone; one model serves every target")
            if args.massive_dirs and len(args.massive_dirs) != len(args.target_dirs):
                raise GridError(f"--per-target pairs each --target-dirs folder with one --massive-dir folder, in "
                                f"order: got {len(args.target_dirs)} and {len(args.massive_dirs)}")
            names = [Path(d).name for d in args.target_dirs]
            if len(set(names)) != len(names):
                raise GridError(f"--per-target: the --target-dirs folders name the sub-grids GRID/<folder name>; "
                                f"these names repeat: {' '.join(names)}")
    for p in args.fractions:
        if not 0 <= p <= 1 or (p == 0 and not has_speech(args, p)):
            raise GridError(f"--fractions: {p:g} is not in (0, 1] (text-only, which uses no speech, is always run "
                            f"at p0; 0 is a fraction only in a setting with target speech, T+S)")
    for scheme in args.schemes:
        if not any(c.scheme == scheme for c in cells(args)):
            raise GridError(f"--schemes {scheme}: --setting {args.setting} has no speech for it to mix in "
                            f"(use text-only)")
    if any(s.endswith("+gap") for s in args.schemes) and args.setting is not None:
        raise GridError("--schemes ...+gap: gap selection in a grid is for a monolingual --corpus-dir grid (one "
                        "training manifest); run train.py --subset-selection gap by hand for a setting")
    if args.oracle and "text-only" not in args.schemes:
        raise GridError("--oracle decodes with the text-only model of each seed: keep text-only in --schemes")
    if args.epochs is None:  # the model's own default, as train.py takes it; passed on explicitly, in the records
        try:
            args.epochs = resolve_epochs(TrainArgs(model=resolve_model(args.model)))
        except TrainInputError as e:
            raise GridError(str(e)) from None
    if args.epochs < 1 or args.num_beams < 1 or args.max_new_tokens < 1:
        raise GridError("--epochs, --num-beams and --max-new-tokens must be >= 1")
    needed = [Path(d) / "train.jsonl" for d in [args.corpus_dir, args.source_dir, *args.target_dirs,
                                               *args.massive_dirs] if d] + test_manifests(args)
    missing = [str(p) for p in dict.fromkeys(needed) if not p.is_file()]
    if missing and not args.dry_run:
        raise GridError(f"missing manifest(s): {', '.join(missing)} (make them with prepare.py)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="GRID/<name>: the grid directory (created)")
    parser.add_argument("--corpus-dir", help="prepared corpus DIR/{train,devel,test}.jsonl (monolingual grid)")
    parser.add_argument("--fractions", type=float, nargs="+",
                        help="speech fractions of the mixing schemes (default: the paper's 0.02 0.05 0.10 0.25 0.50 "
                             "1.0; a no-source setting has none of its own: p0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seed k: --seed k --subset-seed k")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES + VARIANT_SCHEMES,
                        help="default: all three; with --setting, the paper's rule (text-only where a setting has "
                             "no target speech, curriculum wherever a cell has speech). Rows of the related methods: "
                             "SCHEME+distill, SCHEME+distill-frozen, SCHEME+gap (SCHEME direct or curriculum; "
                             "README, 'Distillation and gap selection'); +gap needs --corpus-dir, whose train "
                             "transcripts grid.py has espeak-ng speak once into CORPUS/synth/")
    parser.add_argument("--oracle", action="store_true", help="also decode the test transcripts with text-only")
    parser.add_argument("--epochs", type=int, help="default: the model directory's own (the miniature's 5; "
                        "pretraining.json), else the paper's 3")
    parser.add_argument("--model", default="mini", help="Hugging Face Qwen2-Audio directory, 'mini' (the shipped "
                        "pretrained miniature) or a random preset (tiny, 7b)")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--infer-flag", dest="infer_flags", action="append", default=[], metavar="FLAG",
                        help="extra infer.py argument, repeatable (e.g. --infer-flag=--dtype --infer-flag=float32)")
    parser.add_argument("--setting", choices=list(SETTINGS), help="a cross-lingual setting (see below)")
    parser.add_argument("--source-dir", help="source manifests (Speech-MASSIVE fr-FR)")
    parser.add_argument("--target-dirs", nargs="+", default=[], help="target few-shot manifests (train_115, test)")
    parser.add_argument("--massive-dir", dest="massive_dirs", nargs="+", default=[],
                        help="MASSIVE target-language text manifests (the +M settings)")
    parser.add_argument("--per-target", action="store_true",
                        help="one model per --target-dirs folder (default: one model on all targets together)")
    parser.add_argument("--report-out", help="report.py's --out (default: GRID-report beside GRID)")
    parser.add_argument("--redo-changed", action="store_true",
                        help="delete and redo the cells made by other commands (default: refuse to run)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser


def default_schemes(args) -> list[str]:
    """The paper's rule: text-only when only text is available, curriculum when there is speech."""
    if args.setting is None:
        return list(SCHEMES)
    text_only = [] if SETTINGS[args.setting].target_speech else ["text-only"]  # every cell has speech with S
    return text_only + (["curriculum"] if any(has_speech(args, p) for p in args.fractions) else [])


def parse_args(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = []
    if "--" in argv:  # everything after `--` goes to train.py
        at = argv.index("--")
        argv, train_flags = argv[:at], argv[at + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    owned = flag_names(train_flags) & set(OWNED_TRAIN_FLAGS)
    if owned:
        raise GridError(f"{', '.join(sorted(owned))} after `--`: grid.py sets these per cell (use its own flags)")
    ours = flag_names(train_flags) & {o for action in parser._actions for o in action.option_strings}
    if ours:
        raise GridError(f"{', '.join(sorted(ours))} after `--`: grid.py's own flag(s), which would go to every "
                        f"train.py call; put them before `--`")
    args.train_flags = train_flags
    if args.fractions is None:
        # no source: no fraction of its own; the mixing schemes' cell (if any speech) is at p0
        no_source = args.setting is not None and not SETTINGS[args.setting].source
        args.fractions = list(PAPER_FRACTIONS) if not no_source else [0.0] if has_speech(args, 0.0) else []
    elif args.setting is not None and not SETTINGS[args.setting].source:
        raise GridError(f"--fractions: --setting {args.setting} has no source speech to take a fraction of "
                        f"(its cells are at p0)")
    args.fractions = sorted(dict.fromkeys(args.fractions))  # 0.1 and 0.10 are one directory
    args.seeds = list(dict.fromkeys(args.seeds))
    chosen = default_schemes(args) if args.schemes is None else args.schemes
    args.schemes = [s for s in SCHEMES + VARIANT_SCHEMES if s in chosen]  # text-only first: the oracle needs it
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        grids = per_target_grids(args) if args.per_target else [args]
        if args.dry_run:
            for sub in grids:
                print_commands(sub)
            return 0
        # Every grid's cells are checked before anything runs: a refusal comes first, not hours in.
        directory_hash.cache_clear()  # the models as they are at this run's start
        hashes = [test_speech_hash(sub) for sub in grids]
        foreign = [w for sub, h in zip(grids, hashes) for w in foreign_cells(sub, Path(sub.grid), h)]
        if foreign:
            raise refuse_foreign(foreign)
        stale = [s for sub, h in zip(grids, hashes) for s in stale_cells(sub, Path(sub.grid), h)]
        if stale and not args.redo_changed:
            raise refuse(stale)
        redo(stale)
        totals = [run_grid(sub, h) for sub, h in zip(grids, hashes)]
        ran, skipped = sum(t[0] for t in totals), sum(t[1] for t in totals)
        print(f"grid.py: {ran} cells run, {skipped} skipped; report in {report_dir(args)}")
        return 0
    except (GridError, ManifestError) as e:
        print(f"grid.py: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"grid.py: error: exit status {e.returncode} from: {shlex.join(e.cmd)}\n"
              f"(rerun the same grid.py command to resume: finished cells are skipped)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
