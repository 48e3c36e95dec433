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

Processor files. An export that carries a tokenizer is completed into what the hub directory
Qwen/Qwen2-Audio-7B-Instruct holds (feature-extractor config, tokenizer config with the special tokens, chat
template, generation config), so transformers' AutoProcessor and serving engines load it like the real download.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from model import processor as P
from model.manifest import apply_umask, replace_dir

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{:05d}-of-{:05d}.safetensors"  # HF's shard names, 1-based

# The processor files save_hf generates when the tokenizer's directory lacks them (see `processor_files`).
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"  # transformers 5's processor file (feature extractor inside)
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
# What train.py writes beside the weights of RUN_DIR/hf (via save_hf's extra_json): {"finished": bool, "steps",
# "planned_steps", "settings", "history"}. infer.py warns on an unfinished run; grid.py reuses finished ones only.
TRAINING_RUN_FILE = "training_run.json"
# Files of a model directory that are not weights; save_hf copies those present in `extra_files_from`.
EXTRA_FILES = (
    "tokenizer.json", TOKENIZER_CONFIG_FILE, "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", PREPROCESSOR_FILE, PROCESSOR_CONFIG_FILE,
    LEGACY_CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE,
)

# Qwen2AudioProcessor's default chat template (transformers' processing_qwen2_audio.py); processor.build_prompt
# is its rendering for a system turn and one user turn.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or message['type'] == 'audio'"
    " or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
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


def _json_text(obj: Any) -> str:
    # HF writes its JSON files like this (sorted keys, 2-space indent, trailing newline).
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(_json_text(obj))


# ---- processor files ------------------------------------------------------------------------------------------


def preprocessor_config() -> dict:
    """WhisperFeatureExtractor's settings for model/processor.py's log-mel front end, as the hub directory
    writes them (the processor always asks for the attention mask: it counts the audio tokens from it)."""
    return {
        "chunk_length": P.CHUNK_SAMPLES // P.SAMPLE_RATE, "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": P.N_MELS, "hop_length": P.HOP_LENGTH, "n_fft": P.N_FFT, "n_samples": P.CHUNK_SAMPLES,
        "nb_max_frames": P.CHUNK_FRAMES, "padding_side": "right", "padding_value": 0.0,
        "processor_class": "Qwen2AudioProcessor", "return_attention_mask": True, "sampling_rate": P.SAMPLE_RATE,
    }


def tokenizer_config(tok) -> dict:
    """The hub's tokenizer settings: the special tokens at the ids this tokenizer gives them, <|im_end|> ends a turn,
    <|endoftext|> pads, no BOS; the tokenizer itself is tokenizer.json (or vocab.json + merges.txt) beside it."""
    added = {str(P.token_id(tok, t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in P.SPECIAL_TOKENS}
    return {
        "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in P.SPECIAL_TOKENS if t != P.ENDOFTEXT],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": P.IM_END, "errors": "replace",
        "pad_token": P.ENDOFTEXT, "processor_class": "Qwen2AudioProcessor", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def generation_config(ids: P.SpecialIds) -> dict:
    """Greedy by default (the hub's file samples), stopping where model/generate.py stops. infer.py and
    train.py's evaluation never read it: they decode with their own settings."""
    return {"do_sample": False, "num_beams": 1, "eos_token_id": list(ids.eos), "pad_token_id": ids.pad}


def _has_chat_template(source: Path) -> bool:
    if (source / CHAT_TEMPLATE_FILE).is_file() or (source / LEGACY_CHAT_TEMPLATE_FILE).is_file():
        return True
    for name in (TOKENIZER_CONFIG_FILE, PROCESSOR_CONFIG_FILE):  # older exports keep it inside these
        path = source / name
        if path.is_file():
            try:
                if "chat_template" in json.loads(path.read_text(encoding="utf-8")):
                    return True
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON: {e}") from e
    return False


def _check_audio_token(hf_config: dict, tok) -> None:
    """config.json's audio_token_index must be the tokenizer's <|AUDIO|>: the generated files state both."""
    from model.config import Qwen2AudioConfig
    audio_id = hf_config.get("audio_token_index", Qwen2AudioConfig.audio_token_index)  # transformers' default
    if audio_id != P.token_id(tok, P.AUDIO_TOKEN):
        raise ValueError(f"config.json: audio_token_index is {audio_id}, but the tokenizer's {P.AUDIO_TOKEN} is "
                         f"{P.token_id(tok, P.AUDIO_TOKEN)}")


def processor_files(hf_config: dict, source: Path | None) -> dict[str, str]:
    """{file name: text} of the processor files `source` lacks, so that a directory holding its files is a
    checkpoint transformers' AutoProcessor loads. Nothing when `source` has no tokenizer (tokenizer.json, or
    vocab.json + merges.txt): without one there is no processor to describe."""
    def has(name: str) -> bool:
        return source is not None and (source / name).is_file()

    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        return {}
    tok = P.load_tokenizer(source)
    files = {}
    if not (has(PREPROCESSOR_FILE) or has(PROCESSOR_CONFIG_FILE)):
        files[PREPROCESSOR_FILE] = _json_text(preprocessor_config())
    if not has(TOKENIZER_CONFIG_FILE):
        files[TOKENIZER_CONFIG_FILE] = _json_text(tokenizer_config(tok))
    if not _has_chat_template(source):
        files[CHAT_TEMPLATE_FILE] = CHAT_TEMPLATE
    if not has(GENERATION_CONFIG_FILE):
        files[GENERATION_CONFIG_FILE] = _json_text(generation_config(P.special_ids(tok)))
    if files:
        _check_audio_token(hf_config, tok)
    return files


def _extra_json_texts(extra_json: dict[str, Any] | None) -> dict[str, str]:
    """save_hf's extra_json as {file name: text}, checked before any tensor is gathered."""
    texts = {}
    for name, obj in (extra_json or {}).items():
        if not isinstance(name, str) or not name.endswith(".json") or Path(name).name != name:
            raise ValueError(f"extra_json: {name!r} is not a plain file name ending in .json")
        if name in (CONFIG_NAME, INDEX_FILE, *EXTRA_FILES):
            raise ValueError(f"extra_json: {name!r} is a file of the export itself")
        try:
            texts[name] = _json_text(obj)
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra_json[{name!r}]: not JSON-serialisable: {e}") from e
    return texts


# ---- save -----------------------------------------------------------------------------------------------------


def _remove_stale(out_dir: Path) -> None:
    """Delete what a killed save_hf of out_dir left beside it: .NAME.tmp-* (an export being written) and
    .NAME.old-* (the previous export, set aside during the swap). A kill between the swap's two renames left
    no out_dir, and the previous export in .NAME.old-*/NAME: it is put back first. Only the one writing
    process calls this, before it creates its own temp dir (a second writer of the same out_dir at the same
    time is not supported: its swap would race with ours anyway)."""
    # mkdtemp appends 8 characters from [a-z0-9_]; matching them exactly leaves e.g. `.hf.tmp-x.tmp-*`
    # (the temp dir of an export named `hf.tmp-x`) alone.
    stale = re.compile(re.escape(f".{out_dir.name}.") + r"(tmp|old)-[a-z0-9_]{8}")
    found = {p: m[1] for p in sorted(out_dir.parent.iterdir()) if (m := stale.fullmatch(p.name)) and p.is_dir()}
    for p, kind in found.items():
        if kind == "old" and not out_dir.exists() and (p / out_dir.name).is_dir():
            os.rename(p / out_dir.name, out_dir)
    for p in found:
        shutil.rmtree(p, ignore_errors=True)


def host_array(x) -> np.ndarray:
    """The whole of one array as a host array. An array sharded over several processes is all-gathered: that
    is a collective, so every process must call this for the same arrays in the same order."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf(params: dict, hf_config: dict, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
            extra_files_from: str | os.PathLike | None = None, write: bool = True,
            extra_json: dict[str, Any] | None = None, dtype: str | None = None) -> Path:
    """Write params as a Hugging Face directory that transformers' from_pretrained loads.

    Tensors keep the dtype of their leaf, or are cast one at a time to `dtype` ('bfloat16', 'float32'; the
    config's "dtype" says which). The directory is built under a temporary name beside out_dir and
    renamed into place only when complete; an existing out_dir is replaced at that point, never before. What
    an earlier, killed save_hf of the same out_dir left behind is removed first.

    extra_files_from: a directory whose tokenizer / processor / generation files (EXTRA_FILES) are copied;
    when it holds a tokenizer, the processor files it lacks are generated (see `processor_files`).
    extra_json: {file name: JSON object} written into the directory too (so they appear with the weights).

    Multi-host: every process calls this with its (globally sharded) params. Tensors are gathered one at a
    time (one layer of a stacked leaf), so a host holds one shard file's worth (5 GB by default) plus one
    tensor, never the whole model. Only the process with `write=True` touches the disk; the others just take
    part in the gathers.
    """
    out_dir = Path(out_dir).absolute()
    layout = checkpoint_layout(hf_config)
    cast = None if dtype is None else np.dtype(jnp.dtype(dtype))
    if cast is not None:  # transformers 5 writes "dtype"; a config from transformers 4 may carry "torch_dtype"
        hf_config = {**hf_config, "dtype": cast.name, **({"torch_dtype": cast.name} if "torch_dtype" in hf_config else {})}
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
            sizes.append((name, numel * (cast or np.dtype(x.dtype)).itemsize))
            total_params += numel

    def host_tensor(leaf: Leaf, layer: int) -> np.ndarray:  # one layer of a stacked leaf at a time
        x = _subtree(params, leaf.path, "params")
        x = host_array(x[layer] if layer >= 0 else x)
        return x if cast is None else x.astype(cast)

    # Every process checks the other files before the first gather, so bad input stops all of them at once.
    source = None if extra_files_from is None else Path(extra_files_from)
    if source is not None and not source.is_dir():
        raise FileNotFoundError(f"extra_files_from: {source} is not a directory")
    copied = [] if source is None else [source / f for f in EXTRA_FILES if (source / f).is_file()]
    texts = {**processor_files(hf_config, source), **_extra_json_texts(extra_json)}

    if not write:
        for _, leaf, layer in plan:  # the writer's gathers, in the writer's order
            host_tensor(leaf, layer)
        return out_dir
    shards = _split_shards(sizes, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [SHARD_PATTERN.format(k + 1, n) for k in range(n)]
    file_of = {name: names[k] for k, shard in enumerate(shards) for name in shard}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
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
        for src in copied:
            shutil.copyfile(src, tmp / src.name)
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        # mkdtemp's 0700 and safetensors' 0600 would survive the rename: make them like any other output.
        for path in (tmp, *tmp.iterdir()):
            apply_umask(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap in (replace_dir); the previous export is set aside inside .NAME.old-*, where _remove_stale finds it.
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        replace_dir(tmp, out_dir, aside=old / out_dir.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_dir.exists():  # else the previous export is still in `old`, where _remove_stale puts it back
            shutil.rmtree(old, ignore_errors=True)
    return out_dir
