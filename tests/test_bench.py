"""bench.py's side-by-side runs compute the same thing on both sides (its timings are printed, never asserted).

One random tiny-preset checkpoint (real vocabulary, written as a Hugging Face directory) is loaded by train.py's /
infer.py's code and by transformers; a few demo rows go through both.
"""
import subprocess
import sys

import pytest
import tyro

import bench
from bench import DecodeArgs, LMArgs, StepArgs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(bench.random_checkpoint(tmp_path_factory.mktemp("bench") / "tiny"))


@pytest.mark.slow  # about 40 s each: our step's compilation and two torch steps over 156k-token logits
@pytest.mark.parametrize("group", ["no", "yes"])  # grouped: transformers gets our micro-batches' rows
def test_step_side_by_side_trains_the_same_mixed_rows_answer_tokens_and_loss(checkpoint, group):
    # 4 rows in 2 micro-batches; speech fraction 1 so the first step with a recording comes early.
    report = bench.step_bench(StepArgs(model=checkpoint, global_batch=4, speech_fraction=1.0, steps=1,
                                       profile=False, group_recordings=group))
    assert report["n_speech"] >= 1 and report["n_text"] >= 1 and len(report["rows"]) == 4
    # Row by row the same token ids: our bucketed prompt with its audio tokens and answer equal the processor's.
    assert report["same_token_ids"]
    assert report["ours"]["answer_tokens"] == report["torch"]["answer_tokens"] > 4
    assert report["torch"]["audio_frames_per_clip"] == 3000
    assert report["ours"]["batch_shape"]["input_features"][-1] < 3000  # ours encodes a bucket, not 30 s
    assert abs(report["ours"]["loss"] - report["torch"]["loss"]) <= bench.LOSS_TOLERANCE
    assert report["agree"]


def test_decode_side_by_side_gives_identical_token_ids_for_every_row(checkpoint):
    report = bench.decode_bench(DecodeArgs(model=checkpoint, limit=3, batch=2, max_new_tokens=5))
    assert report["rows"] == 3
    assert report["identical"] and report["rows_differing"] == 0
    # A random model never ends a row: every row generated its 5 tokens on both sides.
    assert report["ours"]["generated_tokens"] == report["torch"]["generated_tokens"] == 15
    assert report["ours"]["second_pass_identical"] and report["ours"]["batch_shapes_compiled"] >= 1
    assert report["agree"]


def test_a_row_with_other_tokens_or_missing_on_one_side_is_reported():
    ours = {"a": [1, 2, 3], "b": [4, 5], "c": [6]}
    theirs = {"a": [1, 2, 3], "b": [4, 7]}
    assert bench.compare_decodes(ours, theirs) == {"identical": False, "rows_differing": 2,
                                                   "differing_ids": ["b", "c"]}
    assert bench.compare_decodes(ours, dict(ours))["identical"]


def step_result(loss: float, row_ids, answer_tokens: int = 10) -> dict:
    return {"loss": loss, "row_ids": row_ids, "answer_tokens": answer_tokens, "device_step_s": 1.0,
            "host_load_s": 0.1}


def test_step_comparison_flags_a_loss_beyond_the_tolerance_other_tokens_or_answer_counts():
    ids = [[1, 2, 3], [4, 5]]
    assert bench.compare_steps(step_result(2.0, ids), step_result(2.0 + bench.LOSS_TOLERANCE / 2, ids))["agree"]
    assert not bench.compare_steps(step_result(2.0, ids), step_result(2.0 + 2 * bench.LOSS_TOLERANCE, ids))["agree"]
    assert not bench.compare_steps(step_result(2.0, ids), step_result(2.0, [[1, 2, 3], [4, 6]]))["same_token_ids"]
    assert not bench.compare_steps(step_result(2.0, ids), step_result(2.0, ids, 11))["agree"]


def test_plain_bench_py_is_the_lm_benchmark_and_the_others_are_subcommands():
    parse = lambda argv: tyro.cli(bench.Command, default=LMArgs(), args=argv)
    assert parse([]) == LMArgs()
    assert parse(["lm", "--steps", "2"]) == LMArgs(steps=2)
    assert parse(["step", "--plan-step", "3"]) == StepArgs(plan_step=3)
    assert parse(["decode", "--limit", "8"]) == DecodeArgs(limit=8)


def test_bad_flags_exit_2_naming_the_problem_before_any_model_work(tmp_path):
    proc = subprocess.run([sys.executable, "bench.py", "decode", "--limit", "0"], capture_output=True, text=True,
                          cwd=bench.REPO)
    assert proc.returncode == 2 and "bench.py: error: --limit must be >= 1, got 0" in proc.stderr
    proc = subprocess.run([sys.executable, "bench.py", "step", "--model", str(tmp_path)], capture_output=True,
                          text=True, cwd=bench.REPO)
    assert proc.returncode == 2 and f"bench.py: error: --model {tmp_path}: no config.json" in proc.stderr


def test_pipeline_times_the_same_rows_both_ways_and_states_the_7b_appetite_from_model_flops():
    report = bench.pipeline_bench(bench.PipelineArgs(rows=3, batch=2))
    assert report["host"]["rows"] == 3 and set(report["host"]["ms_per_row"]) == {"decode", "host_features",
                                                                                "device_features"}
    assert set(report["host_rows_per_s_per_core"]) == {"host_features", "device_features"}
    assert report["device_log_mel"]["batch"] == 2 and report["device_log_mel"]["rows_per_s"] > 0
    # 7b: ~6 x 7.7e9 decoder parameters x 250 tokens per row, plus attention and the encoder on 200 positions
    s = report["step_7b"]
    assert 1.0e13 < s["model_flops_per_row"] < 1.4e13
    # 128 such rows on 8 x 989 TFLOP/s at 50%: about 0.37 s a step, ~340 rows/s
    assert 0.3 < s["step_s"] < 0.45 and 280 < s["rows_per_s"] < 430


def test_grouping_runs_the_audio_tower_on_the_fewest_micro_batches_that_hold_a_steps_recordings():
    import train
    from model.config import get_config
    texts, speech = [f"t{i}" for i in range(5)], [f"s{i}" for i in range(3)]
    lengths = {**{(0, k): (40, None) for k in texts}, **{(0, k): (60, 300) for k in speech}}
    # a seed whose one step of 8 rows has its 3 recordings in 3 of the 4 micro-batches of 2
    plan = next(p for p in (train.make_plan("direct", 1, 8, [texts], [speech], [1.0], seed=s) for s in range(100))
                if sum(any(k[1] in speech for k in p.step_keys(0)[a:a + 2]) for a in (0, 2, 4, 6)) == 3)
    (seq, frames), = {s["shape"] for s in train.plan_step_shapes(plan, lengths, 8)}
    config = get_config("7b")
    work = bench.audio_tower_work(plan, lengths, 8, 2, config)
    assert (work["row_frames_as_drawn"], work["row_frames_grouped"]) == (3 * 2 * frames, 2 * 2 * frames)
    assert work["recordings_share_grouped"] == round(3 * 300 / (4 * frames), 3)
    tower, decoder = bench.encoder_flops_per_frame(config), 8 * seq * bench.model_flops_per_token(config, seq)
    saved = tower * 2 * frames  # one micro-batch of 2 rows x frames
    assert work["saved_7b_flops_share"] == round(saved / (decoder + tower * 3 * 2 * frames), 3) > 0
