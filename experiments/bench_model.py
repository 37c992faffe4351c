"""Throughput of the float-emulated model on CPU: one Adam train step, eval forward, batch-1 latency.

  .venv/bin/python experiments/bench_model.py --model bireal18 --image-size 224 --batch-size 32

Every program is jitted and timed after `--warmup` untimed calls (compile excluded); figures are
medians of `--repeats` calls. Several variants are compiled in the same process and timed
interleaved (A, B, A, B, ...), so load from other processes hits them alike; the ratio column
compares each variant with the last one. Variants are `PATHS:OPTIONS`, PATHS a setting of
`bireal_jax.ops.implementation`:

  PATHS    auto       the library's default: each op's fastest candidate on this CPU and shape
                      (timed on first use; the picks are printed)   [alias: lib]
           native     the C++ kernels wherever they apply: oneDNN f32 convolutions, gradients
                      and max-pool, the C++ XOR/popcount binary-conv forward, BatchNorm backward
           jax        no custom calls: XLA's convolutions, the pure-JAX XOR forward, sliced
                      max-pool, BatchNorm backward                 [alias: xla]
           reference  plain lax ops, what GPUs and TPUs run         [alias: ref]
  OPTIONS  default  XLA's default compiler options
           cpu      `ops.compiler_options()` (Eigen instead of YNNPACK convolutions)

The train step is Adam + softmax cross-entropy with batch_stats mutable (the work of
`bireal_jax.train`'s step, minus metrics). Besides wall time it reports CPU seconds per call
(user+sys of this process), which is less sensitive to other processes on a shared machine.
Load averages are printed before and after.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from bireal_jax.ops.cpu import host_malloc

# As the training job does on the CPU, before JAX's threads allocate (`BIREAL_MALLOC=system` to
# measure without it).
MALLOC = "keep" if host_malloc.cpu_only() and host_malloc.keep_freed_memory() else "system"

import flax  # noqa: E402
import jax
import jaxlib
import jax.numpy as jnp
import numpy as np
import optax

from bireal_jax import models, ops  # noqa: E402
from bireal_jax.ops import autotune  # noqa: E402
from bireal_jax.ops.cpu import build  # noqa: E402
from machine import cores, cpu_model, cpu_seconds, loadavg

DEFAULT_VARIANTS = {"train": "auto:cpu,native:cpu,jax:cpu,reference:cpu",
                    "eval": "auto:default,native:default,jax:default,reference:default",
                    "latency": "auto:default,native:default,jax:default,reference:default"}


def compiler_options(name: str) -> dict:
  if name == "default":
    return {}
  if name == "cpu":
    return ops.compiler_options()
  raise ValueError(f"unknown compiler options {name!r}; expected 'default' or 'cpu'")


SETTINGS = {"auto": "auto", "native": "native", "jax": "jax", "reference": "reference",
            "lib": "auto", "xla": "jax", "ref": "reference"}  # the last three: older names
PATHS = tuple(SETTINGS)


class Programs:
  """Jitted train step, eval forward and batch-1 forward of one model, with their inputs."""

  def __init__(self, model_name: str, batch: int, size: int, num_classes: int,
               dtype: str = "float32", seed: int = 0):
    self.model = models.get(model_name, num_classes=num_classes, dtype=dtype)
    rng = np.random.default_rng(seed)
    self.images = jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))
    self.labels = jnp.asarray(rng.integers(0, num_classes, batch))
    # rbg key: the jitted init compiles far faster than with threefry; values don't affect speed.
    self.variables = jax.jit(self.model.init)(jax.random.key(seed, impl="rbg"), self.images[:1])
    self.tx = optax.adam(1e-3)
    self.opt_state = self.tx.init(self.variables["params"])

  def train_step(self, params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, upd = self.model.apply({"params": params, "batch_stats": batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, upd["batch_stats"]
    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state

  def forward(self, variables, images):
    return self.model.apply(variables, images)

  def compile(self, kind: str, paths: str, options: str):
    """(compiled fn, args, images per call, step) for kind in train/eval/latency.

    `step(fn, args)` runs one call and returns the args of the next (the train state advances).
    """
    if paths not in PATHS:
      raise ValueError(f"unknown paths {paths!r}; expected one of {PATHS}")
    if kind == "train":
      fn = lambda *a: self.train_step(*a)  # fresh function object: no trace-cache sharing
      args = (self.variables["params"], self.variables["batch_stats"], self.opt_state,
              self.images, self.labels)
      step = lambda c, a: (*c(*a), a[3], a[4])
      n = self.images.shape[0]
    elif kind in ("eval", "latency"):
      fn = lambda *a: self.forward(*a)
      images = self.images if kind == "eval" else self.images[:1]
      args = (self.variables, images)
      step = lambda c, a: (jax.block_until_ready(c(*a)), a)[1]  # same inputs every call
      n = images.shape[0]
    else:
      raise ValueError(f"unknown kind {kind!r}")
    with ops.implementation(SETTINGS[paths]):
      compiled = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options(options))
    return compiled, args, n, step


def run_interleaved(entries: dict, warmup: int, repeats: int) -> dict:
  """Times each entry's calls interleaved; returns {name: (wall list, cpu list, n)}."""
  state = {}
  for name, (compiled, args, n, step) in entries.items():
    for _ in range(warmup):
      args = step(compiled, args)
    jax.block_until_ready(args)
    state[name] = args
  out = {name: ([], [], entries[name][2]) for name in entries}
  for _ in range(repeats):
    for name, (compiled, _, _, step) in entries.items():
      t, c = time.perf_counter(), cpu_seconds()
      state[name] = jax.block_until_ready(step(compiled, state[name]))
      out[name][0].append(time.perf_counter() - t)
      out[name][1].append(cpu_seconds() - c)
  return out


def add_model_args(ap: argparse.ArgumentParser, repeats: int) -> None:
  """The model/input/repeat flags every CPU model benchmark takes (checked by parse_model_args)."""
  ap.add_argument("--model", default="bireal18", help=f"one of {models.names()}")
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--repeats", type=int, default=repeats)


def parse_model_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """`ap.parse_args`, then an error naming the flag for an unknown model or a size below 1."""
  args = ap.parse_args(argv)
  if args.model not in models.names():
    ap.error(f"unknown model {args.model!r}; expected one of {models.names()}")
  for flag in ("image_size", "batch_size", "num_classes", "repeats"):
    if getattr(args, flag) < 1:
      ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  return args


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  add_model_args(ap, repeats=7)
  ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
  ap.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
  ap.add_argument("--mode", choices=("all", "both", "train", "forward", "latency"), default="all",
                  help="all = train + eval forward + batch-1 latency; both = train + eval")
  for kind in ("train", "eval", "latency"):
    ap.add_argument(f"--{kind}-variants", default=DEFAULT_VARIANTS[kind],
                    help=f"comma-separated PATHS:OPTIONS (default {DEFAULT_VARIANTS[kind]})")
  args = parse_model_args(ap, argv)
  kinds = {"all": ("train", "eval", "latency"), "both": ("train", "eval"), "train": ("train",),
           "forward": ("eval",), "latency": ("latency",)}[args.mode]
  variants = {}
  for kind in kinds:
    vs = [v.strip() for v in getattr(args, f"{kind}_variants").split(",") if v.strip()]
    for v in vs:
      if v.count(":") != 1 or v.split(":")[0] not in PATHS or \
         v.split(":")[1] not in ("default", "cpu"):
        ap.error(f"variant {v!r} must be PATHS:OPTIONS with PATHS {'|'.join(PATHS)}, "
                 f"OPTIONS default|cpu")
    variants[kind] = vs

  print(f"jax {jax.__version__}  jaxlib {jaxlib.__version__}  flax {flax.__version__}  optax {optax.__version__}  python {platform.python_version()}")
  print(f"cpu {cpu_model()}  ISA {build.isa()}  cores {cores()} (os.cpu_count "
        f"{os.cpu_count()})  backend {jax.default_backend()}  devices {jax.local_device_count()}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
        f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')!r}  "
        f"cpu_compiler_options={ops.compiler_options()}")
  print(f"model {args.model}  image {args.image_size}x{args.image_size}  batch {args.batch_size}  "
        f"dtype {args.dtype}  median of {args.repeats} interleaved calls after {args.warmup} "
        f"warm-up calls")
  print(f"load average before: {loadavg()}")
  progs = Programs(args.model, args.batch_size, args.image_size, args.num_classes, args.dtype)
  print(f"host malloc: {MALLOC} (bireal_jax/ops/cpu/host_malloc.py)")
  for kind in kinds:
    entries = {}
    for v in variants[kind]:
      t = time.perf_counter()
      entries[v] = progs.compile(kind, *v.split(":"))
      print(f"  compiled {kind} {v} in {time.perf_counter() - t:.1f} s", flush=True)
    res = run_interleaved(entries, args.warmup, args.repeats)
    ref = statistics.median(res[variants[kind][-1]][0])
    label = {"train": "train step (Adam)", "eval": "eval forward", "latency": "batch-1 forward"}
    for v in variants[kind]:
      walls, cpus, n = res[v]
      med = statistics.median(walls)
      rate = (f"{med * 1e3:8.1f} ms" if kind == "latency" else f"{n / med:8.1f} img/s")
      print(f"{label[kind]:18s} {v:12s} {rate}  median {med * 1e3:8.1f} ms/call (min "
            f"{min(walls) * 1e3:.1f})  cpu {statistics.median(cpus):6.2f} s/call  "
            f"speed vs {variants[kind][-1]}: {ref / med:5.2f}x", flush=True)
  print_auto_choices()
  print(f"load average after: {loadavg()}")


def print_auto_choices() -> None:
  """What `auto` picked, per op: counts of shapes per candidate, then each shape."""
  summary = autotune.summary()
  if not summary:
    return
  print("auto's picks (op: candidate x shapes):  " + ";  ".join(
      f"{op}: " + ", ".join(f"{n} x{c}" for n, c in picks.items())
      for op, picks in summary.items()))
  for op, picks in autotune.choices().items():
    for shape, name in picks.items():
      print(f"  {op:17s} {shape:70s} -> {name}")


if __name__ == "__main__":
  main()
