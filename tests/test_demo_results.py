"""The demo grid's numbers in README.md are the ones the commands print.

docs/demo-grid/ holds the predictions of the README's demo grid (`grid.py` on the bundled demo corpus from the pretrained miniature, 5 seeds)
and the gold file they were scored against. These tests rebuild the report from those files with report.py and
check the README against it: the table is the printed one, every interval is the Student-t interval of the
per-seed scores, the daggers are the paper's (direct vs curriculum), and the committed figure is a real picture.
"""
import re
from pathlib import Path

import numpy as np
import pytest

import report
import score
from model.manifest import read_manifest
from table_reference import parse_markdown, t_half_width

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs" / "demo-grid"
GOLD = GRID / "test_speech.jsonl"
BEGIN, END = "<!-- demo-grid table: begin -->", "<!-- demo-grid table: end -->"
CELL = re.compile(r"(?P<mean>\d+\.\d) ± (?P<ci>\d+\.\d)(?P<dagger>†?)")
METRIC_OF_LABEL = {label: metric for metric, label in score.LABELS.items()}


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs one {BEGIN} ... {END} block"
    return text.split(BEGIN)[1].split(END)[0].strip()


def _tables(text: str) -> dict[tuple[str, str, str], str]:
    """{(metric, scheme, column header): cell} of the README's tables (one group: all rows)."""
    return {(METRIC_OF_LABEL[label], scheme, column): cell
            for (_, label, scheme, column), cell in parse_markdown(text).items()}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-report")
    summary, _ = report.report(GRID, GOLD, out)
    return out, summary


@pytest.fixture(scope="module")
def per_seed():
    """{(scheme, column header): {metric: [value of each seed]}} from score.py on one prediction file at a time."""
    gold = score.load_gold(GOLD)
    ids = {row["id"] for row in gold}
    runs, _ = report.find_runs(GRID)
    values = {}
    for (scheme, fraction), seeds in runs.items():
        results = [score.evaluate(gold, [score.load_predictions(path, ids, GOLD)]) for _, path in seeds]
        values[(scheme, report.fraction_label(fraction))] = {
            m: [r[m] for r in results] for m in report.DEFAULT_METRICS}
    return values


def test_readme_table_is_the_table_report_py_prints_from_the_committed_predictions(rebuilt):
    out, _ = rebuilt
    printed = (out / "table.md").read_text(encoding="utf-8")
    body = printed[printed.index("\n## "):].strip()  # the title names the grid path; the tables follow it
    # in the README the tables sit under a section of their own: their headings are two levels deeper
    body = "\n".join("##" + line if line.startswith("#") else line for line in body.splitlines())
    assert _readme_block() == body


def test_committed_gold_is_the_demo_test_splits_speech_rows_and_its_audio_is_in_the_repository():
    gold = score.load_gold(GOLD)
    demo_speech = [r for r in read_manifest(ROOT / "data/demo/test.jsonl") if r["audio"] is not None]
    assert [r["id"] for r in gold] == [r["id"] for r in demo_speech] and len(gold) == 208
    for row in gold:
        assert not Path(row["audio"]).is_absolute() and (GOLD.parent / row["audio"]).is_file(), row["audio"]


CELLS = [("text-only", "0%"), ("oracle", "0%"), ("direct", "10%"), ("direct", "50%"), ("curriculum", "10%"),
         ("curriculum", "50%"), ("curriculum+distill", "10%"), ("curriculum+distill-frozen", "10%"),
         ("curriculum+gap", "10%")]


def test_every_scheme_has_both_fractions_the_variants_the_low_one_and_all_the_papers_five_seeds(per_seed):
    assert sorted(per_seed) == sorted(CELLS)
    assert all(len(v) == 5 for cell in per_seed.values() for v in cell.values())


def test_readme_cells_are_the_mean_and_t_interval_of_the_per_seed_scores(per_seed):
    cells = _tables(_readme_block())
    assert {m for m, _, _ in cells} == set(report.DEFAULT_METRICS)
    checked = 0
    for (metric, scheme, column), text in cells.items():
        if (scheme, column) not in per_seed:
            assert text == "–", (metric, scheme, column)
            continue
        match = CELL.fullmatch(text)
        assert match, f"{metric} {scheme} {column}: {text!r} is not 'mean ± ci' in percent with one decimal"
        values = per_seed[(scheme, column)][metric]
        assert match["mean"] == f"{100 * np.mean(values):.1f}", (metric, scheme, column, values)
        assert match["ci"] == f"{100 * t_half_width(values):.1f}", (metric, scheme, column, values)
        checked += 1
    assert checked == 3 * len(CELLS)


def test_a_dagger_marks_exactly_the_method_whose_interval_lies_above_the_other_methods(per_seed):
    # The paper's Table 2: at the same fraction, the better of direct and curriculum when their intervals are apart;
    # a variant row against its own scheme.
    cells = _tables(_readme_block())
    rival = {"direct": "curriculum", "curriculum": "direct", "curriculum+distill": "curriculum",
             "curriculum+distill-frozen": "curriculum", "curriculum+gap": "curriculum"}
    for (metric, scheme, column), text in cells.items():
        if text == "–":
            continue
        expected = False
        if scheme in rival:
            values, other = per_seed[(scheme, column)][metric], per_seed[(rival[scheme], column)][metric]
            a, b = (np.mean(values), t_half_width(values)), (np.mean(other), t_half_width(other))
            expected = a[0] - a[1] > b[0] + b[1]
        assert text.endswith("†") == expected, (metric, scheme, column)


def test_committed_figure_is_a_real_non_blank_png_like_the_one_report_py_draws(rebuilt):
    import matplotlib.image
    out, _ = rebuilt
    committed, drawn = GRID / "slu_f1_vs_fraction.png", out / "slu_f1_vs_fraction.png"
    for path in (committed, drawn):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 400, (path, pixels.shape)
        rgb = pixels[..., :3].reshape(-1, 3)
        assert rgb.std() > 0.05 and (rgb.max(axis=1) - rgb.min(axis=1) > 0.3).mean() > 0.002, path  # lines in colour
    # same canvas; the pixels may differ a little between font renderers, not in layout
    a, b = matplotlib.image.imread(committed), matplotlib.image.imread(drawn)
    assert a.shape == b.shape and np.abs(a - b).mean() < 0.02
