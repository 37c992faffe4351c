"""Where a compiled train step spends its time: a `jax.profiler` trace, summed by XLA op.

Runs `bench_model`'s Adam train step (library paths and CPU compiler options by default) a few
times under the profiler, reads the Perfetto trace it writes, and prints per-step milliseconds
grouped three ways: by kind (each C++ custom call, XLA convolutions, library fusions such as
YNNPACK dots/reductions, other fusions), by output shape, and the slowest single ops. On a CPU
the per-op events are XLA:CPU's thunks, so the groups add up to about the step's wall time.

  python experiments/profile_step.py                          # Bi-Real-18, 224², batch 32
  python experiments/profile_step.py --paths ref --top 20     # the plain lax ops instead
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402  (experiments/bench_model.py)
from machine import cpu_model, loadavg  # noqa: E402


CUSTOM_CALLS = {"bireal_onednn_conv": "custom calls: oneDNN convolutions",
                "bireal_onednn_pool": "custom calls: oneDNN max-pool",
                "bireal_xor_conv": "custom calls: C++ XOR binary-conv forward"}


def op_kind(name: str, hlo_op: str, target: str = "") -> str:
  """A coarse bucket for one thunk, from its HLO instruction name, opcode and custom-call
  target."""
  if hlo_op == "custom-call" or name.startswith("ffi_call"):
    return next((kind for prefix, kind in CUSTOM_CALLS.items() if target.startswith(prefix)),
                "custom calls: other")
  if hlo_op == "convolution" or name.startswith("convolution"):
    return "XLA convolutions"
  if name.startswith(("ynn_fusion", "xnn_fusion", "onednn")):
    return "library fusions (YNNPACK dots / reductions)"
  if hlo_op == "fusion" or "fusion" in name:
    return "XLA loop fusions"
  return "other"


def hlo_index(hlo_text: str) -> dict:
  """{instruction name: (output type, opcode, custom-call target or "")} from a compiled
  module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\(", line)
    if m:
      t = re.search(r'custom_call_target="([^"]+)"', line)
      out[m.group(1)] = (m.group(2), m.group(3), t.group(1) if t else "")
  return out


def trace_events(trace_dir: str) -> list:
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def summarise(events, index: dict, steps: int) -> dict:
  """Per-step ms by kind, by output type and by op (complete events of compiled ops only)."""
  by_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in index:
      by_op[e["name"]] += e["dur"] / 1e3 / steps
  by_kind, by_shape = collections.Counter(), collections.Counter()
  for name, ms in by_op.items():
    out_type, opcode, target = index[name]
    by_kind[op_kind(name, opcode, target)] += ms
    by_shape[out_type] += ms
  return {"kind": by_kind, "shape": by_shape, "op": by_op}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_model.add_model_args(ap, repeats=3)
  ap.add_argument("--paths", default="auto", choices=bench_model.PATHS)
  ap.add_argument("--options", default="cpu", help="compiler options: cpu or default")
  ap.add_argument("--top", type=int, default=12, help="how many shapes and ops to list")
  args = bench_model.parse_model_args(ap, argv)

  print(f"jax {jax.__version__}  {cpu_model()}  backend {jax.default_backend()}")
  print(f"model {args.model}  image {args.image_size}  batch {args.batch_size}  paths "
        f"{args.paths}  options {args.options}  {args.repeats} profiled steps")
  print(f"load average before: {loadavg()}")
  progs = bench_model.Programs(args.model, args.batch_size, args.image_size, args.num_classes)
  print(f"host malloc: {bench_model.MALLOC}")
  compiled, state, _, step = progs.compile("train", args.paths, args.options)
  for _ in range(2):  # warm up: first calls allocate and (for oneDNN) build primitives
    state = jax.block_until_ready(step(compiled, state))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(args.repeats):
      state = jax.block_until_ready(step(compiled, state))
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.repeats
    jax.profiler.stop_trace()
    events = trace_events(trace_dir)
  index = hlo_index(compiled.as_text())
  res = summarise(events, index, args.repeats)

  total = sum(res["kind"].values())
  print(f"\nper step: {wall_ms:.0f} ms wall under the profiler, {total:.0f} ms in compiled ops")
  print("\n| kind | ms per step | share |\n|---|---|---|")
  for kind, ms in res["kind"].most_common():
    print(f"| {kind} | {ms:.1f} | {ms / total:.0%} |")
  print("\n| output type | ms per step |\n|---|---|")
  for shape, ms in res["shape"].most_common(args.top):
    print(f"| {shape} | {ms:.1f} |")
  print("\n| op | output type | ms per step |\n|---|---|---|")
  for name, ms in res["op"].most_common(args.top):
    print(f"| {name} | {index[name][0]} | {ms:.1f} |")
  print(f"\nload average after: {loadavg()}")


if __name__ == "__main__":
  main()
