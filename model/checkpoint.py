"""Hugging Face checkpoint directory <-> Flax parameters for Qwen2-Audio.

One table (`checkpoint_layout`) says where every tensor of the HF checkpoint lives in the Flax params tree and
how its axes are laid out; `load_hf` and `save_hf` both walk it, so the two directions cannot drift apart.

Tensor names. transformers 5.23 holds the model as `model.audio_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head.weight`, but `save_pretrained` converts them back to the names of the hub
checkpoint Qwen/Qwen2-Audio-7B-Instruct (its `conversion_mapping.py` entry "qwen2_audio"):
    audio_tower.*   multi_modal_projector.*   language_model.model.*   language_model.lm_head.weight
So the hub names are the on-disk format: `save_hf` writes them, and `load_hf` accepts them as well as the
in-memory `model.*` names (some tools save a plain `state_dict()`).

Axis layouts. A Flax Dense kernel is [in, out], the transpose of torch's Linear weight [out, in]; a Flax Conv
kernel is [width, in, out], torch's Conv1d weight is [out, in, width]. Per-layer tensors are stacked on a
leading layer axis so the model can `scan` over layers.

Memory. A 7B checkpoint is ~16 GB in bf16, so neither direction holds the model twice on the host: loading
preallocates one stacked leaf, fills it layer by layer from memory-mapped safetensors, moves it to the devices
and drops the host copy before the next leaf; saving gathers one leaf at a time and writes a shard as soon as
it is full.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{:05d}-of-{:05d}.safetensors"  # HF's shard names, 1-based

# Files of a model directory that are not weights; save_hf copies those present in `extra_files_from`.
EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
    "chat_template.json", "chat_template.jinja", "generation_config.json",
)

# In-memory (transformers 5.x state_dict) prefix -> on-disk (hub) prefix. Order matters: the longest first.
_INMEMORY_TO_DISK = (
    ("model.language_model.", "language_model.model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of the Flax params tree and the HF tensor(s) it is made of."""
    path: tuple[str, ...]   # keys into the nested params dict
    hf_name: str            # on-disk name; contains "{i}" (the layer index) when the leaf is stacked
    kind: str               # "copy" (same axes), "dense" ([out,in] -> [in,out]) or "conv" ([out,in,w] -> [w,in,out])
    shape: tuple[int, ...]  # Flax shape of one layer's slice (of the whole leaf when not stacked)
    layers: int = 0         # > 0: the leaf is [layers, *shape], one HF tensor per layer

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return (self.layers, *self.shape) if self.layers else self.shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.kind in ("dense", "conv") else self.shape

    def hf_names(self) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(self.layers)] if self.layers else [self.hf_name]


def _to_flax(kind: str, t: np.ndarray) -> np.ndarray:
    # Both dense [out,in] and conv [out,in,w] reverse their axes; .T is a view, the copy happens on assignment.
    return t.T if kind in ("dense", "conv") else t


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T) if kind in ("dense", "conv") else np.ascontiguousarray(x)


def _dims(hf_config: dict) -> dict[str, int]:
    """The sizes the layout needs, with transformers' own defaults for fields a config.json leaves out
    (the hub config of Qwen2-Audio-7B-Instruct omits several of them)."""
    from transformers import Qwen2AudioConfig  # config classes only: no torch needed

    try:
        cfg = Qwen2AudioConfig(**copy.deepcopy(hf_config))  # it fills in sub-dicts; keep the caller's intact
        a, t = cfg.audio_config, cfg.text_config
        heads = t.num_attention_heads
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
        return dict(
            mels=a.num_mel_bins, d=a.d_model, ffn=a.encoder_ffn_dim, audio_layers=a.encoder_layers,
            positions=a.max_source_positions, H=t.hidden_size, I=t.intermediate_size,
            text_layers=t.num_hidden_layers, q=heads * head_dim, kv=t.num_key_value_heads * head_dim,
            V=t.vocab_size,
        )
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"config is not a Qwen2-Audio config.json ({type(e).__name__}: {e})") from e


def checkpoint_layout(hf_config: dict) -> list[Leaf]:
    """Every leaf of the Flax params tree, in the order load_hf builds and save_hf writes them."""
    n = _dims(hf_config)
    d, H = n["d"], n["H"]
    audio_layer = [  # (path under layers/, HF name under layers.{i}., kind, Flax shape)
        ("self_attn_layer_norm/scale", "self_attn_layer_norm.weight", "copy", (d,)),
        ("self_attn_layer_norm/bias", "self_attn_layer_norm.bias", "copy", (d,)),
        ("self_attn/q_proj/kernel", "self_attn.q_proj.weight", "dense", (d, d)),
        ("self_attn/q_proj/bias", "self_attn.q_proj.bias", "copy", (d,)),
        ("self_attn/k_proj/kernel", "self_attn.k_proj.weight", "dense", (d, d)),  # Whisper: no k bias
        ("self_attn/v_proj/kernel", "self_attn.v_proj.weight", "dense", (d, d)),
        ("self_attn/v_proj/bias", "self_attn.v_proj.bias", "copy", (d,)),
        ("self_attn/out_proj/kernel", "self_attn.out_proj.weight", "dense", (d, d)),
        ("self_attn/out_proj/bias", "self_attn.out_proj.bias", "copy", (d,)),
        ("final_layer_norm/scale", "final_layer_norm.weight", "copy", (d,)),
        ("final_layer_norm/bias", "final_layer_norm.bias", "copy", (d,)),
        ("fc1/kernel", "fc1.weight", "dense", (d, n["ffn"])),
        ("fc1/bias", "fc1.bias", "copy", (n["ffn"],)),
        ("fc2/kernel", "fc2.weight", "dense", (n["ffn"], d)),
        ("fc2/bias", "fc2.bias", "copy", (d,)),
    ]
    text_layer = [
        ("input_layernorm/scale", "input_layernorm.weight", "copy", (H,)),
        ("self_attn/q_proj/kernel", "self_attn.q_proj.weight", "dense", (H, n["q"])),
        ("self_attn/q_proj/bias", "self_attn.q_proj.bias", "copy", (n["q"],)),
        ("self_attn/k_proj/kernel", "self_attn.k_proj.weight", "dense", (H, n["kv"])),
        ("self_attn/k_proj/bias", "self_attn.k_proj.bias", "copy", (n["kv"],)),
        ("self_attn/v_proj/kernel", "self_attn.v_proj.weight", "dense", (H, n["kv"])),
        ("self_attn/v_proj/bias", "self_attn.v_proj.bias", "copy", (n["kv"],)),
        ("self_attn/o_proj/kernel", "self_attn.o_proj.weight", "dense", (n["q"], H)),  # Qwen2: no o bias
        ("post_attention_layernorm/scale", "post_attention_layernorm.weight", "copy", (H,)),
        ("mlp/gate_proj/kernel", "mlp.gate_proj.weight", "dense", (H, n["I"])),
        ("mlp/up_proj/kernel", "mlp.up_proj.weight", "dense", (H, n["I"])),
        ("mlp/down_proj/kernel", "mlp.down_proj.weight", "dense", (n["I"], H)),
    ]

    def leaf(path: str, hf_name: str, kind: str, shape: tuple[int, ...], layers: int = 0) -> Leaf:
        return Leaf(tuple(path.split("/")), hf_name, kind, shape, layers)

    return [
        leaf("audio_tower/conv1/kernel", "audio_tower.conv1.weight", "conv", (3, n["mels"], d)),
        leaf("audio_tower/conv1/bias", "audio_tower.conv1.bias", "copy", (d,)),
        leaf("audio_tower/conv2/kernel", "audio_tower.conv2.weight", "conv", (3, d, d)),
        leaf("audio_tower/conv2/bias", "audio_tower.conv2.bias", "copy", (d,)),
        leaf("audio_tower/embed_positions/embedding", "audio_tower.embed_positions.weight", "copy",
             (n["positions"], d)),
        *[leaf(f"audio_tower/layers/{p}", f"audio_tower.layers.{{i}}.{h}", k, s, n["audio_layers"])
          for p, h, k, s in audio_layer],
        leaf("audio_tower/layer_norm/scale", "audio_tower.layer_norm.weight", "copy", (d,)),
        leaf("audio_tower/layer_norm/bias", "audio_tower.layer_norm.bias", "copy", (d,)),
        leaf("multi_modal_projector/linear/kernel", "multi_modal_projector.linear.weight", "dense", (d, H)),
        leaf("multi_modal_projector/linear/bias", "multi_modal_projector.linear.bias", "copy", (H,)),
        leaf("language_model/embed_tokens/embedding", "language_model.model.embed_tokens.weight", "copy",
             (n["V"], H)),
        *[leaf(f"language_model/layers/{p}", f"language_model.model.layers.{{i}}.{h}", k, s, n["text_layers"])
          for p, h, k, s in text_layer],
        leaf("language_model/norm/scale", "language_model.model.norm.weight", "copy", (H,)),
        # Qwen2-Audio never ties lm_head to embed_tokens (transformers 5.23 saves both even when
        # text_config.tie_word_embeddings is true), so lm_head is always a tensor of its own.
        leaf("lm_head/kernel", "language_model.lm_head.weight", "dense", (H, n["V"])),
    ]


def disk_name(name: str) -> str:
    """Any accepted tensor name -> the on-disk (hub) name; unknown prefixes pass through unchanged."""
    for inmemory, disk in _INMEMORY_TO_DISK:
        if name.startswith(inmemory):
            return disk + name[len(inmemory):]
    return name


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (expected JSON with a 'weight_map'): {e}") from e
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE} (only safetensors is read)")


def _subtree(tree: Any, path: tuple[str, ...], what: str) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise KeyError(f"{what} has no entry {'/'.join(path)}")
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf(model_dir: str | os.PathLike, dtype: Any = None, shardings: Any = None) -> tuple[dict, dict]:
    """Read a Hugging Face Qwen2-Audio directory into (config.json as a dict, Flax params tree).

    dtype: cast every leaf to it (None keeps the stored dtype, e.g. bf16 stays bf16).
    shardings: a tree of jax.sharding.Sharding matching the params tree; each leaf is placed with it as soon
    as it is built. Without it, leaves go to the default device.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face model directory needs a config.json")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON: {e}") from e
    layout = checkpoint_layout(hf_config)
    target_dtype = None if dtype is None else np.dtype(dtype)

    with contextlib.ExitStack() as stack:
        # Open every file once (memory-mapped) and index the tensors it holds under their on-disk names.
        where: dict[str, tuple[Any, str, Path]] = {}  # disk name -> (handle, name as stored, file)
        for path in _weight_files(model_dir):
            handle = stack.enter_context(safe_open(str(path), framework="numpy"))
            for stored in handle.keys():
                name = disk_name(stored)
                if name in where:
                    raise ValueError(f"tensor {name} appears twice: as {where[name][1]} in {where[name][2]} "
                                     f"and as {stored} in {path}")
                where[name] = (handle, stored, path)
        expected = {name for leaf in layout for name in leaf.hf_names()}
        unexpected = sorted(set(where) - expected)
        if unexpected:
            raise ValueError(f"{model_dir}: {len(unexpected)} unexpected tensor(s) for this config, e.g. "
                             + ", ".join(f"{n} (in {where[n][2].name})" for n in unexpected[:5]))
        missing = sorted(expected - set(where))
        if missing:
            files = sorted({p.name for _, _, p in where.values()})
            raise KeyError(f"{model_dir}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                           f"(not in {files})")

        params: dict = {}
        for leaf in layout:
            host = None
            for i, name in enumerate(leaf.hf_names()):
                handle, stored, path = where[name]
                found = tuple(handle.get_slice(stored).get_shape())
                if found != leaf.hf_shape:
                    raise ValueError(f"{path.name}: tensor {stored} has shape {list(found)}, expected "
                                     f"{list(leaf.hf_shape)} for config.json")
                tensor = _to_flax(leaf.kind, handle.get_tensor(stored))
                if host is None:  # allocate once, in the stored dtype unless a cast was asked for
                    host = np.empty(leaf.flax_shape, tensor.dtype if target_dtype is None else target_dtype)
                if leaf.layers:
                    host[i] = tensor
                else:
                    host[...] = tensor
            sharding = None if shardings is None else _subtree(shardings, leaf.path, "shardings")
            _set(params, leaf.path, jax.device_put(host, sharding))
            del host  # the device copy is the only one from here on
    return hf_config, params


def _split_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in write order, as huggingface_hub does: start a new shard when the next tensor would
    overflow the current one; a tensor larger than the limit gets a shard of its own. Unlike huggingface_hub
    (which sets such a tensor aside and keeps filling the open shard) every shard here is a contiguous run,
    so each file can be written and dropped before the next one is started."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if current and current_size + size > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _write_json(path: Path, obj: Any) -> None:
    # HF writes its JSON files like this (sorted keys, 2-space indent, trailing newline).
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def host_array(x) -> np.ndarray:
    """The whole of one array as a host array. An array sharded over several processes is all-gathered: that
    is a collective, so every process must call this for the same arrays in the same order."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf(params: dict, hf_config: dict, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
            extra_files_from: str | os.PathLike | None = None, write: bool = True) -> Path:
    """Write params as a Hugging Face directory that transformers' from_pretrained loads.

    Tensors keep the dtype of their leaf. The directory is built under a temporary name beside out_dir and
    renamed into place only when complete; an existing out_dir is replaced at that point, never before.

    Multi-host: every process calls this with its (globally sharded) params. Tensors are gathered one at a
    time (one layer of a stacked leaf), so a host holds one shard file's worth (5 GB by default) plus one
    tensor, never the whole model. Only the process with `write=True` touches the disk; the others just take
    part in the gathers.
    """
    out_dir = Path(out_dir).absolute()
    layout = checkpoint_layout(hf_config)
    # Plan the shards from shapes and dtypes alone, so nothing is gathered before it is written.
    plan: list[tuple[str, Leaf, int]] = []  # (disk name, leaf, layer index or -1)
    sizes: list[tuple[str, int]] = []
    total_params = 0
    for leaf in layout:
        x = _subtree(params, leaf.path, "params")
        if tuple(x.shape) != leaf.flax_shape:
            raise ValueError(f"params {'/'.join(leaf.path)} has shape {list(x.shape)}, expected "
                             f"{list(leaf.flax_shape)} for the config")
        numel = int(np.prod(leaf.shape))
        for i, name in enumerate(leaf.hf_names()):
            plan.append((name, leaf, i if leaf.layers else -1))
            sizes.append((name, numel * np.dtype(x.dtype).itemsize))
            total_params += numel
    def host_tensor(leaf: Leaf, layer: int) -> np.ndarray:  # one layer of a stacked leaf at a time
        x = _subtree(params, leaf.path, "params")
        return host_array(x[layer] if layer >= 0 else x)

    if not write:
        for _, leaf, layer in plan:  # the writer's gathers, in the writer's order
            host_tensor(leaf, layer)
        return out_dir
    shards = _split_shards(sizes, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [SHARD_PATTERN.format(k + 1, n) for k in range(n)]
    file_of = {name: names[k] for k, shard in enumerate(shards) for name in shard}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_json(tmp / CONFIG_NAME, hf_config)
        pending: dict[str, np.ndarray] = {}
        for k, (name, leaf, layer) in enumerate(plan):
            pending[name] = _to_hf(leaf.kind, host_tensor(leaf, layer))
            last_of_file = k + 1 == len(plan) or file_of[plan[k + 1][0]] != file_of[name]
            if last_of_file:
                # "format": "pt" is what transformers writes and checks for when it loads the file.
                save_file(pending, str(tmp / file_of[name]), metadata={"format": "pt"})
                pending = {}
        if len(shards) > 1:
            _write_json(tmp / INDEX_FILE, {
                "metadata": {"total_parameters": total_params, "total_size": sum(s for _, s in sizes)},
                "weight_map": file_of,
            })
        if extra_files_from is not None:
            for fname in EXTRA_FILES:
                src = Path(extra_files_from) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap in: move the old directory aside, rename the new one into place, then delete the old one.
    # (POSIX cannot rename a directory over a non-empty one, hence two renames; if the second fails the
    # old directory is put back.)
    old = None
    try:
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / out_dir.name)
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None and (old / out_dir.name).exists() and not out_dir.exists():
            os.rename(old / out_dir.name, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
