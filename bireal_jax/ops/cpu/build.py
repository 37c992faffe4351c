"""Compiling and loading the C++ custom calls: one cached shared library per source set and CPU.

Libraries are built on first use with the system compiler (`$CXX`, default g++), `-O3
-march=native`, and cached under `$BIREAL_JAX_CACHE` (default `~/.cache/bireal_jax`), keyed by
the sources and the headers beside them (`csrc/*.h`), the jax version (the FFI headers come from
jaxlib), the extra flags and the CPU (model and feature flags: a shared home directory may serve
several machines). When the run caps the instruction set below the CPU's (`ONEDNN_MAX_CPU_ISA=
AVX2` or `XLA_FLAGS=--xla_cpu_max_isa=AVX2`, e.g. to reproduce an AVX2-only machine on an AVX-512
one), the C++ is built without AVX-512 as well, so every kernel sees the same machine.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import jax

from bireal_jax.cache import compile_library, cpu_id, library_file

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")


def cpu_flags() -> set:
  m = re.search(r"^flags\s*:(.*)$", cpu_id(), re.M)
  return set(m.group(1).split()) if m else set()


def isa_cap() -> str | None:
  """'AVX2' when the run caps the ISA at AVX2 (oneDNN's or XLA's setting), else None."""
  xla = re.search(r"--xla_cpu_max_isa=(\w+)", os.environ.get("XLA_FLAGS", ""))
  caps = {os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper(), (xla.group(1).upper() if xla else "")}
  return "AVX2" if caps & {"AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX", "SSE41", "SSE4_2"} else None


def has_amx() -> bool:
  """Whether the CPU has AMX with bf16 tiles (`amx_bf16` in /proc/cpuinfo's flags, Intel Sapphire
  Rapids and later) and the run does not cap the ISA below it. `BIREAL_AMX=1` or `0` overrides
  the answer (tests; or to keep `auto` from timing the AMX candidates). `auto` offers the
  bf16 oneDNN binary convolutions only where this is true (`ops.CANDIDATES[...].offered`)."""
  forced = os.environ.get("BIREAL_AMX", "").strip()
  if forced in ("0", "1"):
    return forced == "1"
  if forced:
    raise ValueError(f"BIREAL_AMX={forced!r}: expected '1', '0' or unset")
  return "amx_bf16" in cpu_flags() and isa_cap() is None


def isa() -> str:
  """What the kernels may use here, in words: 'AVX-512 (VPOPCNTDQ)', 'AVX-512', 'AVX2', ..."""
  flags = cpu_flags()
  if "avx512f" in flags and isa_cap() is None:
    return "AVX-512" + (" + VPOPCNTDQ" if "avx512_vpopcntdq" in flags else "")
  if "avx2" in flags:
    return "AVX2" + (" (capped; CPU has AVX-512)" if "avx512f" in flags else "")
  return "no AVX2" if flags else "unknown"


def _arch_flags() -> list[str]:
  return ["-march=native"] + (["-mno-avx512f"] if isa_cap() else [])


def headers() -> list[Path]:
  """The headers the sources may include (`csrc/*.h`, found beside them by `#include "..."`):
  part of every library's cache key, so a changed header rebuilds what uses it."""
  return sorted(CSRC.glob("*.h"))


def library_path(name: str, sources: Sequence[Path], flags: Sequence[str]) -> Path:
  return library_file(name, *(p.read_bytes() for p in [*sources, *headers()]),
                      jax.__version__.encode(), " ".join([*_arch_flags(), *flags]).encode())


def compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "g++"))


def _compile(out: Path, sources: Sequence[Path], flags: Sequence[str]) -> None:
  """Builds the shared library into `out` atomically (concurrent test workers may race)."""
  compile_library(out, [os.environ.get("CXX", "g++"), "-O3", *_arch_flags(), "-fopenmp",
                        "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
                        *map(str, sources), *flags])


def load(name: str, sources: Sequence[Path], targets: Mapping[str, str],
         flags: Sequence[str] = ()) -> None:
  """Build (once) and load a library, registering its FFI `targets` {name: symbol} on the CPU.

  Raises OSError / RuntimeError / AttributeError when that fails."""
  path = library_path(name, sources, flags)
  if not path.exists():
    log.info("bireal_jax: compiling %s into %s", name, path)
    _compile(path, sources, flags)
  # The kernels run on OpenMP threads; left spinning after each call they take the cores from
  # XLA's own threads running the fusions in between. Read once, when libgomp loads.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  lib = ctypes.cdll.LoadLibrary(str(path))
  for target, symbol in targets.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def kernel_available(library: str, sources, symbols: dict, flags=(), what: str = "") -> bool:
  """Build and register `library` (see `load`) unless BIREAL_CPU_KERNELS=0 or no compiler;
  False, with the reason on stderr, when it cannot be had. Callers cache the answer."""
  if os.environ.get("BIREAL_CPU_KERNELS", "1") == "0":
    reason = "disabled by BIREAL_CPU_KERNELS=0"
  elif compiler() is None:
    reason = "no C++ compiler (apt-get install g++)"
  else:
    try:
      load(library, sources, symbols, flags)
      return True
    except (OSError, RuntimeError, AttributeError) as e:
      reason = str(e)
  log.warning("bireal_jax: %s unavailable (%s)", what or library, reason)
  return False
