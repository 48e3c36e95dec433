"""The epoch plan of train.py: the paper's deterministic epoch-allocation sampler and learning-rate schedules.

No model and no audio: the plan is a function of row ids, the scheme, the fractions and the seeds.
Expected numbers come from the issue / paper (SLURP train: 11,514 transcripts, 50,628 recordings) or are
computed here by hand from the definitions (round half up, ceil, linear warmup + cosine).
"""
import collections
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import train
from model import processor as P

REPO = Path(__file__).resolve().parents[1]
N_TEXT, N_SPEECH = 11_514, 50_628  # SLURP train (paper Table 1)
TEXT_IDS = [f"slurp-{i}" for i in range(N_TEXT)]
SPEECH_IDS = [f"audio-{i:06d}-headset.flac" for i in range(N_SPEECH)]


def slurp_plan(scheme, p, epochs=3, *, seed=0, subset_seed=0, global_batch=128, speech_ids=SPEECH_IDS):
    return train.make_plan(scheme, epochs, global_batch, [TEXT_IDS], [speech_ids], [p],
                           seed=seed, subset_seed=subset_seed)


def test_issue_numbers_direct_sees_1013_speech_rows_every_epoch():
    plan = slurp_plan("direct", 0.02)
    assert [e["speech"] for e in plan.epochs] == [1013, 1013, 1013]  # round(0.02 * 50628 = 1012.56)
    assert [e["text"] for e in plan.epochs] == [N_TEXT] * 3
    assert plan.to_json()["n_p"] == 1013


def test_issue_numbers_curriculum_puts_all_3039_speech_rows_in_the_last_epoch():
    plan = slurp_plan("curriculum", 0.02)
    assert [e["speech"] for e in plan.epochs] == [0, 0, 3039]
    assert [e["text"] for e in plan.epochs] == [N_TEXT] * 3
    # the last epoch is the subset repeated E times: every subset row exactly 3 times
    speech = collections.Counter(k for k in plan.epoch_keys[2] if k[1].startswith("audio-"))
    assert set(speech.values()) == {3} and len(speech) == 1013


def test_both_mixing_schemes_see_the_same_speech_subset_and_total():
    direct, curriculum = slurp_plan("direct", 0.02), slurp_plan("curriculum", 0.02)
    assert direct.subset_keys == curriculum.subset_keys
    assert sum(e["speech"] for e in direct.epochs) == sum(e["speech"] for e in curriculum.epochs) == 1013 * 3


def test_text_only_uses_every_transcript_every_epoch_and_no_speech():
    plan = slurp_plan("text-only", 0.02)
    assert [e["speech"] for e in plan.epochs] == [0, 0, 0]
    for keys in plan.epoch_keys:
        assert sorted(i for _, i in keys) == sorted(TEXT_IDS)


def test_subsets_are_nested_as_the_fraction_grows():
    fractions = [0.02, 0.05, 0.10, 0.25, 0.50, 1.0]
    subsets = [set(train.speech_subset(SPEECH_IDS, p, subset_seed=0)) for p in fractions]
    for p, s in zip(fractions, subsets):
        assert len(s) == math.floor(p * N_SPEECH + 0.5)
    for small, large in zip(subsets, subsets[1:]):
        assert small < large
    assert subsets[-1] == set(SPEECH_IDS)


def test_round_half_up_not_bankers_rounding():
    # 0.5 * 11 = 5.5: Python's round() would give 6 here but 4 for 4.5; the plan always rounds half up
    assert len(train.speech_subset([f"r{i}" for i in range(11)], 0.5, 0)) == 6
    assert len(train.speech_subset([f"r{i}" for i in range(9)], 0.5, 0)) == 5


def test_same_seeds_give_the_same_plan():
    a, b = slurp_plan("direct", 0.05, seed=3, subset_seed=7), slurp_plan("direct", 0.05, seed=3, subset_seed=7)
    assert a.to_json() == b.to_json() and a.epoch_keys == b.epoch_keys
    assert a.fingerprint() == b.fingerprint()


def test_other_subset_seed_gives_another_subset_of_the_same_size():
    a, b = slurp_plan("direct", 0.05, subset_seed=0), slurp_plan("direct", 0.05, subset_seed=1)
    sa, sb = set(a.to_json()["speech_subset"]), set(b.to_json()["speech_subset"])
    assert len(sa) == len(sb) == 2531 and sa != sb
    # chance overlap of two random 5% subsets is ~5%; a seed that was ignored would give 100%
    assert len(sa & sb) < 0.2 * len(sa)


def test_other_seed_reshuffles_epochs_but_keeps_the_subset():
    a, b = slurp_plan("direct", 0.05, seed=0), slurp_plan("direct", 0.05, seed=1)
    assert a.subset_keys == b.subset_keys
    assert a.epoch_keys[0] != b.epoch_keys[0] and sorted(a.epoch_keys[0]) == sorted(b.epoch_keys[0])
    assert a.fingerprint() != b.fingerprint()


def test_epochs_are_shuffled_differently():
    plan = slurp_plan("text-only", 0.0)
    assert plan.epoch_keys[0] != plan.epoch_keys[1]


def test_subset_does_not_depend_on_manifest_row_order():
    shuffled = list(reversed(SPEECH_IDS))
    assert train.speech_subset(shuffled, 0.02, 0) == train.speech_subset(SPEECH_IDS, 0.02, 0)


def test_steps_are_ceil_of_rows_over_global_batch_and_every_row_is_seen_once():
    plan = slurp_plan("direct", 0.02, global_batch=128)
    rows = N_TEXT + 1013
    assert [e["steps"] for e in plan.epochs] == [math.ceil(rows / 128)] * 3 == [98] * 3
    for e in range(3):
        start = sum(ep["steps"] for ep in plan.epochs[:e])
        seen = [k for s in range(plan.epochs[e]["steps"]) for k in plan.step_keys(start + s)]
        assert seen == plan.epoch_keys[e]  # nothing dropped, nothing repeated
        assert len(plan.step_keys(start + plan.epochs[e]["steps"] - 1)) == rows - 97 * 128  # the short last batch
    assert plan.total_steps == 294


def test_multi_manifest_mixture_gives_each_manifest_its_own_fraction():
    # zero-shot cross-lingual: source-language speech at p, target-language transcripts, extra text-only data
    src_text, src_speech = [f"en-{i}" for i in range(40)], [f"en-{i}.flac" for i in range(200)]
    tgt_text, tgt_speech = [f"fr-{i}" for i in range(30)], [f"fr-{i}.flac" for i in range(50)]
    extra_text = [f"massive-{i}" for i in range(25)]
    plan = train.make_plan("direct", 2, 16, [src_text, tgt_text, extra_text], [src_speech, tgt_speech, []],
                           [0.1, 0.0, 0.5])
    assert [s["n_p"] for s in plan.sources] == [20, 0, 0]
    assert [e["text"] for e in plan.epochs] == [95, 95]
    assert [e["speech"] for e in plan.epochs] == [20, 20]
    assert {i for _, i in plan.subset_keys} <= set(src_speech)
    # the same manifest's subset is the one it would get alone
    alone = train.speech_subset(src_speech, 0.1, 0)
    assert [i for m, i in plan.subset_keys if m == 0] == alone


def test_parse_source_reads_an_optional_fraction_suffix():
    assert train.parse_source("data/train.jsonl:0.25", 0.02) == train.Source("data/train.jsonl", 0.25)
    assert train.parse_source("data/train.jsonl", 0.02) == train.Source("data/train.jsonl", 0.02)
    assert train.parse_source("odd:dir/train.jsonl", 0.1) == train.Source("odd:dir/train.jsonl", 0.1)
    with pytest.raises(ValueError, match=r"x\.jsonl:1\.5.*\[0, 1\]"):
        train.parse_source("x.jsonl:1.5", 0.1)


def test_train_manifest_flag_may_be_repeated_or_given_a_list():
    a = train.parse_args(["--train-manifest", "a.jsonl:0.1", "--train-manifest", "b.jsonl", "--epochs", "2"])
    b = train.parse_args(["--train-manifest", "a.jsonl:0.1", "b.jsonl", "--epochs", "2"])
    assert a.train_manifest == b.train_manifest == ("a.jsonl:0.1", "b.jsonl") and a.epochs == 2


def test_train_manifest_in_tyros_underscore_spelling_repeated_keeps_every_manifest():
    # tyro accepts --train_manifest too; repeated, it would keep only the last one: cross-lingual runs without
    # their source data
    for argv in (["--train_manifest", "a.jsonl", "--train_manifest", "b.jsonl:0.5"],
                 ["--train_manifest=a.jsonl", "--train-manifest", "b.jsonl:0.5"]):
        assert train.parse_args(argv).train_manifest == ("a.jsonl", "b.jsonl:0.5"), argv


def test_a_single_dash_flag_after_the_manifests_ends_their_list():
    assert train._merge_repeated(["--train-manifest", "a.jsonl", "-h"], "--train-manifest") == \
        ["-h", "--train-manifest", "a.jsonl"]


def test_the_same_manifest_given_twice_is_refused_it_would_double_its_rows(tmp_path):
    write_manifest(tmp_path / "a.jsonl", 2, 2, "a")
    args = train.Args(train_manifest=(str(tmp_path / "a.jsonl"), str(tmp_path / ".." / tmp_path.name / "a.jsonl:0.5")))
    with pytest.raises(train.InputError, match=r"same file; give each manifest once"):
        train.load_sources(args)


def test_global_batch_fixes_the_step_and_the_accumulation_follows_the_mesh():
    assert train.resolve_batch(train.Args(global_batch=128, per_device_batch=2), 1, 8) == (128, 8)
    assert train.resolve_batch(train.Args(global_batch=128, per_device_batch=2), 2, 1) == (128, 32)
    assert train.resolve_batch(train.Args(global_batch=128, per_device_batch=2), 1, 1) == (128, 64)
    # defaults: the paper's 128 for a pretrained model directory, the demo's 16 for a preset
    assert train.resolve_batch(train.Args(model="."), 1, 8) == (128, 8)
    assert train.resolve_batch(train.Args(model="tiny"), 1, 1) == (16, 8)
    # an explicit accumulation without --global-batch keeps its meaning (rows per device x accumulation x devices)
    assert train.resolve_batch(train.Args(per_device_batch=8, grad_accum=1), 1, 2) == (16, 1)


def test_a_model_directory_states_its_own_finetuning_defaults_and_flags_override_them(tmp_path):
    # the shipped miniature says {"peak_lr", "global_batch"} in pretraining.json; a bare directory gets the paper's
    assert train.resolve_lr(train.Args(model=str(tmp_path))) == (5e-6, pytest.approx(3e-6))
    (tmp_path / "pretraining.json").write_text(json.dumps({"finetune_defaults": {"peak_lr": 1e-3, "global_batch": 32}}))
    assert train.resolve_lr(train.Args(model=str(tmp_path))) == (1e-3, pytest.approx(6e-4))
    assert train.resolve_batch(train.Args(model=str(tmp_path)), 1, 2) == (32, 8)
    assert train.resolve_lr(train.Args(model=str(tmp_path), peak_lr=2e-4))[0] == 2e-4
    assert train.resolve_batch(train.Args(model=str(tmp_path), global_batch=8), 1, 2) == (8, 2)
    (tmp_path / "pretraining.json").write_text(json.dumps({"finetune_defaults": {"peak_lr": "fast"}}))
    with pytest.raises(train.InputError, match=r"pretraining.json: finetune_defaults.peak_lr must be a positive"):
        train.resolve_lr(train.Args(model=str(tmp_path)))


def test_the_epoch_count_is_the_model_directorys_own_else_the_papers_and_a_flag_overrides_it(tmp_path):
    assert train.resolve_epochs(train.Args(model=str(tmp_path))) == train.PAPER_EPOCHS == 3
    assert train.resolve_epochs(train.Args(model="tiny")) == 3
    (tmp_path / "pretraining.json").write_text(json.dumps({"finetune_defaults": {"epochs": 5}}))
    assert train.resolve_epochs(train.Args(model=str(tmp_path))) == 5
    assert train.resolve_epochs(train.Args(model=str(tmp_path), epochs=2)) == 2
    (tmp_path / "pretraining.json").write_text(json.dumps({"finetune_defaults": {"epochs": 2.5}}))
    with pytest.raises(train.InputError, match=r"pretraining.json: finetune_defaults.epochs must be a positive"):
        train.resolve_epochs(train.Args(model=str(tmp_path)))


def test_a_mistyped_model_path_is_named_as_a_path_not_as_a_preset(tmp_path):
    with pytest.raises(train.InputError, match=r"--model /ckpt/Qwen2-Audi: not a directory, nor a preset \(7b, tiny\)"):
        train.check_model_choice(train.Args(model="/ckpt/Qwen2-Audi", random_init=True))
    train.check_model_choice(train.Args(model="7b", random_init=True))  # allowed, with a warning


def test_a_global_batch_the_mesh_cannot_split_is_an_error_naming_the_numbers():
    with pytest.raises(train.InputError, match=r"global batch 100 .* --per-device-batch 2 x 8 data-parallel devices "
                                               r"\(--data-parallel 1 x --fsdp 8\) = 16 rows"):
        train.resolve_batch(train.Args(global_batch=100), 1, 8)
    with pytest.raises(train.InputError, match=r"--grad-accum 4 contradicts --global-batch 128"):
        train.resolve_batch(train.Args(global_batch=128, grad_accum=4), 1, 8)


def test_mesh_larger_than_the_devices_or_not_dividing_them_is_an_error():
    with pytest.raises(ValueError, match="8 devices"):
        train.resolve_mesh_shape(train.Args(data_parallel=3, fsdp=-1), 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        train.resolve_mesh_shape(train.Args(data_parallel=2, fsdp=4, tensor_parallel=2), 8)
    assert train.resolve_mesh_shape(train.Args(data_parallel=2, tensor_parallel=2), 8) == (2, 2, 2)
    assert train.resolve_mesh_shape(train.Args(fsdp=1), 8) == (1, 1, 1)  # a sub-mesh: the first device


# --- learning-rate schedules ----------------------------------------------------------------------------------

def warmup_cosine(k, steps, warmup, peak):
    """Hand-written reference: linear warmup from 0, then half a cosine down to 0 at the end of the phase."""
    if k < warmup:
        return peak * k / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup)))


def test_direct_schedule_one_warmup_cosine_over_all_epochs_peak_5e6_warmup_4pct():
    # 100 transcripts + round(0.25 * 80) = 20 speech rows per epoch, batch 8 -> 15 steps/epoch, 45 in all
    plan = train.make_plan("direct", 3, 8, [[f"t{i}" for i in range(100)]], [[f"s{i}" for i in range(80)]], [0.25])
    assert [e["steps"] for e in plan.epochs] == [15, 15, 15]
    assert [(e["peak_lr"], e["warmup_steps"]) for e in plan.epochs] == [(5e-6, 2)] * 3  # ceil(0.04 * 45) = 2
    sched = train.lr_schedule(plan.phases)
    for k, want in [(0, 0.0), (1, 2.5e-6), (2, 5e-6), (10, warmup_cosine(10, 45, 2, 5e-6)),
                    (23, warmup_cosine(23, 45, 2, 5e-6)), (44, warmup_cosine(44, 45, 2, 5e-6))]:
        assert float(sched(k)) == pytest.approx(want, rel=1e-5, abs=1e-12), k
    assert float(sched(23)) == pytest.approx(0.5 * 5e-6 * (1 + math.cos(math.pi * 21 / 43)), rel=1e-5)


def test_curriculum_restarts_with_peak_3e6_and_2pct_warmup_in_the_last_epoch():
    # epochs 1-2: 200 transcripts / batch 8 = 25 steps each -> 50 steps, warmup ceil(0.04*50) = 2
    # epoch 3: 200 + 3 * round(0.5 * 100) = 350 rows -> 44 steps, warmup ceil(0.02*44) = 1
    plan = train.make_plan("curriculum", 3, 8, [[f"t{i}" for i in range(200)]], [[f"s{i}" for i in range(100)]],
                           [0.5])
    assert [e["steps"] for e in plan.epochs] == [25, 25, 44]
    assert [(e["peak_lr"], e["warmup_steps"]) for e in plan.epochs] == [(5e-6, 2), (5e-6, 2), (3e-6, 1)]
    sched = train.lr_schedule(plan.phases)
    assert float(sched(2)) == pytest.approx(5e-6, rel=1e-6)
    assert float(sched(30)) == pytest.approx(warmup_cosine(30, 50, 2, 5e-6), rel=1e-5)
    assert float(sched(49)) == pytest.approx(warmup_cosine(49, 50, 2, 5e-6), rel=1e-4)
    assert float(sched(50)) == 0.0                                  # the fresh schedule starts from 0 ...
    assert float(sched(51)) == pytest.approx(3e-6, rel=1e-6)        # ... peaks at 3e-6 after 1 warmup step ...
    for k in (60, 93):                                              # ... and decays over the last epoch's 44 steps
        assert float(sched(k)) == pytest.approx(warmup_cosine(k - 50, 44, 1, 3e-6), rel=1e-4)


def test_curriculum_cut_schedule_is_the_text_only_e_epoch_schedule_stopped_after_epoch_e_minus_1():
    # the other reading of "same scheduler configuration": epochs 1-2 follow the 3-epoch text-only schedule (75
    # steps, warmup ceil(0.04*75) = 3) and stop at step 50, before its cosine reaches 0
    plan = train.make_plan("curriculum", 3, 8, [[f"t{i}" for i in range(200)]], [[f"s{i}" for i in range(100)]],
                           [0.5], curriculum_schedule="cut")
    text_only = train.make_plan("text-only", 3, 8, [[f"t{i}" for i in range(200)]], [[]], [0.5])
    first, last = plan.phases
    assert (first["steps"], first["schedule_steps"], first["warmup_steps"]) == (50, 75, 3)
    cut, full = train.lr_schedule(plan.phases), train.lr_schedule(text_only.phases)
    for k in (0, 2, 3, 30, 49):
        assert float(cut(k)) == pytest.approx(float(full(k)), rel=1e-6, abs=1e-15), k
    assert float(cut(49)) > 1e-6                                   # cut while still well above 0
    assert float(cut(51)) == pytest.approx(3e-6, rel=1e-6)         # the last epoch is unchanged


def test_paper_peak_lr_for_a_pretrained_model_and_three_fifths_for_the_last_epoch(tmp_path):
    assert train.resolve_lr(train.Args(model=str(tmp_path))) == (5e-6, pytest.approx(3e-6))
    assert train.resolve_lr(train.Args(model=str(tmp_path), peak_lr=1e-5, last_epoch_peak_lr=2e-6)) == (1e-5, 2e-6)


# --- --plan-only on real manifest files --------------------------------------------------------------------------

def write_manifest(path, n_text, n_speech, prefix):
    rows = [{"id": f"{prefix}-t{i}", "lang": "en", "text": f"wake me at {i}", "audio": None,
             "scenario": "alarm", "action": "set", "entities": [{"type": "time", "filler": str(i)}]}
            for i in range(n_text)]
    rows += [{"id": f"{prefix}-s{i}.flac", "lang": "en", "text": f"wake me at {i}", "audio": f"audio/{i}.flac",
              "scenario": "alarm", "action": "set", "entities": []} for i in range(n_speech)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plan_only_prints_the_issue_json_and_loads_no_model(tmp_path):
    a = write_manifest(tmp_path / "a.jsonl", 30, 40, "a")
    b = write_manifest(tmp_path / "b.jsonl", 10, 8, "b")
    code = ("import sys, train; train.main(sys.argv[1:]); "
            "assert 'model.qwen2_audio' not in sys.modules and 'model.processor' not in sys.modules, 'model loaded'")
    out = subprocess.run([sys.executable, "-c", code, "--plan-only", "--scheme", "curriculum",
                          "--train-manifest", f"{a}:0.25", "--train-manifest", str(b), "--speech-fraction", "0.5",
                          "--epochs", "3", "--per-device-batch", "2", "--grad-accum", "2", "--fsdp", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert {"scheme", "speech_fraction", "n_text", "n_speech", "n_p", "epochs", "speech_subset"} <= set(plan)
    assert set(plan["epochs"][0]) == {"epoch", "text", "speech", "steps", "peak_lr", "warmup_steps"}
    assert (plan["scheme"], plan["n_text"], plan["n_speech"], plan["n_p"]) == ("curriculum", 40, 48, 10 + 4)
    assert [e["speech"] for e in plan["epochs"]] == [0, 0, 42]
    assert [e["steps"] for e in plan["epochs"]] == [10, 10, 21]  # global batch 2 * 2 * 1 = 4
    assert len(plan["speech_subset"]) == 14 and all(i.endswith(".flac") for i in plan["speech_subset"])


def test_the_default_run_trains_the_miniature_for_its_own_five_epochs_with_the_subset_repeated_five_times():
    out = subprocess.run([sys.executable, "train.py", "--plan-only", "--fsdp", "1"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [e["speech"] for e in plan["epochs"]] == [0, 0, 0, 0, 5 * 32]  # p = 0.1 of 316 recordings
    assert (plan["global_batch"], plan["total_steps"]) == (4, 4 * 79 + 119)


def test_plan_only_names_the_manifest_line_of_a_bad_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    out = subprocess.run([sys.executable, "train.py", "--plan-only", "--train-manifest", str(bad)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and f"{bad}:1" in out.stderr


# --- step shapes (few compilations) -------------------------------------------------------------------------------

SLURP = Path(__file__).resolve().parents[2] / "shared" / "data" / "slurp"


@pytest.mark.skipif(not (SLURP / "test.jsonl").is_file(), reason="the real SLURP annotations are not in ../shared")
@pytest.mark.parametrize("global_batch", [128, 16])
def test_a_slurp_like_run_compiles_at_most_8_step_shapes_in_any_scheme(global_batch):
    import bench
    texts, speech, lengths = bench.slurp_like_lengths(str(SLURP))
    assert len(texts) == 5007 and len(speech) > 20000
    for scheme, p in (("text-only", 0.0), ("direct", 0.1), ("direct", 1.0), ("curriculum", 0.02), ("curriculum", 1.0)):
        plan = train.make_plan(scheme, 3, global_batch, [texts], [speech], [p])
        shapes = {s["shape"] for s in train.plan_step_shapes(plan, lengths, global_batch)}
        assert len(shapes) <= 8, (scheme, p, sorted(shapes, key=str))


@pytest.mark.skipif(not (SLURP / "test.jsonl").is_file(), reason="the real SLURP annotations are not in ../shared")
def test_a_slurp_like_test_set_decodes_in_at_most_8_batch_shapes():
    # infer.py sorts rows by length and pads batches to the same buckets as train.py's steps
    import bench
    for run in bench.decode_shapes(str(SLURP), batch_sizes=(8, 32)):
        assert run["batch_shapes"] <= 8 and run["padding"] < 0.25, run


def test_step_shapes_come_from_short_lists_and_never_cut_a_row():
    seqs = {P.seq_bucket(n) for n in range(1, 2049)}
    assert sorted(seqs) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    for n in (1, 63, 64, 65, 97, 1000, 2048):
        assert P.seq_bucket(n) >= n and (n <= 64 or P.seq_bucket(n) <= 1.5 * n)  # at most a third padding
    assert [P.audio_bucket(f) for f in (100, 400, 401, 1500, 3000)] == [400, 400, 800, 1600, 3000]
    assert train.step_shape(70, None) == (96, None) and train.step_shape(300, 900) == (384, 1600)
