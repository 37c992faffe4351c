"""Benchmark packed Bi-Real inference against float emulation: latency (batch 1), img/s (batch N).

  .venv/bin/python experiments/bench_packed.py --model bireal18 --size 224 --batch 1 32 --rounds 7
  .venv/bin/python experiments/bench_packed.py --variants xor openvino openvino/bf16 --ov_profile

Variables are random (speed does not depend on their values). Every variant runs the same images;
its top-1 is compared with the first variant (the float Flax model) and its max |Δlogit| printed.
Variants are timed in interleaved rounds (A B C A B C ...) so that load from other processes on a
shared machine hits all of them alike; the median and the minimum over rounds are printed
(compile and one warm-up call excluded), with the speed-up of each median over the first variant
and images per CPU-second of this process (independent of how many cores other processes take,
not of how they share caches: on the shared 2-core EPYC it ranged 215–335 for the same code).
The default variants are the side-by-side comparison float (Flax model) vs ±1 float vs int8 vs
packed XOR/popcount. Prints versions, machine and load.

Variants: "float_model" (the Flax BiRealNet, float emulation of ±1), "float_model/mbM" (the same
run M images at a time with lax.map), and "IMPL[/mbM][/smbJ][/sK]" for the packed model's public
call (`PackedModel.__call__`) with impl in deploy.IMPLS, micro-batch M for the stem and J for the
stages, K concurrent streams (defaults: deploy.default_micro_batch(),
deploy.default_stage_micro_batch(), deploy.default_streams()); "IMPL/mbM/vwN" or
"IMPL/mball" jit `deploy.forward` directly in one stream, with XLA's CPU vector width N bits
(default deploy.compiler_options(), i.e. 512) or the whole batch at once. A last option
"/ops=SETTING" (a `bireal_jax.ops` setting, e.g. `ops=packed_conv2d=reference,conv2d=reference`:
the packed forward as it ran before `ops.packed_conv2d`) traces that variant's public call under
it (a fresh jit; `BIREAL_OPS` is set while it is called, since streams trace in worker threads),
so an old and a new path are timed in the same run. "openvino" and
"openvino/bf16" run the model's OpenVINO IR on the CPU plugin (`impl="openvino"`, f32 or bf16
inference precision; needs bireal_jax[openvino]); `--ov_profile` then also prints the plugin's
per-layer profile (PERF_COUNT) of each batch, summed by layer type (median over the rounds).
`--stage_profile` times the JAX impls' forward stage by stage (`deploy.forward_pieces`, each
piece jitted alone, whole batch, one stream, interleaved rounds) beside OpenVINO's profile
summed by stage.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import bireal_jax.ops
from bireal_jax import deploy, models


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


def ov_stage(config):
  """Group OpenVINO profile rows by stage: node names are bireal_jax's (deploy/openvino.py)."""
  bounds = [sum(config["stage_sizes"][:s + 1]) for s in range(len(config["stage_sizes"]))]

  def group(name, _):
    m = re.match(r"(stem|pool|fc|logits)|layer(\d+)_|layers_(\d+)/", name)
    if not m:
      return "other"
    if m.group(1):
      return "stem" if m.group(1) == "stem" else "head"
    if m.group(2):
      return f"stage{m.group(2)}"
    return f"stage{next(s for s, b in enumerate(bounds) if int(m.group(3)) < b) + 1}"
  return group


def time_pieces(pm, impl, x, rounds):
  """{piece: median ms} of `deploy.forward_pieces`, each jitted alone, in interleaved rounds."""
  rp = pm.runtime_params(impl)
  fns, inputs, state = [], [], x
  for name, f in deploy.forward_pieces(pm.config, impl):
    fn = jax.jit(f, compiler_options=deploy.compiler_options() or None)
    inputs.append(state)
    state = jax.block_until_ready(fn(rp, state))  # compile + warm-up
    fns.append((name, fn))
  ts = {name: [] for name, _ in fns}
  for _ in range(rounds):
    for (name, fn), inp in zip(fns, inputs):
      t = time.perf_counter()
      jax.block_until_ready(fn(rp, inp))
      ts[name].append(time.perf_counter() - t)
  return {name: statistics.median(v) * 1e3 for name, v in ts.items()}


def _mb(s):
  return None if s == "all" else int(s)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="bireal18")
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  ap.add_argument("--variants", nargs="+",
                  default=["float_model", "float_model/mb2", "float/mb2", "int8/mb2", "xor/mb2"],
                  help="float_model[/mbM] or IMPL/mbM with M an int or 'all'")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--ov_profile", action="store_true",
                  help="print OpenVINO's per-layer-type times for the openvino variants")
  ap.add_argument("--stage_profile", action="store_true",
                  help="time the JAX impls' stages one by one beside OpenVINO's by stage")
  args = ap.parse_args()
  os.environ.setdefault("BIREAL_OPS", "auto")  # a benchmark opts in to CPU tuning (ops.DEFAULT off)

  print(f"jax {jax.__version__} jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}"
        f" backend {jax.default_backend()} devices {jax.devices()}")
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.readlines()
    model_name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "?")
    flags = next((l for l in lines if l.startswith("flags")), "")
  except OSError:
    model_name = platform.processor()
  print(f"python {platform.python_version()} {platform.machine()} '{model_name}' cpus "
        f"{os.cpu_count()} avx512_vpopcntdq={'avx512_vpopcntdq' in flags} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

  model = models.get(args.model)
  variables = random_variables(model, args.size)
  pm = deploy.pack(model, variables)
  print(f"{args.model} {args.size}²: packed payload {pm.num_bytes():,} bytes; defaults impl="
        f"{deploy.default_impl()!r} micro_batch={deploy.default_micro_batch()}")

  def float_model(mb):
    apply = lambda xs: model.apply(variables, xs)  # noqa: E731
    if mb is None:
      return jax.jit(apply)

    def chunked(x):
      n = x.shape[0]
      if n <= mb or n % mb:
        return apply(x)
      return jax.lax.map(apply, x.reshape(n // mb, mb, *x.shape[1:])).reshape(n, -1)
    return jax.jit(chunked)

  def under_ops(setting, fn):
    """`fn` traced and run with `bireal_jax.ops` setting `setting` (its own jit of the forward)."""
    from bireal_jax.deploy import runtime
    backend = jax.default_backend()
    # a new function object: jax.jit shares its trace cache between jits of one function
    fresh = jax.jit(lambda *a: runtime._forward_static(*a), static_argnums=(0, 1, 2),
                    compiler_options=runtime.compiler_options(backend) or None)

    def call(x):
      saved, env = runtime._jitted(), os.environ.get("BIREAL_OPS")
      runtime._JITTED[backend], os.environ["BIREAL_OPS"] = fresh, setting
      try:
        return fn(x)
      finally:
        runtime._JITTED[backend] = saved
        if env is None:
          os.environ.pop("BIREAL_OPS")
        else:
          os.environ["BIREAL_OPS"] = env
    return call

  fns = {}
  for v in args.variants:
    name, *opts = v.split("/")
    setting = next((o[4:] for o in opts if o.startswith("ops=")), None)
    opts = [o for o in opts if not o.startswith("ops=")]
    mb = next((_mb(o[2:]) for o in opts if o.startswith("mb")), None)
    vw = next((int(o[2:]) for o in opts if o.startswith("vw")), None)
    if name == "float_model":
      fns[v] = float_model(mb)
    elif name == deploy.OPENVINO:
      precision = "bf16" if "bf16" in opts else "f32"
      fns[v] = functools.partial(pm, impl=name, precision=precision)
    elif vw or (mb is None and any(o == "mball" for o in opts)):
      # the packed forward jitted as PackedModel.__call__ does it, but with /vwN's CPU vector
      # width or the whole batch at once (/mball), in one stream
      copts = deploy.compiler_options()
      if vw and jax.default_backend() == "cpu":
        copts = dict(copts, xla_cpu_prefer_vector_width=vw)
      fwd = jax.jit(lambda rp, x, name=name, mb=mb: deploy.forward(pm.config, rp, x, name, mb),
                    compiler_options=copts or None)
      fns[v] = functools.partial(fwd, pm.runtime_params(name))  # device arrays, as pm(x) passes
    else:  # the public call: PackedModel.__call__ (micro-batch /mbM, /sK concurrent streams)
      streams = next((int(o[1:]) for o in opts if o[:1] == "s" and o[1:].isdigit()), None)
      smb = next((int(o[3:]) for o in opts if o.startswith("smb")), None)
      fns[v] = functools.partial(pm, impl=name, micro_batch=mb, streams=streams,
                                 stage_micro_batch=smb)
    if setting is not None:
      fns[v] = under_ops(setting, fns[v])

  for b in args.batch:
    x = jax.random.normal(jax.random.key(1), (b, args.size, args.size, 3), jnp.float32)
    outs = {}
    for v, fn in fns.items():
      t = time.perf_counter()
      outs[v] = np.asarray(fn(x))
      print(f"  batch {b}: {v} compiled+first call {time.perf_counter() - t:.1f} s", flush=True)
    ts = {v: [] for v in fns}
    cpu = {v: [] for v in fns}
    for _ in range(args.rounds):
      for v, fn in fns.items():
        c, t = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(x))
        ts[v].append(time.perf_counter() - t)
        cpu[v].append(time.process_time() - c)
    ref = outs[args.variants[0]]
    base = statistics.median(ts[args.variants[0]])
    print(f"batch {b}  (load avg {' '.join(f'{l:.1f}' for l in os.getloadavg())}; ×: speed-up of "
          f"the median over {args.variants[0]}; img/CPU-s: images per second of this process's "
          f"CPU time: not its share of the cores, but still slowed by co-runners' cache use)")
    for v in fns:
      med, best, c = statistics.median(ts[v]), min(ts[v]), statistics.median(cpu[v])
      print(f"  {v:18s} median {med * 1e3:8.2f} ms ({b / med:7.1f} img/s, ×{base / med:5.2f})  min "
            f"{best * 1e3:8.2f} ms ({b / best:7.1f} img/s)  {b / c:7.1f} img/CPU-s  top-1 = ref: "
            f"{np.array_equal(outs[v].argmax(-1), ref.argmax(-1))}  max|Δlogit| "
            f"{np.max(np.abs(outs[v] - ref)):.1e}", flush=True)
    if args.ov_profile:
      for v in fns:
        if v.split("/")[0] != deploy.OPENVINO:
          continue
        prof = pm.openvino().profile(x, "bf16" if "bf16" in v else "f32", args.rounds)
        total = sum(ms for ms, _ in prof.values())
        print(f"  {v} per-layer profile, batch {b} (PERF_COUNT, median of {args.rounds} calls; "
              f"sum {total:.2f} ms):")
        for kind, (ms, k) in prof.items():
          print(f"    {kind:20s} {ms:8.3f} ms  {100 * ms / total:5.1f}%  {k:3d} layers", flush=True)
    if args.stage_profile:
      cols = {}
      for v in fns:
        name = v.split("/")[0]
        if name in deploy.IMPLS and v not in cols:
          setting = next((o[4:] for o in v.split("/") if o.startswith("ops=")), None)
          with (bireal_jax.ops.implementation(setting) if setting else contextlib.nullcontext()):
            cols[v] = time_pieces(pm, name, x, args.rounds)
        elif name == deploy.OPENVINO and v not in cols:
          prof = pm.openvino().profile(x, "bf16" if "bf16" in v else "f32", args.rounds,
                                       ov_stage(pm.config))
          cols[v] = {g: ms for g, (ms, _) in prof.items()}
      rows = list(dict.fromkeys(r for c in cols.values() for r in c))
      order = (["stem"] + [f"stage{s + 1}" for s in range(len(pm.config["stage_sizes"]))]
               + ["head"])
      rows = [r for r in order if r in rows] + [r for r in rows if r not in order]
      print(f"  stage profile, batch {b} (ms, median of {args.rounds}; JAX: each stage jitted "
            f"alone; OpenVINO: PERF_COUNT summed by stage)")
      print("    " + f"{'':8s}" + "".join(f"{c:>16s}" for c in cols))
      for r in rows + ["sum"]:
        vals = [sum(c.values()) if r == "sum" else c.get(r) for c in cols.values()]
        print("    " + f"{r:8s}" + "".join(f"{'-' if v is None else f'{v:.3f}':>16s}"
                                         for v in vals), flush=True)

if __name__ == "__main__":
  main()
