"""Throughput of the float-emulated model on CPU: eval forward and one Adam train step, in img/s.

  .venv/bin/python experiments/bench_model.py --model bireal18 --image-size 224 --batch-size 32

Both programs are jitted; the train step is Adam + softmax cross-entropy with batch_stats mutable
(the same work as `bireal_jax.train`'s step, minus metrics). Timings are medians of `--repeats`
timed calls after `--warmup` untimed calls (compile excluded). Load averages are printed before
and after because a shared machine makes the figures noisy.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bireal_jax import models


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def loadavg() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def timed(fn, args, warmup: int, repeats: int) -> list[float]:
  for _ in range(warmup):
    args = fn(*args)
  jax.block_until_ready(args)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    args = fn(*args)
    jax.block_until_ready(args)
    times.append(time.perf_counter() - t)
  return times


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="bireal18", help=f"one of {models.names()}")
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
  ap.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
  ap.add_argument("--mode", choices=("both", "forward", "train"), default="both")
  args = ap.parse_args(argv)
  if args.model not in models.names():
    ap.error(f"unknown model {args.model!r}; expected one of {models.names()}")
  for flag in ("image_size", "batch_size", "num_classes", "repeats"):
    if getattr(args, flag) < 1:
      ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"jax {jax.__version__}  flax {flax.__version__}  optax {optax.__version__}  "
        f"python {platform.python_version()}")
  print(f"cpu {cpu_model()}  cores {cores} (os.cpu_count {os.cpu_count()})  "
        f"backend {jax.default_backend()}  devices {jax.local_device_count()}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  load average before: {loadavg()}")

  model = models.get(args.model, num_classes=args.num_classes, dtype=args.dtype)
  b, s = args.batch_size, args.image_size
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((b, s, s, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, args.num_classes, b))
  # rbg key: the jitted init compiles far faster than with threefry; values don't affect speed.
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images[:1])
  tx = optax.adam(1e-3)

  @jax.jit
  def forward(variables, images):
    return variables, model.apply(variables, images)

  @jax.jit
  def train_step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, upd["batch_stats"]
    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state

  print(f"model {args.model}  image {s}x{s}  batch {b}  dtype {args.dtype}  "
        f"repeats {args.repeats} (median) after {args.warmup} warm-up calls")
  results = {}
  if args.mode in ("both", "forward"):
    t = time.perf_counter()
    jax.block_until_ready(forward(variables, images))
    compile_s = time.perf_counter() - t
    ts = timed(lambda v, _: forward(v, images), (variables, None), args.warmup, args.repeats)
    results["forward (eval)"] = (compile_s, ts)
  if args.mode in ("both", "train"):
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    t = time.perf_counter()
    state = jax.block_until_ready(train_step(*state))
    compile_s = time.perf_counter() - t
    results["train step (Adam)"] = (compile_s, timed(train_step, state, args.warmup,
                                                     args.repeats))
  for name, (compile_s, ts) in results.items():
    med = statistics.median(ts)
    print(f"{name:18s} {b / med:8.1f} img/s  median {med * 1e3:8.1f} ms/batch  "
          f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}; first call incl. compile "
          f"{compile_s:.1f} s)")
  print(f"load average after: {loadavg()}")


if __name__ == "__main__":
  main()
