"""What each CPU fast path is worth: the train step (or eval forward) as shipped against the same
program with one path undone, compiled in one process and timed interleaved (A, B, C, ...).

  python experiments/ablate_cpu_paths.py                 # Bi-Real-18 train step, 224², batch 32
  python experiments/ablate_cpu_paths.py --kind eval --variants shipped,jax_xor

Variants (each undoes one path, the others stay as shipped):
  shipped     the "native" preset of `bireal_jax.ops`: the C++ kernels wherever they apply
  flax_bn     flax's BatchNorm formula differentiated by autodiff (`batch_norm_train` =
              "reference") instead of the hand-written backward ("fused_bwd")
  sliced_pool the strided-slice max-pool ("sliced") instead of oneDNN's pooling
  jax_xor     the pure-JAX XOR forward ("xor_jax", `bits.xor_popcount_conv`) instead of the C++
              XOR kernel ("xor")
Each variant is an `ops.implementation` setting ({op: candidates}) the program is traced under,
so nothing in the library changes. Figures are medians of `--repeats` calls, wall and CPU
seconds; the last column compares each variant with the first. The train step uses
`ops.compiler_options()`, the eval forward XLA's defaults (as bench_model's `native:cpu` and
`native:default`).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax

import bench_model
from bireal_jax import ops
from bireal_jax.ops.cpu import onednn, xor
from machine import cpu_model, loadavg

SHIPPED = dict(ops.PRESETS["native"])

# name -> `ops.implementation` setting: the shipped one with one op's candidates replaced.
VARIANTS = {
    "shipped": SHIPPED,
    "flax_bn": dict(SHIPPED, batch_norm_train=("reference",)),
    "sliced_pool": dict(SHIPPED, max_pool=("sliced",)),
    "jax_xor": dict(SHIPPED, binary_conv2d=tuple("xor_jax" if n == "xor" else n
                                                 for n in SHIPPED["binary_conv2d"])),
}


def compile_variant(progs: bench_model.Programs, kind: str, setting, options: str):
  """`progs.compile(kind, ...)` traced under the `ops.implementation` setting of a variant."""
  if kind == "train":
    fn = lambda *a: progs.train_step(*a)  # noqa: E731  fresh function: no trace-cache sharing
    args = (progs.variables["params"], progs.variables["batch_stats"], progs.opt_state,
            progs.images, progs.labels)
    step = lambda c, a: (*c(*a), a[3], a[4])  # noqa: E731
  elif kind == "eval":
    fn = lambda *a: progs.forward(*a)  # noqa: E731
    args = (progs.variables, progs.images)
    step = lambda c, a: (jax.block_until_ready(c(*a)), a)[1]  # noqa: E731
  else:
    raise ValueError(f"unknown kind {kind!r}")
  with ops.implementation(setting):
    compiled = jax.jit(fn).lower(*args).compile(
        compiler_options=bench_model.compiler_options(options))
  return compiled, args, progs.images.shape[0], step


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
  if not (onednn.available() and xor.available()):
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
    entries[name] = compile_variant(progs, args.kind, VARIANTS[name],
                                    "cpu" if args.kind == "train" else "default")
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
