"""Run the paper's experiment grid: train.py, then infer.py, for every (scheme, speech fraction, seed); then report.py.

    python grid.py --corpus-dir data/prepared/demo --grid grids/demo --fractions 0.05 0.25 --seeds 0 1 --oracle
    python grid.py --corpus-dir data/prepared/slurp --grid grids/slurp --fractions 0.02 0.05 0.10 0.25 0.50 1.0 \
        --seeds 0 1 2 3 4 --oracle --model /ckpt/Qwen2-Audio-7B-Instruct -- --fsdp 8
    python grid.py --setting few-shot-TS --source-dir sm/fr-FR --target-dirs sm/targets \
        --grid grids/xl-few-shot-TS --fractions 0.02 0.10 1.0 --seeds 0 1 2 --model /ckpt/Qwen2-Audio-7B-Instruct
    python grid.py ... --dry-run          # print every command, run none

The stage scripts stay standalone; this file only builds their command lines and runs them as subprocesses,
so every run of a grid can be reproduced by hand from the printed command. Arguments after `--` go to every
train.py call unchanged (mesh flags, batch size, --remat, ...).

The grid directory (report.py reads exactly this layout):

    GRID/test_speech.jsonl                      the SPEECH rows of the test manifest(s): the paper scores speech
                                                input; the transcript rows are only used by the oracle
    GRID/<scheme>/p<fraction>/seed<k>/run/      train.py's run directory (checkpoints, metrics.jsonl, hf/)
    GRID/<scheme>/p<fraction>/seed<k>/pred.jsonl infer.py's predictions on test_speech.jsonl
    GRID/oracle/p0/seed<k>/pred.jsonl           the text-only model of seed k decoded from the transcripts of the
                                                same rows (infer.py --input text): the no-ASR-error upper bound
    GRID-report/                                report.py's tables and figures (outside GRID: report.py treats
                                                every folder inside GRID as part of the layout)

text-only uses no speech, so it runs once per seed, under p0. Seed k means `--seed k --subset-seed k`: the speech
subsets of one seed are nested across fractions (train.py takes the first round(p*N) rows of one permutation).
A cell whose pred.jsonl exists is skipped; a run directory with hf/ (train.py exports only at the end of its
plan) is not trained again; an interrupted training resumes from its run directory (train.py does that itself).
So rerunning the same command finishes an interrupted grid without redoing finished runs. Delete a pred.jsonl
to redo its cell's decoding; delete its run/ too to redo the training.

Cross-lingual settings (paper Fig. 2 / Table 3), --setting NAME. Source: Speech-MASSIVE fr-FR prepared with
`prepare.py speech-massive --locales fr-FR --out SRC`; targets: Speech-MASSIVE few-shot, `prepare.py speech-massive
--locales de-DE es-ES ... --few-shot --out TGT` (train = train_115: 115 transcripts and their recordings per
locale; one folder with all targets, or one folder per target); MASSIVE target text: `prepare.py massive --locales
de-DE es-ES ... --out MAS` (transcripts only). p is the grid's speech fraction. Each setting's --train-manifest
entries (PATH:FRACTION = that manifest's transcripts, always all of them, plus that fraction of its speech rows):

    zero-shot     SRC/train.jsonl:p                                       source only
    few-shot-T    SRC/train.jsonl:p  TGT/train.jsonl:0                    + target transcripts T
    few-shot-TS   SRC/train.jsonl:p  TGT/train.jsonl:1.0                  + target transcripts T and speech S
    few-shot-T+M  SRC/train.jsonl:p  TGT/train.jsonl:0  MAS/train.jsonl:0 + T + MASSIVE target text M
    no-source     TGT/train.jsonl:p                                       target few-shot data only (T, S at p)

(one TGT entry per --target-dirs folder). Text-only runs pass the same entries and use none of their speech.
Evaluation: the speech rows of every TGT/test.jsonl, reported per language (report.py --by lang); dev: the
source's devel.jsonl (none for no-source: the targets' few-shot data has no dev split worth the name).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from model.manifest import ManifestError, read_manifest, write_manifest
from report import fraction_name  # the directory names report.py parses: p0, p0.02, p1

REPO = Path(__file__).resolve().parent
SCHEMES = ("text-only", "direct", "curriculum")
SETTINGS = ("zero-shot", "few-shot-T", "few-shot-TS", "few-shot-T+M", "no-source")
# train.py flags that grid.py sets per cell; passing them after `--` would contradict the layout.
OWNED_TRAIN_FLAGS = ("--scheme", "--speech-fraction", "--epochs", "--model", "--run-dir", "--seed", "--subset-seed",
                     "--train-manifest", "--plan-only")


class GridError(ValueError):
    """Bad flags or inputs; main prints the message and exits with status 2."""


# ----------------------------------------------------------------------------------------------------------------
# What each run trains on and is scored on.

def train_entries(args, fraction: float) -> list[str]:
    """The --train-manifest entries (PATH:FRACTION) of one run at speech fraction `fraction`."""
    if args.setting is None:
        return [f"{Path(args.corpus_dir) / 'train.jsonl'}:{fraction:g}"]
    source = f"{Path(args.source_dir) / 'train.jsonl'}:{fraction:g}" if args.setting != "no-source" else None
    targets = [Path(d) / "train.jsonl" for d in args.target_dirs]
    if args.setting == "zero-shot":
        return [source]
    if args.setting == "few-shot-T":
        return [source] + [f"{t}:0" for t in targets]
    if args.setting == "few-shot-TS":
        return [source] + [f"{t}:1.0" for t in targets]
    if args.setting == "few-shot-T+M":
        return [source] + [f"{t}:0" for t in targets] + [f"{Path(d) / 'train.jsonl'}:0" for d in args.massive_dirs]
    if args.setting == "no-source":
        return [f"{t}:{fraction:g}" for t in targets]
    raise GridError(f"--setting {args.setting!r}: expected one of {', '.join(SETTINGS)}")


def test_manifests(args) -> list[Path]:
    """The manifests whose speech rows make GRID/test_speech.jsonl."""
    if args.setting is None:
        return [Path(args.corpus_dir) / "test.jsonl"]
    return [Path(d) / "test.jsonl" for d in args.target_dirs]


def dev_manifest(args) -> str:
    """train.py's epoch-end dev set: the corpus' (or source's) devel.jsonl if there is one."""
    folder = args.corpus_dir if args.setting is None else (args.source_dir if args.setting != "no-source" else None)
    if folder is not None and (Path(folder) / "devel.jsonl").is_file():
        return str(Path(folder) / "devel.jsonl")
    return "none"


def write_test_speech(args, out: Path) -> int:
    """Write the speech rows of the test manifest(s) to `out` (atomically; left alone if already identical).

    Audio paths come back absolute from read_manifest, so the file works from the grid directory."""
    rows = []
    for path in test_manifests(args):
        speech = [r for r in read_manifest(path) if r["audio"] is not None]
        if not speech:
            raise GridError(f"{path}: no speech rows (audio set): nothing to score speech input on")
        rows += speech
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
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


def train_command(args, cell: Cell, grid: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--scheme", cell.scheme,
            "--speech-fraction", f"{cell.fraction:g}", "--epochs", str(args.epochs), "--model", args.model,
            "--run-dir", str(cell.dir(grid) / "run"), "--seed", str(cell.seed), "--subset-seed", str(cell.seed),
            "--train-manifest", *train_entries(args, cell.fraction),
            *([] if "--dev-manifest" in flag_names(args.train_flags) else ["--dev-manifest", dev_manifest(args)]),
            *args.train_flags]


def infer_command(args, model_run: Path, manifest: Path, out: Path, text_input: bool = False) -> list[str]:
    return [sys.executable, str(REPO / "infer.py"), "--model", str(model_run / "hf"), "--manifest", str(manifest),
            "--out", str(out), "--num-beams", str(args.num_beams), "--max-new-tokens", str(args.max_new_tokens),
            *(["--input", "text"] if text_input else []), *args.infer_flags]


def report_command(args, grid: Path, gold: Path) -> list[str]:
    return [sys.executable, str(REPO / "report.py"), "--grid", str(grid), "--gold", str(gold),
            "--out", str(report_dir(args, grid)), *(["--by", "lang"] if args.setting else [])]


def report_dir(args, grid: Path) -> Path:
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


# ----------------------------------------------------------------------------------------------------------------
# Running.

def run_command(cmd: list[str]) -> None:
    """Run one stage script; a failure stops the grid (the finished cells stay finished)."""
    print("+ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def exported(run_dir: Path) -> bool:
    return (run_dir / "hf" / "config.json").is_file()


def run_cell(args, cell: Cell, grid: Path, test: Path) -> bool:
    """Train (or resume) and decode one cell unless its pred.jsonl exists; True if anything ran."""
    pred = cell.dir(grid) / "pred.jsonl"
    if pred.is_file():
        return False
    # The oracle decodes the transcripts with the text-only model of the same seed; nothing of its own to train.
    train_cell = Cell("text-only", 0.0, cell.seed) if cell.scheme == "oracle" else cell
    run_dir = train_cell.dir(grid) / "run"
    # hf/ is written when a run ends (its plan's end, or --max-steps among the train flags): such a run is done.
    if not exported(run_dir):
        run_command(train_command(args, train_cell, grid))  # resumes from run/checkpoints if interrupted
        if not exported(run_dir):
            raise GridError(f"{run_dir}: train.py finished without writing hf/ (was --no-export among the train "
                            f"flags? a grid cell must export its model to be decoded)")
    run_command(infer_command(args, run_dir, test, pred, text_input=cell.scheme == "oracle"))
    return True


def check_args(args) -> None:
    if args.setting is None:
        if not args.corpus_dir:
            raise GridError("give --corpus-dir (a prepared corpus: DIR/{train,devel,test}.jsonl) or --setting")
        if args.source_dir or args.target_dirs or args.massive_dirs:
            raise GridError("--source-dir / --target-dirs / --massive-dir need --setting")
    else:
        if args.corpus_dir:
            raise GridError(f"--setting {args.setting} takes its data from --source-dir / --target-dirs, "
                            f"not --corpus-dir")
        if not args.target_dirs:
            raise GridError(f"--setting {args.setting} needs --target-dirs (the targets' few-shot manifests)")
        if args.setting != "no-source" and not args.source_dir:
            raise GridError(f"--setting {args.setting} needs --source-dir (Speech-MASSIVE fr-FR manifests)")
        if args.setting == "few-shot-T+M" and not args.massive_dirs:
            raise GridError("--setting few-shot-T+M needs --massive-dir (MASSIVE target-language text)")
        if args.setting != "few-shot-T+M" and args.massive_dirs:
            raise GridError(f"--massive-dir is only used by --setting few-shot-T+M, not {args.setting}")
    for p in args.fractions:
        if not 0 < p <= 1:
            raise GridError(f"--fractions: {p:g} is not in (0, 1] (text-only, which uses no speech, is always run "
                            f"at p0)")
    if args.oracle and "text-only" not in args.schemes:
        raise GridError("--oracle decodes with the text-only model of each seed: keep text-only in --schemes")
    if args.epochs < 1 or args.num_beams < 1 or args.max_new_tokens < 1:
        raise GridError("--epochs, --num-beams and --max-new-tokens must be >= 1")
    owned = flag_names(args.train_flags) & set(OWNED_TRAIN_FLAGS)
    if owned:
        raise GridError(f"{', '.join(sorted(owned))} after `--`: grid.py sets these per cell (use its own flags)")
    needed = [Path(d) / "train.jsonl" for d in [args.corpus_dir, args.source_dir, *args.target_dirs,
                                               *args.massive_dirs] if d] + test_manifests(args)
    missing = [str(p) for p in dict.fromkeys(needed) if not p.is_file()]
    if missing and not args.dry_run:
        raise GridError(f"missing manifest(s): {', '.join(missing)} (make them with prepare.py)")


def parse_args(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = []
    if "--" in argv:  # everything after `--` goes to train.py
        at = argv.index("--")
        argv, train_flags = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="GRID/<name>: the grid directory (created)")
    parser.add_argument("--corpus-dir", help="prepared corpus DIR/{train,devel,test}.jsonl (monolingual grid)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.10, 0.25, 0.50, 1.0],
                        help="speech fractions of the mixing schemes (default: the paper's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seed k: --seed k --subset-seed k")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--oracle", action="store_true", help="also decode the test transcripts with text-only")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="tiny", help="preset (tiny, 7b) or Hugging Face Qwen2-Audio directory")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--infer-flag", dest="infer_flags", action="append", default=[], metavar="FLAG",
                        help="extra infer.py argument, repeatable (e.g. --infer-flag=--dtype --infer-flag=float32)")
    parser.add_argument("--setting", choices=SETTINGS, help="a cross-lingual setting (see below)")
    parser.add_argument("--source-dir", help="source manifests (Speech-MASSIVE fr-FR)")
    parser.add_argument("--target-dirs", nargs="+", default=[], help="target few-shot manifests (train_115, test)")
    parser.add_argument("--massive-dir", dest="massive_dirs", nargs="+", default=[],
                        help="MASSIVE target-language text manifests (few-shot-T+M)")
    parser.add_argument("--report-out", help="report.py's --out (default: GRID-report beside GRID)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    args.train_flags = train_flags
    args.fractions = sorted(dict.fromkeys(args.fractions))  # 0.1 and 0.10 are one directory
    args.seeds = list(dict.fromkeys(args.seeds))
    args.schemes = [s for s in SCHEMES if s in args.schemes]  # text-only first: the oracle needs it
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        grid = Path(args.grid)
        test = grid / "test_speech.jsonl"
        todo = cells(args)
        if args.dry_run:
            print(f"# {test}: the speech rows of {' '.join(map(str, test_manifests(args)))}")
            for cell in todo:
                train_cell = Cell("text-only", 0.0, cell.seed) if cell.scheme == "oracle" else cell
                run_dir = train_cell.dir(grid) / "run"
                if cell.scheme != "oracle":
                    print(shlex.join(train_command(args, cell, grid)))
                print(shlex.join(infer_command(args, run_dir, test, cell.dir(grid) / "pred.jsonl",
                                               text_input=cell.scheme == "oracle")))
            print(shlex.join(report_command(args, grid, test)))
            return 0
        n_test = write_test_speech(args, test)
        print(f"grid.py: {len(todo)} cells, {n_test} test speech rows in {test}", flush=True)
        ran = 0
        for k, cell in enumerate(todo, 1):
            if run_cell(args, cell, grid, test):
                ran += 1
                print(f"grid.py: [{k}/{len(todo)}] {cell.dir(grid)} done", flush=True)
            else:
                print(f"grid.py: [{k}/{len(todo)}] {cell.dir(grid)}: pred.jsonl exists, skipped", flush=True)
        run_command(report_command(args, grid, test))
        print(f"grid.py: {ran} cells run, {len(todo) - ran} skipped; report in {report_dir(args, grid)}")
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
