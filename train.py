"""Fine-tune Qwen2-Audio for SLU: text-only, direct mixing or curriculum (arXiv 2509.15389).

    python train.py --scheme curriculum                        # the pretrained miniature on the demo, 2-3 min on a CPU
    python train.py --scheme direct --speech-fraction 0.02 --model /ckpt/Qwen2-Audio-7B-Instruct \
        --train-manifest data/slurp/train.jsonl --fsdp 8 --run-dir runs/direct-p002
    python train.py --scheme curriculum --plan-only            # print the epoch plan as JSON, load no model

The file reads top to bottom:
  1. Args: every flag, with its default.
  2. The plan: which rows each epoch sees (the paper's deterministic epoch-allocation sampler) and the
     learning-rate schedule. Pure Python + numpy, no model: `--plan-only` stops here.
  3. Batches: manifest rows -> prompt + answer tokens, labels on the answer only, audio -> log-mel features.
  4. The train step: bf16 forward, answer-token cross-entropy summed over micro-batches and divided once,
     global-norm clipping, AdamW on fp32 master parameters, one jax.jit with explicit shardings; the phases
     (which parameters are frozen, when a fresh AdamW starts).
  5. train(): check the plan and every recording, refuse a resume with other settings, mesh and model, the loop
     phase by phase (train_phase: metrics, evaluation, checkpoints), export to RUN_DIR/hf.

The sampler (section 2) in words. N speech rows, p = --speech-fraction, N_p = round(p*N) (half up), E epochs.
The speech subset is the first N_p rows of ONE permutation (seeded by --subset-seed) of the speech rows sorted by
id, so a larger p always contains a smaller p's subset and the file's row order does not matter.
  text-only:  every epoch = all transcript rows.
  direct:     every epoch = all transcript rows + the N_p subset, shuffled together.
  curriculum: epochs 1..E-1 = all transcript rows; epoch E = all transcripts + the N_p subset repeated E times,
              so both mixing schemes see N_p*E speech examples in total. Epochs 1..E-1 train exactly as text-only
              (audio path frozen); epoch E starts a fresh AdamW with its own schedule (see Phase).
Each epoch's rows are shuffled with a generator seeded by (--seed, epoch). Steps per epoch = ceil(rows / global
batch): the last step of an epoch takes the remaining rows (padded with rows that carry no loss), nothing is
dropped, and since the loss is a mean over the answer tokens actually present, a short batch is not down-weighted
per token.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

REPO = Path(__file__).resolve().parent
SCHEMES = ("text-only", "direct", "curriculum")
# The seeds' other methods as grid rows next to direct and curriculum (grid.py --schemes, report.py): the run
# SCHEME+VARIANT is train.py --scheme SCHEME plus these flags.
VARIANTS = {"distill": ("--distill-weight", "1"),
            "distill-frozen": ("--distill-weight", "1", "--distill-teacher", "frozen"),
            "gap": ("--subset-selection", "gap")}
VARIANT_SCHEMES = tuple(f"{scheme}+{variant}" for scheme in ("direct", "curriculum") for variant in VARIANTS)
# Frozen parameters (no gradient, no optimizer state, no weight decay), as paths into the parameter tree.
# The audio tower's sinusoidal position table: transformers keeps it out of training (requires_grad_(False)).
ALWAYS_FROZEN = (("audio_tower", "embed_positions"),)
# text-only, and curriculum's transcript epochs 1..E-1: the whole audio path.
AUDIO_FROZEN = (("audio_tower",), ("multi_modal_projector",))
PAPER_GLOBAL_BATCH = 128  # 8 GPUs x 2 rows x 8 accumulation steps
DEMO_GLOBAL_BATCH = 16    # a preset (the demo): 2 rows x 8 accumulation steps on one CPU
PAPER_EPOCHS = 3          # "sufficient for convergence" of the 7B model (section 4)
# Flags a resumed run may change: how it runs, not what it computes (each change is recorded in config.json).
RESUMABLE = ("max_steps", "save_every", "keep_checkpoints", "eval_max_rows", "eval_max_new_tokens", "dev_manifest",
             "export", "export_dtype", "keep_optimizer_state", "progress", "per_device_batch", "grad_accum",
             "data_parallel", "fsdp", "tensor_parallel", "group_recordings", "run_dir", "plan_only",
             "compilation_cache", "aot_topology", "aot_seq_len", "aot_audio_seconds",
             "dtype")  # as written ('auto'); result_settings compares what it resolves to (compute_dtype)


class InputError(ValueError):
    """Bad flags or data; main prints the message (no traceback) and exits with status 2."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Args
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Args:
    scheme: Literal["text-only", "direct", "curriculum"] = "curriculum"
    """text-only: transcripts only (audio encoder + projector frozen); direct: transcripts + speech subset every
    epoch; curriculum: transcripts, then transcripts + the subset repeated E times in the last epoch."""
    train_manifest: tuple[str, ...] = ("data/demo/train.jsonl",)
    """Training manifests, each PATH or PATH:FRACTION (the fraction of THAT manifest's speech rows to use; default
    --speech-fraction). Every transcript row of every manifest is used every epoch. Give several after one flag
    or repeat the flag."""
    dev_manifest: str | None = "data/demo/devel.jsonl"
    """Evaluated (loss on transcripts, greedy intent accuracy) at each epoch end; 'none' to skip."""
    speech_fraction: float = 0.1
    """p: fraction of each manifest's speech rows in the subset (0..1)."""
    epochs: int | None = None
    """E. None: the model directory's own default (pretraining.json; the miniature's is 5), else the paper's 3."""
    model: str = "mini"
    """A Hugging Face Qwen2-Audio directory (e.g. Qwen2-Audio-7B-Instruct) / our RUN_DIR/hf; 'mini', the pretrained
    miniature shipped in models/mini (the demo); or a preset with random weights: 'tiny' or '7b' (needs
    --random-init)."""
    random_init: bool = False
    """Allow a preset other than 'tiny' to start from random weights (a smoke test, never a result)."""
    run_dir: str | None = None
    """Checkpoints, metrics.jsonl, config.json, hf/ export. Default runs/<scheme>. Rerunning resumes."""
    global_batch: int | None = None
    """Rows per optimizer step, the same on any hardware: accumulation = global_batch / (per_device_batch x data x
    fsdp). None: the model directory's own default (pretraining.json; the miniature's is 4), else 128 (the paper)
    for a pretrained --model directory, 16 for a preset; or, when --grad-accum is given, per_device_batch x
    grad_accum x data x fsdp."""
    per_device_batch: int = 2
    """Rows per device per micro-batch (paper: 2)."""
    grad_accum: int | None = None
    """Micro-batches per optimizer step (paper: 8). None: derived from --global-batch and the mesh."""
    data_parallel: int = 1
    """Mesh axis 'data' (pure data parallelism: parameters replicated)."""
    fsdp: int = -1
    """Mesh axis 'fsdp' (batch AND parameters sharded); -1 = all remaining devices."""
    tensor_parallel: int = 1
    """Mesh axis 'tensor' (heads / mlp / vocab sharded)."""
    peak_lr: float | None = None
    """Peak learning rate of the main schedule. None: the model directory's own default (pretraining.json; the
    miniature's is 1e-3), else the paper's 5e-6 for a pretrained --model directory, 1e-2 for a randomly initialised
    preset (5e-6 would leave a random tiny model where it started)."""
    warmup_ratio: float = 0.04
    """Linear-warmup fraction of the main schedule (paper: 0.04)."""
    last_epoch_peak_lr: float | None = None
    """Curriculum only: peak of the fresh last-epoch schedule. None: peak_lr * 3/5 (paper: 3e-6 vs 5e-6)."""
    last_epoch_warmup_ratio: float = 0.02
    """Curriculum only: warmup fraction of the fresh last-epoch schedule (paper: 0.02)."""
    curriculum_optimizer: Literal["fresh", "carry"] = "fresh"
    """Curriculum only. fresh: the last epoch starts a new AdamW (zero moments, step count 0), as the paper's two
    successive training runs do, and epochs 1..E-1 train exactly as text-only. carry (ablation): one AdamW through
    both phases with every parameter but the position table trainable throughout."""
    curriculum_schedule: Literal["own", "cut"] = "own"
    """Curriculum only; the paper's "same scheduler configuration" for epochs 1..E-1. own: one warmup-cosine over
    those E-1 epochs. cut: the E-epoch text-only schedule, stopped after epoch E-1."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on kernels and embeddings (0: the Hugging Face Trainer default)."""
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float = 1.0
    """Global gradient-norm clipping."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype; master parameters and optimizer state are always float32. auto: bfloat16 (the paper) on
    GPU/TPU, float32 on CPU, where XLA emulates bf16 matmuls slowly."""
    audio_features: Literal["auto", "host", "device"] = "auto"
    """Where the log-mel features of the recordings are computed. host: on the CPU while loading (float64, the
    reference). device: inside the jitted step from 16 kHz waveforms (model/processor.py log_mel_jnp, equal to 1e-4),
    so the host only decodes audio. auto: device on GPU/TPU, host on a CPU (where both spend the same cores)."""
    group_recordings: Literal["auto", "yes", "no"] = "auto"
    """Within each optimizer step, put its recordings in the first micro-batches (in their drawn order, its
    transcripts after them), so that the audio tower runs on ceil(recordings / micro-batch) micro-batches and the
    transcript-only ones skip it. A step keeps its rows; only which rows share a micro-batch changes, i.e. the
    summation order of the gradients. auto: yes on GPU/TPU, no on a CPU (where the demo's figures were made with
    the rows as drawn, and the miniature's audio tower costs nothing measurable)."""
    remat: Literal["none", "full", "dots"] = "none"
    """Rematerialise each decoder/encoder layer in the backward pass ('full' saves the most memory)."""
    compilation_cache: str = "auto"
    """JAX's persistent compilation cache, so a grid's later runs with the same step shapes compile nothing: 'auto'
    ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/sluice/jax-compilation), a directory, or 'none'."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (saves a checkpoint there; rerun without it to continue)."""
    save_every: int = 200
    """Checkpoint every N optimizer steps (and always at each epoch end); 0 = epoch ends only."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    eval_max_rows: int = 200
    """Dev rows used for the epoch-end evaluation: the first N transcript rows and the first N recording rows (loss
    on the transcripts; intent accuracy and SLU-F1 of greedy answers on both); 0 = no evaluation."""
    eval_max_new_tokens: int | None = None
    """Token limit of the epoch-end greedy decoding. None: infer.py's default (model/answer.py MAX_NEW_TOKENS)."""
    seed: int = 0
    """Everything except the speech subset: parameter init, epoch shuffles."""
    subset_seed: int = 0
    """The permutation the speech subset is a prefix of."""
    subset_selection: Literal["random", "gap"] = "random"
    """Which speech rows make the subset (README, "Distillation and gap selection"). random: a prefix of one seeded
    permutation (--subset-seed). gap: the top of a ranking by the text-speech gap of --gap-reference on synthetic
    speech of the transcripts (--gap-speech), spread over intents by their median gap; nested across fractions."""
    gap_speech: tuple[str, ...] = ()
    """--subset-selection gap: per --train-manifest (same order), a manifest of synthetic recordings of its speech
    rows' transcripts, by row id (`python prepare.py synth --manifest TRAIN --out DIR` writes DIR/synthetic.jsonl)."""
    gap_reference: str | None = None
    """--subset-selection gap: the model whose gap ranks the rows (default --model, the initial model; e.g. a
    text-only run's RUN_DIR/hf)."""
    distill_weight: float = 0.0
    """Cross-modal distillation (README, "Distillation and gap selection"): on every speech row, add weight x T^2 x
    KL(teacher given the row's transcript || model given its audio), summed over the answer tokens, to the answer
    cross-entropy. 0: off, today's loss exactly."""
    distill_teacher: Literal["self", "frozen"] = "self"
    """self: the model itself on the transcript, no gradient through it (MTBI's behaviour imitation). frozen: a copy
    of the model as it was when speech training started (direct: the initial model; curriculum: the end of the
    text-only phase), never updated (SALAD's text teacher)."""
    distill_temperature: float = 1.0
    """T: both distributions are softmax(logits / T)."""
    plan_only: bool = False
    """Print the epoch plan as one JSON object and exit (no model is loaded)."""
    aot_topology: str | None = None
    """Compile this run's train step for a TPU slice (v4-8, v5e-16, v5p-8, v6e-8, ...: model/aot.py's table) on this
    machine, with no weights and no audio (headers only), print memory per chip as JSON and exit: 0 fits, 3 not."""
    aot_seq_len: int | None = None
    """--aot-topology: the padded sequence length to compile for (default: the longest bucket of the manifests)."""
    aot_audio_seconds: float | None = None
    """--aot-topology: the longest clip to compile for (default: the manifests' longest recording the plan uses)."""
    export: bool = True
    """Write the final model to RUN_DIR/hf (Hugging Face format, with tokenizer files)."""
    export_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the exported weights. auto: the source checkpoint's (bfloat16 for Qwen2-Audio-7B-Instruct: half the
    disk of float32), float32 for a preset."""
    keep_optimizer_state: bool = False
    """Keep RUN_DIR/checkpoints (parameters and both Adam moments: 3x the model in float32) once the run finished
    and exported, to train it further. By default a finished run keeps hf/, metrics.jsonl and config.json."""
    progress: bool = True
    """tqdm progress bar."""


def parse_args(argv: list[str] | None = None) -> Args:
    import tyro
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _merge_repeated(_merge_repeated(argv, "--train-manifest"), "--gap-speech")
    return tyro.cli(Args, args=argv, description=__doc__.split("\n")[0])


def _merge_repeated(argv: list[str], flag: str) -> list[str]:
    """`--train-manifest a --train-manifest b` (or `--train_manifest`, tyro's other spelling, or `--flag=a`) ->
    `--train-manifest a b`: tyro would keep only the last occurrence of a repeated flag."""
    spellings = (flag, "--" + flag[2:].replace("-", "_"))
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] in spellings:
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):  # the next flag (-h too) ends the list
                values.append(argv[i])
                i += 1
        elif argv[i].split("=", 1)[0] in spellings and "=" in argv[i]:
            values.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


# ----------------------------------------------------------------------------------------------------------------
# 2. The plan: rows per epoch (the sampler) and the learning-rate schedule
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One --train-manifest entry."""
    path: str
    speech_fraction: float


def parse_source(spec: str, default_fraction: float) -> Source:
    """'PATH' or 'PATH:FRACTION'. A suffix that is not a number is part of the path."""
    path, fraction = spec, default_fraction
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            fraction = float(tail)
            path = head
        except ValueError:
            pass
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"--train-manifest {spec!r}: speech fraction must be in [0, 1], got {fraction}")
    return Source(path, fraction)


def round_half_up(x: float) -> int:
    # Python's round() rounds 0.5 to even; the plan must be the obvious number (round(0.5 * 11) = 6).
    return int(math.floor(x + 0.5))


def speech_subset(speech_ids: list[str], fraction: float, subset_seed: int,
                  ranking: list[str] | None = None) -> list[str]:
    """The first round(fraction*N) ids of one seeded permutation of the ids sorted, or of `ranking` (gap selection):
    nested across fractions."""
    ordered = sorted(speech_ids)
    if len(set(ordered)) != len(ordered):
        raise InputError("speech row ids must be unique")
    n_p = round_half_up(fraction * len(ordered))
    if ranking is not None:
        if sorted(ranking) != ordered:
            raise InputError("the gap ranking does not rank exactly the manifest's speech rows")
        return ranking[:n_p]
    perm = np.random.default_rng(subset_seed).permutation(len(ordered))
    return [ordered[i] for i in perm[:n_p]]


@dataclass
class Plan:
    """Everything about the data order and schedule, computed from ids alone (no audio, no model)."""
    scheme: str
    speech_fraction: float
    global_batch: int
    sources: list[dict]            # per manifest: path, speech_fraction, n_text, n_speech, n_p
    text_keys: list[tuple]         # (manifest index, row id) of every transcript row
    subset_keys: list[tuple]       # (manifest index, row id) of the speech subset (empty for text-only)
    n_speech: int
    epoch_keys: list[list[tuple]]  # per epoch, the shuffled rows
    epochs: list[dict]             # per epoch: epoch, text, speech, steps, peak_lr, warmup_steps
    phases: list[dict]             # learning-rate schedules: steps, peak_lr, warmup_steps (joined end to end)
    selection: dict | None = None  # gap selection: the ranking's record (None: the seeded permutation)

    @property
    def total_steps(self) -> int:
        return sum(e["steps"] for e in self.epochs)

    def to_json(self) -> dict:
        return {
            "scheme": self.scheme,
            "speech_fraction": self.speech_fraction,
            "n_text": len(self.text_keys),
            "n_speech": self.n_speech,
            "n_p": len(self.subset_keys),
            "epochs": self.epochs,
            "speech_subset": [k[1] for k in self.subset_keys],
            "global_batch": self.global_batch,
            "total_steps": self.total_steps,
            "manifests": self.sources,
            "schedules": self.phases,
            # only for gap selection, so that the fingerprints of random-subset runs stay what they were
            **({"subset_selection": self.selection} if self.selection else {}),
        }

    def fingerprint(self) -> str:
        """Identifies the data order; a resumed run must have the same one. A gap ranking counts by its inputs'
        fingerprint, not by where its files lie (a moved checkout resumes)."""
        plan = self.to_json()
        if self.selection:
            plan["subset_selection"] = [m.get("fingerprint") for m in self.selection["manifests"]]
        blob = json.dumps([plan, self.epoch_keys], sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def position(self, step: int) -> tuple[int, int]:
        """Optimizer step (0-based) -> (epoch index, step within that epoch)."""
        for e, epoch in enumerate(self.epochs):
            if step < epoch["steps"]:
                return e, step
            step -= epoch["steps"]
        raise IndexError("step past the end of the plan")

    def step_keys(self, step: int) -> list[tuple]:
        e, s = self.position(step)
        return self.epoch_keys[e][s * self.global_batch:(s + 1) * self.global_batch]


def make_plan(scheme: str, epochs: int, global_batch: int, text_ids: list[list[str]], speech_ids: list[list[str]],
              fractions: list[float], *, seed: int = 0, subset_seed: int = 0, peak_lr: float = 5e-6,
              warmup_ratio: float = 0.04, last_epoch_peak_lr: float = 3e-6, last_epoch_warmup_ratio: float = 0.02,
              paths: list[str] | None = None, speech_fraction: float | None = None,
              curriculum_schedule: str = "own", rankings: list[list[str]] | None = None,
              selection: dict | None = None) -> Plan:
    """The epoch plan for one or more manifests (lists are per manifest, in --train-manifest order). rankings: per
    manifest, the order the speech subset is a prefix of (gap selection; None: the seeded permutation)."""
    if scheme not in SCHEMES:
        raise InputError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if epochs < 1 or global_batch < 1:
        raise InputError(f"epochs and global batch must be >= 1, got {epochs}, {global_batch}")
    paths = paths or [f"manifest{i}" for i in range(len(text_ids))]
    text_keys, subset_keys, sources = [], [], []
    for m, (texts, speech, fraction) in enumerate(zip(text_ids, speech_ids, fractions)):
        subset = [] if scheme == "text-only" else \
            speech_subset(speech, fraction, subset_seed, rankings[m] if rankings else None)  # a ranking or None
        text_keys += [(m, i) for i in texts]
        subset_keys += [(m, i) for i in subset]
        sources.append({"path": paths[m], "speech_fraction": fraction, "n_text": len(texts),
                        "n_speech": len(speech), "n_p": len(subset)})
    if not text_keys and not subset_keys:
        raise InputError("the training manifests hold no rows this scheme uses")

    epoch_keys, epoch_speech = [], []
    for e in range(epochs):
        if scheme == "text-only":
            speech = []
        elif scheme == "direct":
            speech = subset_keys
        else:  # curriculum: all speech in the last epoch, repeated E times
            speech = subset_keys * epochs if e == epochs - 1 else []
        epoch_speech.append(len(speech))
        keys = text_keys + speech
        order = np.random.default_rng([seed, e]).permutation(len(keys))
        epoch_keys.append([keys[i] for i in order])

    steps = [math.ceil(len(k) / global_batch) for k in epoch_keys]
    # One schedule over all epochs, except curriculum: E-1 epochs, then a fresh (lower, shorter-warmup) one.
    if scheme == "curriculum" and epochs > 1:
        groups = [(list(range(epochs - 1)), peak_lr, warmup_ratio),
                  ([epochs - 1], last_epoch_peak_lr, last_epoch_warmup_ratio)]
    elif scheme == "curriculum":
        groups = [([0], last_epoch_peak_lr, last_epoch_warmup_ratio)]
    else:
        groups = [(list(range(epochs)), peak_lr, warmup_ratio)]
    phases, epoch_rows = [], [None] * epochs
    for k, (group, peak, ratio) in enumerate(groups):
        n = sum(steps[e] for e in group)
        # The length the warmup and cosine are laid out over: the phase itself, or (curriculum "cut") the E-epoch
        # text-only schedule that the first phase is the first E-1 epochs of.
        cut = scheme == "curriculum" and curriculum_schedule == "cut" and k == 0 and len(groups) == 2
        span = n + steps[0] if cut else n
        # ceil, as the Hugging Face Trainer turns warmup_ratio into steps (the paper's setup)
        phase = {"epochs": [e + 1 for e in group], "steps": n, "schedule_steps": span, "peak_lr": peak,
                 "warmup_steps": math.ceil(ratio * span)}
        phases.append(phase)
        for e in group:
            epoch_rows[e] = {"epoch": e + 1, "text": len(text_keys), "speech": epoch_speech[e],
                             "steps": steps[e], "peak_lr": peak, "warmup_steps": phase["warmup_steps"]}
    return Plan(scheme=scheme, speech_fraction=fractions[0] if speech_fraction is None else speech_fraction,
                global_batch=global_batch, sources=sources, text_keys=text_keys, subset_keys=subset_keys,
                n_speech=sum(len(s) for s in speech_ids), epoch_keys=epoch_keys, epochs=epoch_rows, phases=phases,
                selection=selection)


def lr_schedule(phases: list[dict]):
    """optax schedule: per phase, linear warmup 0 -> peak over warmup_steps, then cosine to 0 at schedule_steps
    (the phase's end, except curriculum's "cut" first phase, which stops before its cosine reaches 0).

    Step k of a phase gets peak*k/warmup during warmup (so the very first update has lr 0, as in the Hugging Face
    Trainer), then peak*0.5*(1+cos(pi*(k-warmup)/(span-warmup))). A following phase restarts at its own step 0.
    """
    import optax
    schedules, boundaries, start = [], [], 0
    for phase in phases:
        steps, warmup = phase["steps"], phase["warmup_steps"]
        span = phase.get("schedule_steps", steps)
        schedules.append(optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=phase["peak_lr"], warmup_steps=warmup,
            decay_steps=max(span, warmup + 1), end_value=0.0))
        start += steps
        boundaries.append(start)
    if len(schedules) == 1:
        return schedules[0]
    return optax.join_schedules(schedules, boundaries[:-1])


def load_sources(args: Args) -> tuple[list[Source], list[list[dict]]]:
    from model.manifest import read_manifest
    if not args.train_manifest:
        raise InputError("--train-manifest: at least one manifest is needed")
    sources = [parse_source(s, args.speech_fraction) for s in args.train_manifest]
    seen = {}
    for s in sources:  # the same file twice would silently double its rows
        real = os.path.realpath(find_path(s.path))
        if real in seen:
            raise InputError(f"--train-manifest: {s.path!r} and {seen[real]!r} are the same file; give each manifest "
                             f"once")
        seen[real] = s.path
    return sources, [read_manifest(find_path(s.path)) for s in sources]


def find_path(path: str) -> str:
    """A relative path missing from the working directory is looked up in the repository (the demo defaults)."""
    if not os.path.isabs(path) and not os.path.exists(path) and (REPO / path).exists():
        return str(REPO / path)
    return path


def resolve_batch(args: Args, data: int, fsdp: int) -> tuple[int, int]:
    """(global batch, accumulation steps). A micro-batch is per_device_batch rows on each of the data x fsdp
    devices (the tensor axis shares one batch); the accumulation makes up the global batch, so the same command
    takes the same optimizer steps on 1 CPU, 8 GPUs or a pod slice."""
    micro = args.per_device_batch * data * fsdp
    if args.per_device_batch < 1 or (args.grad_accum is not None and args.grad_accum < 1):
        raise InputError(f"--per-device-batch and --grad-accum must be >= 1, got {args.per_device_batch}, "
                         f"{args.grad_accum}")
    if args.global_batch is None and args.grad_accum is not None:
        return micro * args.grad_accum, args.grad_accum
    target = args.global_batch or checkpoint_defaults(args.model).get("global_batch") or \
        (PAPER_GLOBAL_BATCH if os.path.isdir(args.model) else DEMO_GLOBAL_BATCH)
    if target < 1 or target % micro:
        raise InputError(
            f"global batch {target} is not a multiple of the micro-batch: --per-device-batch {args.per_device_batch} "
            f"x {data * fsdp} data-parallel devices (--data-parallel {data} x --fsdp {fsdp}) = {micro} rows; change "
            f"--global-batch, --per-device-batch or the mesh")
    accum = target // micro
    if args.grad_accum is not None and args.grad_accum != accum:
        raise InputError(f"--grad-accum {args.grad_accum} contradicts --global-batch {target} = {micro} rows per "
                         f"micro-batch x {accum}; give one of the two")
    return target, accum


def check_model_choice(args: Args) -> None:
    """A preset other than 'tiny' has random weights: never train one by accident (nor a mistyped path)."""
    from model.config import PRESETS
    if os.path.isdir(args.model) or args.model == "tiny":
        return
    if args.model not in PRESETS:
        raise InputError(f"--model {args.model}: not a directory, nor a preset ({', '.join(PRESETS)}) or 'mini' "
                         f"(the shipped miniature). Pass the path of a Hugging Face Qwen2-Audio directory (e.g. a "
                         f"download of Qwen/Qwen2-Audio-7B-Instruct)")
    if not args.random_init:
        raise InputError(f"--model {args.model}: not a directory. Pass the path of a Hugging Face Qwen2-Audio "
                         f"directory (e.g. a download of Qwen/Qwen2-Audio-7B-Instruct); to train the "
                         f"{args.model!r} preset from random weights (a smoke test, never a result), add --random-init")
    print(f"train.py: warning: --model {args.model} --random-init: the weights are random (a smoke test, never a "
          f"result)", file=sys.stderr)


def checkpoint_defaults(model: str) -> dict:
    """The fine-tuning defaults a model directory states for itself ({"peak_lr", "global_batch", "epochs"};
    pretrain.py writes them into the miniature's pretraining.json: the paper's 5e-6 at batch 128 for 3 epochs is a
    7B model's recipe), or {}."""
    path = Path(model) / "pretraining.json"
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text(encoding="utf-8")).get("finetune_defaults", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise InputError(f"{path}: expected a JSON object (pretrain.py writes it)") from None
    for key, kind in (("peak_lr", float), ("global_batch", int), ("epochs", int)):
        if key in defaults and not (isinstance(defaults[key], (int, float) if kind is float else int)
                                    and defaults[key] > 0):
            raise InputError(f"{path}: finetune_defaults.{key} must be a positive number, got {defaults[key]!r}")
    return defaults


def resolve_epochs(args: Args) -> int:
    return args.epochs if args.epochs is not None else checkpoint_defaults(args.model).get("epochs", PAPER_EPOCHS)


def resolve_lr(args: Args) -> tuple[float, float]:
    pretrained = os.path.isdir(args.model)
    peak = args.peak_lr if args.peak_lr is not None else \
        checkpoint_defaults(args.model).get("peak_lr", 5e-6 if pretrained else 1e-2)
    last = args.last_epoch_peak_lr if args.last_epoch_peak_lr is not None else peak * 3 / 5
    return peak, last


def build_plan(args: Args, sources: list[Source], manifests: list[list[dict]], global_batch: int) -> Plan:
    rankings, selection = gap_rankings(args, sources, manifests) if args.subset_selection == "gap" and \
        args.scheme != "text-only" else (None, None)
    peak, last = resolve_lr(args)
    return make_plan(
        args.scheme, resolve_epochs(args), global_batch,
        text_ids=[[r["id"] for r in rows if r["audio"] is None] for rows in manifests],
        speech_ids=[[r["id"] for r in rows if r["audio"] is not None] for rows in manifests],
        fractions=[s.speech_fraction for s in sources], seed=args.seed, subset_seed=args.subset_seed,
        peak_lr=peak, warmup_ratio=args.warmup_ratio, last_epoch_peak_lr=last,
        last_epoch_warmup_ratio=args.last_epoch_warmup_ratio, paths=[s.path for s in sources],
        speech_fraction=args.speech_fraction, curriculum_schedule=args.curriculum_schedule, rankings=rankings,
        selection=selection)


def check_audio(plan: Plan, sources: list[Source], manifests: list[list[dict]]) -> list[str]:
    """Every recording the run will use is read from its header (in parallel) before the first step: all bad rows
    are reported at once as `manifest:line: id: reason`, instead of a crash at their batch hours in. Returns the
    ids of the clips longer than 30 s (cut to their first 30 s, as Qwen2-Audio's processor does)."""
    from model.manifest import iter_jsonl
    from model.processor import MAX_AUDIO_SECONDS, check_audio_file
    rows = [{r["id"]: r for r in m} for m in manifests]
    keys = sorted(set(plan.subset_keys))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda k: check_audio_file(rows[k[0]][k[1]]["audio"]), keys))
    bad = [(k, reason) for k, (reason, _) in zip(keys, results) if reason]
    if bad:
        lines = [{row["id"]: n for n, row in iter_jsonl(find_path(s.path))} for s in sources]
        report = [f"{sources[m].path}:{lines[m].get(i, '?')}: {i}: {reason} ({rows[m][i]['audio']})"
                  for (m, i), reason in bad]
        raise InputError(f"{len(bad)} of the {len(keys)} recordings this run uses cannot be trained on:\n  "
                         + "\n  ".join(report))
    return [k[1] for k, (_, seconds) in zip(keys, results) if seconds > MAX_AUDIO_SECONDS]


def resolve_mesh_shape(args: Args, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor). fsdp=-1 takes every device the other two axes leave; explicit sizes may use fewer
    devices than there are (the first data*fsdp*tensor ones: handy for comparisons), never more."""
    fixed = args.data_parallel * args.tensor_parallel
    if args.data_parallel < 1 or args.tensor_parallel < 1 or args.fsdp == 0 or args.fsdp < -1:
        raise InputError(f"mesh sizes must be >= 1 (fsdp may be -1): --data-parallel {args.data_parallel} "
                         f"--fsdp {args.fsdp} --tensor-parallel {args.tensor_parallel}")
    if args.fsdp == -1 and n_devices % fixed:
        raise InputError(f"--data-parallel {args.data_parallel} x --tensor-parallel {args.tensor_parallel} does not "
                         f"divide the {n_devices} devices")
    fsdp = n_devices // fixed if args.fsdp == -1 else args.fsdp
    if fixed * fsdp > n_devices:
        raise InputError(f"mesh --data-parallel {args.data_parallel} x --fsdp {fsdp} x --tensor-parallel "
                         f"{args.tensor_parallel} needs {fixed * fsdp} devices; there are {n_devices} devices")
    return args.data_parallel, fsdp, args.tensor_parallel


def print_plan(args: Args) -> dict:
    """--plan-only: manifests -> plan JSON on stdout. Reads no audio, loads no model."""
    import jax
    sources, manifests = load_sources(args)
    data, fsdp, _ = resolve_mesh_shape(args, jax.device_count())
    plan = build_plan(args, sources, manifests, resolve_batch(args, data, fsdp)[0])
    out = plan.to_json()
    print(json.dumps(out, ensure_ascii=False))
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2b. Gap selection: which recordings to pay for, ranked by the text-speech gap on synthetic speech
# ----------------------------------------------------------------------------------------------------------------

GAP_SCORE = "teacher-forced answer KL(transcript || synthetic speech) per answer token; D'Hondt over intents' medians"


def gap_order(rows: list[dict], gaps: dict[str, float]) -> list[str]:
    """The speech rows' ids in gap order. Intents (scenario_action) share the budget in proportion to their median
    gap by the highest-averages (D'Hondt) rule: each next place goes to the intent with the largest
    median gap / (places it has + 1); within an intent, its rows by their own gap, largest first (ties: by id). The
    median, so that a few outlier rows (a clip the reference mishears for any reason) cannot buy their intent the
    budget; every prefix is the subset of a smaller fraction."""
    by_intent: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: (-gaps[r["id"]], r["id"])):
        by_intent.setdefault(f"{r['scenario']}_{r['action']}", []).append(r["id"])
    median = {k: float(np.median([gaps[i] for i in ids])) for k, ids in by_intent.items()}
    taken = dict.fromkeys(by_intent, 0)
    order = []
    for _ in range(len(rows)):
        k = max((k for k in sorted(by_intent) if taken[k] < len(by_intent[k])),
                key=lambda k: median[k] / (taken[k] + 1))  # max keeps the first of equals: ties go by intent name
        order.append(by_intent[k][taken[k]])
        taken[k] += 1
    return order


def gap_scores(reference: str, pairs: list[tuple[dict, dict]], dtype: str, batch: int = 8) -> dict[str, float]:
    """{row id: the reference model's mean KL per answer token between its answer given the transcript (the
    target) and given the synthetic recording}, teacher-forced on the row's gold answer: distill_kl at T=1, the
    distillation term of these rows before any training. pairs: (training row, its synthetic row)."""
    import jax
    import jax.numpy as jnp
    from model import processor as P
    from model.checkpoint import load_hf
    from model.config import get_config
    config, tok = get_config(reference), P.load_tokenizer(reference if os.path.isdir(reference) else None)
    dtype, pad = jnp.dtype(dtype), P.special_ids(tok).pad
    # in the compute dtype, on one device: a 7B reference in bfloat16 needs ~17 GB (README)
    _, params = load_hf(reference, dtype=dtype)

    @jax.jit
    def row_kl(params, mb):
        student = answer_logits(params, config, mb, dtype, "none")
        teacher = answer_logits(params, config, mb, dtype, "none", prefix="teacher_")
        kl = jax.vmap(lambda s, t, m: distill_kl(s[None], t[None], m[None], 1.0))(student, teacher, mb["distill_mask"])
        return kl / jnp.maximum(mb["distill_mask"].sum(-1), 1.0)

    scores = {}
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        speech = [make_example({**row, "audio": synthetic["audio"]}, tok) for row, synthetic in chunk]
        text = [transcript_example(row, tok) for row, _ in chunk]
        speech += [None] * (batch - len(chunk))
        text += [None] * (batch - len(chunk))
        seq_len, frames = step_shape(max(len(e.ids) for e in speech if e),
                                     max(P.bucket_frames(e.n_frames) for e in speech if e))
        answer_len = max(len(e.ids) - e.n_prompt for e in speech if e)
        mb = collate(speech, seq_len, frames, answer_len, pad)
        mb.update(collate_teacher(text, step_shape(max(len(e.ids) for e in text if e), None)[0], answer_len, pad))
        kl = np.asarray(row_kl(params, mb))
        scores.update({row["id"]: float(kl[i]) for i, (row, _) in enumerate(chunk)})
    return scores


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(model_dir: str | Path) -> str:
    """sha256 over a model directory's files (names and contents): what a run's settings and a gap ranking record
    of their model, so that a directory whose weights were replaced (a rebuilt `mini`, a re-downloaded checkpoint)
    is never taken for the one a run or ranking was made with, while a copy elsewhere is."""
    return hashlib.sha256("".join(f"{p.name}:{file_digest(p)}\n" for p in sorted(Path(model_dir).iterdir())
                                  if p.is_file()).encode()).hexdigest()


def gap_rankings(args: Args, sources: list[Source], manifests: list[list[dict]]) -> tuple[list[list[str]], dict]:
    """(per manifest, its speech rows' ids in gap order; what the run's config records). A ranking is computed once
    per (manifest rows, synthetic recordings, reference model) and cached next to the synthetic manifest, under the
    fingerprint of all three (file contents, not names): a changed input makes a new ranking, never reuses one."""
    from model.config import resolve_model
    from model.manifest import atomic_write_text, read_manifest
    from model.sharding import resolve_dtype
    if len(args.gap_speech) != len(sources):
        raise InputError(f"--subset-selection gap: --gap-speech needs one synthetic-speech manifest per "
                         f"--train-manifest ({len(sources)}, in the same order; 'none' for a manifest without "
                         f"recordings or at fraction 0 or 1, where there is nothing to choose), got "
                         f"{len(args.gap_speech)}; make them with `python prepare.py synth --manifest TRAIN --out DIR` "
                         f"(DIR/synthetic.jsonl)")
    reference = resolve_model(args.gap_reference or args.model)
    if not os.path.isdir(reference):
        raise InputError(f"--gap-reference {reference}: gap selection needs a trained model directory (the initial "
                         f"--model or a text-only run's RUN_DIR/hf), not a random preset")
    dtype = resolve_dtype("auto")  # the compute dtype of this backend: part of what the scores are
    reference_digest = model_digest(reference)
    rankings, records = [], []
    for source, rows, speech_path in zip(sources, manifests, args.gap_speech):
        if not any(r["audio"] is not None for r in rows) or source.speech_fraction in (0.0, 1.0):
            rankings.append(None)  # every subset of this manifest is empty or whole: the seeded order will do
            records.append({"manifest": source.path, "synthetic": None})
            continue
        if speech_path.lower() == "none":
            raise InputError(f"--gap-speech none for {source.path}: its speech fraction {source.speech_fraction:g} "
                             f"leaves a subset to choose; give its synthetic speech (prepare.py synth)")
        speech_path = find_path(speech_path)
        synthetic = {r["id"]: r for r in read_manifest(speech_path)}
        candidates = sorted((r for r in rows if r["audio"] is not None), key=lambda r: r["id"])
        missing = [r["id"] for r in candidates if r["id"] not in synthetic]
        if missing:
            raise InputError(f"{speech_path}: no synthetic recording for {len(missing)} of the {len(candidates)} "
                             f"speech rows of {source.path} (first: {', '.join(missing[:3])}); make it from that "
                             f"manifest")
        other = [r["id"] for r in candidates if synthetic[r["id"]]["text"] != r["text"]]
        if other:
            raise InputError(f"{speech_path}: {len(other)} rows speak another text than {source.path}'s row of the "
                             f"same id (first: {other[0]}); make it from that manifest")
        blob = json.dumps([GAP_SCORE, dtype, reference_digest] + [
            [r["id"], r["text"], r["scenario"], r["action"], r["entities"], file_digest(synthetic[r["id"]]["audio"])]
            for r in candidates], ensure_ascii=False)
        fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        cache = Path(speech_path).resolve().parent / "gap-rankings" / f"{fingerprint}.json"
        if cache.is_file():
            order = json.loads(cache.read_text(encoding="utf-8"))["order"]
        else:
            gaps = gap_scores(reference, [(r, synthetic[r["id"]]) for r in candidates], dtype)
            order = gap_order(candidates, gaps)
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps({"score": GAP_SCORE, "reference": reference, "manifest": source.path,
                                                 "synthetic": speech_path, "order": order, "gaps": gaps}, indent=1))
        rankings.append(order)
        records.append({"manifest": source.path, "synthetic": speech_path, "ranking": str(cache),
                        "fingerprint": fingerprint})
    return rankings, {"method": "gap", "score": GAP_SCORE, "reference": reference, "compute_dtype": dtype,
                      "manifests": records}


# ----------------------------------------------------------------------------------------------------------------
# 3. Batches: manifest row -> tokens, labels and audio features
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Example:
    ids: list[int]                 # prompt + answer + <|im_end|>
    n_prompt: int                  # the first n_prompt tokens carry no loss
    features: np.ndarray | None    # [128, T_bucket] log-mel (speech rows; host features)
    n_frames: int                  # valid mel frames (0 for a transcript row)
    waveform: np.ndarray | None = None  # the 16 kHz clip, cut to 30 s, instead of features (device features)


def encode_text(tok, text: str) -> list[int]:
    enc = tok.encode(text, add_special_tokens=False)
    return list(getattr(enc, "ids", enc))  # tokenizers.Tokenizer gives an Encoding, transformers a list


@functools.lru_cache(maxsize=256)
def audio_prompt_ids(tok, n_audio_tokens: int) -> tuple[int, ...]:
    """The prompt of a recording row: the same text for every clip but its <|AUDIO|> count (tokenizing it is most
    of a row's host time once the features are computed on the device: bench.py pipeline)."""
    from model import processor as P
    return tuple(P.encode_prompt(tok, P.build_prompt(None, audio=True), n_audio_tokens=n_audio_tokens))


def make_example(row: dict, tok, device_features: bool = False) -> Example:
    """A speech row puts its audio in the user turn, a transcript row its text; the instruction is the same.
    device_features: keep the decoded clip for the step to compute its features (--audio-features device)."""
    from model.answer import render_answer
    from model import processor as P
    answer = render_answer(row["scenario"], row["action"], row["entities"])
    features, waveform, n_frames = None, None, 0
    if row["audio"] is not None:
        if device_features:
            waveform = P.load_audio(row["audio"])[:P.CHUNK_SAMPLES]
            n_frames = P.num_frames(waveform.size)
        else:
            features, n_frames = P.log_mel_features(P.load_audio(row["audio"]))
        prompt_ids = audio_prompt_ids(tok, int(P.num_audio_tokens(n_frames)))
    else:
        prompt_ids = P.encode_prompt(tok, P.build_prompt(row["text"], audio=False))
    # <|im_end|> closes the assistant turn; it is trained, so the model learns to stop
    return Example(list(prompt_ids) + encode_text(tok, answer) + [P.token_id(tok, P.IM_END)], len(prompt_ids),
                   features, int(n_frames), waveform)


def transcript_example(row: dict, tok) -> Example:
    """A recording row as its transcript: the same instruction and answer, the text in place of the audio (the
    distillation teacher's input, and the gap score's text side)."""
    return make_example({**row, "audio": None}, tok)


def collate(examples: list[Example | None], seq_len: int, n_frames_max: int | None,
            answer_len: int | None = None, pad_id: int = 0, waveforms: bool = False) -> dict[str, np.ndarray]:
    """Right-padded arrays. None = a padding row (the last step of an epoch): one token, no loss.

    targets[t] = ids[t+1] and loss_mask[t] = 1 where that next token is part of the answer (or its <|im_end|>),
    so the loss is on the assistant's answer only. answer_index [b, answer_len] lists those positions (padded
    with 0, where loss_mask is always 0): the model computes logits only there. Transcript rows in a batch with
    speech get all-zero features and feature_lengths 0 (the encoder masks them out entirely). Examples that carry
    waveforms (device features) give input_waveforms [b, n_frames_max * HOP] and n_samples [b] instead of
    input_features; the step computes the features from them. `waveforms` says which of the two a batch carries,
    also when none of its rows is a recording: every micro-batch of a step, on every host, has the same arrays."""
    from model.processor import HOP_LENGTH
    b = len(examples)  # pad_id fills padded positions, masked out of attention and loss (any id would do)
    out = {"input_ids": np.full((b, seq_len), pad_id, np.int32), "attention_mask": np.zeros((b, seq_len), np.int32),
           "targets": np.full((b, seq_len), pad_id, np.int32), "loss_mask": np.zeros((b, seq_len), np.float32)}
    if answer_len is None:
        answer_len = max([len(ex.ids) - ex.n_prompt for ex in examples if ex is not None] + [1])
    out["answer_index"] = np.zeros((b, answer_len), np.int32)
    if n_frames_max is not None:
        if waveforms:
            out["input_waveforms"] = np.zeros((b, n_frames_max * HOP_LENGTH), np.float32)
            out["n_samples"] = np.zeros((b,), np.int32)
        else:
            out["input_features"] = np.zeros((b, 128, n_frames_max), np.float32)
        out["feature_lengths"] = np.zeros((b,), np.int32)
    for i, ex in enumerate(examples):
        if ex is None:
            out["attention_mask"][i, 0] = 1
            continue
        n = len(ex.ids)
        out["input_ids"][i, :n] = ex.ids
        out["attention_mask"][i, :n] = 1
        out["targets"][i, :n - 1] = ex.ids[1:]
        out["loss_mask"][i, ex.n_prompt - 1:n - 1] = 1.0
        out["answer_index"][i, :n - ex.n_prompt] = np.arange(ex.n_prompt - 1, n - 1)
        if ex.features is not None:
            out["input_features"][i, :, :ex.features.shape[1]] = ex.features
        elif ex.waveform is not None:
            out["input_waveforms"][i, :ex.waveform.size] = ex.waveform
            out["n_samples"][i] = ex.waveform.size
        if n_frames_max is not None:
            out["feature_lengths"][i] = ex.n_frames
    return out


def collate_teacher(teachers: list[Example | None], seq_len: int, answer_len: int,
                    pad_id: int) -> dict[str, np.ndarray]:
    """The distillation teacher's inputs for one micro-batch: row i is the transcript of student row i when that row
    is a recording (else a padding row). The answer tokens are the same in both, so position j of answer_index and of
    teacher_answer_index hold the same answer token; distill_mask marks the answer tokens of the recording rows."""
    t = collate(teachers, seq_len, None, answer_len, pad_id)
    return {"teacher_input_ids": t["input_ids"], "teacher_attention_mask": t["attention_mask"],
            "teacher_answer_index": t["answer_index"],
            "distill_mask": np.take_along_axis(t["loss_mask"], t["answer_index"], axis=1)}


# Step shapes. Every new (sequence length, audio frames) pair compiles a new train step (minutes for 7b), so
# both are padded up to short lists (model/processor.py: seq_bucket, audio_bucket). A SLURP-like epoch then runs a
# handful of shapes (tests/test_train_plan.py; `bench.py shapes` prints the trade-off). One answer length per run.
def step_shape(longest_tokens: int, longest_frames: int | None) -> tuple[int, int | None]:
    """(sequence length, audio frames or None for a step without recordings) that a step is padded to."""
    from model.processor import audio_bucket, seq_bucket
    return seq_bucket(longest_tokens), None if longest_frames is None else audio_bucket(longest_frames)


def plan_step_shapes(plan: Plan, lengths: dict[tuple, tuple[int, int | None]], step_rows: int,
                     shape_of=None) -> list[dict]:
    """Per optimizer step of the plan: its shape and padded share, from each row's (tokens, feature frames or None)
    alone: what StepLoader would build, without tokenizing or reading audio (bench.py shapes; shape_of: another
    bucketing to compare, default step_shape)."""
    out = []
    for step in range(plan.total_steps):
        keys = plan.step_keys(step)
        tokens = [lengths[k][0] for k in keys]
        frames = [lengths[k][1] for k in keys if lengths[k][1] is not None]
        shape = (shape_of or step_shape)(max(tokens), max(frames) if frames else None)
        out.append({"shape": shape, "padding": 1 - sum(tokens) / (step_rows * shape[0])})
    return out


def recordings_first(keys: list, is_recording: list[bool]) -> list:
    """--group-recordings: a step's rows with its recordings first, each group in its drawn order."""
    return [k for k, r in zip(keys, is_recording) if r] + [k for k, r in zip(keys, is_recording) if not r]


class StepLoader:
    """Builds the arrays of one optimizer step: [grad_accum, micro_batch, ...], this process's rows only.

    micro_batch = per_device_batch * data * fsdp rows. Row j of micro-batch a is row a*micro_batch + j of the
    step's slice of the epoch order, or with `group_recordings` of that slice with its recordings moved to the
    front (step_order). A process loads (decodes audio for, tokenizes) only the rows of its own
    devices; the padded shape (step_shape) is agreed across processes so the global array has one shape.
    `shapes` collects the step shapes loaded; `padding` the real and padded token positions."""

    def __init__(self, plan: Plan, rows: list[dict[str, dict]], tok, grad_accum: int, micro_batch: int,
                 local_rows: slice, distill: bool = False, device_features: bool = False,
                 group_recordings: bool = False):
        from model import processor as P
        from model.answer import render_answer
        from model.processor import round_up
        self.plan, self.rows, self.tok = plan, rows, tok
        self.grad_accum, self.micro_batch, self.local = grad_accum, micro_batch, local_rows
        self.distill = distill  # steps with recordings also carry their transcripts (collate_teacher)
        self.device_features = device_features  # recordings as waveforms, featurised in the step
        self.group_recordings = group_recordings
        self.pad_id = P.special_ids(tok).pad
        # one answer length for the whole run (logits are computed only there, so its padding is cheap)
        used = {k for keys in plan.epoch_keys for k in keys}
        longest = max(len(encode_text(tok, render_answer(r["scenario"], r["action"], r["entities"])))
                      for r in (rows[m][i] for m, i in used))
        self.answer_len = round_up(longest + 1, 16)  # + <|im_end|>

    def counts(self, step: int) -> tuple[int, int]:
        keys = self.plan.step_keys(step)
        n_speech = sum(1 for m, i in keys if self.rows[m][i]["audio"] is not None)
        return len(keys) - n_speech, n_speech

    def step_order(self, step: int) -> list[tuple[int, str]]:
        """The step's rows in the order they fill its micro-batches."""
        keys = self.plan.step_keys(step)
        if not self.group_recordings:
            return keys
        return recordings_first(keys, [self.rows[m][i]["audio"] is not None for m, i in keys])

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        from model.processor import bucket_frames
        keys = self.step_order(step)
        keys = keys + [None] * (self.grad_accum * self.micro_batch - len(keys))
        micro = [keys[a * self.micro_batch:(a + 1) * self.micro_batch][self.local] for a in range(self.grad_accum)]
        examples = [[None if k is None else make_example(self.rows[k[0]][k[1]], self.tok, self.device_features)
                     for k in mb] for mb in micro]
        flat = [ex for mb in examples for ex in mb if ex is not None]
        longest = max([len(ex.ids) for ex in flat] + [1])
        frames = max([bucket_frames(ex.n_frames) for ex in flat if ex.n_frames] + [0])
        any_speech = any(self.rows[k[0]][k[1]]["audio"] is not None for k in keys if k is not None)
        teachers = [[None if ex is None or not ex.n_frames else transcript_example(self.rows[k[0]][k[1]], self.tok)
                     for k, ex in zip(ks, mb)]
                    for ks, mb in zip(micro, examples)] if self.distill and any_speech else None
        teacher_longest = max([len(t.ids) for mb in teachers or [] for t in mb if t is not None] + [1])
        longest, frames, teacher_longest = _global_max(longest, frames, teacher_longest)
        seq_len, n_frames = step_shape(longest, frames if any_speech else None)
        answer_len = min(self.answer_len, seq_len)
        arrays = [collate(mb, seq_len, n_frames, answer_len, self.pad_id, self.device_features) for mb in examples]
        if teachers is not None:
            teacher_len = step_shape(teacher_longest, None)[0]
            for a, mb in zip(arrays, teachers):
                a.update(collate_teacher(mb, teacher_len, answer_len, self.pad_id))
        return {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}


def device_features(args: Args, backend: str) -> bool:
    """--audio-features resolved: compute the log-mel in the step (True) or on the host."""
    return args.audio_features == "device" or (args.audio_features == "auto" and backend != "cpu")


def group_recordings(args: Args, backend: str) -> bool:
    """--group-recordings resolved."""
    return args.group_recordings == "yes" or (args.group_recordings == "auto" and backend != "cpu")


def step_frames(batch: dict) -> int | None:
    """The mel frames a step's arrays are padded to (None: a step without recordings)."""
    from model.processor import HOP_LENGTH
    if "input_features" in batch:
        return batch["input_features"].shape[-1]
    return batch["input_waveforms"].shape[-1] // HOP_LENGTH if "input_waveforms" in batch else None


def _global_max(*values: int) -> tuple[int, ...]:
    import jax
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
    return tuple(int(v) for v in gathered.reshape(-1, len(values)).max(axis=0))


# ----------------------------------------------------------------------------------------------------------------
# 4. The train step
# ----------------------------------------------------------------------------------------------------------------

AUDIO_INPUTS = ("input_features", "input_waveforms", "n_samples", "feature_lengths")  # collate's recording arrays


def answer_forward(params, config, mb: dict, dtype, remat_policy: str, prefix: str = "", hidden_only: bool = False):
    """The model at the positions whose next token is an answer token (answer_index) of one micro-batch: fp32 logits
    [b, A, V], or with hidden_only the hidden states [b, A, H] the LM head reads. prefix "teacher_" reads the
    transcript inputs collate_teacher adds (no audio). With device features the host sent waveforms: their log-mel
    is computed here (log_mel_jnp), then the model runs as on host features."""
    from model.processor import HOP_LENGTH, log_mel_jnp
    from model.qwen2_audio import forward
    features, lengths = (None, None) if prefix else (mb.get("input_features"), mb.get("feature_lengths"))
    if not prefix and "input_waveforms" in mb:
        features = log_mel_jnp(mb["input_waveforms"], mb["n_samples"], mb["input_waveforms"].shape[-1] // HOP_LENGTH)
    return forward(params, config, mb[prefix + "input_ids"], mb[prefix + "attention_mask"], features, lengths,
                   dtype=dtype, remat_policy=remat_policy, logits_at=mb[prefix + "answer_index"],
                   hidden_only=hidden_only)


def answer_logits(params, config, mb: dict, dtype, remat_policy: str, prefix: str = ""):
    """fp32 logits [b, A, V] at the answer positions (answer_forward): what distillation compares."""
    return answer_forward(params, config, mb, dtype, remat_policy, prefix)


def answer_targets(mb: dict):
    """(target token ids, loss mask) at the answer positions [b, A]."""
    import jax.numpy as jnp
    return (jnp.take_along_axis(mb["targets"], mb["answer_index"], axis=1),
            jnp.take_along_axis(mb["loss_mask"], mb["answer_index"], axis=1))


def answer_nll(logits, mb: dict):
    """(sum of token cross-entropies over the answer tokens, their count) from answer_logits."""
    import jax.numpy as jnp
    from model.qwen2_audio import token_nll
    targets, mask = answer_targets(mb)
    return token_nll(logits, targets, mask), jnp.sum(mask)


def answer_loss(params, config, mb: dict, dtype, remat_policy: str):
    """(sum of token cross-entropies over answer tokens, their count) for one micro-batch: the model's hidden
    states at the answer positions, then the LM head and the cross-entropy as one step (lm_head_nll: with a 156k
    vocabulary the logits are made a chunk at a time, never all at once). Logits are fp32."""
    import jax.numpy as jnp
    from model.qwen2_audio import lm_head_nll
    hidden = answer_forward(params, config, mb, dtype, remat_policy, hidden_only=True)
    targets, mask = answer_targets(mb)
    return lm_head_nll(hidden, params["lm_head"]["kernel"], targets, mask, dtype), jnp.sum(mask)


def distill_kl(student_logits, teacher_logits, mask, temperature: float):
    """sum over the masked answer positions of T^2 x KL(softmax(teacher / T) || softmax(student / T)): the teacher's
    distribution is the target (forward KL, as in Hinton et al.'s distillation; T^2 keeps the gradient's scale
    independent of T)."""
    import jax
    import jax.numpy as jnp
    t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return temperature ** 2 * jnp.sum(kl * mask)


@dataclass(frozen=True)
class Distill:
    """--distill-*: the weight, the teacher ('self' or 'frozen') and the temperature."""
    weight: float
    teacher: str
    temperature: float


def make_optimizer(args: Args, schedule):
    import jax
    import optax
    # decay kernels and embeddings only, as the Hugging Face Trainer skips biases and norm scales
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)
    return optax.chain(
        optax.clip_by_global_norm(args.clip_norm),
        optax.adamw(schedule, b1=args.adam_b1, b2=args.adam_b2, eps=args.adam_eps,
                    weight_decay=args.weight_decay, mask=decay_mask))


def make_train_step(config, tx, dtype, remat_policy: str, distill: Distill | None = None,
                    skip_audio_tower: bool = False):
    """(trainable, frozen, opt_state, batch[, teacher]) -> (trainable, opt_state, metrics).

    batch leaves are [grad_accum, micro_batch, ...]. Gradients of the SUMMED token losses are accumulated over
    the micro-batches and divided once by the step's answer-token count, so accumulation gives exactly the update
    of one big batch. `frozen` (see Phase) is an input only: no gradient, no optimizer state, returned untouched
    by construction.

    Distillation (a step whose batch carries collate_teacher's arrays, i.e. one with recordings): the objective adds
    weight x distill_kl of the recording rows, over the same answer-token count. The teacher's logits come from the
    model itself under stop_gradient ('self') or from `teacher`, a separate parameter tree that is only read
    ('frozen'; unused otherwise). metrics["distill_kl"] is the KL per distilled answer token.

    skip_audio_tower (--group-recordings): a micro-batch of transcripts only, in a step with recordings, skips the
    audio tower (lax.cond). Its rows hold no audio token, so the tower's output reaches no logit: the same loss to
    the bit, and the same gradient but for XLA summing the embedding table's scatter-add in another order (a few
    entries differ in their last bits: tests/test_train.py)."""
    import jax
    import jax.numpy as jnp
    import optax

    def step(trainable, frozen, opt_state, batch, teacher=None):
        distilling = distill is not None and "teacher_input_ids" in batch  # a trace-time choice per step shape

        def loss_fn(tr, mb):
            params = merge_params(frozen, tr)
            if not distilling:
                nll, n = answer_loss(params, config, mb, dtype, remat_policy)
                return nll, (nll, jnp.float32(0), n)
            student = answer_logits(params, config, mb, dtype, remat_policy)  # the KL needs them all
            nll, n = answer_nll(student, mb)
            source = jax.lax.stop_gradient(params) if distill.teacher == "self" else teacher
            target = answer_logits(source, config, mb, dtype, "none", prefix="teacher_")
            kl = distill_kl(student, jax.lax.stop_gradient(target), mb["distill_mask"], distill.temperature)
            return nll + distill.weight * kl, (nll, kl, n)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_grads(mb):
            if not skip_audio_tower or "feature_lengths" not in mb:  # or a step without recordings
                return grad_fn(trainable, mb)
            text = {k: v for k, v in mb.items() if k not in AUDIO_INPUTS}
            return jax.lax.cond(jnp.any(mb["feature_lengths"] > 0), lambda: grad_fn(trainable, mb),
                                lambda: grad_fn(trainable, text))

        def micro(carry, mb):
            grads, loss_sum, kl_sum, n_tok = carry
            (_, (l, kl, n)), g = micro_grads(mb)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + l, kl_sum + kl, n_tok + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        (grads, loss_sum, kl_sum, n_tok), _ = jax.lax.scan(micro, init, batch)
        denom = jnp.maximum(n_tok, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads), "answer_tokens": n_tok,
                   # tokens of real rows (a padding row's single token is not work done)
                   "tokens": jnp.sum(batch["attention_mask"] * (batch["loss_mask"].sum(-1, keepdims=True) > 0))}
        if distilling:
            metrics["distill_kl"] = kl_sum / jnp.maximum(jnp.sum(batch["distill_mask"]), 1.0)
        return trainable, opt_state, metrics

    return step


def split_params(params: dict, frozen_paths: tuple[tuple[str, ...], ...]) -> tuple[dict, dict]:
    """(trainable, frozen): the leaves under any of frozen_paths go to `frozen`. Works on any tree shaped like
    the parameters (their shardings, say)."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    flat = flatten_dict(params)
    is_frozen = lambda path: any(path[:len(f)] == f for f in frozen_paths)
    return (unflatten_dict({k: v for k, v in flat.items() if not is_frozen(k)}),
            unflatten_dict({k: v for k, v in flat.items() if is_frozen(k)}))


def merge_params(a: dict, b: dict) -> dict:
    """The inverse of split_params."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    return unflatten_dict({**flatten_dict(a), **flatten_dict(b)})


@dataclass
class Phase:
    """Optimizer steps [start, start + steps) trained by ONE AdamW, fresh (zero moments, step count 0) at `start`,
    with `frozen` parameters that get no gradient, no optimizer state and no weight decay.

    text-only and direct: one phase. Curriculum: epochs 1..E-1 exactly as text-only (the audio path frozen), then
    the last epoch with a new AdamW and its own schedule, which is what the paper's two successive training runs
    do (--curriculum-optimizer carry: one phase, the ablation)."""
    start: int
    steps: int
    schedule: object  # optax schedule over the phase's own steps
    frozen: tuple[tuple[str, ...], ...]

    @property
    def end(self) -> int:
        return self.start + self.steps


def training_phases(args: Args, plan: Plan) -> list[Phase]:
    if args.scheme == "curriculum" and len(plan.phases) == 2 and args.curriculum_optimizer == "fresh":
        first, last = plan.phases
        return [Phase(0, first["steps"], lr_schedule([first]), AUDIO_FROZEN + ALWAYS_FROZEN),
                Phase(first["steps"], last["steps"], lr_schedule([last]), ALWAYS_FROZEN)]
    frozen = AUDIO_FROZEN + ALWAYS_FROZEN if args.scheme == "text-only" else ALWAYS_FROZEN
    return [Phase(0, plan.total_steps, lr_schedule(plan.phases), frozen)]


def make_distill(args: Args) -> Distill | None:
    return Distill(args.distill_weight, args.distill_teacher, args.distill_temperature) if args.distill_weight else None


def speech_start(plan: Plan) -> int:
    """The first optimizer step of the first epoch with recordings (0 for direct; curriculum: its last epoch)."""
    first = next((e for e, epoch in enumerate(plan.epochs) if epoch["speech"]), len(plan.epochs))
    return sum(epoch["steps"] for epoch in plan.epochs[:first])


@dataclass
class FrozenTeacher:
    """--distill-teacher frozen: the parameters as they were at optimizer step `start` (speech_start), copied once in
    the compute dtype and never updated; from then on every checkpoint carries them, so a resume has them back."""
    start: int
    params: dict | None = None

    def take(self, params: dict, param_sh, dtype) -> None:
        import jax
        import jax.numpy as jnp
        # a copy (the train step donates the live buffers), sharded like the parameters
        copy = jax.jit(lambda p: jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), p),
                       out_shardings=param_sh)
        self.params = copy(params)


# ----------------------------------------------------------------------------------------------------------------
# 5. main
# ----------------------------------------------------------------------------------------------------------------

def maybe_init_distributed() -> None:
    """Multi-host: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (or a cluster JAX auto-detects,
    e.g. SLURM, when only JAX_COORDINATOR_ADDRESS or SLUICE_DISTRIBUTED=1 is set)."""
    import jax
    if os.environ.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLUICE_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def local_batch_rows(sharding, global_shape: tuple) -> slice:
    """The contiguous rows of axis 1 ([accum, micro_batch, ...]) that this process's devices hold."""
    idx = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [i[1].start or 0 for i in idx]
    stops = [global_shape[1] if i[1].stop is None else i[1].stop for i in idx]
    lo, hi = min(starts), max(stops)
    covered = set()
    for s, e in zip(starts, stops):
        covered.update(range(s, e))
    if covered != set(range(lo, hi)):
        raise RuntimeError("this process's batch rows are not contiguous; use a mesh whose data/fsdp axes follow "
                           "the process order (the default device order does)")
    return slice(lo, hi)


def to_global(batch: dict[str, np.ndarray], sharding, micro_batch: int) -> dict:
    import jax
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0], micro_batch) + v.shape[2:])
            for k, v in batch.items()}


def load_model(args: Args, config, param_sh, dtype_params):
    """(hf_config dict, params placed with param_sh, tokenizer, directory to copy tokenizer files from)."""
    import jax
    from model import processor as P
    from model.checkpoint import load_hf
    from model.qwen2_audio import init_params
    if os.path.isdir(args.model):
        tok = P.load_tokenizer(args.model)
        if config.audio_token_index != P.special_ids(tok).audio:  # the ids come from the checkpoint: agree
            raise InputError(f"{args.model}: config.json's audio_token_index {config.audio_token_index} is not the "
                             f"tokenizer's <|AUDIO|> id {P.special_ids(tok).audio}")
        hf_config, params = load_hf(args.model, dtype=dtype_params, shardings=param_sh)
        return hf_config, params, tok, args.model
    init = jax.jit(lambda rng: init_params(config, rng, dtype_params), out_shardings=param_sh)
    return config.to_hf_dict(), init(jax.random.PRNGKey(args.seed)), P.load_tokenizer(None), None


class Evaluator:
    """Epoch-end dev evaluation: the teacher-forced answer loss on the transcript rows, and greedy decoding scored as
    score.py scores it (intent accuracy: scenario and action both right; SLU-F1), on the transcript rows and on the
    recording rows (speech is what the paper scores). Decoding batches as infer.py does (its shape buckets, audio
    and text rows apart), so the numbers are those infer.py + score.py would print for these rows.

    Multi-host: every process runs it on the same rows (host inputs count as replicated; the params are the
    global sharded arrays), and results are gathered to every host, so all processes agree on the numbers."""

    def __init__(self, text_rows: list[dict], speech_rows: list[dict], tok, config, dtype, max_new_tokens: int,
                 source: str, batch: int = 8):
        import jax
        import infer
        self.text_rows, self.speech_rows, self.tok, self.config, self.dtype = text_rows, speech_rows, tok, config, dtype
        self.batch, self.max_new_tokens = batch, max_new_tokens
        # prompts and the decoding order as infer.py plans them; every recording's header was read here, up front
        self.items = {name: infer.plan_rows(rows, tok, use_audio=True, source=source)
                      for name, rows in (("text", text_rows), ("speech", speech_rows)) if rows}
        self.loss_fn = jax.jit(lambda p, mb: answer_loss(p, config, mb, dtype, "none"))

    def loss(self, params) -> float:
        from model.checkpoint import host_array
        from model import processor as P
        pad = P.special_ids(self.tok).pad
        loss_sum = n_tok = 0.0
        for start in range(0, len(self.text_rows), self.batch):
            examples = [make_example(r, self.tok) for r in self.text_rows[start:start + self.batch]]
            examples += [None] * (self.batch - len(examples))  # one shape for every chunk
            mb = collate(examples, P.seq_bucket(max(len(e.ids) for e in examples if e)), None, pad_id=pad)
            l, n = self.loss_fn(params, mb)
            loss_sum, n_tok = loss_sum + float(host_array(l)), n_tok + float(host_array(n))
        return loss_sum / max(n_tok, 1.0)

    def predictions(self, params, items: list[dict]) -> dict[str, dict]:
        """{row id: infer.py's output row} of greedy decoding."""
        import jax.numpy as jnp
        import infer
        from model.checkpoint import host_array
        from model.compilation import gc_paused
        from model import processor as P
        ids_of = P.special_ids(self.tok)
        search, static = infer.decoder(1, self.max_new_tokens, self.dtype, ids_of)  # greedy, as infer.py runs it
        preds = {}
        for chunk in infer.batches(items, self.batch):
            b = infer.make_batch(chunk, self.tok, self.batch, ids_of.pad)
            inputs = [None if b[key] is None else jnp.asarray(b[key])
                      for key in ("input_ids", "attention_mask", "input_features", "feature_lengths")]
            with gc_paused():
                out = search(params, self.config, *inputs, **static)
            tokens, lengths = host_array(out.tokens), host_array(out.lengths)
            for i, item in enumerate(chunk):
                generated = self.tok.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
                preds[item["row"]["id"]] = infer.output_row(item["row"], item["prompt"], generated)
        return preds

    def __call__(self, params) -> dict:
        from score import score_rows
        out = {}
        if self.text_rows:
            out["dev_loss"] = self.loss(params)
        for name, rows in (("text", self.text_rows), ("speech", self.speech_rows)):
            if rows:
                scores = score_rows(rows, self.predictions(params, self.items[name]))
                prefix = "dev_" if name == "text" else "dev_speech_"
                out.update({prefix + "intent_acc": scores["intent_acc"], prefix + "slu_f1": scores["slu_f1"],
                            prefix + "rows": len(rows)})
        return out

    def describe(self, row: dict) -> str:
        """One line of the epoch-end log."""
        parts = [f"dev loss {row['dev_loss']:.4f}"] if "dev_loss" in row else []
        for prefix, what in (("dev_", "transcripts"), ("dev_speech_", "recordings")):
            if prefix + "rows" in row:
                parts.append(f"{what}: intent accuracy {row[prefix + 'intent_acc']:.3f}, SLU-F1 "
                             f"{row[prefix + 'slu_f1']:.3f} ({row[prefix + 'rows']} rows)")
        return "; ".join(parts)


@dataclass
class RunMesh:
    """The device mesh and the shardings every step uses."""
    mesh: object
    shape: dict                  # {"data", "fsdp", "tensor"}
    micro_batch: int             # rows per micro-batch, over all devices
    grad_accum: int
    param_sh: dict               # parameter tree of NamedShardings
    batch_sh: object             # [grad_accum, micro_batch, ...] arrays: rows over data x fsdp
    replicated: object


def make_run_mesh(args: Args, plan_batch: tuple[int, int], config) -> RunMesh:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    from model.qwen2_audio import abstract_params
    from model.sharding import LOGICAL_AXIS_RULES, make_mesh, param_shardings
    data, fsdp, tensor = resolve_mesh_shape(args, jax.device_count())
    if data * fsdp * tensor < jax.device_count() and jax.process_count() > 1:
        raise InputError("with several processes the mesh must use every device")
    mesh = make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])
    return RunMesh(mesh, {"data": data, "fsdp": fsdp, "tensor": tensor}, args.per_device_batch * data * fsdp,
                plan_batch[1], param_shardings(mesh, abstract_params(config, jnp.float32)),
                NamedSharding(mesh, nn.logical_to_mesh_axes((None, "batch"), LOGICAL_AXIS_RULES)),
                NamedSharding(mesh, PartitionSpec()))


def phase_optimizer(args: Args, phase: Phase, m: RunMesh):
    """(AdamW, trainable shardings, frozen shardings, optimizer-state shardings) of one phase."""
    import jax
    import optax
    tx = make_optimizer(args, phase.schedule)
    train_sh, frozen_sh = split_params(m.param_sh, phase.frozen)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct((), "float32"), train_sh)  # structure only
    # Adam moments are sharded like their parameters; step counters are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract), train_sh,
                                   transform_non_params=lambda _: m.replicated)
    return tx, train_sh, frozen_sh, opt_sh


def result_settings(args: Args, plan: Plan, dtype: str) -> dict:
    """Every setting that changes what the run computes; a resumed run must have the same ones."""
    peak, last = resolve_lr(args)
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in RESUMABLE}
    import jax
    on_device = device_features(args, jax.default_backend())
    settings.update(model=f"sha256:{model_digest(args.model)}" if os.path.isdir(args.model) else args.model,
                    audio_features="device" if on_device else "host",
                    epochs=resolve_epochs(args), peak_lr=peak, last_epoch_peak_lr=last, compute_dtype=dtype,
                    global_batch=plan.global_batch, plan_fingerprint=plan.fingerprint())
    return json.loads(json.dumps(settings))  # tuples -> lists: the form the checkpoint stores


def setting_name(key: str) -> str:
    """A settings key as the user knows it: its flag, or what a derived setting stands for."""
    derived = {"compute_dtype": "compute dtype (--dtype on this backend)", "global_batch": "global batch",
               "plan_fingerprint": "data plan (the manifests' rows, scheme, seeds, epochs or batch)"}
    return derived.get(key, "--" + key.replace("_", "-"))


# Settings added after runs were made, at the value that computes what those runs computed: a run that did not
# record one had that value (so it still resumes and counts as finished).
LATER_SETTINGS = {"distill_weight": 0.0, "distill_teacher": "self", "distill_temperature": 1.0,
                  "subset_selection": "random", "gap_speech": [], "gap_reference": None, "audio_features": "host"}


def refuse_other_settings(what: str, old: dict, new: dict, model_dir: str) -> None:
    # an older train.py also recorded some of RESUMABLE (--dtype as written): they do not change the result
    recorded = {k: v for k, v in old.items() if k not in RESUMABLE}
    old = {**{k: v for k, v in LATER_SETTINGS.items() if k in new}, **recorded}
    if str(old.get("model")).startswith("/") and old["model"] == os.path.abspath(model_dir):
        # recorded by a train.py that named a model directory by its absolute path, not its contents
        print(f"train.py: note: {what} records its model by path ({old['model']}), not by contents; taken to be "
              f"that directory's model as it is now", file=sys.stderr)
        old["model"] = new["model"]
    diff = [f"{setting_name(k)} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]
    if diff:
        raise InputError(f"{what} was made with other settings: {'; '.join(diff)}. Rerun with the run's own "
                         f"settings (config.json) or use another --run-dir")


REMOVING = ".checkpoints.removing"  # the checkpoints of a finished run, while they are deleted


class RunDir:
    """RUN_DIR: checkpoints/ (orbax: parameters, optimizer state, and a record of the settings), config.json (the
    run's settings and resume history, written once the settings check passed), metrics.jsonl, hf/."""

    def __init__(self, path: Path, args: Args, is_main: bool):
        import orbax.checkpoint as ocp
        self.path, self.is_main = path, is_main
        self.ckpt = ocp.CheckpointManager(path / "checkpoints", options=ocp.CheckpointManagerOptions(
            max_to_keep=args.keep_checkpoints, enable_async_checkpointing=False))
        self.metrics = path / "metrics.jsonl"

    def latest(self) -> tuple[int, dict | None]:
        import orbax.checkpoint as ocp
        step = self.ckpt.latest_step()
        if step is None:
            return 0, None
        return step, self.ckpt.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def check_resume(self, step: int, meta: dict, settings: dict, args: Args) -> list[dict]:
        """Refuses a resume whose result-changing settings differ from the checkpoint's (naming each one);
        returns the run's history with this resume appended (the RESUMABLE flags it changed)."""
        if "settings" not in meta:
            raise InputError(f"{self.path}: its checkpoint (step {step}) was written by an older train.py that did "
                             f"not record its settings, so a resume cannot be checked; use another --run-dir")
        refuse_other_settings(f"{self.path}: its checkpoint (step {step})", meta["settings"], settings, args.model)
        now = json.loads(json.dumps(dataclasses.asdict(args)))
        changed = {k: [meta["args"].get(k), now[k]] for k in RESUMABLE if meta["args"].get(k) != now[k]}
        return meta.get("history", []) + [{"resumed_at_step": step, "changed": changed}]

    def finished_export(self) -> dict | None:
        """hf/training_run.json of a finished run whose checkpoints were removed (see --keep-optimizer-state)."""
        from model.checkpoint import TRAINING_RUN_FILE
        path = self.path / "hf" / TRAINING_RUN_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        if not record.get("finished"):
            return None
        if self.is_main:  # a kill during remove_checkpoints' rmtree left the renamed folder: finish removing it
            shutil.rmtree(self.path / REMOVING, ignore_errors=True)
        return record

    def remove_checkpoints(self) -> None:
        """Drop the optimizer checkpoints of a finished, exported run: renamed first, so a kill midway leaves no
        half checkpoint that a rerun would try to resume from (the rerun removes the rest: finished_export)."""
        self.ckpt.close()
        if self.is_main and (self.path / "checkpoints").exists():
            doomed = self.path / REMOVING
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(self.path / "checkpoints", doomed)
            shutil.rmtree(doomed)

    def save(self, step: int, state: dict, meta: dict) -> None:
        import orbax.checkpoint as ocp
        self.ckpt.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)
        self.ckpt.wait_until_finished()

    def restore(self, step: int, target: dict) -> dict:
        import orbax.checkpoint as ocp
        return self.ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state

    def trim_metrics(self, step: int) -> None:
        """Drop rows a killed run logged after its last checkpoint (they will be recomputed), and a torn last line
        (the row being written at the kill)."""
        if not self.is_main or not self.metrics.exists():
            return
        lines = self.metrics.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(lines):
                    raise InputError(f"{self.metrics}:{n}: not a JSON object; move the file away to resume")
                print(f"train.py: warning: {self.metrics}:{n}: dropped a torn last line (the run was killed while "
                      f"writing it)", file=sys.stderr)
        from model.manifest import atomic_write_text
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))

    def log(self, row: dict) -> None:
        if self.is_main:
            with open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def train(args: Args) -> dict:
    from model.config import resolve_model
    args = dataclasses.replace(args, model=resolve_model(args.model))
    check_model_choice(args)  # before anything is allocated
    maybe_init_distributed()
    import jax
    import jax.numpy as jnp
    from model.compilation import compilations, enable_persistent_cache
    from model.config import get_config
    from model.manifest import atomic_write_text
    from model.sharding import resolve_dtype

    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    run_dir = Path(args.run_dir or REPO / "runs" / args.scheme).absolute()
    dtype = resolve_dtype(args.dtype)
    enable_persistent_cache(args.compilation_cache)
    compiled_before = compilations()

    # --- the data plan, checked before any model work: manifests, batch, audio files ----------------------------
    config = get_config(args.model)
    manifests, batch, plan, long_ids = plan_run(args, log)
    phases = training_phases(args, plan)
    total_steps = plan.total_steps if args.max_steps is None else min(plan.total_steps, args.max_steps)

    # --- the run directory: refuse a resume with other settings before loading anything ---------------------------
    settings = result_settings(args, plan, dtype)
    run = RunDir(run_dir, args, is_main)
    start, meta = run.latest()
    history = run.check_resume(start, meta, settings, args) if meta else []
    finished = run.finished_export() if meta is None else None
    if finished is not None:  # done before, its checkpoints removed: nothing to train, nothing to reuse wrongly
        refuse_other_settings(f"{run_dir}: this finished run", finished["settings"], settings, args.model)
        log(f"{run_dir}: finished already ({finished['steps']} steps; hf/ holds its model); nothing to do")
        return {"scheme": args.scheme, "run_dir": str(run_dir), "steps": finished["steps"],
                "planned_steps": finished["planned_steps"], "finished": True, "already_finished": True, "losses": []}

    # --- mesh, model -----------------------------------------------------------------------------------------------
    m = make_run_mesh(args, batch, config)
    hf_config, params, tok, tokenizer_dir = load_model(args, config, m.param_sh, jnp.float32)
    teacher = FrozenTeacher(speech_start(plan)) if args.distill_weight and args.distill_teacher == "frozen" else None
    if meta:
        params, opt_leaves, teacher_params = restore_state(run, start, meta, params, phases, args, m, dtype)
        if teacher is not None:
            teacher.params = teacher_params
        log(f"resumed from {run_dir}/checkpoints step {start} ({meta['epochs_done']} epochs done)")
    else:
        opt_leaves = None
    n_params = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
    trainable, frozen = split_params(params, phases[-1].frozen)
    record = {"args": dataclasses.asdict(args), "settings": settings, "history": history, "compute_dtype": dtype,
              "mesh": m.shape, "devices": jax.device_count(), "processes": jax.process_count(),
              "micro_batch": m.micro_batch, "grad_accum": m.grad_accum, "global_batch": plan.global_batch,
              "total_steps": plan.total_steps, "plan_fingerprint": plan.fingerprint(),
              "plan": {k: v for k, v in plan.to_json().items() if k != "speech_subset"},
              "trainable_params": n_params(trainable), "frozen_params": n_params(frozen), "model_config": hf_config,
              "recordings_over_30s": long_ids}
    if is_main:
        atomic_write_text(run_dir / "config.json", json.dumps(record, indent=2, ensure_ascii=False, default=str))
    run.trim_metrics(start)

    evaluator = make_evaluator(args, tok, config, dtype)
    log(f"{args.scheme}: {plan.total_steps} steps over {len(plan.epochs)} epochs, global batch {plan.global_batch} "
        f"(micro-batch {m.micro_batch} x {m.grad_accum}), mesh "
        f"{' '.join(f'{axis}={size}' for axis, size in m.shape.items())}, "
        f"{n_params(trainable):,} trainable / {n_params(frozen):,} frozen params")

    # --- the loop, phase by phase ----------------------------------------------------------------------------------
    loader = StepLoader(plan, [{r["id"]: r for r in rows} for rows in manifests], tok, m.grad_accum, m.micro_batch,
                        local_batch_rows(m.batch_sh, (m.grad_accum, m.micro_batch)), distill=bool(args.distill_weight),
                        device_features=device_features(args, jax.default_backend()),
                        group_recordings=group_recordings(args, jax.default_backend()))
    context = dict(args=args, plan=plan, run=run, m=m, config=config, dtype=dtype, loader=loader,
                   evaluator=evaluator, settings=settings, history=history, log=log, teacher=teacher)
    t_start, ran, opt_size = time.time(), [], 0
    for k, phase in enumerate(phases):
        if phase.end <= start or phase.start >= total_steps:
            continue
        resume_leaves = opt_leaves if start > phase.start else None  # a resume inside this phase
        params, rows, opt_size = train_phase(k, phase, params, resume_leaves, max(start, phase.start),
                                             min(total_steps, phase.end), **context)
        ran += rows

    # --- export, summary -------------------------------------------------------------------------------------------
    done = total_steps == plan.total_steps
    export_dtype = args.export_dtype if args.export_dtype != "auto" else \
        hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if args.export:  # also when --max-steps stopped the run early (the record says so); a resume re-exports
        export(params, hf_config, tok, tokenizer_dir, run_dir / "hf", is_main, export_dtype, {
            "finished": done, "steps": total_steps, "planned_steps": plan.total_steps, "settings": settings,
            "history": history, "export_dtype": export_dtype})
        if done and not args.keep_optimizer_state:
            run.remove_checkpoints()
    summary = {"scheme": args.scheme, "run_dir": str(run_dir), "steps": total_steps, "planned_steps": plan.total_steps,
               "resumed_from": start, "seconds": round(time.time() - t_start, 1), "opt_state_size": opt_size,
               "recordings_over_30s": len(long_ids),
               **summarize_steps(ran), **(compilations() - compiled_before).to_json(),
               "hf_export": str(run_dir / "hf") if args.export else None, "finished": done,
               "losses": [h["loss"] for h in ran]}
    log("summary: " + json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    summary["params"] = params  # for callers in Python (tests, notebooks); not printed
    summary["teacher"] = None if teacher is None else teacher.params
    return summary


def plan_run(args: Args, log) -> tuple[list[list[dict]], tuple[int, int], Plan, list[str]]:
    """(manifests, (global batch, accumulation), plan, ids of the recordings cut to 30 s), with every recording the
    plan uses checked."""
    import jax
    data, fsdp, _ = resolve_mesh_shape(args, jax.device_count())
    sources, manifests = load_sources(args)
    batch = resolve_batch(args, data, fsdp)
    plan = build_plan(args, sources, manifests, batch[0])
    long_ids = check_audio(plan, sources, manifests)
    if long_ids:
        log(f"train.py: note: {len(long_ids)} of the recordings are longer than 30 s and are cut to their first 30 s, "
            f"as Qwen2-Audio's processor does (ids in config.json, recordings_over_30s)")
    return manifests, batch, plan, long_ids


def make_evaluator(args: Args, tok, config, dtype: str):
    """The epoch-end evaluation on the first --eval-max-rows dev transcripts, or None. Every process evaluates
    the same rows (see Evaluator); process 0 logs."""
    import jax.numpy as jnp
    from model.answer import MAX_NEW_TOKENS
    from model.manifest import read_manifest
    if not args.dev_manifest or args.dev_manifest.lower() == "none" or args.eval_max_rows <= 0:
        return None
    path = find_path(args.dev_manifest)
    rows = read_manifest(path)
    text = [r for r in rows if r["audio"] is None][:args.eval_max_rows]
    speech = [r for r in rows if r["audio"] is not None][:args.eval_max_rows]
    if not text and not speech:
        return None
    return Evaluator(text, speech, tok, config, jnp.dtype(dtype), args.eval_max_new_tokens or MAX_NEW_TOKENS, path)


def summarize_steps(ran: list[dict]) -> dict:
    """What the summary line says about the steps this invocation ran (metrics.jsonl rows)."""
    return {"first_loss": ran[0]["loss"] if ran else None, "last_loss": ran[-1]["loss"] if ran else None,
            "tokens_per_s": round(sum(h["tokens"] for h in ran) / max(sum(h["seconds"] for h in ran), 1e-9), 1),
            "n_speech_seen": sum(h["n_speech"] for h in ran), "n_text_seen": sum(h["n_text"] for h in ran),
            "evals": [{k: v for k, v in h.items() if k == "epoch" or k.startswith("dev_")} for h in ran
                      if any(k.startswith("dev_") for k in h)],
            # the step shapes it compiled, and the share of padded token positions in its steps
            "step_shapes": sorted({tuple(h["shape"]) for h in ran}, key=lambda s: (s[0], s[1] or 0)),
            "padding": padding_share(ran)}


def restore_state(run: RunDir, start: int, meta: dict, params: dict, phases: list[Phase], args: Args, m: RunMesh,
                  dtype: str):
    """(parameters, optimizer-state leaves, the frozen teacher's parameters or None) of checkpoint `start`. The
    optimizer state has the shape of the phase it was saved in; a checkpoint at a phase boundary holds the finished
    phase's, which the next phase drops."""
    import jax
    tx, train_sh, _, opt_sh = phase_optimizer(args, phases[meta["phase"]], m)
    abstract = lambda tree, sh, dt=None: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, dt or x.dtype, sharding=s), tree, sh)
    trainable, _ = split_params(params, phases[meta["phase"]].frozen)
    opt_shape = jax.eval_shape(tx.init, trainable)
    target = {"params": abstract(params, m.param_sh), "opt_state": jax.tree.leaves(abstract(opt_shape, opt_sh))}
    if meta.get("teacher"):
        target["teacher"] = abstract(params, m.param_sh, dtype)
    state = run.restore(start, target)
    return state["params"], state["opt_state"], state.get("teacher")


def train_phase(k: int, phase: Phase, params: dict, opt_leaves: list | None, first: int, stop: int, *, args: Args,
                plan: Plan, run: RunDir, m: RunMesh, config, dtype: str, loader: StepLoader, evaluator, settings: dict,
                history: list, log, teacher: FrozenTeacher | None) -> tuple[dict, list[dict], int]:
    """Optimizer steps [first, stop) of phase k -> (parameters, metrics rows, optimizer-state size)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm
    from model.compilation import gc_paused
    from model.sharding import LOGICAL_AXIS_RULES
    tx, train_sh, frozen_sh, opt_sh = phase_optimizer(args, phase, m)
    trainable, frozen = split_params(params, phase.frozen)
    if opt_leaves is None:
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    else:
        opt_state = jax.tree.unflatten(jax.tree.structure(jax.eval_shape(tx.init, trainable)), opt_leaves)
    step_impl = make_train_step(config, tx, jnp.dtype(dtype), args.remat, make_distill(args),
                                loader.group_recordings)  # the skip pays where the loader grouped the rows
    # two jitted forms: without a teacher tree, and (--distill-teacher frozen, from teacher.start) with one
    step_fns = [jax.jit(step_impl, in_shardings=(train_sh, frozen_sh, opt_sh, m.batch_sh) + extra,
                        out_shardings=(train_sh, opt_sh, m.replicated), donate_argnums=(0, 2))
                for extra in ((), (m.param_sh,))]

    def save(step: int, epochs_done: int) -> None:
        state = {"params": merge_params(frozen, trainable), "opt_state": jax.tree.leaves(opt_state)}
        if teacher is not None and teacher.params is not None:
            state["teacher"] = teacher.params
        run.save(step, state, {"step": step, "epochs_done": epochs_done, "phase": k, "settings": settings,
                               "teacher": "teacher" in state,
                               "args": json.loads(json.dumps(dataclasses.asdict(args))), "history": history,
                               "plan_fingerprint": plan.fingerprint(), "seed": args.seed, "subset_seed": args.subset_seed,
                               "data_position": list(plan.position(step)) if step < plan.total_steps
                               else [len(plan.epochs), 0]})

    rows = []
    bar = tqdm(total=stop - first, disable=not (run.is_main and args.progress), dynamic_ncols=True)
    # Load (decode audio, tokenize) step s+1 on a thread while step s runs. Single process only: with several, the
    # loader's length agreement is a collective and stays on the main thread.
    prefetch = ThreadPoolExecutor(1) if jax.process_count() == 1 else None
    pending = None
    with jax.set_mesh(m.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        for step in range(first, stop):
            epoch, in_epoch = plan.position(step)
            t0 = time.time()
            host_batch = pending.result() if pending is not None else loader(step)
            pending = prefetch.submit(loader, step + 1) if prefetch and step + 1 < stop else None
            batch = to_global(host_batch, m.batch_sh, m.micro_batch)
            if teacher is not None and teacher.params is None and step >= teacher.start:
                teacher.take(merge_params(frozen, trainable), m.param_sh, jnp.dtype(dtype))
            extra = () if teacher is None or teacher.params is None else (teacher.params,)
            with gc_paused():  # compiling the step (its first call) without Python's collections
                trainable, opt_state, metrics = step_fns[len(extra)](trainable, frozen, opt_state, batch, *extra)
            metrics = {key: float(v) for key, v in jax.device_get(metrics).items()}
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                if pending is not None:
                    pending.cancel()
                bar.close()
                last = run.ckpt.latest_step()
                raise FloatingPointError(
                    f"non-finite loss {metrics['loss']} (grad norm {metrics['grad_norm']}) at step {step + 1}, epoch "
                    f"{epoch + 1}; stopped without saving. Last good checkpoint: "
                    f"{'none' if last is None else run.path / 'checkpoints' / str(last)}")
            n_text, n_speech = loader.counts(step)
            seconds = time.time() - t0
            seq_len = host_batch["input_ids"].shape[-1]
            frames = step_frames(host_batch)
            positions = m.grad_accum * m.micro_batch * seq_len
            row = {"step": step + 1, "epoch": epoch + 1, "phase": k + 1, "loss": metrics["loss"],
                   "lr": float(phase.schedule(step - phase.start)), "n_text": n_text, "n_speech": n_speech,
                   "tokens": int(metrics["tokens"]), "seconds": round(seconds, 4), "grad_norm": metrics["grad_norm"],
                   "answer_tokens": int(metrics["answer_tokens"]), "shape": [seq_len, frames],
                   "padding": round(1 - metrics["tokens"] / positions, 4)}
            if "distill_kl" in metrics:
                row["distill_kl"] = metrics["distill_kl"]
            epoch_end = in_epoch == plan.epochs[epoch]["steps"] - 1
            if epoch_end and evaluator is not None:
                row.update(evaluator(merge_params(frozen, trainable)))
                log(f"\nepoch {epoch + 1}: {evaluator.describe(row)}")
            rows.append(row)
            run.log(row)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{row['lr']:.2e}",
                            tok_s=f"{metrics['tokens'] / seconds:.0f}")
            bar.update(1)
            if epoch_end or (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == stop:
                save(step + 1, epoch + 1 if epoch_end else epoch)
    bar.close()
    return merge_params(frozen, trainable), rows, int(sum(x.size for x in jax.tree.leaves(opt_state)))


def padding_share(rows: list[dict]) -> float | None:
    """The share of padded token positions over the steps of `rows` (every step has the same number of rows, so
    a step's positions are proportional to its sequence length)."""
    positions = sum(r["shape"][0] for r in rows)
    return round(sum(r["padding"] * r["shape"][0] for r in rows) / positions, 4) if positions else None


def export(params: dict, hf_config: dict, tok, tokenizer_dir: str | None, hf_dir: Path, is_main: bool, dtype: str,
           training_run: dict) -> None:
    """RUN_DIR/hf: the model in Hugging Face format, with the tokenizer and training_run.json (finished or stopped
    by --max-steps, and the settings), all renamed into place together. Every process gathers leaf by leaf
    (multi-host); process 0 writes."""
    from model.checkpoint import TRAINING_RUN_FILE, save_hf
    with tempfile.TemporaryDirectory() as tmp:
        extra = tokenizer_dir
        if extra is None:  # a preset: write the tokenizer we trained with beside the weights
            tok.save(str(Path(tmp) / "tokenizer.json"))
            extra = tmp
        save_hf(params, hf_config, hf_dir, extra_files_from=extra, write=is_main, dtype=dtype,
                extra_json={TRAINING_RUN_FILE: training_run})



# ----------------------------------------------------------------------------------------------------------------
# 6. --aot-topology: the exact train step compiled for a TPU slice, on this machine
# ----------------------------------------------------------------------------------------------------------------

def aot_step_shape(args: Args, plan: Plan, manifests: list[list[dict]],
                   tok) -> tuple[int, int | None, int, int]:
    """(sequence length, audio frames or None, answer length, distillation teacher length) of the run's largest
    step: its longest row (prompt + answer tokens as make_example builds them; durations from the audio headers, or
    --aot-audio-seconds for every clip), or the stated --aot-seq-len, in the step-shape buckets; the teacher's, from
    the recordings' transcripts."""
    from model import processor as P
    from model.answer import render_answer
    from model.processor import round_up
    by_id = [{r["id"]: r for r in rows} for rows in manifests]
    used = [by_id[m][i] for m, i in sorted({k for keys in plan.epoch_keys for k in keys})]
    audio_prompt = len(P.encode_prompt(tok, P.build_prompt(None, audio=True), n_audio_tokens=1)) - 1
    tokens, frames, longest_answer, teacher = 1, None, 1, 1
    for r in used:
        answer = len(encode_text(tok, render_answer(r["scenario"], r["action"], r["entities"]))) + 1  # + <|im_end|>
        longest_answer = max(longest_answer, answer)
        as_text = len(P.encode_prompt(tok, P.build_prompt(r["text"], audio=False))) + answer
        if r["audio"] is None:
            tokens = max(tokens, as_text)
            continue
        teacher = max(teacher, as_text)
        seconds = args.aot_audio_seconds if args.aot_audio_seconds is not None else P.check_audio_file(r["audio"])[1]
        n = P.num_frames(-(-int(round(seconds * P.SAMPLE_RATE * 1e6)) // 1_000_000))  # ceil, as load_audio's length
        tokens = max(tokens, audio_prompt + int(P.num_audio_tokens(n)) + answer)
        frames = max(frames or 0, P.bucket_frames(n))
    if args.aot_seq_len is not None:
        if args.aot_seq_len < tokens:
            raise InputError(f"--aot-seq-len {args.aot_seq_len}: the run's longest row has {tokens} tokens")
        tokens = args.aot_seq_len
    seq_len, n_frames = step_shape(tokens, frames)
    return seq_len, n_frames, min(round_up(longest_answer, 16), seq_len), step_shape(teacher, None)[0]


def aot_train(args: Args) -> int:
    """Compile the step this command would run (scheme, mesh flags, batch, remat, dtype, the largest step shape)
    for --aot-topology with abstract parameters, optimizer state and batch; print model/aot.py's report."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    import flax.linen as nn
    from model import aot
    from model import processor as P
    from model.config import get_config
    from model.qwen2_audio import abstract_params
    from model.sharding import LOGICAL_AXIS_RULES, make_mesh, param_shardings
    devices, topology = aot.topology_devices(args.aot_topology)
    config = get_config(args.model)
    data, fsdp, tensor = resolve_mesh_shape(args, len(devices))
    mesh = make_mesh(data, fsdp, tensor, devices=devices[:data * fsdp * tensor])
    global_batch, accum = resolve_batch(args, data, fsdp)
    sources, manifests = load_sources(args)
    if args.subset_selection == "gap":
        # The ranking needs the reference model; compile instead for every recording the subset could take (the
        # whole of each manifest: an upper bound on the step's shape).
        sources = [Source(s.path, 1.0 if s.speech_fraction > 0 else 0.0) for s in sources]
        args = dataclasses.replace(args, subset_selection="random")
    plan = build_plan(args, sources, manifests, global_batch)
    tok = P.load_tokenizer(args.model if os.path.isdir(args.model) else None)
    seq_len, frames, answer_len, teacher_len = aot_step_shape(args, plan, manifests, tok)
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype  # auto on an accelerator

    boxed = abstract_params(config, jnp.float32)
    param_sh = param_shardings(mesh, boxed)
    params = aot.abstract_like(nn.unbox(boxed), param_sh)
    phase = training_phases(args, plan)[-1]  # the phase with the most trainable parameters
    m = RunMesh(mesh, {"data": data, "fsdp": fsdp, "tensor": tensor}, args.per_device_batch * data * fsdp, accum,
                param_sh, NamedSharding(mesh, nn.logical_to_mesh_axes((None, "batch"), LOGICAL_AXIS_RULES)),
                NamedSharding(mesh, PartitionSpec()))
    tx, train_sh, frozen_sh, opt_sh = phase_optimizer(args, phase, m)
    trainable, frozen = split_params(params, phase.frozen)
    opt_state = aot.abstract_like(jax.eval_shape(tx.init, trainable), opt_sh)
    rows = (accum, m.micro_batch)
    spec = {"input_ids": (seq_len, jnp.int32), "attention_mask": (seq_len, jnp.int32), "targets": (seq_len, jnp.int32),
            "loss_mask": (seq_len, jnp.float32), "answer_index": (answer_len, jnp.int32)}
    batch = {k: jax.ShapeDtypeStruct(rows + (n,), t, sharding=m.batch_sh) for k, (n, t) in spec.items()}
    if frames is not None and device_features(args, "tpu"):  # waveforms in, the log-mel computed in the step
        batch["input_waveforms"] = jax.ShapeDtypeStruct(rows + (frames * P.HOP_LENGTH,), jnp.float32,
                                                        sharding=m.batch_sh)
        batch["n_samples"] = jax.ShapeDtypeStruct(rows, jnp.int32, sharding=m.batch_sh)
    elif frames is not None:
        batch["input_features"] = jax.ShapeDtypeStruct(rows + (config.audio.num_mel_bins, frames), jnp.float32,
                                                       sharding=m.batch_sh)
    if frames is not None:
        batch["feature_lengths"] = jax.ShapeDtypeStruct(rows, jnp.int32, sharding=m.batch_sh)
    teacher = {}  # distillation: the recordings' transcripts and, for 'frozen', the teacher's copy
    if args.distill_weight and frames is not None:
        spec = {"teacher_input_ids": (teacher_len, jnp.int32), "teacher_attention_mask": (teacher_len, jnp.int32),
                "teacher_answer_index": (answer_len, jnp.int32), "distill_mask": (answer_len, jnp.float32)}
        batch.update({k: jax.ShapeDtypeStruct(rows + (n,), t, sharding=m.batch_sh) for k, (n, t) in spec.items()})
        if args.distill_teacher == "frozen":
            teacher["teacher"] = aot.abstract_like(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                                                                nn.unbox(boxed)), param_sh)
    step_fn = jax.jit(make_train_step(config, tx, jnp.dtype(dtype), args.remat, make_distill(args),
                                      group_recordings(args, "tpu")),
                      in_shardings=(train_sh, frozen_sh, opt_sh, m.batch_sh) + ((param_sh,) if teacher else ()),
                      out_shardings=(train_sh, opt_sh, m.replicated), donate_argnums=(0, 2))
    workload = {"model": args.model, "scheme": args.scheme, "global_batch": global_batch, "grad_accum": accum,
                "rows_per_chip": args.per_device_batch, "seq_len": seq_len, "audio_frames": frames,
                "answer_len": answer_len, "remat": args.remat, "dtype": dtype}
    report = aot.compile_report(step_fn, {"trainable": trainable, "frozen": frozen, "opt_state": opt_state,
                                          "batch": batch, **teacher}, topology, mesh, workload=workload)
    shards = fsdp * tensor
    remedies = {
        "temporaries": "activations grow with rows per chip x sequence length: --remat full (or dots), a lower "
                       "--per-device-batch (the accumulation makes up the global batch)",
        "opt_state": f"Adam's 2 moments per trainable parameter, 1/{shards} of them per chip: raise --fsdp",
        "trainable": f"fp32 master weights, 1/{shards} per chip: raise --fsdp",
        "frozen": f"1/{shards} per chip: raise --fsdp",
        "teacher": f"--distill-teacher frozen's copy of the model, 1/{shards} per chip: --distill-teacher self"}
    return aot.emit(report, remedies, "train.py")


def check_flags(args: Args) -> None:
    """Flag values that make no sense together, refused before anything is read."""
    if args.distill_weight < 0 or args.distill_temperature <= 0:
        raise InputError(f"--distill-weight must be >= 0 and --distill-temperature > 0, got {args.distill_weight}, "
                         f"{args.distill_temperature}")
    if args.distill_weight and args.scheme == "text-only":
        raise InputError("--distill-weight: text-only trains on no recordings, so there is nothing to distill on; use "
                         "--scheme direct or curriculum")


def main(argv: list[str] | None = None) -> dict | int:
    args = parse_args(argv)
    check_flags(args)
    from model.config import resolve_model
    args = dataclasses.replace(args, model=resolve_model(args.model))  # `mini`: the shipped miniature's directory
    if args.plan_only:
        return print_plan(args)
    if args.aot_topology is not None:
        return aot_train(args)
    return train(args)


if __name__ == "__main__":
    from model.aot import AotError
    from model.config import ConfigError
    from model.manifest import ManifestError
    try:
        result = main()
        if isinstance(result, int):  # --aot-topology: 0 fits, 3 does not
            sys.exit(result)
    except (InputError, ManifestError, ConfigError, AotError, FileNotFoundError) as e:  # bad input: one clear line
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # non-finite loss: the message says where the last good checkpoint is
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(3)
