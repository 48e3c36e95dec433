"""model/aot.py: TPU topologies compiled for on this CPU machine (libtpu from requirements-test.txt), in the test
process itself: conftest's JAX_PLATFORMS=cpu does not keep the TPU compiler out."""
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from model import aot, sharding

if sys.platform != "linux":  # libtpu ships Linux wheels only; on Linux a missing libtpu is a failed install step
    pytest.skip("libtpu (the TPU compiler) has no wheel for this platform", allow_module_level=True)

GIB = 2 ** 30
# device_kind libtpu gives each generation's chips
DEVICE_KIND = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}


def test_every_topology_in_the_table_builds_its_chips_with_libtpu():
    for name, topology in aot.TOPOLOGIES.items():
        devices, entry = aot.topology_devices(name)
        assert entry is topology and len(devices) == topology.chips, name
        assert {d.device_kind for d in devices} == {DEVICE_KIND[name.split("-")[0]]}, name


def test_names_count_tensorcores_on_v4_v5p_and_chips_on_v5e_v6e():
    assert [aot.TOPOLOGIES[n].chips for n in ("v4-8", "v5p-8", "v5p-64", "v5e-8", "v5e-16", "v6e-8")] == \
        [4, 4, 32, 8, 16, 8]


@pytest.mark.parametrize("generation", sorted(aot.USABLE_HBM_GIB))
def test_usable_hbm_per_chip_is_what_the_compiler_allows(generation):
    # A program that cannot fit makes XLA state the HBM it may use; the table must say the same.
    name = next(n for n in aot.TOPOLOGIES if n.startswith(f"{generation}-"))
    devices, topology = aot.topology_devices(name)
    mesh = sharding.make_mesh(-1, 1, 1, devices=devices)
    too_big = jax.ShapeDtypeStruct((topology.chips * 2 ** 18, 2 ** 16), jnp.float32,
                                   sharding=sharding.batch_sharding(mesh))  # 64 GiB per chip
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as e:
        jax.jit(lambda x: x * 2).lower(too_big).compile()
    available = re.search(r"exceeds available HBM \(([\d.]+)G\)", str(e.value)).group(1)
    assert float(available) == topology.hbm_gib


def test_an_unknown_topology_is_an_error_listing_the_known_ones():
    with pytest.raises(aot.AotError, match="unknown TPU topology; known: v4-8, .*v5p-8, .*v6e-8"):
        aot.topology_devices("v5p-7")


@pytest.fixture(scope="module")
def v5p_8():
    devices, topology = aot.topology_devices("v5p-8")
    return topology, sharding.make_mesh(1, -1, 1, devices=devices)  # 4 chips, all fsdp


def test_a_sharded_matmul_reports_its_per_chip_memory_and_flops(v5p_8):
    topology, mesh = v5p_8
    rows, cols = NamedSharding(mesh, PartitionSpec("fsdp")), NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16, sharding=rows)   # 16 MiB per chip
    w = jax.ShapeDtypeStruct((4096, 8192), jnp.bfloat16, sharding=cols)   # 16 MiB per chip
    report = aot.compile_report(jax.jit(lambda x, w: x @ w, out_shardings=rows), {"x": x, "w": w}, topology, mesh,
                                workload={"what": "matmul"})
    memory = report["memory_per_chip_gib"]
    assert (report["topology"], report["chips"], report["mesh"]) == ("v5p-8", 4, {"data": 1, "fsdp": 4, "tensor": 1})
    assert report["arguments_per_chip_gib"] == {"x": round(16 / 1024, 3), "w": round(16 / 1024, 3)}
    assert memory["arguments"] == round(32 / 1024, 3) and memory["output"] == round(32 / 1024, 3)
    assert memory["total"] == round(memory["arguments"] + memory["output"] + memory["temporaries"]
                                    - memory["alias"], 3)
    assert report["fits"] and report["hbm_per_chip_gib"] == 95.74 and report["workload"] == {"what": "matmul"}
    # Each chip multiplies its 2048 rows by the whole (all-gathered) w: 2 * 2048 * 4096 * 8192 flops.
    assert report["flops_per_chip"] == pytest.approx(2 * 2048 * 4096 * 8192, rel=0.01)
    assert report["compile_s"] >= 0


def test_a_program_larger_than_the_hbm_does_not_fit_and_the_advice_names_its_largest_consumers(v5p_8, capsys):
    topology, mesh = v5p_8
    replicated = NamedSharding(mesh, PartitionSpec())
    weights = jax.ShapeDtypeStruct((60 * 2 ** 14, 2 ** 15), jnp.bfloat16, sharding=replicated)  # 60 GiB on each chip
    small = jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=replicated)
    # The output is another 60 GiB: 120 GiB per chip in all, more than a v5p chip's 95.74.
    report = aot.compile_report(jax.jit(lambda w, s: w * 2), {"weights": weights, "small": small}, topology, mesh)
    assert report["fits"] is False and "RESOURCE_EXHAUSTED" in report["xla_error"]
    assert report["memory_per_chip_gib"]["arguments"] == 60.0
    assert report["memory_per_chip_gib"]["total"] == pytest.approx(120, abs=0.1)
    assert [name for name, _ in aot.largest_consumers(report, 2)] == ["weights", "temporaries"]
    assert aot.emit(report, {"weights": "shard them: raise --fsdp"}, prog="x.py") == aot.EXIT_DOES_NOT_FIT == 3
    out, err = capsys.readouterr()
    assert '"fits": false' in out
    assert err.startswith("x.py: does not fit on v5p-8: the program needs 120")
    assert "weights: 60.0 GiB per chip: shard them: raise --fsdp" in err


def test_a_program_that_fits_exits_0_and_prints_no_advice(v5p_8, capsys):
    topology, mesh = v5p_8
    x = jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
    report = aot.compile_report(jax.jit(lambda x: x + 1), {"x": x}, topology, mesh)
    assert aot.emit(report, {}, prog="x.py") == aot.EXIT_FITS == 0
    out, err = capsys.readouterr()
    assert '"fits": true' in out and err == ""
