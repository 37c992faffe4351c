"""What each CPU fast path is worth: the train step (or eval forward) as shipped against the same
program with one path undone, compiled in one process and timed interleaved (A, B, C, ...).

  python experiments/ablate_cpu_paths.py                 # Bi-Real-18 train step, 224², batch 32
  python experiments/ablate_cpu_paths.py --kind eval --variants shipped,jax_xor

Variants (each undoes one path, the others stay as shipped):
  shipped     the library as is
  flax_bn     `nn.BatchNorm` (autodiff of flax's ops) instead of `layers.BatchNorm`'s backward
  sliced_pool the strided-slice max-pool instead of oneDNN's pooling
  jax_xor     the pure-JAX `packed.xor_popcount_conv` instead of the C++ XOR forward
The undoing is done by swapping module attributes while the variant is traced (the layers look
them up at trace time), so nothing in the library changes. Figures are medians of `--repeats`
calls, wall and CPU seconds; the last column compares each variant with the first. The train
step uses `layers.cpu_compiler_options()`, the eval forward XLA's defaults (as bench_model's
`lib:cpu` and `lib:default`).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import flax.linen as nn
import jax

import bench_model
from bireal_jax import layers
from bireal_jax.ops.cpu import onednn
from machine import cpu_model, loadavg


@contextlib.contextmanager
def _swapped(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


VARIANTS = {
    "shipped": contextlib.nullcontext,
    "flax_bn": lambda: _swapped(layers, "BatchNorm", nn.BatchNorm),
    "sliced_pool": lambda: _swapped(onednn, "max_pool2d", lambda x, w, s, p: (
        layers._max_pool_sliced(x, w, s, p, tuple(x.shape)))),
    "jax_xor": lambda: _swapped(onednn, "xor_conv", layers._conv_pm1_xor_jax),
}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_model.add_model_args(ap, repeats=9)
  ap.add_argument("--kind", choices=("train", "eval"), default="train",
                  help="the Adam train step or the batch eval forward")
  ap.add_argument("--variants", default=",".join(VARIANTS),
                  help=f"comma-separated subset of {','.join(VARIANTS)}")
  args = bench_model.parse_model_args(ap, argv)
  names = [v for v in args.variants.split(",") if v]
  if not names or any(v not in VARIANTS for v in names):
    ap.error(f"--variants {args.variants!r}: expected a subset of {','.join(VARIANTS)}")
  if not onednn.available():
    print("note: the C++ custom calls are unavailable here, so sliced_pool and jax_xor equal "
          "shipped")
  print(f"jax {jax.__version__}  {cpu_model()}  backend {jax.default_backend()}  {args.kind}  "
        f"model {args.model}  image {args.image_size}  batch {args.batch_size}  median of "
        f"{args.repeats} interleaved calls")
  print(f"load average before: {loadavg()}")
  progs = bench_model.Programs(args.model, args.batch_size, args.image_size, args.num_classes)
  print(f"host malloc: {bench_model.MALLOC}")
  entries = {}
  for name in names:
    t = time.perf_counter()
    with VARIANTS[name]():
      entries[name] = progs.compile(args.kind, "lib", "cpu" if args.kind == "train" else "default")
    print(f"  compiled {name} in {time.perf_counter() - t:.1f} s", flush=True)
  res = bench_model.run_interleaved(entries, warmup=2, repeats=args.repeats)
  base = statistics.median(res[names[0]][0])
  print(f"\n| variant | ms per call | img/s | CPU s per call | time vs {names[0]} |")
  print("|---|---|---|---|---|")
  for name in names:
    walls, cpus, n = res[name]
    med = statistics.median(walls)
    print(f"| {name} | {med * 1e3:.1f} | {n / med:.1f} | {statistics.median(cpus):.2f} | "
          f"{med / base:.3f}× |")
  print(f"\nload average after: {loadavg()}")


if __name__ == "__main__":
  main()
