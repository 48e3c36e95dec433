"""The device mesh (data / fsdp / tensor) and the ONE table that maps the model's logical axis names to it.

Parameters carry logical names (see model/qwen2_audio.py's docstring); activations are constrained to
("batch", "length", "embed") at layer boundaries. Flax resolves a name with the first rule whose mesh axis is
still free in that array, so e.g. an activation's "embed" is left unsharded once "batch" took ("data", "fsdp").

Usage:
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    shardings = param_shardings(mesh, abstract_params(config, jnp.bfloat16))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        logits = jax.jit(forward_fn, in_shardings=(shardings, batch_sharding(mesh), ...))(params, batch...)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: earlier rules win a mesh axis. "batch" comes first so activations shard over data x fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("audio_length", None),
    # text decoder
    ("embed", "fsdp"),  # hidden size: parameters are fully sharded over fsdp (ZeRO-3 style)
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),  # nH * head_dim, flattened
    ("kv_heads", "tensor"),  # nKV * head_dim, flattened
    ("norm", None),
    ("layers", None),  # the scanned layer axis is never sharded
    # audio tower
    ("audio_embed", "fsdp"),
    ("audio_mlp", "tensor"),
    ("audio_heads", "tensor"),
    ("audio_conv_in", "tensor"),
    ("mel", None),
    ("conv_width", None),
    ("audio_pos", None),
    ("audio_norm", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor"). One size may be -1: it takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % known:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} x tensor={tensor} does not divide the "
                         f"{len(devices)} available devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"make_mesh: data x fsdp x tensor = {int(np.prod(sizes))} but there are {len(devices)} "
                         f"devices (use -1 for one axis to take the rest)")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def param_shardings(mesh: Mesh, abstract_boxed, rules=LOGICAL_AXIS_RULES):
    """NamedSharding for every parameter, from the logical names in `abstract_params(...)`'s boxed tree."""
    specs = nn.get_partition_spec(abstract_boxed)  # logical PartitionSpecs, boxes removed
    mesh_specs = nn.logical_to_mesh(specs, rules)
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch-major inputs ([B, ...]): rows split over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def resolve_dtype(name: str) -> str:
    """--dtype auto: bfloat16 (the paper) on GPU/TPU, float32 on a CPU, where XLA emulates bf16 matmuls slowly and
    greedy outputs drift from the fp32 reference at near-ties."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
