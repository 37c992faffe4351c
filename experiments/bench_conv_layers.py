"""Where the CPU train step's time goes: every convolution of the model, forward, dX and dW, timed alone.

  .venv/bin/python experiments/bench_conv_layers.py --model bireal18 --image-size 224 --batch-size 32

The convolutions are read from the model itself (a jaxpr of its training forward under
`ops.implementation("reference")`, so each is a plain `lax.conv_general_dilated`); identical
geometries are timed once and counted. For each: the f32 forward, the input gradient dX (skipped
for the stem, whose input needs none) and the weight gradient dW, each `ops.conv2d` under
`ops.implementation({"conv2d": "reference" | "onednn"})`, jitted alone with `--options` and timed
interleaved with the whole library train step on the same convolutions (`bench_model.Programs`
paths "jax" — the CPU fast paths but XLA's convolutions — or, with `--impl onednn`, "native":
the C++ kernels wherever they apply; Adam, the same options), medians of `--repeats`
(each timed call right after an untimed one of the same program). The table gives ms per call
and GFLOP/s; the summary compares the sum with the step. The step's binary forwards take the
XOR/int8 paths, so the sum is of the plain f32 work the step would do without them.

Run it under other `XLA_FLAGS` to try other convolution libraries: it reports how many of the
compiled convolutions XLA left as plain `convolution` ops (its Eigen runtime) and how many went
into a library fusion (YNNPACK, XNNPACK or oneDNN).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from bench_model import Programs, add_model_args, compiler_options, parse_model_args
from bireal_jax import models, ops
from bireal_jax.ops.reference import conv2d as lax_conv
from bireal_jax.ops.cpu import onednn
from machine import cores, cpu_model, loadavg


def model_convs(model_name: str, batch: int, size: int, num_classes: int) -> collections.Counter:
  """Counter of (lhs shape, rhs shape, strides, padding) over the model's training forward."""
  model = models.get(model_name, num_classes=num_classes)
  x = jnp.zeros((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))

  def fwd(v, x):
    return model.apply(v, x, train=True, mutable=["batch_stats"])[0]

  with ops.implementation("reference"):
    jaxpr = jax.make_jaxpr(fwd)(variables, x)
  found = collections.Counter()

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        found[(lhs, rhs, tuple(eqn.params["window_strides"]),
               tuple(tuple(p) for p in eqn.params["padding"]))] += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return found


IMPLS = {"xla": "reference", "onednn": "onednn"}  # --impl -> ops' conv2d candidate
STEP_PATHS = {"xla": "jax", "onednn": "native"}  # --impl -> bench_model.Programs paths


def conv_programs(lhs, rhs, strides, padding, options: dict, stem: bool, impl: str = "xla"):
  """{part: (compiled, args, flops)} for the forward, dX and dW of one conv.

  `stem`: the conv reads the input images, so the train step needs no dX for it.
  `impl`: "xla" (`ops.conv2d`'s "reference", i.e. `lax.conv_general_dilated`) or "onednn"
  (its oneDNN candidate, the CPU fast path).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; expected one of {sorted(IMPLS)}")
  setting = {"conv2d": IMPLS[impl]}
  conv = lambda x, w: ops.conv2d(x, w, strides, padding)  # noqa: E731
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.sign(rng.standard_normal(lhs)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal(rhs).astype(np.float32))
  y = jax.eval_shape(lambda a, b: lax_conv(a, b, strides, padding), x, w)  # not `conv`: jax
  # caches a function's trace, and `conv`'s must be made under `setting`
  g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
  flops = 2 * int(np.prod(y.shape)) * int(np.prod(rhs[:3]))
  parts = {"fwd": (conv, (x, w)),
           "dX": (lambda x, w, g: jax.vjp(lambda a: conv(a, w), x)[1](g)[0], (x, w, g)),
           "dW": (lambda x, w, g: jax.vjp(lambda b: conv(x, b), w)[1](g)[0], (x, w, g))}
  if stem:
    del parts["dX"]
  with ops.implementation(setting):  # chosen while tracing, so inside the block
    return {k: (jax.jit(f).lower(*a).compile(compiler_options=options), a, flops)
            for k, (f, a) in parts.items()}


def library_split(compiled) -> tuple[int, int]:
  """(convolutions XLA runs itself, convolutions inside a library fusion) in a compiled program.

  A library fusion is a `kind=kCustom` fusion (YNNPACK, XNNPACK, oneDNN); its convolution sits
  in the computation the fusion calls.
  """
  text = compiled.as_text()
  library = set(re.findall(r"fusion\(.*kind=kCustom, calls=(%[\w.-]+)", text))
  plain = fused = 0
  computation = None
  for line in text.splitlines():
    header = re.match(r"(?:ENTRY )?(%[\w.-]+) \(", line)
    if header:
      computation = header.group(1)
    elif re.search(r"= \S+ convolution\(", line):
      if computation in library:
        fused += 1
      else:
        plain += 1
  return plain, fused


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  add_model_args(ap, repeats=5)
  ap.add_argument("--options", choices=("cpu", "default"), default="cpu",
                  help="cpu = ops.compiler_options() (what the training loop uses)")
  ap.add_argument("--impl", choices=("xla", "onednn"), default="xla",
                  help="whose convolutions: XLA's, or the oneDNN custom calls the library uses "
                       "on CPU (the step is then the library's as shipped)")
  a = parse_model_args(ap, argv)
  if a.impl == "onednn" and not onednn.available():
    ap.error(f"--impl onednn: oneDNN convolutions unavailable ({onednn.unavailable_reason()})")
  opts = compiler_options(a.options)
  print(f"jax {jax.__version__}  cpu {cpu_model()}  cores {cores()}  backend {jax.default_backend()}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  compiler options {opts}")
  print(f"model {a.model}  image {a.image_size}  batch {a.batch_size}  medians of {a.repeats}  "
        f"convolutions {a.impl}")
  print(f"load average before: {loadavg()}")

  convs = model_convs(a.model, a.batch_size, a.image_size, a.num_classes)
  entries, plain, fused = {}, 0, 0
  for (lhs, rhs, strides, padding), count in convs.items():
    name = f"{lhs[1]}x{lhs[2]}x{lhs[3]}->{rhs[3]} k{rhs[0]}x{rhs[1]} s{strides[0]}"
    progs = conv_programs(lhs, rhs, strides, padding, opts,
                          stem=lhs == (a.batch_size, a.image_size, a.image_size, 3), impl=a.impl)
    for part, (c, args, flops) in progs.items():
      entries[(name, part)] = (c, args, flops, count)
      p, f = library_split(c)
      plain, fused = plain + p, fused + f
  print(f"{len(convs)} distinct convolutions ({sum(convs.values())} in the model); compiled "
        f"programs: {plain} convolutions run by XLA itself (Eigen), {fused} inside library "
        f"fusions (YNNPACK/XNNPACK/oneDNN)")
  step, args, n, advance = Programs(a.model, a.batch_size, a.image_size, a.num_classes).compile(
      "train", STEP_PATHS[a.impl], a.options)
  args = jax.block_until_ready(advance(step, args))
  times = {k: [] for k in entries}
  step_times = []
  for _ in range(a.repeats):
    for k, (c, xs, _, _) in entries.items():
      jax.block_until_ready(c(*xs))  # untimed: no program is timed in the caches another left
      t = time.perf_counter()
      jax.block_until_ready(c(*xs))
      times[k].append(time.perf_counter() - t)
    t = time.perf_counter()
    args = jax.block_until_ready(advance(step, args))
    step_times.append(time.perf_counter() - t)

  print("\n| convolution | count | part | ms per call | ms × count | GFLOP/s |\n|---|---|---|---|---|---|")
  by_part = collections.Counter()
  for (name, part), (_, _, flops, count) in entries.items():
    med = statistics.median(times[(name, part)])
    by_part[part] += med * count
    print(f"| {name} | {count} | {part} | {med * 1e3:.1f} | {med * count * 1e3:.1f} | "
          f"{flops / med / 1e9:.0f} |")
  total = sum(by_part.values())
  step_med = statistics.median(step_times)
  print(f"\nsum of convolutions {total * 1e3:.0f} ms (fwd {by_part['fwd'] * 1e3:.0f}, dX "
        f"{by_part['dX'] * 1e3:.0f}, dW {by_part['dW'] * 1e3:.0f}); whole train step "
        f"{step_med * 1e3:.0f} ms = {n / step_med:.1f} img/s; convolutions / step = "
        f"{total / step_med:.2f}")
  print(f"load average after: {loadavg()}")


if __name__ == "__main__":
  main()
