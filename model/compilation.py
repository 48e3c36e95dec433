"""XLA compilations: JAX's persistent compilation cache (on by default in train.py and infer.py, so a grid's
later runs with the same shapes compile nothing), a process-wide count of programs compiled, programs loaded
from that cache, and the seconds spent on both (from jax.monitoring's events), and Python's garbage collector
paused while a program is dispatched (gc_paused)."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache


def enable_persistent_cache(setting: str) -> str | None:
    """'auto': $JAX_COMPILATION_CACHE_DIR, else ~/.cache/sluice/jax-compilation; 'none': off; else a directory.
    Returns the directory in use. Every program is cached, however quick to compile: a run then reports exactly
    how many it compiled."""
    directory = None if setting.lower() == "none" else setting
    if setting == "auto":
        from model.processor import cache_dir
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir() / "jax-compilation")
    if jax.config.jax_compilation_cache_dir != directory:
        compilation_cache.reset_cache()  # JAX opens its cache once per process: reopen it in the new place
        jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


@dataclasses.dataclass
class Compilations:
    """Running totals since the process started; subtract two snapshots for a stretch of work."""
    compiled: int = 0      # programs XLA compiled
    cache_hits: int = 0    # programs loaded from the persistent cache instead
    seconds: float = 0.0   # spent on both

    def __sub__(self, other: Compilations) -> Compilations:
        return Compilations(self.compiled - other.compiled, self.cache_hits - other.cache_hits,
                            self.seconds - other.seconds)

    def to_json(self) -> dict:
        return {"compiled": self.compiled, "cache_hits": self.cache_hits, "compile_seconds": round(self.seconds, 2)}


_TOTALS: Compilations | None = None


def compilations() -> Compilations:
    """A snapshot of the process's totals (the listeners are registered on the first call: count from then)."""
    global _TOTALS
    if _TOTALS is None:
        _TOTALS = Compilations()

        def on_duration(name: str, seconds: float, **_) -> None:
            # every compile request ends with this event, a cache hit too (then it covers the retrieval)
            if name == "/jax/core/compile/backend_compile_duration":
                _TOTALS.compiled += 1
                _TOTALS.seconds += seconds

        def on_event(name: str, **_) -> None:
            if name == "/jax/compilation_cache/cache_hits":
                _TOTALS.compiled -= 1
                _TOTALS.cache_hits += 1

        monitoring.register_event_duration_secs_listener(on_duration)
        monitoring.register_event_listener(on_event)
    return dataclasses.replace(_TOTALS)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block (as it was after). Wrap the call of a jitted function:
    the first call with a shape traces, lowers and compiles it, which allocates enough Python objects to set off
    collections, and each full collection walks every live object (about 400k once a model, its tokenizer and JAX
    are loaded). Paused, the beam-search program of bench.py decode traced, lowered and compiled in 2.1-3.0 s
    instead of 2.9-3.7 s here. A call with a compiled shape allocates little, so pausing it costs nothing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
