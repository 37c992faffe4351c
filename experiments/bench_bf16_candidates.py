"""Times the binary convs' `onednn_bf16` candidates (the AMX ones, issue 24 item 3) beside the
others that `auto` times, on Bi-Real-18's 3×3 shapes, with `auto`'s own timer.

  .venv/bin/python experiments/bench_bf16_candidates.py [--rounds 11]

`auto` times `onednn_bf16` only on AMX CPUs (`build.has_amx()`); this runs it on any CPU, so its
speed there can be compared. Each figure is `autotune.measure`'s: the minimum over interleaved
rounds of the mean of a few calls, ms, random operands (±1 and α·sign for `binary_conv2d`).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

from bireal_jax import ops  # noqa: E402
from bireal_jax.ops import autotune  # noqa: E402
from bireal_jax.ops.cpu import build  # noqa: E402

PACKED = [(1, 56, 64), (1, 28, 128), (1, 14, 256), (1, 7, 512), (4, 56, 64), (4, 7, 512)]
FLOAT = [(1, 56, 64), (1, 7, 512)]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--rounds", type=int, default=11)
  args = ap.parse_args()
  os.environ["BIREAL_AUTOTUNE_ROUNDS"] = str(args.rounds)
  for candidates in ops.CANDIDATES.values():  # build and register the custom calls
    for c in candidates.values():
      c.available()
  print(f"jax {jax.__version__} '{machine.cpu_model()}' cores {machine.cores()} isa "
        f"{build.isa()} amx {build.has_amx()} load {machine.loadavg()}")
  s1 = dict(stride=1, pad=1)
  for n, hw, c in PACKED:
    x = jax.ShapeDtypeStruct((n, hw, hw, c), jnp.float32)
    bits = jax.ShapeDtypeStruct((3, 3, c // 32, c), jnp.uint32)
    v = jax.ShapeDtypeStruct((c,), jnp.float32)
    t = autotune.measure("packed_conv2d", ["reference", "xor_cpp", "onednn_bf16"],
                       (x, bits, v, v, x), s1, False)
    print(f"packed_conv2d {n}x{hw}x{hw}x{c} 3x3/1 + residual: "
          + "  ".join(f"{k} {v * 1e3:.3f}" for k, v in t.items()) + " ms", flush=True)
  for n, hw, c in FLOAT:
    x = jax.ShapeDtypeStruct((n, hw, hw, c), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, c, c), jnp.float32)
    t = autotune.measure("binary_conv2d", ["reference", "onednn", "xor", "onednn_bf16"], (x, w),
                       dict(strides=(1, 1), pads=((1, 1), (1, 1))), False)
    print(f"binary_conv2d {n}x{hw}x{hw}x{c} 3x3/1 eval: "
          + "  ".join(f"{k} {v * 1e3:.3f}" for k, v in t.items()) + " ms", flush=True)
  print(f"load {machine.loadavg()}")


if __name__ == "__main__":
  main()
