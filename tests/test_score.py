"""score.py: SLURP's SLU-F1 rule by rule (numbers worked by hand), entity F1, t intervals, the CLI.

Reference: the official SLURP evaluation (pswietojanski/slurp, scripts/evaluation/metrics):
SpanDistanceFMeasure, SLUF1, jiwer's WER and textdistance's normalised Levenshtein.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

import score
from score import char_distance, entity_f1, levenshtein, slu_f1, t_interval, word_distance

REPO = Path(__file__).resolve().parents[1]


def _plain_levenshtein(a, b):
    """The textbook dynamic programme, the reference for score.levenshtein's bit-vector version."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


# --- distances --------------------------------------------------------------------------------

def test_levenshtein_equals_the_plain_dynamic_programme_on_strings_and_word_lists():
    rng = random.Random(0)
    for _ in range(3000):
        a = "".join(rng.choices("abcé", k=rng.randint(0, 14)))
        b = "".join(rng.choices("abcé", k=rng.randint(0, 14)))
        assert levenshtein(a, b) == _plain_levenshtein(a, b), (a, b)
    a, b = "x" * 150 + "abc", "xy" * 80  # longer than a machine word
    assert levenshtein(a, b) == _plain_levenshtein(a, b)
    words_a, words_b = "set the alarm for seven".split(), "set an alarm seven please".split()
    assert levenshtein(words_a, words_b) == _plain_levenshtein(words_a, words_b) == 3


def test_word_distance_is_wer_over_gold_words_and_can_exceed_one():
    # "a b c" -> "a x c d": one substitution + one insertion over 3 gold words.
    assert word_distance("a b c", "a x c d") == pytest.approx(2 / 3)
    # "a" -> "b c d": one substitution + two insertions over 1 gold word.
    assert word_distance("a", "b c d") == 3.0
    assert word_distance("seven  am ", "seven am") == 0.0  # whitespace-split, like jiwer


def test_char_distance_is_levenshtein_over_the_longer_length():
    assert char_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert char_distance("", "") == 0.0
    assert char_distance("", "abc") == 1.0


def test_no_normalisation_case_differences_count():
    # "Seven AM" vs "seven am": 3 characters differ out of 8; both words differ.
    assert char_distance("Seven AM", "seven am") == pytest.approx(3 / 8)
    assert word_distance("Seven AM", "seven am") == 1.0


# --- SLU-F1, one rule per test; rows are lists of (type, filler) --------------------------------

def test_exact_match_scores_one():
    rows = [[("time", "seven am"), ("date", "monday")]]
    assert slu_f1(rows, rows) == {"word_f1": 1.0, "char_f1": 1.0, "slu_f1": 1.0}


def test_partial_filler_adds_its_distance_to_fp_and_fn():
    # word: WER("seven am", "seven pm") = 1/2 -> TP 1, FP .5, FN .5 -> P = R = 1/1.5, F1 = 2/3
    # char: 1 edit / 8 chars = .125 -> TP 1, FP .125, FN .125 -> F1 = 1/1.125 = 8/9
    # SLU:  TP 2, FP .625, FN .625 -> F1 = 2/2.625
    result = slu_f1([[("time", "seven am")]], [[("time", "seven pm")]])
    assert result["word_f1"] == pytest.approx(2 / 3)
    assert result["char_f1"] == pytest.approx(8 / 9)
    assert result["slu_f1"] == pytest.approx(2 / 2.625)


def test_wrong_type_is_a_false_positive_and_the_gold_a_false_negative():
    # date is not among the gold types: FP 1; the time entity is left: FN 1; TP 0 -> F1 0.
    result = slu_f1([[("time", "seven am")]], [[("date", "seven am")]])
    assert result == {"word_f1": 0.0, "char_f1": 0.0, "slu_f1": 0.0}


def test_repeated_type_matches_the_closest_gold_entity_not_the_first():
    # "mary" matches gold "mary" (d 0), not "john smith": TP 1, FP 0, FN 1 (john smith)
    # -> P 1, R .5, F1 2/3 under both distances. Matching the first "person" would give less.
    result = slu_f1([[("person", "john smith"), ("person", "mary")]], [[("person", "mary")]])
    assert result == pytest.approx({"word_f1": 2 / 3, "char_f1": 2 / 3, "slu_f1": 2 / 3})


def test_matching_is_greedy_in_prediction_order_not_an_optimal_assignment():
    # gold p:"a b", p:"c"; predicted p:"a", then p:"a b".
    # word: "a" is closer to "a b" (WER 1/2) than to "c" (1) and takes it; "a b" must then take
    # "c": WER = 1 sub + 1 ins over 1 word = 2. TP 2, FP 2.5, FN 2.5 -> F1 = 2/4.5.
    # (The optimal assignment, "a"->"c" and "a b"->"a b", would total 1 and give 2/3.)
    result = slu_f1([[("p", "a b"), ("p", "c")]], [[("p", "a"), ("p", "a b")]])
    assert result["word_f1"] == pytest.approx(2 / 4.5)


def test_a_distance_tie_goes_to_the_first_remaining_gold_entity():
    # gold p:"ab", p:"cb"; predicted p:"xb" (char distance .5 to both: takes "ab", the first),
    # then p:"ab" takes "cb" at .5. char: TP 2, FP 1, FN 1 -> F1 2/3.
    # (Ties to the last would give "xb"->"cb", "ab"->"ab": FP .5 -> F1 .8.)
    result = slu_f1([[("p", "ab"), ("p", "cb")]], [[("p", "xb"), ("p", "ab")]])
    assert result["char_f1"] == pytest.approx(2 / 3)


def test_a_type_already_used_up_is_a_false_positive():
    # gold one time:"a"; predicted it twice: TP 1, then no time entity remains: FP 1. F1 = 2/3.
    result = slu_f1([[("time", "a")]], [[("time", "a"), ("time", "a")]])
    assert result == pytest.approx({"word_f1": 2 / 3, "char_f1": 2 / 3, "slu_f1": 2 / 3})


def test_spurious_entity_on_a_row_with_empty_gold_is_a_false_positive():
    # row 1 exact (TP 1); row 2 gold [] predicted date:"b" (FP 1): P .5, R 1 -> F1 2/3.
    result = slu_f1([[("time", "a")], []], [[("time", "a")], [("date", "b")]])
    assert result == pytest.approx({"word_f1": 2 / 3, "char_f1": 2 / 3, "slu_f1": 2 / 3})


def test_missed_gold_entity_is_a_false_negative():
    # gold time:"a", date:"b"; predicted time:"a": TP 1, FN 1: P 1, R .5 -> F1 2/3.
    result = slu_f1([[("time", "a"), ("date", "b")]], [[("time", "a")]])
    assert result == pytest.approx({"word_f1": 2 / 3, "char_f1": 2 / 3, "slu_f1": 2 / 3})


def test_rows_empty_on_both_sides_count_nothing_and_all_empty_is_zero():
    assert slu_f1([[("time", "a")], []], [[("time", "a")], []])["slu_f1"] == 1.0
    # No true positives at all: the official compute_metrics returns 0, not 1 or NaN.
    assert slu_f1([[], []], [[], []]) == {"word_f1": 0.0, "char_f1": 0.0, "slu_f1": 0.0}


def test_counts_are_micro_over_rows_not_a_mean_of_row_scores():
    # row 1: TP 1 (exact). row 2: 4 gold entities, none predicted: FN 4.
    # micro: P 1, R 1/5 -> F1 1/3; a mean of row F1s would be (1 + 0) / 2 = .5.
    golds = [[("a", "x")], [("b", "y"), ("c", "y"), ("d", "y"), ("e", "y")]]
    assert slu_f1(golds, [[("a", "x")], []])["slu_f1"] == pytest.approx(1 / 3)


# --- entity F1 -------------------------------------------------------------------------------

def test_entity_f1_counts_only_exact_pairs_as_a_multiset():
    # row 1: gold time:"a" twice, predicted once: TP 1, FN 1.
    # row 2: partial filler is wrong under exact match: FP 1, FN 1.
    # TP 1, FP 1, FN 2 -> P 1/2, R 1/3 -> F1 = 2 * (1/6) / (5/6) = 2/5.
    golds = [[("time", "a"), ("time", "a")], [("time", "seven am")]]
    preds = [[("time", "a")], [("time", "seven pm")]]
    assert entity_f1(golds, preds) == pytest.approx(2 / 5)


# --- rows, missing predictions, accuracies ---------------------------------------------------

def _gold(i, scenario, action, entities, lang="en"):
    return {"id": f"g{i}", "lang": lang, "text": "t", "audio": None, "scenario": scenario, "action": action,
            "entities": [{"type": t, "filler": f} for t, f in entities]}


def _pred(i, scenario, action, entities, parse_error=None):
    return {"id": f"g{i}", "scenario": scenario, "action": action, "parse_error": parse_error,
            "entities": [{"type": t, "filler": f} for t, f in entities]}


GOLD = [
    _gold(0, "alarm", "set", [("time", "seven am")]),
    _gold(1, "alarm", "query", [], lang="fr"),
    _gold(2, "play", "music", [("artist", "abba")], lang="fr"),
    _gold(3, "iot", "hue_lightoff", [("house_place", "kitchen")]),
]
PRED = [
    _pred(0, "alarm", "set", [("time", "seven pm")]),       # intent right, filler partial
    _pred(1, "alarm", "set", [], parse_error="truncated"),  # scenario right, action wrong
    _pred(2, "play", "music", [("artist", "abba")]),        # all right
]                                                           # row 3 has no prediction


def test_missing_prediction_scores_as_wrong_and_is_counted():
    result = score.score_rows(GOLD, {row["id"]: row for row in PRED})
    # scenario right on rows 0-2 of 4; action on 0 and 2; intent on 0 and 2.
    assert result["scenario_acc"] == 3 / 4
    assert result["action_acc"] == result["intent_acc"] == 2 / 4
    # exact entities: TP 1 (abba), FP 1 (seven pm), FN 2 (seven am, kitchen) -> P 1/2, R 1/3 -> 2/5
    assert result["entity_f1"] == pytest.approx(2 / 5)
    # word: TP 2, FP .5, FN .5 + 1 (kitchen) -> P 2/2.5, R 2/3.5 -> F1 = 4 / 6 = 2/3
    assert result["word_f1"] == pytest.approx(2 / 3)
    assert (result["n"], result["missing"], result["parse_errors"]) == (4, 1, 1)


def test_t_interval_equals_scipy_t_interval():
    values = [0.812, 0.829, 0.861, 0.845]
    mean, half = t_interval(values)
    low, high = scipy.stats.t.interval(0.95, df=3, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert mean == pytest.approx((low + high) / 2)
    assert half == pytest.approx((high - low) / 2)
    # By hand for two runs: mean 0.5, s = sqrt(0.02), t(0.975, 1) = 12.7062: 12.7062 * 0.1 = 1.27062.
    assert t_interval([0.4, 0.6])[1] == pytest.approx(1.270620, rel=1e-5)


def test_t_interval_needs_two_runs():
    with pytest.raises(ValueError, match="at least 2 runs"):
        t_interval([0.5])


# --- files and the command line --------------------------------------------------------------

def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "score.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_prediction_with_unknown_id_is_an_error_naming_file_line_and_id(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    pred = _write(tmp_path / "pred.jsonl", PRED + [_pred(99, "alarm", "set", [])])
    with pytest.raises(ValueError, match=r"pred\.jsonl:4: id 'g99' is not in .*gold\.jsonl"):
        score.load_predictions(pred, {row["id"] for row in score.load_gold(gold)}, gold)


def test_malformed_gold_row_is_an_error_naming_file_line_and_field(tmp_path):
    bad = GOLD[:1] + [{**GOLD[1], "entities": [{"type": "time"}]}]
    with pytest.raises(ValueError, match=r"gold\.jsonl:2: entities\[0\] must be an object"):
        score.load_gold(_write(tmp_path / "gold.jsonl", bad))


def test_cli_json_single_run_with_by_lang(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    pred = _write(tmp_path / "pred.jsonl", PRED)
    proc = _run("--gold", gold, "--pred", pred, "--json", "--by", "lang")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(score.METRICS + score.COUNTS) <= set(result)
    assert (result["n"], result["missing"], result["intent_acc"]) == (4, 1, 0.5)
    assert "g3" in proc.stderr  # the missing row is reported by id
    en, fr = result["by_lang"]["en"], result["by_lang"]["fr"]
    # en: rows 0 (intent right) and 3 (missing); fr: rows 1 (action wrong) and 2 (all right).
    assert (en["n"], en["missing"], en["intent_acc"]) == (2, 1, 0.5)
    assert (fr["n"], fr["missing"], fr["intent_acc"], fr["parse_errors"]) == (2, 0, 0.5, 1)
    assert fr["entity_f1"] == 1.0  # abba exact; row 1 has no entities on either side


def test_cli_several_runs_report_mean_and_scipy_ci_and_table_output(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    full = PRED + [_pred(3, "iot", "hue_lightoff", [("house_place", "kitchen")])]  # intent 3/4
    runs = [_write(tmp_path / "a.jsonl", PRED), _write(tmp_path / "b.jsonl", full),
            _write(tmp_path / "c.jsonl", full[:2])]  # intent 2/4, 3/4, 1/4
    proc = _run("--gold", gold, "--pred", *runs, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    low, high = scipy.stats.t.interval(0.95, df=2, loc=0.5, scale=scipy.stats.sem([0.5, 0.75, 0.25]))
    assert result["intent_acc"] == result["mean"]["intent_acc"] == pytest.approx(0.5)
    assert result["ci95"]["intent_acc"] == pytest.approx((high - low) / 2)
    assert [run["intent_acc"] for run in result["runs"]] == [0.5, 0.75, 0.25]
    assert result["missing"] == 1 + 0 + 2

    table = _run("--gold", gold, "--pred", runs[0], "--pred", runs[1])  # repeated --pred works too
    assert table.returncode == 0, table.stderr
    assert "SLU-F1" in table.stdout and "62.50 ± " in table.stdout  # intent mean of 1/2 and 3/4


def _seed_files(tmp_path, name, rows, n=2):
    """n prediction files with the same labels that differ only in a field score.py ignores (infer.py's raw
    `generated` text): seeds that agree on every answer, yet distinct files."""
    return [_write(tmp_path / f"{name}{k}.jsonl", [{**row, "generated": f"seed {k}"} for row in rows])
            for k in range(n)]


def test_cli_compare_puts_the_dagger_on_the_better_system_only_where_intervals_do_not_overlap(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    right = [_pred(i, g["scenario"], g["action"], [(e["type"], e["filler"]) for e in g["entities"]])
             for i, g in enumerate(GOLD)]
    good = _seed_files(tmp_path, "good", right)
    bad = _seed_files(tmp_path, "bad", [{**row, "action": "x"} for row in right])
    for first, second, better, worse in [(good, bad, "compare", "against"), (bad, good, "against", "compare")]:
        proc = _run("--gold", gold, "--compare", *first, "--against", *second, "--json")
        assert proc.returncode == 0, proc.stderr
        dagger = json.loads(proc.stdout)["dagger"]
        # Action: 1 +- 0 against 0 +- 0 are apart and the dagger goes to the 1; scenario: 1 +- 0 on both sides.
        assert dagger[better]["action_acc"] and dagger[better]["intent_acc"]
        assert not dagger[better]["scenario_acc"] and not dagger[better]["slu_f1"]
        assert not any(dagger[worse].values())  # the worse system never gets a dagger


def test_cli_compare_warns_of_a_seed_file_lacking_gold_rows_as_pred_does(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    right = [_pred(i, g["scenario"], g["action"], []) for i, g in enumerate(GOLD)]
    full = _seed_files(tmp_path, "full", right)
    short = _seed_files(tmp_path, "short", right[:-1])
    proc = _run("--gold", gold, "--compare", *full, "--against", *short)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("gold rows have no prediction, scored as wrong") == 2
    assert f"{short[1]}: 1 of {len(GOLD)} gold rows have no prediction" in proc.stderr


def test_cli_warns_when_one_file_mixes_answers_to_speech_and_to_transcripts(tmp_path):
    # infer.py on a manifest with both kinds of row decodes the transcript rows from text: the oracle's input
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    speech, text = "<|audio_bos|><|AUDIO|><|audio_eos|>", "set an alarm"
    mixed = _write(tmp_path / "mixed.jsonl", [{**row, "prompt": speech if i else text} for i, row in enumerate(PRED)])
    only_speech = _write(tmp_path / "speech.jsonl", [{**row, "prompt": speech} for row in PRED])
    proc = _run("--gold", gold, "--pred", mixed, only_speech)
    assert proc.returncode == 0, proc.stderr
    assert f"{mixed}: 2 rows were decoded from speech and 1 from transcripts" in proc.stderr
    assert proc.stderr.count("rows were decoded from speech") == 1  # not for the speech-only file


def test_cli_unknown_id_exits_with_error_naming_the_file_and_id(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    pred = _write(tmp_path / "pred.jsonl", PRED + [_pred(99, "alarm", "set", [])])
    proc = _run("--gold", gold, "--pred", pred)
    assert proc.returncode == 2
    assert "pred.jsonl:4" in proc.stderr and "'g99'" in proc.stderr


@pytest.mark.parametrize("spelling", ["same path", "another spelling of the path"])
def test_cli_refuses_the_same_prediction_file_twice_it_would_be_two_perfectly_agreeing_seeds(tmp_path, capsys,
                                                                                              monkeypatch, spelling):
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    pred = _write(tmp_path / "pred.jsonl", PRED)
    monkeypatch.chdir(tmp_path)
    again = pred if spelling == "same path" else "./sub/../pred.jsonl"
    (tmp_path / "sub").mkdir()
    assert score.main(["--gold", gold, "--pred", pred, again]) == 2
    err = capsys.readouterr().err
    assert err.startswith("score.py: error: ") and f"{pred} and {again} are the same file" in err


def test_cli_refuses_a_byte_identical_copy_of_a_prediction_file(tmp_path, capsys):
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    seed0, copy = _write(tmp_path / "seed0.jsonl", PRED), _write(tmp_path / "seed1.jsonl", PRED)
    assert score.main(["--gold", gold, "--pred", seed0, copy]) == 2
    assert f"score.py: error: {seed0} and {copy} have identical contents" in capsys.readouterr().err
    # Among the seeds of either side of a comparison too.
    a = _seed_files(tmp_path, "a", PRED)
    assert score.main(["--gold", gold, "--compare", *a, "--against", seed0, copy]) == 2
    assert f"score.py: error: {seed0} and {copy} have identical contents" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_cli_refuses_a_gold_file_without_rows_instead_of_scoring_zero(tmp_path, capsys, content):
    gold = tmp_path / "gold.jsonl"
    gold.write_text(content, encoding="utf-8")
    pred = _write(tmp_path / "pred.jsonl", [])
    assert score.main(["--gold", str(gold), "--pred", pred]) == 2
    assert capsys.readouterr().err.startswith(f"score.py: error: {gold}: no gold rows")


def test_cli_prediction_file_that_is_not_utf8_is_an_error_naming_file_and_line(tmp_path, capsys):
    # score.py reads JSONL with model/manifest.py's reader: its errors name the file and the line.
    gold = _write(tmp_path / "gold.jsonl", GOLD)
    pred = tmp_path / "pred.jsonl"
    pred.write_bytes(json.dumps(PRED[0]).encode() + b"\n" + b'{"id": "g1\xff"}\n')
    assert score.main(["--gold", gold, "--pred", str(pred)]) == 2
    assert capsys.readouterr().err.startswith(f"score.py: error: {pred}:2: ")


# --- the paper's dagger ----------------------------------------------------------------------

# Table 2 of the paper (arXiv 2509.15389), the direct and curriculum rows: per speech fraction, nine
# "mean ± half-width" cells (SLURP, ITALIC, Speech-MASSIVE FR; intent accuracy, entity F1, SLU-F1), in units of
# 1e-4 as printed; "+" marks the paper's dagger. Integers, so that touching intervals compare exactly.
PAPER_TABLE_2 = """
2%   Direct 8345 82    6354 38    7167 38    8048 147   5644 152   6773 98    8132 78    5349 113   6740 98
2%   Curr.  8574 33+   6577 24+   7335 11+   8272 29+   6074 65+   7088 44+   8287 77    5590 63+   6919 48+
5%   Direct 8558 50    6617 54    7373 42    8376 48    6190 70    7165 37    8376 118   5677 53    6969 37
5%   Curr.  8642 16+   6765 21+   7475 25+   8412 32    6334 72+   7271 41+   8423 23    5802 35+   7048 44
10%  Direct 8618 23    6740 31    7482 22    8533 54    6387 60    7320 34    8418 66    5805 102   7054 59
10%  Curr.  8678 37    6807 15+   7529 21+   8490 34    6492 61    7406 22+   8493 17    5994 72+   7174 56+
25%  Direct 8689 28    6779 40    7515 43    8618 71    6650 41    7518 21    8619 53    6150 65    7278 53
25%  Curr.  8743 26    6873 23+   7580 15+   8622 17    6690 39    7529 40    8634 24    6176 50    7285 37
50%  Direct 8779 27    6891 28    7618 12    8680 25    6827 72    7597 42    8708 50    6271 51    7363 49
50%  Curr.  8771 33    6890 23    7610 22    8687 40    6850 43    7616 33    8682 34    6311 33    7381 24
100% Direct 8813 35    6959 30    7675 22    8767 16    7022 54    7737 63    8739 40    6445 31    7486 25
100% Curr.  8810 43    6932 30    7644 17    8735 34    7056 49    7766 32    8718 36    6463 75    7492 67
"""


def test_significantly_better_reproduces_every_dagger_of_the_papers_table_2_and_no_other():
    rows = [line.split() for line in PAPER_TABLE_2.strip().splitlines()]
    checked = 0
    for direct, curriculum in zip(rows[::2], rows[1::2]):
        assert (direct[1], curriculum[1], direct[0]) == ("Direct", "Curr.", curriculum[0])
        for k in range(9):
            d = (int(direct[2 + 2 * k]), int(direct[3 + 2 * k].rstrip("+")))
            c = (int(curriculum[2 + 2 * k]), int(curriculum[3 + 2 * k].rstrip("+")))
            where = (direct[0], k)
            assert score.significantly_better(c, d) == curriculum[3 + 2 * k].endswith("+"), where
            assert score.significantly_better(d, c) == direct[3 + 2 * k].endswith("+"), where
            checked += 1
    assert checked == 54
    # Touching intervals overlap: SLURP intent at 10% (8678 - 37 == 8618 + 23) has no dagger in the paper.
    assert not score.significantly_better((8678, 37), (8618, 23))
