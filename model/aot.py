"""Ahead-of-time compilation for a TPU topology on a machine without TPUs: does this step fit, and how much HBM?

With libtpu installed (requirements-test.txt; `pip install "jax[tpu]==<the installed jax>"`), JAX builds abstract
TPU devices for a named topology and compiles a jitted function for them exactly as it would on the pod: the
program, its sharding and XLA's memory plan are the real ones; nothing runs and no weights or data are needed.
This is how MaxText's train_compile.py tells on a laptop whether a config fits a v5p-256.

    devices, topology = topology_devices("v5p-8")
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
    report = compile_report(jax.jit(step), {"params": abstract_params, "batch": abstract_batch}, topology, mesh)
    sys.exit(emit(report, remedies={"temporaries": "--remat full", "params": "raise --fsdp"}, prog="train.py"))

It works in a process whose JAX runs on the CPU (JAX_PLATFORMS=cpu, as the tests set): the TPU compiler is
loaded as a plugin beside the CPU backend, whatever JAX_PLATFORMS says. Compiling a 7B-sized program takes a
few minutes on 2 CPU cores (a program too large for the HBM is refused in seconds); the tiny preset seconds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import flax.linen as nn
import jax
from jax.experimental.compilation_cache import compilation_cache

from model import sharding

GIB = 2 ** 30
# Exit statuses of a script's --aot-topology run (bad input stays 2, as everywhere).
EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 3


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                  # the name users know: a v4-8 / v5p-8 counts TensorCores (2 per chip), v5e/v6e chips
    topology_name: str         # get_topology_desc's arguments (MaxText's accelerator_to_spec_map for the same names)
    chip_config_name: str      # "megacore": the chip's 2 TensorCores act as one device (v4, v5p)
    chips_per_host_bounds: tuple[int, int, int]
    chips: int                 # devices JAX sees: one per chip
    hbm_gib: float             # HBM a program may use per chip (see USABLE_HBM_GIB)


# HBM per chip that XLA lets one program use, as libtpu 0.0.42.1's compiler states it ("exceeds available HBM
# (X G)" when a program is too large): the chip's HBM (v4 32 GiB, v5e 16 GiB, v5p 96 GiB, v6e 31.5 GiB as the
# compiler counts it) less what the TPU runtime keeps. tests/test_aot.py checks these against the compiler.
USABLE_HBM_GIB = {"v4": 30.75, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}


def _table() -> dict[str, Topology]:
    """The slices of each generation, by the names Cloud TPU gives them. Hosts hold 4 chips, but for the 8-chip
    single-host v5e-8 / v6e-8 machines (the bounds only set which process owns which chip: the compiled program is
    the same)."""
    rows = [
        # v4 and v5p: 3-D tori; the name counts TensorCores, 2 per chip (v4-8 = 4 chips, one host).
        *[(f"v4-{2 * n}", f"v4:{shape}", "megacore", (2, 2, 1), n)
          for n, shape in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"), (64, "4x4x4"),
                           (128, "4x4x8"))],
        *[(f"v5p-{2 * n}", f"v5:{shape}", "megacore", (2, 2, 1), n)
          for n, shape in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"), (64, "4x4x4"),
                           (128, "4x4x8"))],
        # v5e and v6e: 2-D, the name counts chips; up to 8 chips is one host, larger slices are 4-chip hosts.
        *[(f"{gen}-{n}", f"{gen}:{shape}", "default", host, n)
          for gen in ("v5e", "v6e")
          for n, shape, host in ((1, "1x1", (1, 1, 1)), (4, "2x2", (2, 2, 1)), (8, "2x4", (2, 4, 1)),
                                 (16, "4x4", (2, 2, 1)), (32, "4x8", (2, 2, 1)), (64, "8x8", (2, 2, 1)),
                                 (128, "8x16", (2, 2, 1)), (256, "16x16", (2, 2, 1)))],
    ]
    return {name: Topology(name, topo, chip_config, host, chips, USABLE_HBM_GIB[name.split("-")[0]])
            for name, topo, chip_config, host, chips in rows}


TOPOLOGIES: dict[str, Topology] = _table()
LIBTPU_INSTALL = f'pip install "jax[tpu]=={jax.__version__}"'


class AotError(ValueError):
    """An unknown topology name, or no TPU compiler installed: a script reports it and exits 2."""


def _compile_only_libtpu_env() -> None:
    """Settings for loading libtpu as a compiler only, on a machine without TPU chips (where JAX sets
    TPU_SKIP_MDS_QUERY=1 at import). On a TPU VM nothing is set: there the runtime's own values must win.

    - libtpu locks /tmp/libtpu_lockfile so that one process owns the chips; with no chips to own, a second
      compiling process (a test's subprocess, a colleague's compile) must not fail on the lock.
    - It cannot ask the cloud metadata server for its worker hostnames and host bounds, and prints an alarming
      INVALID_ARGUMENT error; a compile-only client needs neither (get_topology_desc is given the topology's own
      host bounds), so give it harmless values."""
    if os.environ.get("TPU_SKIP_MDS_QUERY") == "1":
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


def topology_devices(name: str) -> tuple[list, Topology]:
    """(the topology's abstract TPU devices, to build a mesh on; its table entry)."""
    if name not in TOPOLOGIES:
        raise AotError(f"--aot-topology {name}: unknown TPU topology; known: {', '.join(TOPOLOGIES)}")
    topology = TOPOLOGIES[name]
    from jax.experimental import topologies
    _compile_only_libtpu_env()
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name,
                                            chip_config_name=topology.chip_config_name,
                                            chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise AotError(f"--aot-topology {name}: compiling for TPUs needs libtpu, which is not installed "
                           f"({LIBTPU_INSTALL}; it is in requirements-test.txt)") from None
        raise
    if len(desc.devices) != topology.chips:  # the table and libtpu disagree: never report for the wrong slice
        raise AssertionError(f"{name}: libtpu built {len(desc.devices)} devices for {topology.topology_name}, "
                             f"the table says {topology.chips} chips")
    return list(desc.devices), topology


def per_chip_bytes(tree) -> int:
    """Bytes of the largest shard of every array in a tree of ShapeDtypeStructs with shardings (others: 0)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
            total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def _gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / GIB, 3)


def _hbm_error_total(message: str) -> float | None:
    """GiB a program needs per chip, from XLA's 'the total memory required for HLO temporaries (80.12G) exceeds
    available HBM (15.75G)' (the figure counts arguments and outputs too); None if the message is another one."""
    match = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
    if not match:
        return None
    return round(float(match.group(1)) * 1024.0 ** ("KMGT".index(match.group(2)) - 2), 3)


def compile_report(jitted, args: dict, topology: Topology, mesh, *, kwargs: dict | None = None,
                   workload: dict | None = None) -> dict:
    """Lower and compile `jitted(*args.values(), **kwargs)` for the mesh (built on topology_devices' devices) and
    report memory per chip and whether it fits.

    args: the positional arguments by name, in order: ShapeDtypeStructs with shardings (a static argument such as
    a config passes through as is); the names label the arguments' share of the memory. The compile runs under
    the mesh and the model's logical axis rules, as train.py and infer.py run their steps.
    A program too large for the chip's HBM makes XLA refuse to compile it: the report then says fits=false, with
    XLA's message and the total it needed.
    """
    shape = dict(mesh.shape)
    report = {"topology": topology.name, "chips": topology.chips, "mesh": shape,
              "hbm_per_chip_gib": topology.hbm_gib}
    if workload is not None:
        report["workload"] = workload
    arg_bytes = {name: per_chip_bytes(value) for name, value in args.items()
                 if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(value))}
    start = time.perf_counter()
    # The persistent compilation cache (model/compilation.py) holds programs for this machine's devices; a
    # compile-only TPU client can neither load nor usefully store them: keep it out of the way.
    cache_was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once per process whether to use it: decide again
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            compiled = jitted.lower(*args.values(), **(kwargs or {})).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # XLA's total counts arguments, output and temporaries; it does not separate the last two when it refuses.
        total = _hbm_error_total(str(e))
        arguments = _gib(sum(arg_bytes.values()))
        report.update(compile_s=round(time.perf_counter() - start, 1), fits=False,
                      memory_per_chip_gib={"arguments": arguments,
                                           "temporaries": None if total is None else round(total - arguments, 3),
                                           "output": None, "alias": None, "total": total},
                      arguments_per_chip_gib={k: _gib(v) for k, v in arg_bytes.items()},
                      xla_error=str(e).strip().splitlines()[0])
        return report
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was_on)
        compilation_cache.reset_cache()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
             - memory.alias_size_in_bytes)  # an output written into a donated argument's buffer counts once
    report.update(compile_s=round(seconds, 1), fits=total <= topology.hbm_gib * GIB,
                  memory_per_chip_gib={"arguments": _gib(memory.argument_size_in_bytes),
                                       "temporaries": _gib(memory.temp_size_in_bytes),
                                       "output": _gib(memory.output_size_in_bytes),
                                       "alias": _gib(memory.alias_size_in_bytes), "total": _gib(total)},
                  arguments_per_chip_gib={k: _gib(v) for k, v in arg_bytes.items()})
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict in older JAX
    if cost and cost.get("flops"):
        # XLA's count for one chip's share of the program. It counts a while loop's body once (the trip count is
        # not known when compiling): for a decode that is the prefill plus one decode step, not the whole search.
        report["flops_per_chip"] = float(cost["flops"])
    return report


def largest_consumers(report: dict, n: int = 3) -> list[tuple[str, float]]:
    """The n largest known parts of a chip's memory, largest first: each argument by name, the temporaries
    (activations, a decode's KV cache, gradients...) and the output."""
    parts = dict(report["arguments_per_chip_gib"])
    for part in ("temporaries", "output"):
        if report["memory_per_chip_gib"][part] is not None:
            parts[part] = report["memory_per_chip_gib"][part]
    return sorted(parts.items(), key=lambda kv: -kv[1])[:n]


def fit_advice(report: dict, remedies: dict[str, str]) -> str:
    """What a user reads when the program does not fit: the total against the HBM, the largest consumers, and
    for each the caller's remedy (e.g. {"temporaries": "--remat full or fewer rows per chip", "params": "raise
    --fsdp"}, keyed by largest_consumers' names)."""
    total = report["memory_per_chip_gib"]["total"]
    needed = "more than it has" if total is None else f"{total} GiB per chip"
    lines = [f"does not fit on {report['topology']}: the program needs {needed}, a chip has "
             f"{report['hbm_per_chip_gib']} GiB of usable HBM (mesh "
             f"{' '.join(f'{axis}={size}' for axis, size in report['mesh'].items())})"]
    if "xla_error" in report:
        lines.append(f"  XLA: {report['xla_error']}")
    for name, gib in largest_consumers(report):
        lines.append(f"  {name}: {gib} GiB per chip" + (f": {remedies[name]}" if name in remedies else ""))
    return "\n".join(lines)


def emit(report: dict, remedies: dict[str, str], prog: str) -> int:
    """Print the report as one JSON object on stdout (and, if it does not fit, the advice on stderr); return the
    exit status: EXIT_FITS or EXIT_DOES_NOT_FIT."""
    print(json.dumps(report, indent=2))
    if report["fits"]:
        return EXIT_FITS
    print(f"{prog}: {fit_advice(report, remedies)}", file=sys.stderr)
    return EXIT_DOES_NOT_FIT


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the given shardings: a model's parameters without creating them."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
