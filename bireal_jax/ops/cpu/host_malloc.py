"""Host memory for CPU training: let glibc malloc keep what XLA:CPU frees.

XLA:CPU allocates a step's buffers (activations, gradients, temporaries: about 0.7 GB for
Bi-Real-18 at batch 32) at every call and frees them when it returns. glibc hands such large
blocks back to the kernel (mmap'd chunks, trimmed heap tops, per-thread arenas), so the next step
faults them in again, zero-filled, in kernel time at every step (figures: docs/speed.md, "Host
memory"). `keep_freed_memory()` tells glibc to serve everything from one heap
and never return it (`mallopt`: one arena, no mmap, no trimming), so every step reuses the last
one's pages. The price: the process holds its peak memory until it exits.

It must run before JAX's threads first allocate (glibc gives each thread its arena then): the
training job calls it at start-up, before initialising JAX, when no accelerator plugin is
installed (`config.keep_freed_host_memory`, on by default; `cpu_only()`), and so do the
benchmarks; importing `bireal_jax` never does. `BIREAL_MALLOC=system` turns it off everywhere
(e.g. to measure the difference).
"""
from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def cpu_only() -> bool:
  """True when JAX will run on the CPU: `JAX_PLATFORMS=cpu`, or no GPU/TPU plugin installed
  (decided without initialising JAX, so `keep_freed_memory` can still come first)."""
  from importlib import metadata, util
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return (util.find_spec("jax_plugins") is None and util.find_spec("libtpu") is None
          and not metadata.entry_points(group="jax_plugins"))


def keep_freed_memory() -> bool:
  """Sets glibc malloc to keep freed memory; True when it took effect (Linux with glibc and not
  `BIREAL_MALLOC=system`), False otherwise, changing nothing."""
  if os.environ.get("BIREAL_MALLOC", "keep") == "system" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt means something else
  except (OSError, AttributeError):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
