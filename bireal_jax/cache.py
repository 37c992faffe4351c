"""Where bireal_jax keeps what it builds on a machine (compiled kernels, the resize op, autotune
picks), and the CPU identity those files are keyed by. Imports nothing heavy: both the CPU
backend (`ops/cpu/build.py`) and the input pipeline (`data/resize_op.py`) use it."""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def cache_dir() -> Path:
  """$BIREAL_JAX_CACHE, default ~/.cache/bireal_jax."""
  return Path(os.environ.get("BIREAL_JAX_CACHE", Path.home() / ".cache" / "bireal_jax"))


@functools.lru_cache(maxsize=None)  # read once: every library key and ISA question asks for it
def cpu_id() -> str:
  """The CPU's model name and feature flags (Linux), else what `platform` knows."""
  try:
    info = Path("/proc/cpuinfo").read_text()
    return "\n".join(sorted({l for l in info.splitlines()
                              if l.startswith(("model name", "flags"))}))
  except OSError:
    import platform
    return platform.processor() + platform.machine()


def library_file(name: str, *parts: bytes) -> Path:
  """`cache_dir()/name-KEY.so`, KEY a hash of `parts` (sources, flags, versions) and the CPU:
  a change of any of them, or another machine sharing the home directory, builds anew."""
  key = hashlib.sha256(b"".join(parts) + cpu_id().encode()).hexdigest()[:16]
  return cache_dir() / f"{name}-{key}.so"


def compile_library(out: Path, cmd: Sequence[str], timeout_s: Optional[float] = None) -> None:
  """Runs the compiler command `cmd` (`-o` appended) into `out` atomically: concurrent test
  workers or processes may build the same library at once. RuntimeError with its stderr."""
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_out = Path(tmp) / out.name
    proc = subprocess.run([*cmd, "-o", str(tmp_out)], capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp_out, out)
