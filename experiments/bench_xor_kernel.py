"""Times `csrc/xor_conv.cc` (the binary convolutions' XOR + popcount forward, an XLA FFI custom
call) compiled three ways: `-march=native` (AVX-512 VPOPCNTDQ where the CPU has it), `-march=
x86-64-v3` (the AVX2 path) and `-march=x86-64` (the scalar fallback), on Bi-Real-18's binary
3×3 convolutions at 224² input, against XLA's f32 convolution of the same ±1 operands.

  .venv/bin/python experiments/bench_xor_kernel.py [--batch 32] [--threads 2] [--repeats 7]

Each build is loaded here with ctypes and registered under its own FFI target (the library's
loader in `ops/cpu/onednn.py` compiles only the native one). Times are medians of `--repeats`
jitted calls after a warm-up, `block_until_ready`; the outputs of all builds are checked equal.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "bireal_jax" / "ops" / "cpu" / "csrc" / "xor_conv.cc"
BUILDS = {"native": "native", "avx2": "x86-64-v3", "scalar": "x86-64"}

# (x shape without batch, kernel HWIO, stride, pad): Bi-Real-18's binary convolutions at 224².
SHAPES = [
    ((56, 56, 64), (3, 3, 64, 64), 1, 1),
    ((56, 56, 64), (3, 3, 64, 128), 2, 1),
    ((28, 28, 128), (3, 3, 128, 128), 1, 1),
    ((28, 28, 128), (3, 3, 128, 256), 2, 1),
    ((14, 14, 256), (3, 3, 256, 256), 1, 1),
    ((14, 14, 256), (3, 3, 256, 512), 2, 1),
    ((7, 7, 512), (3, 3, 512, 512), 1, 1),
]


def cpu_isa() -> str:
  try:
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
                .group(1).split())
  except (OSError, AttributeError):
    return "unknown (no /proc/cpuinfo)"
  have = [f for f in ("avx512f", "avx512_vpopcntdq", "avx2", "fma", "popcnt") if f in flags]
  return " ".join(have) + ("" if "avx512f" in flags else "  (no AVX-512)")


def build(source: Path, march: str, out: Path) -> None:
  import jax
  cmd = ["g++", "-O3", f"-march={march}", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
         f"-I{jax.ffi.include_dir()}", str(source), "-o", str(out)]
  r = subprocess.run(cmd, capture_output=True, text=True)  # XLA's headers warn: keep quiet
  if r.returncode:
    sys.exit(f"{shlex.join(cmd)} failed:\n{r.stderr}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--threads", type=int, default=2,
                  help="OpenMP threads and the CPUs this process may run on (XLA included)")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--source", type=Path, default=SOURCE, help="the .cc to build (default: ours)")
  ap.add_argument("--builds", default=",".join(BUILDS), help=f"subset of {','.join(BUILDS)}")
  args = ap.parse_args()

  # Before JAX or OpenMP start threads: both size their pools from these.
  os.environ["OMP_NUM_THREADS"] = str(args.threads)
  cpus = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, cpus[:args.threads])

  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from bireal_jax.ops.cpu import xor

  print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
  print(f"CPU: {cpu_isa()}; {args.threads} threads (of {len(cpus)} CPUs); batch {args.batch}; "
        f"median of {args.repeats}; jax {jax.__version__}; source {args.source.name}; "
        f"load average {os.getloadavg()[0]:.1f} (other processes skew the times)")

  names = [b for b in args.builds.split(",") if b]
  calls = {}
  with tempfile.TemporaryDirectory() as tmp:
    for b in names:
      so = Path(tmp) / f"xor_{b}.so"
      build(args.source, BUILDS[b], so)
      lib = ctypes.cdll.LoadLibrary(str(so))
      target = f"bench_xor_conv_{b}_{os.getpid()}"
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.BirealXorConvFwd), platform="cpu")
      calls[b] = target

  def xor_fn(target, stride, pad):
    return jax.jit(lambda x, w: xor.xor_conv(x, w, stride, pad, target=target))

  def lax_fn(stride, pad):
    return jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC")))

  def timed(f, *a):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))

  cols = names + ["lax f32"]
  head = f"{'x (HWC)':>12} {'kernel':>14} {'s':>2} " + " ".join(f"{c:>9}" for c in cols)
  if "scalar" in names:
    head += "  " + " ".join(f"{'/' + c:>8}" for c in names if c != "scalar")
  print("ms per call" + (", and speed-up over scalar" if "scalar" in names else ""))
  print(head)
  rng = np.random.default_rng(0)
  totals = dict.fromkeys(cols, 0.0)
  for (h, w, c), k, stride, pad in SHAPES:
    x = jnp.asarray(np.where(rng.standard_normal((args.batch, h, w, c)) >= 0, 1.0, -1.0),
                    jnp.float32)
    # α a multiple of 1/8: the f32 convolution sums exactly too, so all outputs agree bit for bit.
    alpha = rng.integers(1, 16, k[3]) / 8
    wq = jnp.asarray(np.where(rng.standard_normal(k) >= 0, 1.0, -1.0) * alpha, jnp.float32)
    ms, outs = {}, {}
    for b in names:
      f = xor_fn(calls[b], stride, pad)
      outs[b] = np.asarray(f(x, wq))
      ms[b] = timed(f, x, wq)
    f = lax_fn(stride, pad)
    ref = np.asarray(f(x, wq))
    ms["lax f32"] = timed(f, x, wq)
    for b in names:
      np.testing.assert_array_equal(outs[b], ref, err_msg=f"build {b} on {(h, w, c)} {k}")
    for col in cols:
      totals[col] += ms[col]
    row = f"{f'{h}x{w}x{c}':>12} {'x'.join(map(str, k)):>14} {stride:>2} "
    row += " ".join(f"{ms[col]:9.2f}" for col in cols)
    if "scalar" in names:
      row += "  " + " ".join(f"{ms['scalar'] / ms[b]:7.1f}x" for b in names if b != "scalar")
    print(row, flush=True)
  row = f"{'total':>12} {'':>14} {'':>2} " + " ".join(f"{totals[col]:9.2f}" for col in cols)
  if "scalar" in names:
    row += "  " + " ".join(f"{totals['scalar'] / totals[b]:7.1f}x" for b in names if b != "scalar")
  print(row)
  print("all builds equal the f32 convolution bit for bit")


if __name__ == "__main__":
  main()
