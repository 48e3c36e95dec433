"""Train-step benchmark: prints one JSON object.

    python bench.py                       # tiny preset on this machine: ours (JAX) vs transformers (PyTorch)
    python bench.py --impls ours --preset 7b --layers 4 --batch 2 --seq-len 512   # 7b-shaped, on a GPU

Each implementation runs in its own subprocess so that its peak host memory (ru_maxrss) is its own. Both run
the same step on the same shapes: forward over a text batch, token cross-entropy on every position, backward,
AdamW update (fp32 master weights). "tokens" are batch * seq_len per step. On an accelerator, MFU = model FLOPs
per second / peak bf16 FLOPs, with model FLOPs = 6 * (non-embedding parameters) * tokens + attention
(12 * layers * hidden * seq_len per token), the usual PaLM accounting. The torch reference needs
requirements-test.txt.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Literal

import tyro

# Peak dense bf16 FLOP/s of accelerators we know (for MFU); unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5p": 459e12,
                   "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}


@dataclasses.dataclass
class Args:
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


def config_for(args: Args):
    from model.config import get_config
    config = get_config(args.preset)
    if args.layers is not None:
        config = dataclasses.replace(
            config, audio=dataclasses.replace(config.audio, encoder_layers=args.layers),
            text=dataclasses.replace(config.text, num_hidden_layers=args.layers))
    return config


def model_flops_per_token(config, seq_len: int) -> float:
    t = config.text
    kv = t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (t.hidden_size + 2 * kv) + t.hidden_size * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    dense = t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size  # + lm_head
    return 6 * dense + 12 * t.num_hidden_layers * t.hidden_size * seq_len


def batch_arrays(args: Args, vocab: int):
    import numpy as np
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(vocab, 150000), (args.batch, args.seq_len)).astype(np.int32)
    return ids


def run_ours(args: Args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
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


def run_torch(args: Args) -> dict:
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


def main(args: Args) -> dict:
    if args.worker:
        result = {"ours": run_ours, "torch": run_torch}[args.worker](args)
        result["peak_host_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return result
    report = {"preset": args.preset, "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
              "tokens_per_step": args.batch * args.seq_len, "dtype": args.dtype, "remat": args.remat, "results": []}
    here = os.path.dirname(os.path.abspath(__file__))
    for impl in args.impls:
        cmd = [sys.executable, os.path.join(here, "bench.py"), "--worker", impl, "--preset", args.preset,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--dtype", args.dtype, "--remat", args.remat]
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=here)
        if proc.returncode != 0:
            report["results"].append({"impl": impl, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        report["results"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ok = {r["impl"].split()[0]: r for r in report["results"] if "tokens_per_s" in r}
    if "ours" in ok and "transformers" in ok:
        report["speedup_vs_torch"] = round(ok["ours"]["tokens_per_s"] / ok["transformers"]["tokens_per_s"], 3)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
