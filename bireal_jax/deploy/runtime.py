"""Running the packed forward: micro-batches, concurrent streams, the jit cache, XLA options.

XLA CPU runs this forward's kernels one after another, so on CPU a batch is split into
`default_streams()` chunks run concurrently from Python threads (XLA releases the GIL while it
computes), cut at micro-batch boundaries so that the logits are bitwise those of one call.
This buys time only where cores are free. The CPU defaults below were chosen by
`experiments/bench_packed.py` (figures: docs/deployment.md).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

from bireal_jax.deploy.forward import forward

MICRO_BATCH_CPU = 2  # images per step of the stem: its large maps stay in cache
STAGE_MICRO_BATCH_CPU = 4  # images per step of the binary stages and head
MAX_STREAMS_CPU = 8  # beyond this, chunks of a typical eval batch get too small to pay off


def _backend(backend: Optional[str]) -> str:
  return backend or jax.default_backend()


def default_micro_batch(backend: Optional[str] = None) -> Optional[int]:
  """CPU: MICRO_BATCH_CPU images per step (activations stay in cache); else None (whole batch)."""
  return MICRO_BATCH_CPU if _backend(backend) == "cpu" else None


def default_stage_micro_batch(backend: Optional[str] = None) -> Optional[int]:
  """CPU: STAGE_MICRO_BATCH_CPU images per step of the binary stages; else None (as the stem)."""
  return STAGE_MICRO_BATCH_CPU if _backend(backend) == "cpu" else None


def compiler_options(backend: Optional[str] = None) -> dict:
  """XLA options for jitting `forward`. CPU: 512-bit vectors (`xla_cpu_prefer_vector_width`;
  XLA CPU defaults to 256-bit, which halves the XOR/popcount loops' width with AVX-512);
  applied to this jit only. Pass them to your own `jax.jit(..., compiler_options=...)` when you
  call a PackedModel inside it. Other backends: none."""
  return {"xla_cpu_prefer_vector_width": 512} if _backend(backend) == "cpu" else {}


def default_streams(backend: Optional[str] = None) -> int:
  """CPU: the usable cores (at most MAX_STREAMS_CPU); other backends: 1."""
  if _backend(backend) != "cpu":
    return 1
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    cores = os.cpu_count() or 1
  return max(1, min(cores, MAX_STREAMS_CPU))


def split_streams(n: int, streams: int, micro_batch: Optional[int]) -> list[tuple[int, int]]:
  """`[(start, stop), ...]`: at most `streams` contiguous chunks of `n` images, cut at multiples
  of `micro_batch`, so that every image lands in the same micro-batch as in one whole call (the
  logits are then bitwise those of one call)."""
  unit = micro_batch or 1
  units = -(-n // unit)
  k = max(1, min(streams, units))
  bounds = [min(n, (units * i // k) * unit) for i in range(k + 1)]
  return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _forward_static(cfg_json, impl, micro_batches, params, images):
  return forward(json.loads(cfg_json), params, images, impl, *micro_batches)


_JITTED: dict = {}


def _jitted():
  backend = jax.default_backend()
  if backend not in _JITTED:
    _JITTED[backend] = jax.jit(_forward_static, static_argnums=(0, 1, 2),
                               compiler_options=compiler_options(backend) or None)
  return _JITTED[backend]


def is_traced(tree) -> bool:
  return any(isinstance(l, jax.core.Tracer) for l in jax.tree.leaves(tree))


_POOL: list = []


def run_streams(cfg_json, impl, micro_batches, params, images, streams: int):
  """The jitted `forward` on `split_streams` chunks, one Python thread each, concatenated in order."""
  unit = math.lcm(*(m or 1 for m in micro_batches))  # whole micro-batches of every phase
  chunks = split_streams(images.shape[0], streams, unit)
  fwd = _jitted()  # created here, not by racing threads
  if len(chunks) == 1:
    return fwd(cfg_json, impl, micro_batches, params, images)
  if not _POOL or _POOL[0]._max_workers < len(chunks):
    from concurrent.futures import ThreadPoolExecutor
    if _POOL:
      _POOL[0].shutdown(wait=False)
    _POOL[:] = [ThreadPoolExecutor(len(chunks), thread_name_prefix="bireal_packed")]

  def run(ab):
    return jax.block_until_ready(fwd(cfg_json, impl, micro_batches, params, images[ab[0]:ab[1]]))

  return jnp.concatenate(list(_POOL[0].map(run, chunks)))
