"""Qwen2-Audio model configuration: frozen dataclasses that read and write transformers' config.json.

The real Qwen2-Audio-7B-Instruct config.json leaves many fields out (its text_config has no hidden_size,
num_hidden_layers, num_attention_heads...) and relies on transformers' class defaults. `from_hf_dict` therefore
fills an omitted field with the SAME default transformers uses (Qwen2Config / Qwen2AudioEncoderConfig), so a
config.json gives the same shapes here as in transformers. A field that is present but has the wrong type or an
impossible value is an error that names the file and the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from model.manifest import atomic_write_text


class ConfigError(ValueError):
    """A config.json (or dict) field is missing, has the wrong type, or an impossible value."""


@dataclass(frozen=True)
class AudioConfig:
    """The Whisper-style audio encoder (transformers' Qwen2AudioEncoderConfig)."""
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    num_mel_bins: int = 128
    max_source_positions: int = 1500  # positions after conv2 (stride 2): 3000 mel frames = 30 s
    activation_function: str = "gelu"  # exact (erf) GELU, as transformers' ACT2FN["gelu"]
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm default; not a config.json field


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (transformers' Qwen2Config). Defaults are transformers' class defaults."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # a JSON list becomes a tuple (hashable: jit static)
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen2AudioConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646  # id of <|AUDIO|>; each one is replaced by one audio-encoder output
    ignore_index: int = -100

    # ---- transformers config.json <-> dataclasses -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "Qwen2AudioConfig":
        """Build from a transformers Qwen2AudioConfig dict. `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "qwen2_audio") != "qwen2_audio":
            raise ConfigError(f"{source}: model_type is {d['model_type']!r}, expected 'qwen2_audio'")
        for key in ("audio_config", "text_config"):
            if key not in d:
                raise ConfigError(f"{source}: field {key!r} is missing (a Qwen2-Audio config has audio_config "
                                  f"and text_config sub-objects)")
            if not isinstance(d[key], dict):
                raise ConfigError(f"{source}: field {key!r} must be an object, got {type(d[key]).__name__}")
        a, t = d["audio_config"], d["text_config"]
        if a.get("model_type", "qwen2_audio_encoder") != "qwen2_audio_encoder":
            raise ConfigError(f"{source}: audio_config.model_type is {a['model_type']!r}, "
                              f"expected 'qwen2_audio_encoder'")
        if t.get("model_type", "qwen2") != "qwen2":
            raise ConfigError(f"{source}: text_config.model_type is {t['model_type']!r}, expected 'qwen2'")
        if a.get("scale_embedding", False):
            raise ConfigError(f"{source}: audio_config.scale_embedding=true is not supported (Qwen2-Audio uses false)")
        if t.get("use_sliding_window", False):
            raise ConfigError(f"{source}: text_config.use_sliding_window=true is not supported")

        audio = AudioConfig(**{f.name: _get(a, f, source, "audio_config") for f in dataclasses.fields(AudioConfig)
                               if f.name != "layer_norm_eps"})
        # transformers 5 writes rope_parameters={"rope_theta":..., "rope_type": "default"}; older files rope_theta.
        t = dict(t)
        rope = t.pop("rope_parameters", None) or t.pop("rope_scaling", None)
        if rope is not None:
            if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ConfigError(f"{source}: text_config.rope_parameters {rope!r}: only the default RoPE is supported")
            if "rope_theta" in rope:
                t.setdefault("rope_theta", rope["rope_theta"])
        if t.get("num_key_value_heads") is None:  # transformers: None means "same as num_attention_heads"
            t["num_key_value_heads"] = t.get("num_attention_heads", TextConfig.num_attention_heads)
        text = TextConfig(**{f.name: _get(t, f, source, "text_config") for f in dataclasses.fields(TextConfig)})
        cfg = cls(audio=audio, text=text,
                  audio_token_index=_check(d.get("audio_token_index", cls.audio_token_index), int, source,
                                           "audio_token_index"),
                  ignore_index=_check(d.get("ignore_index", cls.ignore_index), int, source, "ignore_index"))
        cfg.validate(source)
        return cfg

    @classmethod
    def from_pretrained(cls, directory: str) -> "Qwen2AudioConfig":
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: not found (expected a Hugging Face checkpoint directory with config.json)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self) -> dict:
        """A config.json dict that transformers' Qwen2AudioConfig loads to the same shapes."""
        a, t = self.audio, self.text
        return {
            "architectures": ["Qwen2AudioForConditionalGeneration"],
            "model_type": "qwen2_audio",
            "audio_token_index": self.audio_token_index,
            "ignore_index": self.ignore_index,
            "audio_config": {
                "model_type": "qwen2_audio_encoder",
                "d_model": a.d_model, "encoder_layers": a.encoder_layers,
                "encoder_attention_heads": a.encoder_attention_heads, "encoder_ffn_dim": a.encoder_ffn_dim,
                "num_mel_bins": a.num_mel_bins, "max_source_positions": a.max_source_positions,
                "activation_function": a.activation_function, "scale_embedding": False,
            },
            "text_config": {
                "model_type": "qwen2",
                "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
                "rope_theta": t.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "max_position_embeddings": t.max_position_embeddings, "hidden_act": t.hidden_act,
                "tie_word_embeddings": False, "use_sliding_window": False,
                "bos_token_id": t.bos_token_id, "pad_token_id": t.pad_token_id,
                "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
            },
        }

    def save_pretrained(self, directory: str) -> str:
        """Write directory/config.json atomically (temp file + rename). Returns the path."""
        path = os.path.join(directory, "config.json")
        atomic_write_text(path, json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path

    def validate(self, source: str = "config") -> None:
        a, t = self.audio, self.text
        for sub, name, value in [("audio_config", f.name, getattr(a, f.name)) for f in dataclasses.fields(a)] + \
                                [("text_config", f.name, getattr(t, f.name)) for f in dataclasses.fields(t)]:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name.endswith(
                    ("_size", "_layers", "_heads", "_dim", "d_model", "_bins", "_positions", "_embeddings")) \
                    and value <= 0:
                raise ConfigError(f"{source}: {sub}.{name} must be positive, got {value}")
        if a.d_model % a.encoder_attention_heads:
            raise ConfigError(f"{source}: audio_config.d_model ({a.d_model}) must be divisible by "
                              f"encoder_attention_heads ({a.encoder_attention_heads})")
        if t.hidden_size % t.num_attention_heads:
            raise ConfigError(f"{source}: text_config.hidden_size ({t.hidden_size}) must be divisible by "
                              f"num_attention_heads ({t.num_attention_heads})")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(f"{source}: text_config.num_attention_heads ({t.num_attention_heads}) must be "
                              f"divisible by num_key_value_heads ({t.num_key_value_heads})")
        if t.head_dim % 2:
            raise ConfigError(f"{source}: text_config head_dim ({t.head_dim}) must be even for rotary embeddings")
        if a.activation_function != "gelu":
            raise ConfigError(f"{source}: audio_config.activation_function must be 'gelu', "
                              f"got {a.activation_function!r}")
        if t.hidden_act != "silu":
            raise ConfigError(f"{source}: text_config.hidden_act must be 'silu', got {t.hidden_act!r}")
        if not 0 <= self.audio_token_index < t.vocab_size:
            raise ConfigError(f"{source}: audio_token_index {self.audio_token_index} is outside the vocabulary "
                              f"(text_config.vocab_size {t.vocab_size})")


def _check(value, typ, source, name):
    """Type check one field value; ints are accepted where floats are expected (JSON writes 10000 for 1e4)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: field {name!r} must be {typ.__name__}, got {value!r}")
    return value


def _get(d: dict, f: dataclasses.Field, source: str, prefix: str):
    default = f.default
    if f.name not in d or (d[f.name] is None and default is None):
        return default
    if f.name in ("bos_token_id", "pad_token_id"):
        return _check(d[f.name], int, source, f"{prefix}.{f.name}")
    if f.name == "eos_token_id":
        v = d[f.name]
        if isinstance(v, (list, tuple)):
            return tuple(_check(x, int, source, f"{prefix}.{f.name}") for x in v)
        return _check(v, int, source, f"{prefix}.{f.name}")
    typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
    return _check(d[f.name], typ, source, f"{prefix}.{f.name}")


PRESETS: dict[str, Qwen2AudioConfig] = {
    # Qwen/Qwen2-Audio-7B-Instruct.
    "7b": Qwen2AudioConfig(
        audio=AudioConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          num_mel_bins=128, max_source_positions=1500),
        text=TextConfig(vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                        max_position_embeddings=8192, bos_token_id=151643, eos_token_id=151645,
                        pad_token_id=151643),
    ),
    # CPU-sized, but with the REAL vocabulary so it runs with the real tokenizer (tests, smoke runs).
    "tiny": Qwen2AudioConfig(
        audio=AudioConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, max_source_positions=1500),
        text=TextConfig(vocab_size=156032, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                        max_position_embeddings=8192, bos_token_id=151643, eos_token_id=151645,
                        pad_token_id=151643),
    ),
}


# Pretrained checkpoints that ship in the repository, by name. `mini` is the miniature Qwen2-Audio that pretrain.py
# builds (the README's "The pretrained miniature"): an ordinary Hugging Face Qwen2-Audio directory with its own
# compact tokenizer, whose special-token ids come from its files like any checkpoint's.
SHIPPED = {"mini": Path(__file__).resolve().parent.parent / "models" / "mini"}


def resolve_model(name_or_dir: str) -> str:
    """A shipped checkpoint's name -> its directory; a preset name or a path unchanged."""
    return str(SHIPPED[name_or_dir]) if name_or_dir in SHIPPED else name_or_dir


def get_config(name_or_dir: str) -> Qwen2AudioConfig:
    """A preset name ("7b", "tiny"), a shipped checkpoint's name ("mini") or a checkpoint directory holding
    config.json."""
    name_or_dir = resolve_model(name_or_dir)
    if name_or_dir in PRESETS:
        return PRESETS[name_or_dir]
    if os.path.isdir(name_or_dir):
        return Qwen2AudioConfig.from_pretrained(name_or_dir)
    raise ConfigError(f"{name_or_dir!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")
