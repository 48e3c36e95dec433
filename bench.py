"""Benchmarks, ours (JAX) vs transformers (PyTorch) doing the same work; each prints one JSON object.

    python bench.py                  # = bench.py lm: a text-only LM train step on fixed shapes (tiny preset)
    python bench.py lm --impls ours --preset 7b --layers 4 --batch 2 --seq-len 512   # 7b-shaped, on a GPU
    python bench.py step             # one SLU optimizer step on a real batch of the demo (direct mixing, 16 rows)
    python bench.py decode --limit 16   # beam-3 decoding of the demo test set's recordings
    python bench.py shapes           # step shapes (= compilations) and padding on SLURP-like lengths, no model
    python bench.py pipeline         # host ms per recording (one core), host vs device features; 7b step appetite

lm: forward over a text batch, token cross-entropy on every position, backward, AdamW update (fp32 master
weights); "tokens" are batch * seq_len per step. Each implementation runs in its own subprocess so that its peak
host memory (ru_maxrss) is its own. On an accelerator, MFU = model FLOPs per second / peak bf16 FLOPs, with
model FLOPs = 6 * (non-embedding parameters) * tokens + attention (12 * layers * hidden * seq_len per token),
the usual PaLM accounting.

step and decode compare what a user of this project runs with what users of LLaMA-Factory or ms-swift run on top
of transformers' Qwen2AudioForConditionalGeneration, on the same checkpoint (`--model tiny`: random weights of the
tiny preset written as a Hugging Face directory, which both sides load) and the same rows:
  step: ours is train.py's step (bucketed audio features, logits at the answer positions only, one jit over the 8
        micro-batches and the AdamW update) on the batch train.py's StepLoader builds for one optimizer step of
        the `direct` plan. Theirs: Qwen2AudioProcessor (features padded to 30 s = 3000 frames for every clip),
        the micro-batches right-padded to their longest row, logits over the whole sequence, transformers'
        ForCausalLMLoss with labels -100 outside the answer and num_items_in_batch (the Trainer's
        gradient-accumulation loss, which is the same mean over the step's answer tokens as ours), torch AdamW.
        Both start from the same weights, so the losses of the first step must agree (up to float rounding and
        the 30 s padding, which the parity tests bound at 1e-4 per logit): LOSS_TOLERANCE.
  decode: ours is infer.py's path (rows sorted by length, batches padded to shape buckets, model/generate.py's
        compiled beam search), timed twice: with its compilations, then again with every shape compiled.
        Theirs: processor + generate(num_beams=3) on 16 rows at a time in manifest order, left-padded. The new
        token ids of every row must be identical.
shapes: the train-step shapes a run compiles and its padded share, for train.py's buckets and the earlier ones
(64-token, 1 s), on lengths drawn like SLURP's (the real devel + test annotations of ../shared/data/slurp: prompt +
answer tokens as train.py builds them, each recording's duration from its transcript at 0.6 s + 0.38 s per
word), for each scheme at a few fractions and global batches. Needs no model and no audio.
pipeline: train.py's host work per speech row (decode, features, tokens: make_example) on one core (BLAS pinned to
one thread), with the log-mel on the host (--audio-features host) and without it (device: the step computes it);
the jitted log_mel_jnp's rows/s on this machine's device; and the speech rows/s the 7b step would consume on 8
H100s at --mfu (an estimate from model FLOPs: PIPELINE_7B), so the cores a host needs to keep up.
Both step and decode run float32 on the CPU (the reference's dtype). The JSON says where the time goes: host loading (audio
decoding, features, tokens) vs the device step, and for our step a breakdown into encoder, language model and
optimizer. A disagreement (other rows, answer tokens, loss or decoded ids) exits with status 1 after the JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import tyro

REPO = Path(__file__).resolve().parent
# Peak dense bf16 FLOP/s of accelerators we know (for MFU); unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5p": 459e12,
                   "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}
# |our loss - theirs| allowed on the same batch and weights: the parity tests bound each logit at 1e-4 (30 s vs
# bucketed audio, float32 rounding), and a token's cross-entropy moves by at most twice its logits' change.
LOSS_TOLERANCE = 2e-4
# Weights of `--model tiny`: 10x the 0.02 init, so next-token distributions over the 156k vocabulary are peaked
# and float rounding between the two implementations cannot flip a beam's choice between near-equal tokens.
RANDOM_WEIGHT_STD = 0.2


class InputError(ValueError):
    """Bad flags or data: `bench.py: error: MESSAGE`, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# lm: the text-only LM train step on fixed shapes
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LMArgs:
    """A text-only LM train step on fixed shapes, ours vs transformers (each in its own process)."""
    preset: str = "tiny"
    """Model shapes: a preset of model/config.py."""
    layers: int | None = None
    """Override the decoder's (and encoder's) layer count, e.g. a 7b-shaped model with 4 layers on one GPU."""
    batch: int = 4
    seq_len: int = 128
    steps: int = 5
    """Timed steps, after one untimed warm-up (compilation) step."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of our step (torch runs float32 on CPU)."""
    remat: Literal["none", "full", "dots"] = "none"
    impls: tuple[str, ...] = ("ours", "torch")
    worker: str | None = None
    """Internal: run one implementation and print its JSON."""


def config_for(args: LMArgs):
    from model.config import get_config
    config = get_config(args.preset)
    if args.layers is not None:
        config = dataclasses.replace(
            config, audio=dataclasses.replace(config.audio, encoder_layers=args.layers),
            text=dataclasses.replace(config.text, num_hidden_layers=args.layers))
    return config


def encoder_flops_per_frame(config) -> float:
    """Training FLOPs of the audio tower per mel frame: 6 x its attention and MLP parameters per position, one
    position per 2 frames (50 per second)."""
    a = config.audio
    return 6 * a.encoder_layers * (4 * a.d_model ** 2 + 2 * a.d_model * a.encoder_ffn_dim) / 2


def model_flops_per_token(config, seq_len: int) -> float:
    t = config.text
    kv = t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (t.hidden_size + 2 * kv) + t.hidden_size * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    dense = t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size  # + lm_head
    return 6 * dense + 12 * t.num_hidden_layers * t.hidden_size * seq_len


def batch_arrays(args: LMArgs, vocab: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(vocab, 150000), (args.batch, args.seq_len)).astype(np.int32)
    return ids


def run_ours(args: LMArgs) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import train
    from model.qwen2_audio import init_params

    config = config_for(args)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    params = init_params(config, jax.random.PRNGKey(0), jnp.float32)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))  # as the torch step below
    opt_state = tx.init(params)
    step = jax.jit(train.make_train_step(config, tx, dtype, args.remat), donate_argnums=(0, 2))
    ids = batch_arrays(args, config.text.vocab_size)
    batch = {"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None],
             "targets": np.roll(ids, -1, axis=1)[None], "loss_mask": np.ones(ids.shape, np.float32)[None],
             "answer_index": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), ids.shape)[None]}
    batch = jax.tree.map(jnp.asarray, batch)
    t0 = time.perf_counter()
    params, opt_state, m = step(params, {}, opt_state, batch)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, m = step(params, {}, opt_state, batch)
    jax.block_until_ready(m["loss"])
    dt = (time.perf_counter() - t0) / args.steps
    dev = jax.devices()[0]
    out = {"impl": "ours (jax)", "device": dev.device_kind, "n_devices": jax.device_count(),
           "first_step_s_incl_compile": round(compile_s, 3), "seconds_per_step": round(dt, 4),
           "tokens_per_s": round(args.batch * args.seq_len / dt, 1), "loss": float(m["loss"])}
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in dev.device_kind.lower()), None)
    if peak and dev.platform != "cpu":
        flops = model_flops_per_token(config, args.seq_len) * args.batch * args.seq_len / dt
        out["mfu"] = round(flops / (peak * jax.device_count()), 4)
    return out


def run_torch(args: LMArgs) -> dict:
    import torch
    import transformers

    config = config_for(args)
    torch.manual_seed(0)
    hf = transformers.Qwen2AudioConfig.from_dict(config.to_hf_dict())
    model = transformers.Qwen2AudioForConditionalGeneration(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.as_tensor(batch_arrays(args, config.text.vocab_size), dtype=torch.long)
    targets = torch.roll(ids, -1, dims=1)

    def step():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    dt = (time.perf_counter() - t0) / args.steps
    return {"impl": "transformers (torch)", "device": "cpu", "torch_threads": torch.get_num_threads(),
            "first_step_s": round(first, 3), "seconds_per_step": round(dt, 4),
            "tokens_per_s": round(args.batch * args.seq_len / dt, 1), "loss": loss}


def lm_bench(args: LMArgs) -> dict:
    if args.worker:
        result = {"ours": run_ours, "torch": run_torch}[args.worker](args)
        result["peak_host_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return result
    report = {"benchmark": "lm", "preset": args.preset, "layers": args.layers, "batch": args.batch,
              "seq_len": args.seq_len, "tokens_per_step": args.batch * args.seq_len, "dtype": args.dtype,
              "remat": args.remat, "results": []}
    for impl in args.impls:
        cmd = [sys.executable, str(REPO / "bench.py"), "lm", "--worker", impl, "--preset", args.preset,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--dtype", args.dtype, "--remat", args.remat]
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            report["results"].append({"impl": impl, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        report["results"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ok = {r["impl"].split()[0]: r for r in report["results"] if "tokens_per_s" in r}
    if "ours" in ok and "transformers" in ok:
        report["speedup_vs_torch"] = round(ok["ours"]["tokens_per_s"] / ok["transformers"]["tokens_per_s"], 3)
    return report


# ----------------------------------------------------------------------------------------------------------------
# The shared checkpoint: both sides of `step` and `decode` load the same Hugging Face directory
# ----------------------------------------------------------------------------------------------------------------

def random_checkpoint(out_dir: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A Hugging Face directory with random weights (std RANDOM_WEIGHT_STD) of a preset and the Qwen2 tokenizer,
    written by save_hf as train.py exports a run: transformers' from_pretrained / AutoProcessor and our load_hf
    both read it."""
    from model import processor as P
    from model.checkpoint import checkpoint_layout, save_hf
    from model.config import get_config
    hf_config = get_config(preset).to_hf_dict()
    rng = np.random.default_rng(seed)
    params: dict = {}
    for leaf in checkpoint_layout(hf_config):
        node = params
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        noise = RANDOM_WEIGHT_STD * rng.standard_normal(leaf.flax_shape)
        # norm scales around 1, as initialised: around 0 they would flatten the logits again
        node[leaf.path[-1]] = (noise + (leaf.path[-1] == "scale")).astype(np.float32)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        P.load_tokenizer().save(str(Path(tokenizer_dir) / "tokenizer.json"))
        return save_hf(params, hf_config, out_dir, extra_files_from=tokenizer_dir)


def resolve_model(model: str, scratch: Path) -> str:
    """--model: a Hugging Face Qwen2-Audio directory (a train.py run's hf/ works), or `tiny`."""
    if model == "tiny":
        return str(random_checkpoint(scratch / "tiny"))
    if not (Path(model) / "config.json").is_file():
        raise InputError(f"--model {model}: no config.json there (expected a Hugging Face Qwen2-Audio directory, "
                         f"e.g. RUN_DIR/hf, or 'tiny')")
    return model


def load_torch_model(model_dir: str, train: bool):
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return model.train(train), AutoProcessor.from_pretrained(model_dir)


def torch_prompt_ids(proc, row: dict, wave) -> tuple[list[int], dict]:
    """The reference processor on one row: (prompt ids with the audio tokens expanded, its audio inputs: 30 s
    features and their mask, or {} for a transcript row). The prompt text is the chat template's (build_prompt
    renders it exactly, tests/test_export.py)."""
    from model import processor as P
    if row["audio"] is None:
        out = proc(text=P.build_prompt(row["text"], audio=False), return_tensors="np")
        return out["input_ids"][0].tolist(), {}
    out = proc(text=P.build_prompt(None, audio=True), audio=[wave], sampling_rate=P.SAMPLE_RATE, return_tensors="np")
    return out["input_ids"][0].tolist(), {"input_features": out["input_features"][0],
                                          "feature_attention_mask": out["feature_attention_mask"][0]}


def reference_wave(row: dict):
    """A recording as the reference reads it (transformers' load_audio), None for a transcript row."""
    from transformers.audio_utils import load_audio
    return None if row["audio"] is None else load_audio(row["audio"], sampling_rate=16000)


# ----------------------------------------------------------------------------------------------------------------
# step: one SLU optimizer step on a real batch
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StepArgs:
    """One SLU optimizer step on a real batch (direct mixing), ours (train.py) vs transformers as peers run it."""
    model: str = "tiny"
    """A Hugging Face Qwen2-Audio directory, or 'tiny' (random weights of the tiny preset)."""
    manifest: str = "data/demo/train.jsonl"
    speech_fraction: float = 0.1
    """The direct plan's speech fraction (train.py's default)."""
    global_batch: int = 16
    per_device_batch: int = 2
    """Rows per micro-batch (one device); global_batch / per_device_batch micro-batches per step, on both sides."""
    group_recordings: Literal["auto", "yes", "no"] = "auto"
    """train.py's --group-recordings (auto: yes on GPU/TPU, no on a CPU)."""
    plan_step: int | None = None
    """Which optimizer step of the plan to load (0-based). None: the first one that holds a recording."""
    steps: int = 3
    """Timed steps on that batch, after one untimed warm-up step (our compilation)."""
    profile: bool = True
    """Break our step down into audio encoder, language model and optimizer (two more compilations)."""


def ours_step_setup(args: StepArgs, model_dir: str):
    """train.py's pieces for a direct run on one device: (train args, plan, loader, mesh, config, params, phase,
    dtype, plan step)."""
    import jax
    import jax.numpy as jnp
    import train
    from model.config import get_config
    from model.sharding import resolve_dtype
    targs = train.Args(scheme="direct", train_manifest=(args.manifest,), speech_fraction=args.speech_fraction,
                       model=model_dir, global_batch=args.global_batch, per_device_batch=args.per_device_batch,
                       data_parallel=1, fsdp=1, dev_manifest=None, progress=False, export=False,
                       group_recordings=args.group_recordings)
    sources, manifests = train.load_sources(targs)
    batch = train.resolve_batch(targs, 1, 1)
    plan = train.build_plan(targs, sources, manifests, batch[0])
    train.check_audio(plan, sources, manifests)
    rows = [{r["id"]: r for r in m} for m in manifests]
    if args.plan_step is None:
        step = next((s for s in range(plan.epochs[0]["steps"])
                     if any(rows[m][i]["audio"] is not None for m, i in plan.step_keys(s))), None)
        if step is None:
            raise InputError(f"{args.manifest}: no step of the direct plan holds a recording (--speech-fraction "
                             f"{args.speech_fraction}); raise --speech-fraction or give --plan-step")
    elif not 0 <= args.plan_step < plan.total_steps:
        raise InputError(f"--plan-step {args.plan_step}: the plan has steps 0..{plan.total_steps - 1}")
    else:
        step = args.plan_step
    config = get_config(model_dir)
    m = train.make_run_mesh(targs, batch, config)
    _, params, tok, _ = train.load_model(targs, config, m.param_sh, jnp.float32)
    loader = train.StepLoader(plan, rows, tok, m.grad_accum, m.micro_batch,
                              train.local_batch_rows(m.batch_sh, (m.grad_accum, m.micro_batch)),
                              group_recordings=train.group_recordings(targs, jax.default_backend()))
    phase = train.training_phases(targs, plan)[0]
    return targs, plan, loader, m, config, params, phase, jnp.dtype(resolve_dtype(targs.dtype)), step


def run_ours_step(args: StepArgs, model_dir: str) -> dict:
    """train.py's step, as train_phase builds and runs it, on one plan step; the loss is the warm-up step's
    (before any update), the time the mean of the timed steps."""
    import flax.linen as nn
    import jax
    import train
    from model import compilation
    from model.sharding import LOGICAL_AXIS_RULES
    targs, plan, loader, m, config, params, phase, dtype, step = ours_step_setup(args, model_dir)
    tx, train_sh, frozen_sh, opt_sh = train.phase_optimizer(targs, phase, m)
    trainable, frozen = train.split_params(params, phase.frozen)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    step_fn = jax.jit(train.make_train_step(config, tx, dtype, targs.remat,
                                            skip_audio_tower=loader.group_recordings),
                      in_shardings=(train_sh, frozen_sh, opt_sh, m.batch_sh),
                      out_shardings=(train_sh, opt_sh, m.replicated), donate_argnums=(0, 2))
    load_s, step_s = [], []
    with jax.set_mesh(m.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        for k in range(args.steps + 1):
            t0 = time.perf_counter()
            host = loader(step)
            t1 = time.perf_counter()
            batch = train.to_global(host, m.batch_sh, m.micro_batch)
            with compilation.gc_paused():  # as train.py calls its step
                trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state, batch)
            metrics = jax.device_get(metrics)
            t2 = time.perf_counter()
            if k == 0:
                compile_s, first = t2 - t1, metrics
            else:
                load_s.append(t1 - t0)
                step_s.append(t2 - t1)
        breakdown = profile_ours(tx, step_fn, (trainable, frozen, opt_state), batch, args.steps) \
            if args.profile else None
    keys = loader.step_order(step)  # the rows in micro-batch order: transformers gets the same micro-batches
    out = {"impl": "ours (jax, train.py's step)", "device": jax.devices()[0].device_kind,
           "first_step_s_incl_compile": round(compile_s, 3),
           "host_load_s": round(float(np.mean(load_s)), 4), "device_step_s": round(float(np.mean(step_s)), 4),
           "loss": float(first["loss"]), "answer_tokens": int(first["answer_tokens"]),
           "batch_shape": {k: list(v.shape) for k, v in host.items() if k in ("input_ids", "input_features")},
           "row_ids": ours_row_ids(host)}
    if breakdown:
        out["breakdown"] = breakdown
    n_text, n_speech = loader.counts(step)
    return {**out, "plan_step": step, "n_speech": n_speech, "n_text": n_text, "grad_accum": m.grad_accum,
            "micro_batch": m.micro_batch, "row_dicts": [loader.rows[mi][i] for mi, i in keys]}


def ours_row_ids(host: dict) -> list[list[int]]:
    """Each real row's token ids (prompt with its audio tokens, answer, <|im_end|>) in step order."""
    ids, mask = host["input_ids"], host["attention_mask"]
    real = host["loss_mask"].sum(-1) > 0  # a padding row carries no loss
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    return [row[:n].tolist() for row, n, r in zip(flat(ids), flat(mask).sum(-1), flat(real)) if r]


def profile_ours(tx, step_fn, state: tuple, batch: dict, rounds: int) -> dict:
    """Where our device step's time goes, from programs doing the same work as the step: the step without the
    audio features (the difference is the audio tower and projector: a step with recordings gives every
    micro-batch features, zeros for transcript rows, so the encoder runs on each) and the AdamW update alone
    (clipping included). The language model is the rest: the micro-batches' forward + backward over the text
    positions, the answer-only logits, and the gradient accumulation. Each round times the three back to back,
    so a change in the shared machine's load hits all alike."""
    import jax
    import jax.numpy as jnp
    import optax
    trainable, frozen, opt_state = state
    text = {k: v for k, v in batch.items() if k not in ("input_features", "feature_lengths")}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), trainable)  # any values: the update's work is the same
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))

    def timed(fn, *xs) -> tuple[float, object]:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*xs))
        return time.perf_counter() - t0, out

    trainable, opt_state, _ = step_fn(trainable, frozen, opt_state, text)  # compile both
    jax.block_until_ready(update(grads, opt_state, trainable))
    totals = np.zeros(3)
    for _ in range(rounds):
        with_audio, (trainable, opt_state, _) = timed(step_fn, trainable, frozen, opt_state, batch)
        without, (trainable, opt_state, _) = timed(step_fn, trainable, frozen, opt_state, text)
        totals += [with_audio, without, timed(update, grads, opt_state, trainable)[0]]
    step, without, optimizer = totals / rounds
    parts = {"audio_encoder": step - without if "input_features" in batch else 0.0,
             "language_model": without - optimizer, "optimizer_update": optimizer}
    return {"rounds": rounds, "step_s": round(step, 4), **{f"{k}_s": round(v, 4) for k, v in parts.items()},
            "shares": {k: round(v / step, 3) for k, v in parts.items()}}


def run_torch_step(args: StepArgs, model_dir: str, row_dicts: list[dict], micro_batch: int) -> dict:
    """The same rows, micro-batches and answer tokens through transformers as a LLaMA-Factory / ms-swift user
    runs it (see the module docstring); loss of the first step, time the mean of the timed steps."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss
    import train
    from model import processor as P
    from model.answer import render_answer
    model, proc = load_torch_model(model_dir, train=True)
    vocab = model.config.text_config.vocab_size
    im_end = proc.tokenizer.convert_tokens_to_ids(P.IM_END)  # closes the answer, trained like ours
    # AdamW as train.py's (weight decay 0, the same betas and eps; lr does not change the work); the audio
    # tower's position table is frozen in transformers already.
    defaults = train.Args()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-6,
                            betas=(defaults.adam_b1, defaults.adam_b2), eps=defaults.adam_eps, weight_decay=0.0)

    def load() -> list[dict]:
        """The collator's work: audio, processor, answer tokens, labels, right padding per micro-batch."""
        rows = []
        for row in row_dicts:
            prompt, audio = torch_prompt_ids(proc, row, reference_wave(row))
            answer = proc.tokenizer(render_answer(row["scenario"], row["action"], row["entities"]),
                                    add_special_tokens=False)["input_ids"] + [im_end]
            rows.append({"ids": prompt + answer, "labels": [-100] * len(prompt) + answer, **audio})
        micro = []
        for a in range(0, len(rows), micro_batch):
            group = rows[a:a + micro_batch]
            width = max(len(r["ids"]) for r in group)
            pad = lambda x, v: x + [v] * (width - len(x))
            mb = {"input_ids": torch.tensor([pad(r["ids"], proc.tokenizer.pad_token_id) for r in group]),
                  "attention_mask": torch.tensor([pad([1] * len(r["ids"]), 0) for r in group]),
                  "labels": torch.tensor([pad(r["labels"], -100) for r in group])}
            clips = [r for r in group if "input_features" in r]
            if clips:
                mb["input_features"] = torch.tensor(np.stack([r["input_features"] for r in clips]))
                mb["feature_attention_mask"] = torch.tensor(np.stack([r["feature_attention_mask"] for r in clips]))
            micro.append(mb)
        return micro

    def step(micro: list[dict]) -> tuple[float, int]:
        n_items = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        total = 0.0
        for mb in micro:
            logits = model(**{k: v for k, v in mb.items() if k != "labels"}).logits
            loss = ForCausalLMLoss(logits, mb["labels"], vocab, num_items_in_batch=n_items)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, n_items

    load_s, step_s = [], []
    for k in range(args.steps + 1):
        t0 = time.perf_counter()
        micro = load()
        t1 = time.perf_counter()
        loss, n_items = step(micro)
        t2 = time.perf_counter()
        if k == 0:
            first_loss, first_s = loss, t2 - t1
        else:
            load_s.append(t1 - t0)
            step_s.append(t2 - t1)
    row_ids = [r[m > 0].tolist() for mb in micro for r, m in zip(mb["input_ids"], mb["attention_mask"])]
    return {"impl": "transformers (torch)", "device": "cpu", "torch_threads": torch.get_num_threads(),
            "first_step_s": round(first_s, 3), "host_load_s": round(float(np.mean(load_s)), 4),
            "device_step_s": round(float(np.mean(step_s)), 4), "loss": first_loss, "answer_tokens": n_items,
            "micro_batch_seq_lens": [int(mb["input_ids"].shape[1]) for mb in micro],
            "audio_frames_per_clip": 3000 if any("input_features" in mb for mb in micro) else None,
            "row_ids": row_ids}


def step_bench(args: StepArgs) -> dict:
    if args.global_batch < 1 or args.per_device_batch < 1 or args.steps < 1:
        raise InputError(f"--global-batch, --per-device-batch and --steps must be >= 1, got {args.global_batch}, "
                         f"{args.per_device_batch}, {args.steps}")
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = resolve_model(args.model, Path(scratch))
        ours = run_ours_step(args, model_dir)
        row_dicts = ours.pop("row_dicts")
        info = {k: ours.pop(k) for k in ("plan_step", "n_speech", "n_text", "grad_accum", "micro_batch")}
        theirs = run_torch_step(args, model_dir, row_dicts, info["micro_batch"])
    report = {"benchmark": "step", "model": args.model, "manifest": args.manifest, "scheme": "direct",
              "speech_fraction": args.speech_fraction, "global_batch": args.global_batch, **info,
              "rows": [r["id"] for r in row_dicts]}
    report.update(compare_steps(ours, theirs))
    report["ours"], report["torch"] = ours, theirs
    for side in (ours, theirs):  # compared above; too long to print
        del side["row_ids"]
    return report


def compare_steps(ours: dict, theirs: dict) -> dict:
    """The side-by-side check (the same rows in the same order: equal token ids row by row, prompt with its audio
    tokens and answer; the same answer-token count; losses within LOSS_TOLERANCE) and the ratios."""
    diff = abs(ours["loss"] - theirs["loss"])
    out = {"same_token_ids": ours["row_ids"] == theirs["row_ids"],
           "same_answer_tokens": ours["answer_tokens"] == theirs["answer_tokens"],
           "loss_abs_diff": diff, "losses_agree": diff <= LOSS_TOLERANCE}
    out["agree"] = all(out[k] for k in ("same_token_ids", "same_answer_tokens", "losses_agree"))
    out["speedup_device_step"] = round(theirs["device_step_s"] / ours["device_step_s"], 2)
    out["speedup_with_host_loading"] = round((theirs["device_step_s"] + theirs["host_load_s"])
                                             / (ours["device_step_s"] + ours["host_load_s"]), 2)
    return out


# ----------------------------------------------------------------------------------------------------------------
# decode: beam search over the test set's recordings
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DecodeArgs:
    """Beam-search decoding of a manifest's recordings, ours (infer.py's path) vs transformers' generate."""
    model: str = "tiny"
    """A Hugging Face Qwen2-Audio directory, or 'tiny' (random weights of the tiny preset)."""
    manifest: str = "data/demo/test.jsonl"
    limit: int | None = None
    """Decode only the first N speech rows (a quick run)."""
    num_beams: int = 3
    max_new_tokens: int = 32
    """A random model never says <|im_end|>, so every row runs to this many tokens."""
    batch: int = 16
    """Rows per batch, both sides."""


def speech_rows(args: DecodeArgs) -> list[dict]:
    from model.manifest import read_manifest
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.num_beams < 1 or args.max_new_tokens < 1 or args.batch < 1:
        raise InputError(f"--num-beams, --max-new-tokens and --batch must be >= 1, got {args.num_beams}, "
                         f"{args.max_new_tokens}, {args.batch}")
    rows = [r for r in read_manifest(str(find_path(args.manifest)), check_audio_exists=True) if r["audio"]]
    if not rows:
        raise InputError(f"{args.manifest}: no speech rows (rows with `audio`) to decode")
    return rows[:args.limit]


def find_path(path: str) -> Path:
    """A relative path missing from the working directory is looked up in the repository (the demo defaults)."""
    return Path(path) if os.path.exists(path) or not (REPO / path).exists() else REPO / path


def run_ours_decode(args: DecodeArgs, model_dir: str, rows: list[dict]) -> dict:
    """infer.py's decoding loop (its planning, batching and search on one device, the next batch built while the
    device decodes the last), run twice: with compilation, then with every shape already compiled."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import infer
    from model import compilation, generate, processor, sharding
    dtype = jnp.float32  # the reference's
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tok = infer.load_tokenizer(model_dir)
    special = processor.special_ids(tok)
    config, params = infer.load_model(model_dir, dtype, 0, mesh, special)
    items = infer.plan_rows(rows, tok, use_audio=True, source=args.manifest)
    processor.mel_filters()  # loaded with the model, as infer.py does (and as load_torch_model builds the processor)
    shapes, put = set(), lambda x: None if x is None else jax.device_put(x, sharding.batch_sharding(mesh))

    def dispatch(chunk):
        batch = infer.make_batch(chunk, tok, args.batch, special.pad)
        shapes.add(tuple(None if x is None else x.shape for x in batch.values()))
        inputs = [put(batch[k]) for k in ("input_ids", "attention_mask", "input_features", "feature_lengths")]
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES), compilation.gc_paused():
            return chunk, generate.beam_search(params, config, *inputs, num_beams=args.num_beams,
                                               max_new_tokens=args.max_new_tokens, eos_ids=special.eos,
                                               pad_id=special.pad, dtype=dtype)

    def decode_all() -> tuple[float, dict]:
        t0, new, pending = time.perf_counter(), {}, None
        for chunk in infer.batches(items, args.batch) + [None]:
            current = dispatch(chunk) if chunk else None
            if pending is not None:
                done, out = pending
                tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
                for b, item in enumerate(done):
                    new[item["row"]["id"]] = tokens[b, :lengths[b]].tolist()
            pending = current
        return time.perf_counter() - t0, new

    first_s, new = decode_all()
    again_s, again = decode_all()
    return {"impl": "ours (jax, infer.py's beam search)", "seconds_incl_compile": round(first_s, 2),
            "seconds_excl_compile": round(again_s, 2), "second_pass_identical": again == new,
            "batch_shapes_compiled": len(shapes),
            "generated_tokens": sum(map(len, new.values())), "new_tokens": new}


def run_torch_decode(args: DecodeArgs, model_dir: str, rows: list[dict]) -> dict:
    """generate(num_beams) on args.batch rows at a time in manifest order, left-padded, as the hub model is
    used: the processor's 30 s features, the checkpoint's generation config (eos <|im_end|> / <|endoftext|>)."""
    import torch
    from model import processor as P
    model, proc = load_torch_model(model_dir, train=False)
    proc.tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    t0, new = time.perf_counter(), {}
    for start in range(0, len(rows), args.batch):
        chunk = rows[start:start + args.batch]
        inputs = proc(text=[P.build_prompt(None, audio=True)] * len(chunk), audio=[reference_wave(r) for r in chunk],
                      sampling_rate=P.SAMPLE_RATE, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, num_beams=args.num_beams, length_penalty=1.0,
                                 early_stopping=False, max_new_tokens=args.max_new_tokens)
        for row, seq in zip(chunk, out[:, inputs["input_ids"].shape[1]:].tolist()):
            new[row["id"]] = cut_at_eos(seq, eos)
    seconds = time.perf_counter() - t0
    return {"impl": "transformers (torch generate)", "torch_threads": torch.get_num_threads(),
            "seconds": round(seconds, 2), "generated_tokens": sum(map(len, new.values())), "new_tokens": new}


def cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """New tokens up to and including the first end token (generate pads finished rows after it)."""
    for n, t in enumerate(tokens):
        if t in eos:
            return tokens[:n + 1]
    return tokens


def compare_decodes(ours: dict[str, list[int]], theirs: dict[str, list[int]]) -> dict:
    """Row ids whose new token ids differ (or that one side lacks)."""
    differ = sorted(i for i in set(ours) | set(theirs) if ours.get(i) != theirs.get(i))
    return {"identical": not differ, "rows_differing": len(differ), "differing_ids": differ[:10]}


def decode_bench(args: DecodeArgs) -> dict:
    rows = speech_rows(args)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = resolve_model(args.model, Path(scratch))
        ours = run_ours_decode(args, model_dir, rows)
        theirs = run_torch_decode(args, model_dir, rows)
    report = {"benchmark": "decode", "model": args.model, "manifest": args.manifest, "rows": len(rows),
              "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "batch": args.batch,
              **compare_decodes(ours.pop("new_tokens"), theirs.pop("new_tokens")),
              "speedup_incl_compile": round(theirs["seconds"] / ours["seconds_incl_compile"], 2),
              "speedup_excl_compile": round(theirs["seconds"] / ours["seconds_excl_compile"], 2),
              "ours": ours, "torch": theirs}
    report["agree"] = report["identical"] and ours["second_pass_identical"]
    return report


# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ShapesArgs:
    slurp_dir: str = str(Path(__file__).resolve().parent.parent / "shared" / "data" / "slurp")
    """The real SLURP annotations (devel.jsonl, test.jsonl)."""
    global_batch: tuple[int, ...] = (128, 16)
    """The paper's global batch, and the demo's."""
    micro_batch: tuple[int, ...] = (16, 2)
    """Rows per micro-batch with each global batch: 8 GPUs x 2 rows (the paper), one device x 2 rows."""
    epochs: int = 3


def slurp_like_lengths(slurp_dir: str) -> tuple[list[str], list[str], dict]:
    """(transcript ids, recording ids, {(0, id): (tokens, feature frames or None)}) of SLURP-like rows: every
    real devel/test utterance as a transcript row and one speech row per recording, with train.py's prompt and
    answer tokens; durations from the transcript at a typical speaking rate, at most 15 s as SLURP's clips."""
    import prepare
    import train
    from model import processor as P
    from model.answer import render_answer
    folder = Path(slurp_dir)
    if not (folder / "test.jsonl").is_file():
        raise InputError(f"--slurp-dir {folder}: no devel.jsonl / test.jsonl (the SLURP annotations)")
    tok = P.load_tokenizer()
    audio_prompt = len(P.encode_prompt(tok, P.build_prompt(None, audio=True), n_audio_tokens=1)) - 1
    texts, speech, lengths = [], [], {}
    for split in ("devel", "test"):
        for n, line in enumerate((folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            r = json.loads(line)
            answer = render_answer(r["scenario"], r["action"], prepare.slurp_entities(r, f"{split}:{n}"))
            n_answer = len(train.encode_text(tok, answer)) + 1  # + <|im_end|>
            key = f"{split}-{r['slurp_id']}"
            texts.append(key)
            lengths[(0, key)] = (len(P.encode_prompt(tok, P.build_prompt(r["sentence"], audio=False))) + n_answer,
                                 None)
            frames = P.num_frames(int(min(15.0, 0.6 + 0.38 * len(r["sentence"].split())) * P.SAMPLE_RATE))
            for k in range(len(r["recordings"])):
                speech.append(f"{key}-{k}")
                lengths[(0, f"{key}-{k}")] = (audio_prompt + P.num_audio_tokens(frames) + n_answer,
                                              P.bucket_frames(frames))
    return texts, speech, lengths


def shapes_bench(args: ShapesArgs) -> dict:
    """Step shapes and padding per (global batch, scheme, fraction), with train.py's buckets and the earlier ones."""
    import train
    from model.processor import round_up
    texts, speech, lengths = slurp_like_lengths(args.slurp_dir)
    bucketings = {"ours": train.step_shape, "earlier (64 tokens, 1 s)": lambda tokens, frames: (round_up(tokens, 64), frames)}
    if len(args.micro_batch) != len(args.global_batch):
        raise InputError("--micro-batch: one per --global-batch")
    from model.config import PRESETS
    runs = []
    for global_batch, micro_batch in zip(args.global_batch, args.micro_batch):
        for scheme, p in (("text-only", 0.0), ("direct", 0.02), ("direct", 0.1), ("direct", 1.0),
                          ("curriculum", 0.1), ("curriculum", 1.0)):
            plan = train.make_plan(scheme, args.epochs, global_batch, [texts], [speech], [p])
            row = {"global_batch": global_batch, "scheme": scheme, "speech_fraction": p, "steps": plan.total_steps}
            for name, shape in bucketings.items():
                steps = train.plan_step_shapes(plan, lengths, global_batch, shape)
                row[name] = {"step_shapes": len({s["shape"] for s in steps}),
                             "padding": round(sum(s["padding"] for s in steps) / len(steps), 3)}
            if p > 0:
                row["audio_tower"] = audio_tower_work(plan, lengths, global_batch, micro_batch, PRESETS["7b"])
            runs.append(row)
    return {"rows": {"transcripts": len(texts), "recordings": len(speech)}, "runs": runs,
            "decode": decode_shapes(args.slurp_dir)}


def audio_tower_work(plan, lengths: dict, global_batch: int, micro_batch: int, config) -> dict:
    """The audio tower's work over a run, in rows x mel frames: as train.py runs it with the rows as drawn (every
    row of a micro-batch holding a recording) and with --group-recordings (train.recordings_first: transcript-only
    micro-batches skip it); the recordings' own share; and what grouping saves of `config`'s training FLOPs
    (model_flops_per_token over every padded token position, encoder_flops_per_frame)."""
    import train

    def tower_micro_batches(order: list, audio: set) -> int:
        return sum(any(k in audio for k in order[a:a + micro_batch]) for a in range(0, len(order), micro_batch))

    drawn = grouped = real = decoder = 0
    for step, shape in enumerate(train.plan_step_shapes(plan, lengths, global_batch)):
        seq, frames = shape["shape"]
        decoder += global_batch * seq * model_flops_per_token(config, seq)
        keys = plan.step_keys(step)
        is_recording = [lengths[k][1] is not None for k in keys]
        audio = {k for k, r in zip(keys, is_recording) if r}
        real += sum(lengths[k][1] for k in audio)
        drawn += tower_micro_batches(keys, audio) * micro_batch * (frames or 0)
        grouped += tower_micro_batches(train.recordings_first(keys, is_recording), audio) * micro_batch * (frames or 0)
    per_frame = encoder_flops_per_frame(config)
    saved = per_frame * (drawn - grouped) / (decoder + per_frame * drawn)
    return {"row_frames_as_drawn": drawn, "row_frames_grouped": grouped,
            "recordings_share_as_drawn": round(real / drawn, 3), "recordings_share_grouped": round(real / grouped, 3),
            "saved_7b_flops_share": round(saved, 3)}


def decode_shapes(slurp_dir: str, batch_sizes: tuple[int, ...] = (8, 16, 32)) -> list[dict]:
    """Batch shapes (one decode program each) and padded share of infer.py decoding the SLURP-like test split:
    its recordings, and its transcripts (--input text, the oracle), rows sorted and batched as infer.py does."""
    import infer
    from model import processor as P
    tok = P.load_tokenizer()
    audio_prompt = len(P.encode_prompt(tok, P.build_prompt(None, audio=True), n_audio_tokens=1)) - 1
    audio, text = [], []
    for line in (Path(slurp_dir) / "test.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        n_text = len(P.encode_prompt(tok, P.build_prompt(r["sentence"], audio=False)))
        text.append({"from_audio": False, "key": (1, 0.0, n_text), "tokens": n_text, "text_tokens": n_text,
                     "frames": None})
        seconds = min(15.0, 0.6 + 0.38 * len(r["sentence"].split()))
        frames = P.num_frames(int(seconds * P.SAMPLE_RATE))
        audio += [{"from_audio": True, "key": (0, seconds, audio_prompt + 1), "frames": frames,
                   "text_tokens": audio_prompt, "tokens": audio_prompt + int(P.num_audio_tokens(frames))}
                  for _ in r["recordings"]]
    out = []
    for batch_size in batch_sizes:
        for name, items in (("recordings", audio), ("transcripts", text)):
            shapes, real, padded = set(), 0, 0
            for chunk in infer.batches(sorted(items, key=lambda item: item["key"]), batch_size):
                frames = infer.frame_bucket(max(item["frames"] for item in chunk)) if chunk[0]["from_audio"] else None
                seq = infer.prompt_columns(max(item["text_tokens"] for item in chunk), frames)
                shapes.add((seq, frames))
                real, padded = real + sum(item["tokens"] for item in chunk), padded + batch_size * seq
            out.append({"batch_size": batch_size, "input": name, "rows": len(items), "batch_shapes": len(shapes),
                        "padding": round(1 - real / padded, 3)})
    return out


# ----------------------------------------------------------------------------------------------------------------
# pipeline: host work per recording (per core) vs what a step consumes
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PipelineArgs:
    """Host work per speech row (one core), host vs device features, and the rows/s a 7b step on 8 H100s needs."""
    manifest: str = "data/demo/train.jsonl"
    rows: int = 64
    """Speech rows of the manifest timed (the first ones)."""
    batch: int = 16
    """Rows per call of the jitted device log-mel (log_mel_jnp), at the 4 s audio bucket."""
    mfu: float = 0.5
    """The 7b step's assumed model-FLOPs utilisation (MaxText's Llama2-7B on H100: ~50%)."""
    worker: bool = False
    """Internal: the single-threaded host measurement, in a subprocess."""


# The 7b step whose appetite the host must meet: the paper's 128 rows per optimizer step on 8 H100s, rows of a
# few seconds of audio (a 4 s bucket: 100 audio tokens) and ~250 decoder tokens.
PIPELINE_7B = {"rows": 128, "gpus": 8, "gpu": "H100", "decoder_tokens_per_row": 250, "audio_frames_per_row": 400}


def host_per_row(args: PipelineArgs) -> dict:
    """ms per speech row of train.py's make_example (decode + features + tokens) with host and device features."""
    import train
    from model import processor as P
    from model.manifest import read_manifest
    rows = [r for r in read_manifest(train.find_path(args.manifest)) if r["audio"] is not None][:args.rows]
    if not rows:
        raise InputError(f"{args.manifest}: no speech rows")
    tok = P.load_tokenizer()
    train.make_example(rows[0], tok)  # warm caches (mel filters, tokenizer)
    # every file read once first (the page cache), then each kind timed 3 times over the rows: the fastest round
    out, seconds = {}, sum(P.load_audio(r["audio"]).size for r in rows) / P.SAMPLE_RATE
    for name, work in (("decode", lambda r: P.load_audio(r["audio"])),
                       ("host_features", lambda r: train.make_example(r, tok)),
                       ("device_features", lambda r: train.make_example(r, tok, device_features=True))):
        rounds = []
        for _ in range(3):
            t0 = time.perf_counter()
            for r in rows:
                work(r)
            rounds.append(time.perf_counter() - t0)
        out[name] = round(min(rounds) / len(rows) * 1e3, 3)
    return {"rows": len(rows), "mean_clip_s": round(seconds / len(rows), 2), "ms_per_row": out}


def device_log_mel_rate(args: PipelineArgs) -> dict:
    """rows/s of the jitted log_mel_jnp on this machine's default device, at the 4 s bucket."""
    import jax
    from model import processor as P
    frames = P.AUDIO_BUCKETS[0]
    waves = np.random.default_rng(0).normal(0, 0.1, (args.batch, frames * P.HOP_LENGTH)).astype(np.float32)
    fn = jax.jit(P.log_mel_jnp, static_argnums=2)
    lengths = np.full(args.batch, frames * P.HOP_LENGTH - 100, np.int32)
    jax.block_until_ready(fn(waves, lengths, frames))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(waves, lengths, frames))
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    return {"backend": jax.default_backend(), "batch": args.batch, "frames": frames, "ms_per_batch": round(ms, 2),
            "rows_per_s": round(args.batch / ms * 1e3, 1)}


def step_appetite_7b(mfu: float) -> dict:
    """Speech rows/s the 7b step consumes at `mfu` on PIPELINE_7B's hardware: an estimate from model FLOPs."""
    from model.config import PRESETS
    config, w = PRESETS["7b"], PIPELINE_7B
    flops_row = (w["decoder_tokens_per_row"] * model_flops_per_token(config, w["decoder_tokens_per_row"])
                 + encoder_flops_per_frame(config) * w["audio_frames_per_row"])
    step_s = w["rows"] * flops_row / (w["gpus"] * PEAK_BF16_FLOPS[w["gpu"]] * mfu)
    return {**w, "mfu": mfu, "model_flops_per_row": float(flops_row), "step_s": round(step_s, 3),
            "rows_per_s": round(w["rows"] / step_s, 1)}


def pipeline_bench(args: PipelineArgs) -> dict:
    if args.worker:
        return host_per_row(args)
    # One core: BLAS and OpenMP pools (the float64 mel product) pinned to one thread, in a fresh process; and the
    # same with the pools as the process finds them (OpenBLAS: one thread per core), for comparison.
    cmd = [sys.executable, str(REPO / "bench.py"), "pipeline", "--worker", "--manifest", args.manifest,
           "--rows", str(args.rows)]
    pinned = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    hosts = {}
    for name, env in (("pinned", {**os.environ, **pinned}),
                      ("blas_default", {k: v for k, v in os.environ.items() if k not in pinned})):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            raise RuntimeError(f"the host measurement failed:\n{done.stderr[-2000:]}")
        hosts[name] = json.loads(done.stdout.strip().splitlines()[-1])
    host = hosts["pinned"]
    per_core = {k: round(1e3 / v, 1) for k, v in host["ms_per_row"].items() if k != "decode"}
    appetite = step_appetite_7b(args.mfu)
    return {"host": host, "host_rows_per_s_per_core": per_core,
            "host_blas_threads_unpinned_ms_per_row": hosts["blas_default"]["ms_per_row"],
            "device_log_mel": device_log_mel_rate(args), "step_7b": appetite,
            "cores_needed_7b": {k: round(appetite["rows_per_s"] / v, 2) for k, v in per_core.items()}}


Command = Union[Annotated[LMArgs, tyro.conf.subcommand("lm")], Annotated[StepArgs, tyro.conf.subcommand("step")],
                Annotated[DecodeArgs, tyro.conf.subcommand("decode")],
                Annotated[ShapesArgs, tyro.conf.subcommand("shapes")],
                Annotated[PipelineArgs, tyro.conf.subcommand("pipeline")]]


def main(args) -> dict:
    run = {LMArgs: lm_bench, StepArgs: step_bench, DecodeArgs: decode_bench, ShapesArgs: shapes_bench,
           PipelineArgs: pipeline_bench}[type(args)]
    report = run(args)
    print(json.dumps(report, indent=None if getattr(args, "worker", None) else 2))
    return report


if __name__ == "__main__":
    from model.config import ConfigError
    from model.manifest import ManifestError
    from train import InputError as TrainInputError
    from infer import InputError as InferInputError
    try:
        report = main(tyro.cli(Command, default=LMArgs()))
    except (InputError, TrainInputError, InferInputError, ManifestError, ConfigError, FileNotFoundError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if report.get("agree") is False:
        print("bench.py: the two implementations did not compute the same thing (see the JSON above)",
              file=sys.stderr)
        sys.exit(1)
