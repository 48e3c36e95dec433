"""Reading report.py's tables back, and the interval they should show, without report.py or score.py.

Shared by tests/test_report.py (synthetic grids) and tests/test_demo_results.py (the README's demo grid)."""
import numpy as np
import scipy.stats


def parse_markdown(text: str) -> dict[tuple[str, str, str, str], str]:
    """{(group, metric label, scheme, column header): cell} from table.md (headings at any depth)."""
    cells, group, metric, columns = {}, "all", None, None
    for line in text.splitlines():
        if line.startswith("## ") and " = " in line:
            group = line[3:].replace(" = ", "=")
        elif line.startswith("#") and line.endswith("(%)"):
            metric = line.lstrip("#").strip()[:-len(" (%)")]
        elif line.startswith("| scheme |"):
            columns = [c.strip() for c in line.strip("|").split("|")][1:]
        elif line.startswith("| ") and columns:
            scheme, *values = [c.strip() for c in line.strip("|").split("|")]
            for column, value in zip(columns, values, strict=True):
                cells[(group, metric, scheme, column)] = value
    return cells


def t_half_width(values) -> float:
    """Half-width of scipy's 95% Student-t interval: the paper's definition, independent of score.py.
    Equal values have no spread: 0 (scipy's sem is 0 there and its interval nan)."""
    values = np.asarray(values, dtype=np.float64)
    if np.all(values == values[0]):
        return 0.0
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))
    return (high - low) / 2
