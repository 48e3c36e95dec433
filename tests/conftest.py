"""Shared test set-up: JAX on the CPU with 8 virtual devices (for the sharding tests), float32 matmuls."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity with the fp32 PyTorch reference needs full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
