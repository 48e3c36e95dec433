"""Turn a grid of prediction files into the paper's tables and figures.

    python report.py --grid GRID/slurp --gold test.jsonl --out reports/slurp
    python report.py --grid GRID/xl-de-fr --gold test.jsonl --out reports/xl --by lang
    python report.py --grid GRID/slurp --gold test.jsonl --out reports/slurp --metric slu_f1
    python report.py --grid GRID/slurp --gold test.jsonl --out reports/slurp --dagger-against text-only

The grid holds one infer.py output per run:

    GRID/<scheme>/p<fraction>/seed<k>/pred.jsonl

scheme is one of text-only, direct, curriculum, oracle (the text-only model decoded from gold transcripts,
fraction dir `p0`); fraction is the share of speech in training, written like `p0.02` or `p1.0`. Every run is
scored by score.py (this file computes no metric itself) and each (scheme, fraction) cell summarised over its
seeds. The same pred.jsonl under two seed dirs of a cell (a linked directory, or a copied file) is an error naming
both: it would count as two seeds that agree perfectly. Written to --out, each file to a temporary name and then
renamed:

  table.md     paper Table 2: rows = schemes, columns = speech fractions, one section per metric (and per
               --by group); a cell is `mean ± ci95` in percent, the 95% Student-t half-width over seeds;
               a single seed shows its value and `(n=1)`. A dagger † marks, as in the paper's Table 2
               ("significant improvement over the other method (95% CI non-overlapping)"), the better of
               direct and curriculum at the same speech fraction when their intervals do not overlap
               (score.daggers); the worse cell, text-only, oracle and a cell or rival of one seed get none.
               --dagger-against text-only instead marks any scheme's cell whose interval lies wholly above
               text-only's; text-only uses no speech, so a grid may hold it once, at p0: its cell at the same
               fraction is the rival, else its p0 cell (this is also the base of the relative improvements).
  table.csv    the same cells, one per line, with the number of runs, mean and ci95 (fractions in [0, 1]),
               and `missing` / `parse_errors` (gold rows with no prediction, unparsed answers; summed over runs).
  report.json  every number above, plus each cell's per-seed values and (with --by) the relative improvements.
  slu_f1_vs_fraction.png     SLU-F1 against the speech fraction per scheme with 95% bands; cells at p0
               (text-only, oracle) are horizontal references.
  relative_improvement.png   with --by: per group, (scheme - text-only) / text-only * 100 of SLU-F1.

A missing cell, or a seed dir without pred.jsonl, is skipped with a warning; a directory whose name does not
fit the layout is an error (a typo would otherwise drop results silently).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

import score  # noqa: E402
from model.manifest import atomic_write, atomic_write_text  # noqa: E402
from train import SCHEMES as TRAIN_SCHEMES, VARIANT_SCHEMES  # noqa: E402

# table row order: train.py's schemes, their variants (distillation, gap selection), then the oracle
SCHEMES = (*TRAIN_SCHEMES, *VARIANT_SCHEMES, "oracle")
REFERENCE = "text-only"  # relative improvements (and daggers with --dagger-against text-only) are against it
# the paper's dagger: the other method at the same fraction; a variant's: its own scheme without it
RIVALS = {"direct": "curriculum", "curriculum": "direct", **{v: v.split("+")[0] for v in VARIANT_SCHEMES}}
OTHER_METHOD = "other-method"  # --dagger-against's default, the paper's rule: RIVALS at the same fraction
DAGGER_AGAINST = (OTHER_METHOD, REFERENCE)  # --dagger-against's choices
DAGGER_NOTES = {  # table.md's footnote for each choice
    OTHER_METHOD: "† significant improvement over the other method (direct or curriculum) at the same speech\n"
                  "fraction: the 95% intervals do not overlap (the paper's Table 2). A variant (scheme+distill,\n"
                  "scheme+gap, ...) is compared with its own scheme at the same fraction.",
    REFERENCE: f"† significant improvement over {REFERENCE} at the same speech fraction ({REFERENCE}'s p0 cell\n"
               f"where it has none there): the 95% intervals do not overlap.",
}
DEFAULT_METRICS = ("slu_f1", "intent_acc", "entity_f1")
FIGURE_METRIC = "slu_f1"
COLORS = {"text-only": "tab:gray", "direct": "tab:blue", "curriculum": "tab:orange", "oracle": "tab:green",
          **dict(zip(VARIANT_SCHEMES, ("tab:cyan", "tab:purple", "tab:olive", "tab:red", "tab:brown", "tab:pink")))}
FRACTION_DIR = re.compile(r"p(\d+(?:\.\d+)?)")
SEED_DIR = re.compile(r"seed(\d+)")
CSV_FIELDS = ("group", "metric", "scheme", "speech_fraction", "runs", "mean", "ci95", "dagger", "cell",
              "missing", "parse_errors")

Cell = tuple[str, float]  # (scheme, speech fraction)


# ---------------------------------------------------------------------------------------------
# Finding the runs.

def find_runs(grid: str | Path) -> tuple[dict[Cell, list[tuple[str, Path]]], list[str]]:
    """{(scheme, fraction): [(seed name, pred.jsonl path), ...] by seed number}, and the warnings.

    Files at any level are ignored (logs, configs); directories must fit the layout."""
    grid = Path(grid)
    if not grid.is_dir():
        raise ValueError(f"--grid {grid}: not a directory (expected GRID/<scheme>/p<fraction>/seed<k>/pred.jsonl)")
    runs, warnings = {}, []
    for scheme_dir in sorted(p for p in grid.iterdir() if p.is_dir()):
        if scheme_dir.name not in SCHEMES:
            raise ValueError(f"{scheme_dir}: unknown scheme directory (expected one of {', '.join(SCHEMES)})")
        seen = {}
        for fraction_dir in sorted(p for p in scheme_dir.iterdir() if p.is_dir()):
            match = FRACTION_DIR.fullmatch(fraction_dir.name)
            if not match or float(match[1]) > 1:
                raise ValueError(f"{fraction_dir}: expected a speech-fraction directory p<fraction> with the "
                                 f"fraction in [0, 1], like p0.02 or p1.0")
            fraction = float(match[1])
            if fraction in seen:
                raise ValueError(f"{fraction_dir}: the same fraction as {seen[fraction]}")
            seen[fraction] = fraction_dir
            seeds = []
            for seed_dir in (p for p in fraction_dir.iterdir() if p.is_dir()):
                if not SEED_DIR.fullmatch(seed_dir.name):
                    raise ValueError(f"{seed_dir}: expected a seed directory seed<k>, like seed0")
                if (seed_dir / "pred.jsonl").is_file():
                    seeds.append((int(seed_dir.name[4:]), seed_dir.name, seed_dir / "pred.jsonl"))
                else:
                    warnings.append(f"{seed_dir / 'pred.jsonl'}: missing, run skipped")
            if seeds:
                runs[(scheme_dir.name, fraction)] = [(name, path) for _, name, path in sorted(seeds)]
            else:
                warnings.append(f"{fraction_dir}: no seed<k>/pred.jsonl, cell skipped")
    if not runs:
        raise ValueError(f"--grid {grid}: no <scheme>/p<fraction>/seed<k>/pred.jsonl found")
    # A (scheme, fraction) that other schemes have but this one lacks is a hole in the table: say so.
    # text-only and oracle take no speech, so their absence at positive fractions is expected.
    fractions = sorted({f for _, f in runs})
    for scheme in SCHEMES:
        if scheme in VARIANT_SCHEMES and not any(s == scheme for s, _ in runs):
            continue  # optional rows: a grid without them is complete
        if not any(s == scheme for s, _ in runs):
            warnings.append(f"{grid / scheme}: no runs, row left out")
        if scheme in (REFERENCE, "oracle") or not any(s == scheme for s, _ in runs):
            continue
        for fraction in fractions:
            if fraction > 0 and (scheme, fraction) not in runs:
                warnings.append(f"{grid / scheme / fraction_name(fraction)}: no runs, cell left empty")
    return runs, warnings


def fraction_name(fraction: float) -> str:
    """The directory name of a fraction (p0, p0.02, p1.0 all parse; this writes the shortest)."""
    return f"p{fraction:g}"


def fraction_label(fraction: float) -> str:
    """A column header: the speech fraction in percent."""
    return f"{100 * fraction:g}%"


# ---------------------------------------------------------------------------------------------
# Scoring and the cells of the tables.

def score_grid(gold_rows: Sequence[dict], runs: dict[Cell, list[tuple[str, Path]]], gold_path: str | Path,
               by: str | None = None) -> tuple[dict[Cell, dict], list[str]]:
    """score.evaluate of every cell's seeds: ({(scheme, fraction): result}, a warning per prediction file that
    lacks gold rows or mixes answers to speech and to transcripts)."""
    ids = {row["id"] for row in gold_rows}
    results, warnings = {}, []
    for cell, seeds in runs.items():
        preds = [score.load_predictions(path, ids, gold_path) for _, path in seeds]
        for (_, path), run in zip(seeds, preds):
            warnings += filter(None, (score.missing_rows_warning(path, run, gold_rows),
                                      score.mixed_input_warning(path, run)))
        results[cell] = score.evaluate(gold_rows, preds, by)
    return results, warnings


def groups_of(results: dict[Cell, dict], by: str | None) -> list[tuple[str, str | None]]:
    """[(group name, key in the result's by_<field> or None for all rows)]: all first, then each value."""
    keys = sorted({k for r in results.values() for k in r.get(f"by_{by}", {})}) if by else []
    return [("all", None)] + [(f"{by}={k}", k) for k in keys]


def reference_of(fraction: float, cells: dict[Cell, dict]) -> Cell | None:
    """text-only's cell at the same fraction, else at p0 (it trains on no speech), else none."""
    for cell in ((REFERENCE, fraction), (REFERENCE, 0.0)):
        if cell in cells:
            return cell
    return None


def rival_of(cell: Cell, cells: dict[Cell, dict], against: str) -> Cell | None:
    """The cell whose interval `cell` must lie wholly above to get a dagger; None: it never gets one.

    other-method (the paper's Table 2): direct against curriculum at the same fraction and back; text-only
    and oracle get none. text-only: every other scheme against text-only's reference cell."""
    scheme, fraction = cell
    if against == REFERENCE:
        return None if scheme == REFERENCE else reference_of(fraction, cells)
    rival = (RIVALS[scheme], fraction) if scheme in RIVALS else None
    return rival if rival in cells else None


def seed_values(result: dict, metric: str) -> list[float]:
    """The per-seed values of one metric in a score.evaluate / summarize_runs result."""
    return [run[metric] for run in result["runs"]] if "runs" in result else [result[metric]]


def format_cell(mean: float, ci95: float | None, dagger: bool) -> str:
    """`mean ± ci95` in percent with one decimal; a single run has no interval: `mean (n=1)`."""
    text = f"{100 * mean:.1f} (n=1)" if ci95 is None else f"{100 * mean:.1f} ± {100 * ci95:.1f}"
    return text + ("†" if dagger else "")


def build_cells(results: dict[Cell, dict], runs: dict[Cell, list[tuple[str, Path]]], metrics: Sequence[str],
                by: str | None = None, dagger_against: str = OTHER_METHOD) -> list[dict]:
    """One dict per (group, metric, scheme, fraction) with a result: the table's cells in reading order."""
    rows = []
    for group, key in groups_of(results, by):
        # This group's result of each cell (every cell has every group: the groups come from the gold file).
        group_results = {c: (r if key is None else r[f"by_{by}"][key]) for c, r in results.items()}
        for metric in metrics:
            for cell in sorted(group_results, key=lambda c: (SCHEMES.index(c[0]), c[1])):
                result, ref = group_results[cell], reference_of(cell[1], group_results)
                rival = rival_of(cell, group_results, dagger_against)
                multi = "ci95" in result
                dagger = (multi and rival is not None and "ci95" in group_results[rival]
                          and score.daggers(result, group_results[rival])[metric])
                mean = result["mean"][metric] if multi else result[metric]
                ci95 = result["ci95"][metric] if multi else None
                rows.append({
                    "group": group, "metric": metric, "scheme": cell[0], "speech_fraction": cell[1],
                    "runs": len(runs[cell]), "seeds": [name for name, _ in runs[cell]],
                    "values": seed_values(result, metric), "mean": mean, "ci95": ci95,
                    "reference_fraction": None if ref is None else ref[1],
                    "dagger_against": None if rival is None else {"scheme": rival[0], "speech_fraction": rival[1]},
                    "dagger": bool(dagger),
                    "cell": format_cell(mean, ci95, bool(dagger)),
                    "missing": result["missing"], "parse_errors": result["parse_errors"],
                })
    return rows


def relative_improvements(cells: list[dict], metric: str = FIGURE_METRIC) -> list[dict]:
    """(scheme - text-only) / text-only * 100 of `metric` for every non-reference cell, per group."""
    means = {(c["group"], c["scheme"], c["speech_fraction"]): c for c in cells if c["metric"] == metric}
    out = []
    for (group, scheme, fraction), cell in means.items():
        if scheme == REFERENCE or cell["reference_fraction"] is None:
            continue
        base = means[(group, REFERENCE, cell["reference_fraction"])]["mean"]
        if base == 0:
            continue  # undefined; the warning is given where the figure is drawn
        out.append({"group": group, "metric": metric, "scheme": scheme, "speech_fraction": fraction,
                    "reference_fraction": cell["reference_fraction"],
                    "relative_improvement": (cell["mean"] - base) / base * 100})
    return out


# ---------------------------------------------------------------------------------------------
# Tables.

def format_markdown(cells: list[dict], title: str, by: str | None = None,
                    dagger_against: str = OTHER_METHOD) -> str:
    fractions = sorted({c["speech_fraction"] for c in cells})
    lines = [f"# {title}", "",
             "Cells: mean ± 95% confidence half-width over seeds (Student t), in percent; `(n=1)`: a single seed,",
             "no interval; –: no runs.", DAGGER_NOTES[dagger_against], ""]
    for group in dict.fromkeys(c["group"] for c in cells):
        if by:
            lines += [f"## {group.replace('=', ' = ')}", ""]
        for metric in dict.fromkeys(c["metric"] for c in cells):
            table = {(c["scheme"], c["speech_fraction"]): c["cell"] for c in cells
                     if c["group"] == group and c["metric"] == metric}
            schemes = [s for s in SCHEMES if any(s == k[0] for k in table)]
            lines += [f"{'###' if by else '##'} {score.LABELS[metric]} (%)", "",
                      "| scheme | " + " | ".join(fraction_label(f) for f in fractions) + " |",
                      "|---|" + "---:|" * len(fractions)]
            lines += ["| " + " | ".join([s] + [table.get((s, f), "–") for f in fractions]) + " |" for s in schemes]
            lines.append("")
    return "\n".join(lines)


def format_csv(cells: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for c in cells:
        writer.writerow({**c, "ci95": "" if c["ci95"] is None else repr(c["ci95"]), "mean": repr(c["mean"]),
                         "dagger": int(c["dagger"])})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Figures.

def plot_fraction_curve(cells: list[dict], path: Path, metric: str = FIGURE_METRIC) -> None:
    """Metric against speech fraction, one line per scheme with its 95% band; p0 cells as horizontal lines."""
    cells = [c for c in cells if c["group"] == "all" and c["metric"] == metric]
    positive = sorted({c["speech_fraction"] for c in cells if c["speech_fraction"] > 0})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = []  # every y value a line or band reaches, for the axis limits
    for scheme in SCHEMES:
        mine = sorted((c for c in cells if c["scheme"] == scheme), key=lambda c: c["speech_fraction"])
        color = COLORS[scheme]
        for c in mine:
            if c["speech_fraction"] == 0:  # a reference: no speech in training (text-only) or an upper bound
                mean, half = 100 * c["mean"], 100 * (c["ci95"] or 0.0)
                ax.axhline(mean, color=color, linestyle="--", label=f"{scheme} (p0)")
                ax.axhspan(mean - half, mean + half, color=color, alpha=0.15, linewidth=0)
                drawn += [mean - half, mean + half]
        curve = [c for c in mine if c["speech_fraction"] > 0]
        if curve:
            x = np.array([c["speech_fraction"] for c in curve])
            y = 100 * np.array([c["mean"] for c in curve])
            half = 100 * np.array([c["ci95"] or 0.0 for c in curve])
            ax.plot(x, y, marker="o", color=color, label=scheme)
            ax.fill_between(x, y - half, y + half, color=color, alpha=0.2, linewidth=0)
            drawn += [*(y - half), *(y + half)]
    if drawn:
        # Scores live in [0, 100]; pad by at least one point so that equal scores (all 0 on a demo that
        # has not learned yet) still get a readable axis instead of matplotlib's +-0.05 around one value.
        lo, hi = min(drawn), max(drawn)
        pad = max(1.0, 0.08 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) if hi + pad > 1.0 else 1.0)
    if len(positive) >= 2:
        ax.set_xscale("log")  # the paper's fractions span 2% to 100%
    # Ticks at the grid's fractions, labelled as the table's columns are (log axes would print 10^-1).
    ax.set_xticks(positive, [fraction_label(f) for f in positive])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("speech fraction p of the training data")
    ax.set_ylabel(f"{score.LABELS[metric]} (%)")
    ax.set_title(f"{score.LABELS[metric]} vs speech fraction (95% bands over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_relative_improvement(improvements: list[dict], path: Path) -> None:
    """Per group, bars of each scheme's relative improvement over text-only; one panel per speech fraction.

    oracle (p0) is drawn in every panel: it is the same bar, the ceiling the others are read against."""
    groups = list(dict.fromkeys(i["group"] for i in improvements if i["group"] != "all"))
    panels = sorted({i["speech_fraction"] for i in improvements if i["scheme"] != "oracle"}) or [None]
    schemes = [s for s in SCHEMES if s != REFERENCE and any(i["scheme"] == s for i in improvements)]
    value = {(i["group"], i["scheme"], i["speech_fraction"]): i["relative_improvement"] for i in improvements}
    width_in = min(20.0, 2.7 + 0.5 * len(groups) * len(schemes) * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in, 4.4), sharey=True, squeeze=False)
    width = 0.8 / max(len(schemes), 1)
    for ax, fraction in zip(axes[0], panels):
        for k, scheme in enumerate(schemes):
            at = 0.0 if scheme == "oracle" else fraction
            heights = [value.get((g, scheme, at), np.nan) for g in groups]
            ax.bar(np.arange(len(groups)) + (k - (len(schemes) - 1) / 2) * width, heights, width,
                   color=COLORS[scheme], hatch="//" if scheme == "oracle" else None,
                   label=f"{scheme} (p0)" if scheme == "oracle" else scheme)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(groups)), [g.split("=", 1)[-1] for g in groups])
        ax.set_title("oracle only" if fraction is None else f"speech fraction {fraction_label(fraction)}")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"relative {score.LABELS[FIGURE_METRIC]} improvement over {REFERENCE} (%)")
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Atomic output.

def _save(fig, path: Path) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------

def report(grid: str | Path, gold: str | Path, out: str | Path, by: str | None = None,
           metrics: Sequence[str] = DEFAULT_METRICS, dagger_against: str = OTHER_METHOD) -> tuple[dict, list[str]]:
    """Score the grid and write every output file to `out`; returns (report.json's object, warnings)."""
    if dagger_against not in DAGGER_AGAINST:
        raise ValueError(f"dagger_against must be one of {', '.join(DAGGER_AGAINST)}, got {dagger_against!r}")
    out = Path(out)
    runs, warnings = find_runs(grid)
    for seeds in runs.values():
        score.check_distinct_runs([path for _, path in seeds])
    gold_rows = score.load_gold(gold, by)
    results, missing = score_grid(gold_rows, runs, gold, by)
    warnings += missing
    if not any(cell[0] == REFERENCE for cell in results):
        warnings.append(f"--grid {grid}: no {REFERENCE} runs, so no relative improvements"
                        + (" and no daggers" if dagger_against == REFERENCE else ""))
    cells = build_cells(results, runs, metrics, by, dagger_against)
    # The figures always show SLU-F1, whatever --metric asked the tables for.
    figure_cells = (cells if FIGURE_METRIC in metrics
                    else build_cells(results, runs, [FIGURE_METRIC], by, dagger_against))
    improvements = relative_improvements(figure_cells) if by else []
    for c in figure_cells if by else []:
        if c["scheme"] == REFERENCE and c["mean"] == 0:
            warnings.append(f"{c['group']}: {REFERENCE} SLU-F1 is 0 at {fraction_name(c['speech_fraction'])}; "
                            f"no relative improvement against it")

    out.mkdir(parents=True, exist_ok=True)
    title = f"sluice report: {grid}" + (f", by {by}" if by else "")
    atomic_write_text(out / "table.md", format_markdown(cells, title, by, dagger_against))
    atomic_write_text(out / "table.csv", format_csv(cells))
    plot_fraction_curve(figure_cells, out / "slu_f1_vs_fraction.png")
    if by and improvements:
        plot_relative_improvement(improvements, out / "relative_improvement.png")
    else:
        (out / "relative_improvement.png").unlink(missing_ok=True)  # a stale one would contradict report.json
        if by:
            warnings.append("nothing to compare with text-only: relative_improvement.png not written")
    summary = {
        "grid": str(grid), "gold": str(gold), "by": by, "metrics": list(metrics), "dagger_against": dagger_against,
        "units": "mean, ci95 and values are fractions in [0, 1]; relative_improvement is in percent",
        "speech_fractions": sorted({c[1] for c in runs}),
        "cells": cells,
        "relative_improvement": improvements,
        "warnings": warnings,
    }
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary, warnings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--grid", required=True, help="GRID/<corpus> or GRID/<setting>: holds <scheme>/p<f>/seed<k>/")
    parser.add_argument("--gold", required=True, help="gold manifest JSONL the predictions are scored against")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--by", default=None, help="also tabulate per value of this gold field, e.g. lang")
    parser.add_argument("--metric", action="append", choices=score.METRICS, default=None,
                        help=f"table section(s) to write, repeatable (default: {' '.join(DEFAULT_METRICS)})")
    parser.add_argument("--dagger-against", choices=DAGGER_AGAINST, default=OTHER_METHOD,
                        help="whom a cell's interval must lie wholly above to get a dagger: other-method (the "
                             "paper's Table 2: direct vs curriculum at the same fraction; default) or text-only")
    args = parser.parse_args(argv)
    try:
        summary, warnings = report(args.grid, args.gold, args.out, args.by,
                                   tuple(dict.fromkeys(args.metric or DEFAULT_METRICS)), args.dagger_against)
    except (OSError, ValueError) as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"report.py: warning: {warning}", file=sys.stderr)
    first = [c for c in summary["cells"] if c["group"] == "all" and c["metric"] == summary["metrics"][0]]
    print(f"report.py: {sum(c['runs'] for c in first)} runs in {len(first)} cells -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
