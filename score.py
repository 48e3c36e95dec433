"""Score predictions against a gold manifest: the paper's metrics, with confidence intervals over seeds.

    python score.py --gold test.jsonl --pred seed0.jsonl [--pred seed1.jsonl ...] [--by lang] [--json]
    python score.py --gold test.jsonl --compare a0.jsonl a1.jsonl a2.jsonl --against b0.jsonl b1.jsonl b2.jsonl

Gold rows are manifest rows (`id, lang, text, audio, scenario, action, entities`); prediction rows
are infer.py's output (`id, scenario, action, entities, parse_error, ...`). Per run we report
scenario / action / intent (= scenario_action) accuracy, entity F1 and SLU-F1; with several runs
(one per seed) the mean and the 95% Student-t interval half-width, as in the paper; `--compare`
puts a dagger on the better system's metric when the two intervals do not overlap (the paper's Table 2:
"significant improvement over the other method (95% CI non-overlapping)"); the worse one never gets one.

Every prediction file is one run: the same file given twice among one system's seeds (by path, or a copy with
the same bytes) would count as two seeds that agree perfectly, an interval of +-0 that can earn a dagger, so it
is an error, as is a gold file with no rows.

SLU-F1 follows the official SLURP evaluation (github.com/pswietojanski/slurp, scripts/evaluation,
`SpanDistanceFMeasure` and `SLUF1`), rule for rule:
  * predicted entities are taken in order; one whose type occurs among the *remaining* gold
    entities is matched to the remaining gold entity of that type with the smallest distance
    (the first one on ties), which is then removed: TP += 1, FP += d, FN += d;
  * a predicted entity whose type is not among the remaining gold entities: FP += 1;
  * gold entities left over: FN += 1 each;
  * word distance d = WER(gold filler, predicted filler) over whitespace-split words (it can
    exceed 1: "a" -> "b c d" is 3); char distance d = Levenshtein / max(len) over characters;
  * word-F1 and char-F1 are micro F1 of counts summed over all rows; SLU-F1 is the micro F1 of
    the word and char counts added together. F1 is 0 when there are no true positives.
No text normalisation is applied beyond that (fillers are compared as the files give them).
Entity F1 is the official `SpanFMeasure`: micro F1 over exact (type, filler) pairs, as multisets.

Differences from the official script, on purpose: a gold row without a prediction is scored as a
wrong, empty prediction and counted in `missing` (the official script skips it, which would reward
a run for crashing on hard rows); a prediction whose id is not in the gold file is an error. The
official WER (jiwer) raises on an empty gold filler; we define that distance as 0 for an empty
prediction and 1 otherwise.

Metrics are fractions in [0, 1] in the JSON output and percentages in the table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

from model.manifest import iter_jsonl
from model.processor import AUDIO_TOKEN

METRICS = ("scenario_acc", "action_acc", "intent_acc", "entity_f1", "word_f1", "char_f1", "slu_f1")
COUNTS = ("n", "missing", "parse_errors")
LABELS = {"scenario_acc": "scenario", "action_acc": "action", "intent_acc": "intent",
          "entity_f1": "entity F1", "word_f1": "word F1", "char_f1": "char F1", "slu_f1": "SLU-F1"}

Entity = tuple[str, str]  # (type, filler)


# ---------------------------------------------------------------------------------------------
# Distances and F1, as the official evaluation defines them.

def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insert, delete, substitute, each cost 1) between two sequences.

    The textbook dynamic programme, one column per item of `b`, but with the column held as bit
    vectors of +1/-1 steps down it (Myers 1999, in Hyyro's 2003 formulation), so a column costs a
    few integer operations instead of a Python loop over `a`. It gives exactly the DP's value
    (tests/test_score.py checks it against the plain DP); it is here because 13k rows of the
    plain DP in Python take about a second.
    """
    if a == b:
        return 0
    if not a or not b:
        return len(a) + len(b)
    match = {}  # item -> bit mask of its positions in a
    for i, item in enumerate(a):
        match[item] = match.get(item, 0) | (1 << i)
    ones, last = (1 << len(a)) - 1, 1 << (len(a) - 1)
    up, down, distance = ones, 0, len(a)  # vertical +1 / -1 steps of the current column
    for item in b:
        eq = match.get(item, 0)
        xv = eq | down
        xh = (((eq & up) + up) ^ up) | eq
        right_up = down | (~(xh | up) & ones)  # horizontal +1 steps
        right_down = up & xh  # horizontal -1 steps
        if right_up & last:
            distance += 1
        elif right_down & last:
            distance -= 1
        right_up = ((right_up << 1) | 1) & ones  # row 0 of the DP grows by 1 per column
        right_down = (right_down << 1) & ones
        up = right_down | (~(xv | right_up) & ones)
        down = right_up & xv
    return distance


def word_distance(gold: str, pred: str) -> float:
    """WER of the predicted filler against the gold one (jiwer's `wer`, whitespace-split words)."""
    gold_words, pred_words = gold.split(), pred.split()
    if not gold_words:
        return 0.0 if not pred_words else 1.0
    return levenshtein(gold_words, pred_words) / len(gold_words)


def char_distance(gold: str, pred: str) -> float:
    """Normalised Levenshtein over characters (textdistance's `normalized_distance`)."""
    longest = max(len(gold), len(pred))
    return levenshtein(gold, pred) / longest if longest else 0.0


def f1_score(tp: float, fp: float, fn: float) -> float:
    """F1 from counts; 0 when precision and recall are both 0 or undefined (official `compute_metrics`)."""
    tp, fp, fn = float(tp), float(fp), float(fn)
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def span_distance_counts(gold: Sequence[Entity], pred: Sequence[Entity], distance) -> tuple[float, float, float]:
    """(TP, FP, FN) of one row under the SLURP distance-smoothed span matching (see the module doc)."""
    remaining = list(gold)
    tp = fp = fn = 0.0
    for pred_type, pred_filler in pred:
        best, best_d = -1, float("inf")
        for k, (gold_type, gold_filler) in enumerate(remaining):
            if gold_type == pred_type:
                d = distance(gold_filler, pred_filler)
                if d < best_d:  # strict: the first gold entity wins a tie
                    best, best_d = k, d
        if best < 0:
            fp += 1
        else:
            tp += 1
            fp += best_d
            fn += best_d
            remaining.pop(best)
    fn += len(remaining)
    return tp, fp, fn


def exact_counts(gold: Sequence[Entity], pred: Sequence[Entity]) -> tuple[int, int, int]:
    """(TP, FP, FN) of one row for exact (type, filler) pairs, each gold pair usable once."""
    remaining = list(gold)
    tp = 0
    for entity in pred:
        if entity in remaining:
            remaining.remove(entity)
            tp += 1
    return tp, len(pred) - tp, len(remaining)


def slu_f1(golds: Iterable[Sequence[Entity]], preds: Iterable[Sequence[Entity]]) -> dict[str, float]:
    """Word-F1, char-F1 and SLU-F1 over rows of (type, filler) lists, micro over all rows."""
    word, char = _distance_counts(list(golds), list(preds))
    return _slu_scores(word.sum(0), char.sum(0))


def entity_f1(golds: Iterable[Sequence[Entity]], preds: Iterable[Sequence[Entity]]) -> float:
    """Micro F1 over exact (type, filler) pairs."""
    counts = [exact_counts(gold, pred) for gold, pred in zip(golds, preds, strict=True)]
    return f1_score(*np.sum(counts, axis=0)) if counts else 0.0


def _distance_counts(golds: list, preds: list) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (TP, FP, FN) under the word and the char distance, as two (rows, 3) arrays."""
    word, char = np.zeros((len(golds), 3)), np.zeros((len(golds), 3))
    for i, (gold, pred) in enumerate(zip(golds, preds, strict=True)):
        if gold or pred:  # a row with no entities on either side counts nothing
            word[i] = span_distance_counts(gold, pred, word_distance)
            char[i] = span_distance_counts(gold, pred, char_distance)
    return word, char


def _slu_scores(word: np.ndarray, char: np.ndarray) -> dict[str, float]:
    return {"word_f1": f1_score(*word), "char_f1": f1_score(*char), "slu_f1": f1_score(*(word + char))}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t confidence interval with n-1 degrees of freedom."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"a confidence interval needs at least 2 runs, got {len(x)}")
    half = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(half)


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (mean, half-width) intervals overlap; intervals that touch overlap (the paper gives no
    dagger to SLURP intent at 10%, 0.8678 +- 0.0037 against 0.8618 +- 0.0023)."""
    return abs(a[0] - b[0]) <= a[1] + b[1]


def significantly_better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether interval a = (mean, half-width) lies wholly above b: the paper's dagger, which goes to a.

    Every metric here is higher-is-better, so the better of two non-overlapping intervals is the higher."""
    return a[0] > b[0] and not intervals_overlap(a, b)


# ---------------------------------------------------------------------------------------------
# Scoring rows.

def score_rows(gold_rows: Sequence[dict], preds: dict[str, dict]) -> dict:
    """All metrics of one run: gold rows in order, predictions by id (a missing id scores as wrong)."""
    return aggregate(row_counts(gold_rows, preds))


def row_counts(gold_rows: Sequence[dict], preds: dict[str, dict]) -> dict[str, np.ndarray]:
    """Per-row outcomes of one run, so that any subset of rows (a language) is scored by summing."""
    empty = {"scenario": None, "action": None, "entities": [], "parse_error": None}
    matched = [preds.get(row["id"], empty) for row in gold_rows]
    gold_entities = [_entities(row) for row in gold_rows]
    pred_entities = [_entities(row) for row in matched]
    word, char = _distance_counts(gold_entities, pred_entities)
    return {
        # None (missing) never equals a gold string, so a missing row is wrong for every label.
        "scenario_ok": np.array([g["scenario"] == p["scenario"] for g, p in zip(gold_rows, matched)], dtype=bool),
        "action_ok": np.array([g["action"] == p["action"] for g, p in zip(gold_rows, matched)], dtype=bool),
        "exact": np.array([exact_counts(g, p) for g, p in zip(gold_entities, pred_entities)],
                          dtype=np.float64).reshape(-1, 3),
        "word": word,
        "char": char,
        "missing": np.array([row["id"] not in preds for row in gold_rows], dtype=bool),
        "parse_error": np.array([bool(p.get("parse_error")) for p in matched], dtype=bool),
    }


def aggregate(counts: dict[str, np.ndarray], rows: np.ndarray | slice = slice(None)) -> dict:
    """The metrics of the selected rows (a boolean mask or index array; all rows by default)."""
    c = {key: value[rows] for key, value in counts.items()}
    n = len(c["scenario_ok"])
    accuracy = lambda ok: float(ok.mean()) if n else 0.0  # noqa: E731
    return {
        "scenario_acc": accuracy(c["scenario_ok"]),
        "action_acc": accuracy(c["action_ok"]),
        "intent_acc": accuracy(c["scenario_ok"] & c["action_ok"]),
        "entity_f1": f1_score(*c["exact"].sum(0)),
        **_slu_scores(c["word"].sum(0), c["char"].sum(0)),
        "n": n,
        "missing": int(c["missing"].sum()),
        "parse_errors": int(c["parse_error"].sum()),
    }


def _entities(row: dict) -> list[Entity]:
    return [(e["type"], e["filler"]) for e in row["entities"]]


def summarize_runs(runs: Sequence[dict]) -> dict:
    """One run: its result. Several: the metric keys hold the mean, plus `mean`, `ci95`, `runs`;
    `missing` and `parse_errors` are summed over runs."""
    if len(runs) == 1:
        return dict(runs[0])
    intervals = {m: t_interval([run[m] for run in runs]) for m in METRICS}
    summary = {m: intervals[m][0] for m in METRICS}
    summary["n"] = runs[0]["n"]
    summary["missing"] = sum(run["missing"] for run in runs)
    summary["parse_errors"] = sum(run["parse_errors"] for run in runs)
    summary["mean"] = {m: intervals[m][0] for m in METRICS}
    summary["ci95"] = {m: intervals[m][1] for m in METRICS}
    summary["runs"] = list(runs)
    return summary


def evaluate(gold_rows: Sequence[dict], runs: Sequence[dict[str, dict]], by: str | None = None) -> dict:
    """Score each run and summarise; with `by`, also per value of that gold field (`by_<field>`)."""
    counts = [row_counts(gold_rows, preds) for preds in runs]
    result = summarize_runs([aggregate(c) for c in counts])
    if by:
        keys = np.array([row[by] for row in gold_rows], dtype=object)
        result[f"by_{by}"] = {
            key: summarize_runs([aggregate(c, keys == key) for c in counts]) for key in sorted(set(keys))
        }
    return result


def daggers(a: dict, b: dict) -> dict[str, bool]:
    """Per metric: whether multi-run summary a is significantly better than b (its 95% interval lies wholly
    above b's): the paper's dagger on a. daggers(b, a) gives b's; at most one of the two is True."""
    return {m: significantly_better((a["mean"][m], a["ci95"][m]), (b["mean"][m], b["ci95"][m])) for m in METRICS}


# ---------------------------------------------------------------------------------------------
# Reading files, with errors that name the file and line.

def _check_row(path, number: int, row: dict, by: str | None = None) -> dict:
    where = f"{path}:{number}"
    if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool):
        raise ValueError(f"{where}: field 'id' must be a string, got {row.get('id')!r}")
    for key in ("scenario", "action"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: field '{key}' must be a string, got {row.get(key)!r}")
    entities = row.get("entities")
    if not isinstance(entities, list):
        raise ValueError(f"{where}: field 'entities' must be a list, got {entities!r}")
    for i, e in enumerate(entities):
        if not (isinstance(e, dict) and isinstance(e.get("type"), str) and isinstance(e.get("filler"), str)):
            raise ValueError(f"{where}: entities[{i}] must be an object with string 'type' and 'filler', got {e!r}")
    if by is not None and not isinstance(row.get(by), str):
        raise ValueError(f"{where}: field '{by}' (for --by) must be a string, got {row.get(by)!r}")
    return {**row, "id": str(row["id"])}


def load_gold(path: str | Path, by: str | None = None) -> list[dict]:
    rows, seen = [], {}
    for number, row in iter_jsonl(path):
        row = _check_row(path, number, row, by)
        if row["id"] in seen:
            raise ValueError(f"{path}:{number}: id {row['id']!r} repeats line {seen[row['id']]}")
        seen[row["id"]] = number
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no gold rows (an empty gold file would score every run 0)")
    return rows


def check_distinct_runs(paths: Sequence[str | Path]) -> None:
    """Refuse a prediction file given twice among one system's seeds, by resolved path or by bytes (a copy).

    Each file counts as one run (seed): a repeat would be a second seed agreeing perfectly with the first,
    shrinking the interval towards +-0 and so inventing a dagger."""
    first_of_path, first_of_hash = {}, {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in first_of_path:
            raise ValueError(f"{first_of_path[resolved]} and {path} are the same file: each prediction file is "
                             f"one run, and a run counted twice looks like two seeds that agree perfectly")
        first_of_path[resolved] = path
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as e:
            raise ValueError(f"{path}: cannot read: {e.strerror}") from None
        if digest in first_of_hash:
            raise ValueError(f"{first_of_hash[digest]} and {path} have identical contents: each prediction file "
                             f"is one run, and a copy looks like a second seed that agrees perfectly")
        first_of_hash[digest] = path


def load_predictions(path: str | Path, gold_ids: set[str], gold_path: str | Path = "the gold file") -> dict[str, dict]:
    preds, seen = {}, {}
    for number, row in iter_jsonl(path):
        row = _check_row(path, number, row)
        if row["id"] not in gold_ids:
            raise ValueError(f"{path}:{number}: id {row['id']!r} is not in {gold_path}")
        if row["id"] in seen:
            raise ValueError(f"{path}:{number}: id {row['id']!r} repeats line {seen[row['id']]}")
        seen[row["id"]] = number
        preds[row["id"]] = row
    return preds


# ---------------------------------------------------------------------------------------------
# Output.

def _cell(result: dict, metric: str) -> str:
    if "ci95" in result:
        return f"{100 * result['mean'][metric]:.2f} ± {100 * result['ci95'][metric]:.2f}"
    return f"{100 * result[metric]:.2f}"


def format_table(result: dict, by: str | None = None) -> str:
    """Rows: all, then one per group; columns: the metrics in percent, then the counts."""
    groups = [("all", result)] + (list(result.get(f"by_{by}", {}).items()) if by else [])
    header = [by or "", *(LABELS[m] for m in METRICS), *COUNTS]
    rows = [[str(name), *(_cell(r, m) for m in METRICS), *(str(r[c]) for c in COUNTS)] for name, r in groups]
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header] + rows)


def format_comparison(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """One row per metric; the dagger follows the cell of the significantly better system, if either is."""
    dagger_a, dagger_b = daggers(a, b), daggers(b, a)
    mark = {True: "†", False: " "}  # a blank where there is no dagger keeps the numbers aligned
    header = ["metric", name_a + " ", name_b + " "]
    rows = [[LABELS[m], _cell(a, m) + mark[dagger_a[m]], _cell(b, m) + mark[dagger_b[m]]] for m in METRICS]
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)).rstrip() for line in [header] + rows)


def missing_rows_warning(path: str | Path, preds: dict[str, dict], gold_rows: Sequence[dict]) -> str | None:
    """What to say of a prediction file that lacks some gold rows (they score as wrong), or None."""
    missing = [row["id"] for row in gold_rows if row["id"] not in preds]
    if not missing:
        return None
    shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
    return f"{path}: {len(missing)} of {len(gold_rows)} gold rows have no prediction, scored as wrong: {shown}"


def mixed_input_warning(path: str | Path, preds: dict[str, dict]) -> str | None:
    """What to say of a prediction file in which infer.py decoded some rows from speech and others from their
    transcripts (a manifest with both kinds of row): one score would mix speech input with the oracle's."""
    prompts = [pred["prompt"] for pred in preds.values() if isinstance(pred.get("prompt"), str)]
    n_speech = sum(AUDIO_TOKEN in prompt for prompt in prompts)
    if not 0 < n_speech < len(prompts):
        return None
    return (f"{path}: {n_speech} rows were decoded from speech and {len(prompts) - n_speech} from transcripts, and "
            f"every score mixes them (the paper scores speech input: score against the speech rows alone, as "
            f"grid.py's GRID/test_speech.jsonl holds them)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gold", required=True, help="gold manifest JSONL")
    parser.add_argument("--pred", action="extend", nargs="+", default=[], help="infer.py output, one per seed")
    parser.add_argument("--compare", nargs="+", default=[], help="runs of system A (one file per seed)")
    parser.add_argument("--against", nargs="+", default=[], help="runs of system B (one file per seed)")
    parser.add_argument("--by", default=None, help="also split by this gold field, e.g. lang")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if bool(args.compare) != bool(args.against) or bool(args.pred) == bool(args.compare):
        parser.error("give either --pred FILE... or both --compare FILE... and --against FILE...")
    if args.compare and (len(args.compare) < 2 or len(args.against) < 2):
        parser.error("--compare and --against need at least 2 runs each for a confidence interval")

    try:
        for seeds in (args.pred, args.compare, args.against):
            check_distinct_runs(seeds)
        gold = load_gold(args.gold, args.by)
        ids = {row["id"] for row in gold}
        paths = args.pred + args.compare + args.against
        runs = dict(zip(paths, (load_predictions(p, ids, args.gold) for p in paths)))
        if args.pred:
            result = evaluate(gold, [runs[p] for p in args.pred], args.by)
        else:
            a = evaluate(gold, [runs[p] for p in args.compare], args.by)
            b = evaluate(gold, [runs[p] for p in args.against], args.by)
    except (OSError, ValueError) as e:
        print(f"score.py: error: {e}", file=sys.stderr)
        return 2

    for path, preds in runs.items():
        for warning in (missing_rows_warning(path, preds, gold), mixed_input_warning(path, preds)):
            if warning:
                print(f"score.py: warning: {warning}", file=sys.stderr)
    if args.pred:
        print(json.dumps(result, ensure_ascii=False) if args.json else format_table(result, args.by))
        return 0

    if args.json:
        out = {"compare": a, "against": b, "dagger": {"compare": daggers(a, b), "against": daggers(b, a)}}
        if args.by:
            groups_a, groups_b = a[f"by_{args.by}"], b[f"by_{args.by}"]
            out[f"dagger_by_{args.by}"] = {key: {"compare": daggers(groups_a[key], groups_b[key]),
                                                 "against": daggers(groups_b[key], groups_a[key])}
                                           for key in groups_a}
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(format_comparison(a, b, "compare", "against"))
        print("† significantly better than the other system: the 95% confidence intervals do not overlap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
