"""Cross-modal distillation (--distill-weight, --distill-teacher, --distill-temperature): the loss against a numpy
reference, where its gradient goes, and the frozen teacher's life through a run and a resume.

The tiny model and demo manifest are test_train.py's (12 transcripts + 4 recordings)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train
from model import processor as P
from model.checkpoint import load_hf
from model.config import get_config
from model.qwen2_audio import forward
from test_train import direct_plan, leaves, run, setup  # noqa: F401  (setup is a fixture)


def loader_and_batch(setup, step=None):
    """A direct plan with every recording (batch 8), its loader with the teacher rows on, and the first micro-batch
    of a step that holds recordings."""
    plan, rows = direct_plan(setup, 8)
    loader = train.StepLoader(plan, rows, P.load_tokenizer(), 1, 8, slice(0, 8), distill=True)
    steps = [s for s in range(plan.total_steps) if loader.counts(s)[1] >= 2]
    host = loader(steps[0] if step is None else step)
    return plan, rows, loader, {k: v[0] for k, v in host.items()}, steps[0] if step is None else step


def numpy_kl(p_logits, q_logits, temperature):
    """sum over positions of T^2 KL(softmax(p/T) || softmax(q/T)), float64."""
    def log_softmax(x):
        x = x.astype(np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return temperature ** 2 * float(np.sum(np.exp(lp) * (lp - lq)))


def test_distill_kl_equals_a_numpy_reference_over_the_answer_tokens_of_the_recording_rows_only(setup):
    # Independent positions: each row's answer span is found from its own example (prompt length, answer length)
    # in full-sequence logits of the recording and of its transcript; the KL is summed there in float64.
    plan, rows, loader, mb, step = loader_and_batch(setup)
    tok = loader.tok
    _, params = load_hf(setup["model"], dtype=np.float32)
    # a random tiny model's answers are near uniform over 156k tokens: a KL of ~1e-3, all float32 rounding. Sharpen
    # them (a larger output layer) so the reference compares a real divergence.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 40.0
    config = get_config(str(setup["model"]))
    temperature = 2.0
    student_full = np.asarray(forward(params, config, mb["input_ids"], mb["attention_mask"], mb["input_features"],
                                      mb["feature_lengths"]))
    teacher_full = np.asarray(forward(params, config, mb["teacher_input_ids"], mb["teacher_attention_mask"]))
    want, n_answer = 0.0, 0
    for i, key in enumerate(plan.step_keys(step)[:8]):
        row = rows[key[0]][key[1]]
        if row["audio"] is None:
            assert mb["distill_mask"][i].sum() == 0
            continue
        s, t = train.make_example(row, tok), train.make_example({**row, "audio": None}, tok)
        assert s.ids[s.n_prompt:] == t.ids[t.n_prompt:]  # the same answer tokens
        # the teacher row is the transcript's prompt: the text is in it, no audio token
        assert list(mb["teacher_input_ids"][i, :len(t.ids)]) == t.ids
        assert row["text"] in tok.decode(t.ids[:t.n_prompt])
        k = len(s.ids) - s.n_prompt
        want += numpy_kl(teacher_full[i, t.n_prompt - 1:t.n_prompt - 1 + k], student_full[i, s.n_prompt - 1:len(s.ids) - 1],
                         temperature)
        n_answer += k
    assert n_answer > 0 and mb["distill_mask"].sum() == n_answer
    mbj = {k: jnp.asarray(v) for k, v in mb.items()}
    got = train.distill_kl(train.answer_logits(params, config, mbj, jnp.float32, "none"),
                           train.answer_logits(params, config, mbj, jnp.float32, "none", prefix="teacher_"),
                           mbj["distill_mask"], temperature)
    assert want > 1.0  # the model answers the recording and the transcript differently
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def sgd_step(config, distill, batch, trainable, frozen, teacher=None):
    """One train step with plain SGD at lr 1 (the update is minus the gradient) -> (new trainable, metrics)."""
    tx = optax.sgd(1.0)
    step = jax.jit(train.make_train_step(config, tx, jnp.float32, "none", distill))
    args = (trainable, frozen, tx.init(trainable), batch) + (() if teacher is None else (teacher,))
    new, _, metrics = step(*args)
    return leaves(new), {k: float(v) for k, v in metrics.items()}


def reference_gradient(config, batch, trainable, frozen, teacher_logits, weight, temperature):
    """d/dtrainable of (cross-entropy + weight x KL) / answer tokens, the teacher's logits a constant."""
    mb = jax.tree.map(lambda x: x[0], batch)

    def objective(tr):
        logits = train.answer_logits(train.merge_params(frozen, tr), config, mb, jnp.float32, "none")
        nll, n = train.answer_nll(logits, mb)
        return (nll + weight * train.distill_kl(logits, teacher_logits, mb["distill_mask"], temperature)) / n

    return leaves(jax.grad(objective)(trainable))


@pytest.mark.parametrize("kind", ["self", "frozen"])
def test_the_gradient_reaches_the_student_and_never_flows_through_the_teacher(setup, kind):
    # self: the same parameters under stop_gradient; frozen: another tree (here: the model with every weight
    # scaled), only read. Either way the update is the gradient with the teacher's logits held constant.
    _, _, _, mb, _ = loader_and_batch(setup)
    _, params = load_hf(setup["model"], dtype=np.float32)
    config = get_config(str(setup["model"]))
    trainable, frozen = train.split_params(params, train.ALWAYS_FROZEN)
    batch = {k: jnp.asarray(v)[None] for k, v in mb.items()}
    teacher = jax.tree.map(lambda x: x * 1.5, params) if kind == "frozen" else None
    source = params if teacher is None else teacher
    teacher_logits = train.answer_logits(source, config, jax.tree.map(lambda x: x[0], batch), jnp.float32, "none",
                                         prefix="teacher_")
    distill = train.Distill(weight=0.7, teacher=kind, temperature=1.5)
    got, _ = sgd_step(config, distill, batch, trainable, frozen, teacher)
    grad = reference_gradient(config, batch, trainable, frozen, teacher_logits, 0.7, 1.5)
    before = leaves(trainable)
    moved = 0
    for k in before:
        np.testing.assert_allclose(before[k] - got[k], grad[k], atol=1e-6, rtol=1e-4, err_msg=k)
        moved += not np.array_equal(before[k], got[k])
    assert moved > 0
    # and the distillation term is really in the update: without it the step moves elsewhere
    plain, _ = sgd_step(config, None, batch, trainable, frozen)
    assert any(not np.allclose(plain[k], got[k], atol=1e-7) for k in got)


def test_weight_zero_reproduces_the_plain_step_and_the_reported_loss_is_the_cross_entropy(setup):
    _, _, _, mb, _ = loader_and_batch(setup)
    _, params = load_hf(setup["model"], dtype=np.float32)
    config = get_config(str(setup["model"]))
    trainable, frozen = train.split_params(params, train.ALWAYS_FROZEN)
    batch = {k: jnp.asarray(v)[None] for k, v in mb.items()}
    plain_batch = {k: v for k, v in batch.items() if not k.startswith(("teacher_", "distill_"))}
    plain, plain_metrics = sgd_step(config, None, plain_batch, trainable, frozen)
    zero, zero_metrics = sgd_step(config, train.Distill(0.0, "self", 1.0), batch, trainable, frozen)
    np.testing.assert_allclose(zero_metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    for k in plain:
        np.testing.assert_allclose(zero[k], plain[k], atol=1e-7, rtol=0, err_msg=k)
    _, one_metrics = sgd_step(config, train.Distill(1.0, "self", 1.0), batch, trainable, frozen)
    np.testing.assert_allclose(one_metrics["loss"], plain_metrics["loss"], rtol=1e-6)  # "loss" stays the CE
    assert one_metrics["distill_kl"] > 0 and "distill_kl" not in plain_metrics
    # and the flag at 0 (its default) is the plain step: no teacher rows are even built
    assert train.make_distill(train.parse_args(["--distill-weight", "0"])) is None


def curriculum_run(setup, run_dir, *flags):
    """Curriculum, 2 epochs of 8-row steps on one device: steps 1-2 transcripts, steps 3-5 with recordings."""
    return run(setup, run_dir, "--scheme", "curriculum", "--speech-fraction", "1.0", "--epochs", "2",
               "--per-device-batch", "8", "--grad-accum", "1", "--fsdp", "1", "--distill-weight", "1",
               "--distill-teacher", "frozen", *flags)


@pytest.mark.slow
def test_frozen_teacher_is_the_model_at_the_end_of_the_text_phase_unchanged_and_survives_a_resume(setup, tmp_path):
    boundary = curriculum_run(setup, tmp_path / "boundary", "--max-steps", "2")
    assert boundary["teacher"] is None  # no recording yet: no teacher taken
    full = curriculum_run(setup, tmp_path / "full")
    first = curriculum_run(setup, tmp_path / "resumed", "--max-steps", "4")
    second = curriculum_run(setup, tmp_path / "resumed")
    assert second["resumed_from"] == 4
    assert first["losses"] + second["losses"] == full["losses"]  # bit-identical, the teacher restored
    want = leaves(boundary["params"])
    for out in (full, second):
        got = leaves(out["teacher"])
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    trained = leaves(full["params"])
    assert not np.array_equal(trained["['lm_head']['kernel']"], want["['lm_head']['kernel']"])
    kls = [r.get("distill_kl") for r in map(__import__("json").loads,
                                             (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())]
    assert kls[:2] == [None, None] and all(k is not None and k >= 0 for k in kls[2:])


def test_direct_frozen_teacher_is_the_initial_model(setup, tmp_path):
    out = run(setup, tmp_path / "d", "--scheme", "direct", "--speech-fraction", "1.0", "--epochs", "1",
              "--per-device-batch", "8", "--grad-accum", "1", "--fsdp", "1", "--warmup-ratio", "0",
              "--distill-weight", "1", "--distill-teacher", "frozen", "--keep-optimizer-state")
    assert out["n_speech_seen"] == 4
    _, initial = load_hf(setup["model"], dtype=np.float32)
    want, got = leaves(initial), leaves(out["teacher"])
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert not np.array_equal(leaves(out["params"])["['lm_head']['kernel']"], want["['lm_head']['kernel']"])


def test_distillation_with_text_only_is_refused_before_any_work(capsys):
    with pytest.raises(train.InputError, match="text-only trains on no recordings"):
        train.main(["--scheme", "text-only", "--distill-weight", "1"])
    with pytest.raises(train.InputError, match="--distill-temperature"):
        train.main(["--distill-weight", "1", "--distill-temperature", "0"])


@pytest.mark.slow
def test_distillation_on_a_2x2x2_mesh_gives_the_one_device_losses_with_the_teacher_sharded_like_the_model(setup,
                                                                                                        tmp_path):
    common = ("--scheme", "direct", "--speech-fraction", "1.0", "--epochs", "1", "--global-batch", "8",
              "--warmup-ratio", "0", "--distill-weight", "1", "--distill-teacher", "frozen")
    one = run(setup, tmp_path / "one", *common, "--per-device-batch", "8", "--fsdp", "1")
    mesh = run(setup, tmp_path / "mesh", *common, "--per-device-batch", "2", "--data-parallel", "2", "--fsdp", "2",
               "--tensor-parallel", "2")
    assert one["n_speech_seen"] == mesh["n_speech_seen"] == 4
    np.testing.assert_allclose(mesh["losses"], one["losses"], rtol=1e-5)
    kl = [[__import__("json").loads(line).get("distill_kl") for line in (tmp_path / d / "metrics.jsonl").read_text()
           .splitlines()] for d in ("one", "mesh")]
    assert any(k is not None for k in kl[0]) and [k is None for k in kl[0]] == [k is None for k in kl[1]]
    # (a random tiny model barely tells audio from text: a KL of ~3e-5, so float rounding shows at 5e-4 of it)
    np.testing.assert_allclose([k for k in kl[1] if k is not None], [k for k in kl[0] if k is not None], rtol=2e-3)
    specs = lambda tree: {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    assert specs(mesh["teacher"]) == specs(mesh["params"])
    assert any(any(axis is not None for axis in spec) for spec in specs(mesh["teacher"]).values())
