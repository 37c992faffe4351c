"""Where bireal_jax keeps what it builds on a machine (compiled kernels, the resize op, autotune
picks), and the CPU identity those files are keyed by. Imports nothing heavy: both the CPU
backend (`ops/cpu/build.py`) and the input pipeline (`data/resize_op.py`) use it."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
  """$BIREAL_JAX_CACHE, default ~/.cache/bireal_jax."""
  return Path(os.environ.get("BIREAL_JAX_CACHE", Path.home() / ".cache" / "bireal_jax"))


def cpu_id() -> str:
  """The CPU's model name and feature flags (Linux), else what `platform` knows."""
  try:
    info = Path("/proc/cpuinfo").read_text()
    return "\n".join(sorted({l for l in info.splitlines()
                              if l.startswith(("model name", "flags"))}))
  except OSError:
    import platform
    return platform.processor() + platform.machine()
