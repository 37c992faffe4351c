"""Benchmark packed Bi-Real inference against float emulation: latency (batch 1), img/s (batch N).

  .venv/bin/python experiments/bench_packed.py --model bireal18 --size 224 --batch 1 32 --reps 7

Variables are random (the speed does not depend on their values); every implementation runs the
same images, and its top-1 is checked against the float model. Prints versions and machine.
Timings are medians over `--reps` timed calls after one warm-up call (compile excluded).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax import models, packed


def random_variables(model, size, seed=0):
  """Trained-looking random variables without running init (abstract shapes + numpy)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      return rng.uniform(0.2, 2.0, s.shape).astype(np.float32)
    if "scale" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (rng.standard_normal(s.shape) * 0.05).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def timeit(fn, x, reps):
  jax.block_until_ready(fn(x))  # compile + warm-up
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(x))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts), min(ts)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="bireal18")
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  ap.add_argument("--impls", nargs="+", default=["float_model", *packed.IMPLS])
  ap.add_argument("--reps", type=int, default=7)
  args = ap.parse_args()

  print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}")
  print(f"python {platform.python_version()} machine {platform.machine()} cpus {os.cpu_count()} "
        f"load {os.getloadavg() if hasattr(os, 'getloadavg') else '?'}")
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((l for l in f if l.startswith("flags")), "")
    print("avx512_vpopcntdq" in flags and "CPU has AVX-512 VPOPCNTDQ" or "no VPOPCNTDQ")
  except OSError:
    pass

  model = models.get(args.model)
  variables = random_variables(model, args.size)
  pm = packed.pack(model, variables)
  print(f"{args.model}: packed payload {pm.num_bytes():,} bytes; default impl "
        f"{packed.default_impl()!r}")
  float_fn = jax.jit(lambda x: model.apply(variables, x))

  for b in args.batch:
    x = jax.random.normal(jax.random.key(1), (b, args.size, args.size, 3), jnp.float32)
    ref = None
    for impl in args.impls:
      fn = float_fn if impl == "float_model" else (lambda x, impl=impl: pm(x, impl=impl))
      med, best = timeit(fn, x, args.reps)
      out = np.asarray(fn(x))
      if ref is None:
        ref = out
      agree = np.array_equal(out.argmax(-1), ref.argmax(-1))
      err = float(np.max(np.abs(out - ref)))
      print(f"batch {b:3d} {impl:12s} median {med * 1e3:8.2f} ms  min {best * 1e3:8.2f} ms  "
            f"{b / med:8.1f} img/s  top-1 same as first: {agree}  max|Δlogit| {err:.2e}",
            flush=True)


if __name__ == "__main__":
  main()
