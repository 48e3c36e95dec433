"""report.py: the paper's tables and figures from a grid of prediction files.

The grid is synthetic: every prediction file gets its first k gold rows right (scenario, action and entity)
and the rest wrong, so each seed's intent accuracy is exactly k / 40. The references are scipy's t interval
of those known values, and tables rebuilt by hand from the same files with score.py's own functions.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import report
import score
from table_reference import parse_markdown, t_half_width

REPO = Path(__file__).resolve().parents[1]
N_ROWS = 40  # rows alternate en / de

# (scheme, fraction dir): correct rows per seed; None = a seed dir without pred.jsonl.
GRID = {
    ("text-only", "p0"): [20, 21, 22],
    ("direct", "p0.02"): [23, 24, 25],  # overlaps text-only under the t interval (not under a normal one)
    ("direct", "p0.1"): [25, 26, 27],  # means 0.125 apart, half-widths sum to 0.1242: just separate
    ("direct", "p1.0"): [30, 31, 32],
    ("curriculum", "p0.02"): [24, 26, None],  # two runs; the third seed has no pred.jsonl
    ("curriculum", "p1.0"): [35],  # a single seed: no interval
    ("oracle", "p0"): [36, 37, 38],
}  # curriculum p0.1 is missing altogether
FRACTION = {"p0": 0.0, "p0.02": 0.02, "p0.1": 0.1, "p1.0": 1.0}
COLUMN = {"p0": "0%", "p0.02": "2%", "p0.1": "10%", "p1.0": "100%"}


def _gold_rows():
    return [{"id": f"u{i}", "lang": "en" if i % 2 == 0 else "de", "text": f"wake me up on day {i}", "audio": None,
             "scenario": f"s{i % 3}", "action": f"a{i % 2}", "entities": [{"type": "date", "filler": f"day {i}"}]}
            for i in range(N_ROWS)]


def _predictions(gold, k):
    """Rows before k exactly right; after it the action is wrong and the entity is missed."""
    return [{"id": g["id"], "scenario": g["scenario"], "action": g["action"] if i < k else "wrong",
             "entities": g["entities"] if i < k else [], "parse_error": None} for i, g in enumerate(gold)]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_grid(root, spec):
    """root/test.jsonl and root/slurp/<scheme>/<fraction>/seed<k>/pred.jsonl for a spec like GRID."""
    gold = _gold_rows()
    _write_jsonl(root / "test.jsonl", gold)
    for (scheme, fraction), ks in spec.items():
        for seed, k in enumerate(ks):
            seed_dir = root / "slurp" / scheme / fraction / f"seed{seed}"
            seed_dir.mkdir(parents=True)
            if k is not None:  # seeds that score the same still decode differently (a field score.py ignores)
                _write_jsonl(seed_dir / "pred.jsonl", [{**row, "generated": f"seed {seed}"}
                                                       for row in _predictions(gold, k)])
            (seed_dir / "train.log").write_text("not a prediction file\n")  # files besides pred.jsonl: ignored
    return root


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return _write_grid(tmp_path_factory.mktemp("grid"), GRID)


@pytest.fixture(scope="module")
def plain(grid):
    """The report.py command line without --by: (output dir, its stderr)."""
    out = grid / "out-plain"
    result = subprocess.run([sys.executable, "report.py", "--grid", str(grid / "slurp"), "--gold",
                             str(grid / "test.jsonl"), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out, result.stderr


@pytest.fixture(scope="module")
def by_lang(grid):
    """report.py --by lang, called through main(): (output dir, report.json)."""
    out = grid / "out-lang"
    assert report.main(["--grid", str(grid / "slurp"), "--gold", str(grid / "test.jsonl"),
                        "--out", str(out), "--by", "lang"]) == 0
    return out, json.loads((out / "report.json").read_text(encoding="utf-8"))


def _intent_values(fraction_dir_and_scheme):
    return [k / N_ROWS for k in GRID[fraction_dir_and_scheme] if k is not None]


# --- the cells ---------------------------------------------------------------------------------

def test_intent_cell_is_the_mean_and_scipy_t_interval_of_the_known_seed_accuracies(plain):
    out, _ = plain
    table = parse_markdown((out / "table.md").read_text(encoding="utf-8"))
    checked = 0
    for (scheme, fraction), ks in GRID.items():
        values = _intent_values((scheme, fraction))
        if len(values) < 2:
            continue
        expected = f"{100 * np.mean(values):.1f} ± {100 * t_half_width(values):.1f}"
        assert table[("all", "intent", scheme, COLUMN[fraction])].rstrip("†") == expected, (scheme, fraction)
        checked += 1
    assert checked == 6


def test_json_cell_holds_each_seeds_value_the_mean_and_the_unrounded_half_width(by_lang):
    _, summary = by_lang
    cells = {(c["scheme"], c["speech_fraction"]): c for c in summary["cells"]
             if c["group"] == "all" and c["metric"] == "intent_acc"}
    for (scheme, fraction), ks in GRID.items():
        values = _intent_values((scheme, fraction))
        cell = cells[(scheme, FRACTION[fraction])]
        assert cell["values"] == pytest.approx(values, abs=1e-12)
        assert cell["runs"] == len(values) and len(cell["seeds"]) == len(values)
        assert cell["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        if len(values) > 1:
            assert cell["ci95"] == pytest.approx(t_half_width(values), rel=1e-9)
        else:
            assert cell["ci95"] is None


def test_a_single_seed_cell_shows_its_value_with_n1_and_no_interval(plain):
    out, _ = plain
    table = parse_markdown((out / "table.md").read_text(encoding="utf-8"))
    assert table[("all", "intent", "curriculum", "100%")] == f"{100 * 35 / N_ROWS:.1f} (n=1)"


def _marked(table, metric="intent"):
    """{(scheme, column)} of the cells of one metric's table that carry a dagger."""
    return {(scheme, column) for (_, m, scheme, column), cell in table.items()
            if m == metric and cell.endswith("†")}


def _apart_above(a, b):
    """Whether the t interval of values a lies wholly above b's (by hand, without score.py)."""
    return np.mean(a) - t_half_width(a) > np.mean(b) + t_half_width(b)


# Per (scheme, fraction dir), correct rows per seed, for the dagger rule; the t intervals in rows (of 40):
DAGGER_GRID = {
    ("text-only", "p0"): [27, 27, 28],  # 25.9 .. 28.8
    ("direct", "p0.02"): [20, 21, 22],  # 18.5 .. 23.5: below both curriculum and text-only
    ("curriculum", "p0.02"): [31, 32, 33],  # 29.5 .. 34.5: curriculum clearly better at 2%
    ("direct", "p0.1"): [31, 32, 33],  # 29.5 .. 34.5: above text-only, but
    ("curriculum", "p0.1"): [29, 31, 33],  # 26.0 .. 36.0: overlaps direct at 10%
    ("direct", "p1.0"): [36, 37, 38],  # 34.5 .. 39.5: direct clearly better at 100%
    ("curriculum", "p1.0"): [30, 31, 32],  # 28.5 .. 33.5
    ("oracle", "p0"): [39, 39, 40],  # 37.9 .. 40.8: far above text-only
}


@pytest.fixture(scope="module")
def dagger_tables(tmp_path_factory):
    """{dagger-against choice: parsed table.md} of report.py on DAGGER_GRID; the default given as no flag."""
    root = _write_grid(tmp_path_factory.mktemp("dagger-grid"), DAGGER_GRID)
    tables = {}
    for against in report.DAGGER_AGAINST:
        out = root / f"out-{against}"
        flag = [] if against == "other-method" else ["--dagger-against", against]
        assert report.main(["--grid", str(root / "slurp"), "--gold", str(root / "test.jsonl"), "--out", str(out),
                            "--metric", "intent_acc", *flag]) == 0
        tables[against] = parse_markdown((out / "table.md").read_text(encoding="utf-8"))
    return tables


def _dagger_values(scheme, fraction):
    return [k / N_ROWS for k in DAGGER_GRID[(scheme, fraction)]]


def test_default_dagger_goes_to_the_better_of_direct_and_curriculum_where_their_intervals_are_apart(dagger_tables):
    # The paper's Table 2: "significant improvement over the other method (95% CI non-overlapping)".
    assert _apart_above(_dagger_values("curriculum", "p0.02"), _dagger_values("direct", "p0.02"))
    assert _apart_above(_dagger_values("direct", "p1.0"), _dagger_values("curriculum", "p1.0"))
    assert _marked(dagger_tables["other-method"]) == {("curriculum", "2%"), ("direct", "100%")}


def test_default_dagger_skips_a_pair_that_overlaps_even_when_one_is_apart_from_text_only(dagger_tables):
    direct, curriculum = _dagger_values("direct", "p0.1"), _dagger_values("curriculum", "p0.1")
    assert not _apart_above(direct, curriculum) and not _apart_above(curriculum, direct)
    assert _apart_above(direct, _dagger_values("text-only", "p0"))
    table = dagger_tables["other-method"]
    assert not table[("all", "intent", "direct", "10%")].endswith("†")
    assert not table[("all", "intent", "curriculum", "10%")].endswith("†")


def test_a_variant_row_follows_the_schemes_and_is_daggered_against_its_own_scheme_only(tmp_path):
    spec = {("text-only", "p0"): [10, 11, 12], ("direct", "p0.1"): [30, 31, 32], ("curriculum", "p0.1"): [10, 11, 12],
            ("curriculum+distill", "p0.1"): [20, 21, 22], ("oracle", "p0"): [39, 39, 40]}
    root = _write_grid(tmp_path, spec)
    assert report.main(["--grid", str(root / "slurp"), "--gold", str(root / "test.jsonl"), "--out",
                        str(root / "out"), "--metric", "intent_acc"]) == 0
    table = parse_markdown((root / "out" / "table.md").read_text(encoding="utf-8"))
    # far above curriculum (its scheme), far below direct: the dagger says it beats what it modifies
    assert _marked(table) == {("direct", "10%"), ("curriculum+distill", "10%")}
    rows = [scheme for (_, m, scheme, column) in table if m == "intent" and column in ("0%", "10%")]
    order = list(dict.fromkeys(rows))
    assert order == ["text-only", "direct", "curriculum", "curriculum+distill", "oracle"]


def test_default_dagger_never_marks_text_only_or_the_oracle(dagger_tables):
    assert _apart_above(_dagger_values("oracle", "p0"), _dagger_values("text-only", "p0"))
    table = dagger_tables["other-method"]
    assert table[("all", "intent", "oracle", "0%")] == "98.3 ± 3.6"
    assert not table[("all", "intent", "text-only", "0%")].endswith("†")


def test_dagger_against_text_only_marks_only_cells_whose_interval_lies_above_text_onlys(dagger_tables):
    base = _dagger_values("text-only", "p0")
    assert _apart_above(base, _dagger_values("direct", "p0.02"))  # apart, but below: the worse cell, no dagger
    assert _marked(dagger_tables["text-only"]) == {("curriculum", "2%"), ("direct", "10%"), ("direct", "100%"),
                                                   ("oracle", "0%")}


def test_dagger_against_text_only_separates_intervals_apart_by_a_hair(grid, tmp_path):
    assert report.main(["--grid", str(grid / "slurp"), "--gold", str(grid / "test.jsonl"), "--out", str(tmp_path),
                        "--metric", "intent_acc", "--dagger-against", "text-only"]) == 0
    table = parse_markdown((tmp_path / "table.md").read_text(encoding="utf-8"))
    base = _intent_values(("text-only", "p0"))
    expected = set()
    for (scheme, fraction) in GRID:
        values = _intent_values((scheme, fraction))
        if scheme != "text-only" and len(values) > 1 and _apart_above(values, base):
            expected.add((scheme, COLUMN[fraction]))  # text-only is at p0 only: the reference of every column
    # The grid was built to hold both kinds, one of them by a hair (direct at 10%).
    assert expected == {("direct", "10%"), ("direct", "100%"), ("oracle", "0%")}
    assert _marked(table) == expected


def test_missing_cells_and_seeds_are_skipped_with_a_warning_naming_them(plain):
    out, stderr = plain
    table = parse_markdown((out / "table.md").read_text(encoding="utf-8"))
    assert table[("all", "SLU-F1", "curriculum", "10%")] == "–"
    assert "curriculum/p0.1: no runs" in stderr
    assert "curriculum/p0.02/seed2/pred.jsonl: missing" in stderr
    rows = list(csv.DictReader(open(out / "table.csv", encoding="utf-8")))
    assert {int(r["runs"]) for r in rows if r["scheme"] == "curriculum" and r["speech_fraction"] == "0.02"} == {2}


def test_csv_and_json_hold_exactly_the_markdown_cells(by_lang):
    out, summary = by_lang
    table = parse_markdown((out / "table.md").read_text(encoding="utf-8"))
    shown = {k: v for k, v in table.items() if v != "–"}
    rows = list(csv.DictReader(open(out / "table.csv", encoding="utf-8")))
    assert len(rows) == len(summary["cells"]) == len(shown) == 3 * 3 * len(GRID)  # groups x metrics x cells
    for row, cell in zip(rows, summary["cells"], strict=True):
        key = (row["group"], score.LABELS[row["metric"]], row["scheme"], report.fraction_label(cell["speech_fraction"]))
        assert shown[key] == row["cell"] == cell["cell"]
        assert (row["group"], row["metric"], row["scheme"]) == (cell["group"], cell["metric"], cell["scheme"])
        assert float(row["speech_fraction"]) == cell["speech_fraction"]
        assert int(row["runs"]) == cell["runs"] == len(cell["values"])
        assert float(row["mean"]) == cell["mean"] == pytest.approx(np.mean(cell["values"]))
        assert (row["ci95"] == "") == (cell["ci95"] is None)
        assert bool(int(row["dagger"])) == cell["dagger"] == row["cell"].endswith("†")
        assert row["cell"].startswith(f"{100 * cell['mean']:.1f}")


def test_tables_equal_the_ones_built_by_hand_from_the_files_with_score_py(grid, by_lang):
    out, _ = by_lang
    table = parse_markdown((out / "table.md").read_text(encoding="utf-8"))
    gold_path = grid / "test.jsonl"
    gold = score.load_gold(gold_path, "lang")
    ids = {row["id"] for row in gold}
    results = {}
    for (scheme, fraction) in GRID:
        paths = sorted((grid / "slurp" / scheme / fraction).glob("seed*/pred.jsonl"))
        results[(scheme, fraction)] = score.evaluate(gold, [score.load_predictions(p, ids, gold_path)
                                                            for p in paths], by="lang")

    def by_hand(result, rival, metric):
        if "ci95" not in result:
            return f"{100 * result[metric]:.1f} (n=1)"
        values = [run[metric] for run in result["runs"]]
        mean, half = score.t_interval(values)
        dagger = rival is not None and "runs" in rival and _apart_above(values, [r[metric] for r in rival["runs"]])
        return f"{100 * mean:.1f} ± {100 * half:.1f}" + ("†" if dagger else "")

    other = {"direct": "curriculum", "curriculum": "direct"}  # the paper's dagger: the other method, same fraction
    expected = {}
    for group in ("all", "lang=de", "lang=en"):
        pick = (lambda r: r) if group == "all" else (lambda r, g=group: r["by_lang"][g[5:]])
        for (scheme, fraction), result in results.items():
            rival = results.get((other.get(scheme), fraction))
            for metric in report.DEFAULT_METRICS:
                expected[(group, score.LABELS[metric], scheme, COLUMN[fraction])] = by_hand(
                    pick(result), None if rival is None else pick(rival), metric)
    assert {k: v for k, v in table.items() if v != "–"} == expected
    # The languages really differ (k correct rows split unevenly), so the per-language sections are not copies.
    assert table[("lang=en", "intent", "direct", "2%")] != table[("lang=de", "intent", "direct", "2%")]


def test_relative_improvement_is_the_percent_change_of_slu_f1_over_text_only_per_language(grid, by_lang):
    _, summary = by_lang
    gold_path = grid / "test.jsonl"
    gold = score.load_gold(gold_path, "lang")
    ids = {row["id"] for row in gold}

    def mean_slu_f1(scheme, fraction, lang):
        paths = sorted((grid / "slurp" / scheme / fraction).glob("seed*/pred.jsonl"))
        runs = [score.load_predictions(p, ids, gold_path) for p in paths]
        return np.mean([score.score_rows([g for g in gold if g["lang"] == lang], preds)["slu_f1"] for preds in runs])

    got = {(i["group"], i["scheme"], i["speech_fraction"]): i["relative_improvement"]
           for i in summary["relative_improvement"]}
    for lang in ("de", "en"):
        base = mean_slu_f1("text-only", "p0", lang)
        for (scheme, fraction) in GRID:
            if scheme != "text-only":
                expected = (mean_slu_f1(scheme, fraction, lang) - base) / base * 100
                assert got[(f"lang={lang}", scheme, FRACTION[fraction])] == pytest.approx(expected, rel=1e-9)
    assert got[("lang=en", "oracle", 0.0)] > got[("lang=en", "direct", 0.02)] > 0


# --- figures and files -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["slu_f1_vs_fraction.png", "relative_improvement.png"])
def test_figures_are_real_non_blank_pngs(by_lang, name):
    out, _ = by_lang
    path = out / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200
    assert pixels.var() > 0
    colours = np.unique((pixels[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20  # lines, bands and bars in several colours, not a blank canvas


def test_plain_report_has_no_per_language_figure_and_leaves_no_temporary_files(plain, by_lang):
    out, _ = plain
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "slu_f1_vs_fraction.png", "table.csv",
                                                       "table.md"]
    assert not [p for p in by_lang[0].iterdir() if p.name.startswith(".")]


def test_metric_flag_writes_only_that_section(grid, tmp_path):
    assert report.main(["--grid", str(grid / "slurp"), "--gold", str(grid / "test.jsonl"), "--out", str(tmp_path),
                        "--metric", "entity_f1"]) == 0
    table = parse_markdown((tmp_path / "table.md").read_text(encoding="utf-8"))
    assert {metric for (_, metric, _, _) in table} == {"entity F1"}
    # The figure shows SLU-F1 whatever the tables hold.
    assert (tmp_path / "slu_f1_vs_fraction.png").stat().st_size > 10_000


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, named, expected", [
    ("curiculum/p0.02/seed0", "curiculum", "unknown scheme directory"),
    ("direct/0.02/seed0", "direct/0.02", "expected a speech-fraction directory p<fraction>"),
    ("direct/p2/seed0", "direct/p2", "fraction in [0, 1]"),
    ("direct/p0.02/run0", "direct/p0.02/run0", "expected a seed directory seed<k>"),
])
def test_a_directory_off_the_layout_is_an_error_naming_it(tmp_path, capsys, bad, named, expected):
    gold = _gold_rows()
    _write_jsonl(tmp_path / "test.jsonl", gold)
    _write_jsonl(tmp_path / "g" / "text-only" / "p0" / "seed0" / "pred.jsonl", _predictions(gold, 20))
    _write_jsonl(tmp_path / "g" / bad / "pred.jsonl", _predictions(gold, 20))
    assert report.main(["--grid", str(tmp_path / "g"), "--gold", str(tmp_path / "test.jsonl"),
                        "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'g' / named}: " in err and expected in err
    assert not (tmp_path / "out").exists()


def test_a_prediction_id_not_in_the_gold_file_is_an_error_naming_file_and_line(tmp_path, capsys):
    gold = _gold_rows()
    _write_jsonl(tmp_path / "test.jsonl", gold)
    preds = _predictions(gold, 20)
    preds[3]["id"] = "nope"
    pred_path = tmp_path / "g" / "direct" / "p0.02" / "seed0" / "pred.jsonl"
    _write_jsonl(pred_path, preds)
    assert report.main(["--grid", str(tmp_path / "g"), "--gold", str(tmp_path / "test.jsonl"),
                        "--out", str(tmp_path / "out")]) == 2
    assert f"{pred_path}:4: id 'nope' is not in" in capsys.readouterr().err


def test_prediction_files_lacking_gold_rows_or_mixing_speech_and_text_answers_are_warnings_naming_them(tmp_path,
                                                                                                     capsys):
    # Scored as they are, as score.py scores them; but scoring against the wrong gold file (all rows, not the
    # speech rows) must not pass for a weaker or a stronger model without a word.
    gold = _gold_rows()
    _write_jsonl(tmp_path / "test.jsonl", gold)
    speech = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    for seed in (0, 1, 2):
        rows = [{**row, "generated": str(seed), "prompt": speech} for row in _predictions(gold, 20)]
        if seed == 1:
            rows = rows[:N_ROWS - 3]
        if seed == 2:
            rows[0]["prompt"] = gold[0]["text"]
        _write_jsonl(tmp_path / "g" / "direct" / "p0.02" / f"seed{seed}" / "pred.jsonl", rows)
    assert report.main(["--grid", str(tmp_path / "g"), "--gold", str(tmp_path / "test.jsonl"),
                        "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"direct/p0.02/seed1/pred.jsonl: 3 of {N_ROWS} gold rows have no prediction, scored as wrong" in err
    assert f"direct/p0.02/seed2/pred.jsonl: {N_ROWS - 1} rows were decoded from speech and 1 from transcripts" in err
    assert "seed0/pred.jsonl: " not in err
    summary = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert any("seed1/pred.jsonl: 3 of" in w for w in summary["warnings"])


@pytest.mark.parametrize("how", ["copied file", "linked seed dir"])
def test_two_seed_dirs_with_the_same_predictions_are_an_error_naming_both(tmp_path, capsys, how):
    # Counted as two seeds, one run would look like perfect agreement: an interval of +-0 that can earn a dagger.
    gold = _gold_rows()
    _write_jsonl(tmp_path / "test.jsonl", gold)
    cell = tmp_path / "g" / "direct" / "p0.02"
    _write_jsonl(cell / "seed0" / "pred.jsonl", _predictions(gold, 20))
    if how == "copied file":
        _write_jsonl(cell / "seed1" / "pred.jsonl", _predictions(gold, 20))
        expected = "have identical contents"
    else:
        (cell / "seed1").symlink_to(cell / "seed0", target_is_directory=True)
        expected = "are the same file"
    assert report.main(["--grid", str(tmp_path / "g"), "--gold", str(tmp_path / "test.jsonl"),
                        "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"report.py: error: {cell / 'seed0' / 'pred.jsonl'} and {cell / 'seed1' / 'pred.jsonl'} {expected}" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_gold_file_is_an_error_not_a_table_of_zeros(tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text("", encoding="utf-8")
    _write_jsonl(tmp_path / "g" / "text-only" / "p0" / "seed0" / "pred.jsonl", [])
    assert report.main(["--grid", str(tmp_path / "g"), "--gold", str(tmp_path / "test.jsonl"),
                        "--out", str(tmp_path / "out")]) == 2
    assert f"report.py: error: {tmp_path / 'test.jsonl'}: no gold rows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fraction_figure_of_all_zero_scores_gets_a_readable_zero_to_one_point_axis(tmp_path, monkeypatch):
    # A demo that has not learned yet scores 0 everywhere; matplotlib alone would give the axis -0.05..0.05.
    seen = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: seen.update(ylim=fig.axes[0].get_ylim()))
    cells = [{"group": "all", "metric": "slu_f1", "scheme": s, "speech_fraction": p, "mean": 0.0, "ci95": 0.0}
             for s, p in [("text-only", 0.0), ("direct", 0.1), ("direct", 0.5), ("curriculum", 0.1)]]
    report.plot_fraction_curve(cells, tmp_path / "f.png")
    assert seen["ylim"] == (0.0, 1.0)


def test_fraction_figure_axis_covers_every_band_within_zero_to_hundred(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: seen.update(ylim=fig.axes[0].get_ylim()))
    cells = [{"group": "all", "metric": "slu_f1", "scheme": "text-only", "speech_fraction": 0.0, "mean": 0.40,
              "ci95": 0.05},
             {"group": "all", "metric": "slu_f1", "scheme": "direct", "speech_fraction": 0.1, "mean": 0.97,
              "ci95": 0.06}]
    report.plot_fraction_curve(cells, tmp_path / "f.png")
    lo, hi = seen["ylim"]
    assert 25.0 < lo < 35.0 and hi == 100.0  # band 35..103: padded below, clipped at 100 above


def test_fraction_figure_ticks_are_the_grid_fractions_labelled_like_the_table_columns(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: seen.update(
        ticks=list(fig.axes[0].get_xticks()), labels=[t.get_text() for t in fig.axes[0].get_xticklabels()],
        minor=list(fig.axes[0].get_xticks(minor=True))))
    cells = [{"group": "all", "metric": "slu_f1", "scheme": s, "speech_fraction": p, "mean": 0.3, "ci95": 0.01}
             for s, p in [("text-only", 0.0), ("direct", 0.02), ("direct", 0.25), ("direct", 1.0)]]
    report.plot_fraction_curve(cells, tmp_path / "f.png")
    assert seen["ticks"] == [0.02, 0.25, 1.0] and seen["labels"] == ["2%", "25%", "100%"] and seen["minor"] == []
