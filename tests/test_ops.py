"""`bireal_jax.ops`: every candidate of every op against the plain-lax reference (values and
gradients, on Bi-Real's geometries at small scale), what `ops.applicable` lets run, BatchNorm's
replica statistics under `pmap`, and `auto`: valid picks, kept in memory and on disk, reused by a
later process without timing, the reference below the work threshold; the CPU compiler options;
the switch (`ops.implementation`: nesting, threads, bad names, BIREAL_OPS); CPU tuning opt-in and
`ops.explain`.

Each candidate runs by naming it: `ops.implementation({op: name})`, the other ops on "reference".
"""
import functools
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_paths import loss_and_grads  # tests/fast_paths.py
from numerics import assert_close  # tests/numerics.py
from op_cases import auto_cases, auto_workload, bn_operands, conv_operands  # tests/op_cases.py

from bireal_jax import layers, models, ops
from bireal_jax.ops import autotune, reference
from bireal_jax.ops.cpu import onednn

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the candidates besides the reference are CPU-only")

TESTS = Path(__file__).resolve().parent


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


_close = assert_close


def _only(op, name):
  """`{op: name}` with every other op on the reference (no `auto` timing, no custom calls)."""
  return {**{o: "reference" for o in ops.OPS}, op: name}


def _run(setting, fn, arrays, cts):
  """(forward jaxpr text, outputs, gradients wrt every array for cotangents `cts`) of `fn`
  traced under `setting` (fresh functions: jax caches traces per function object)."""
  with ops.implementation(setting):
    jaxpr = str(jax.make_jaxpr(lambda *a: fn(*a))(*arrays))

    def value_and_vjp(*a):
      out, vjp = jax.vjp(lambda *b: fn(*b), *a)
      return out, vjp(cts)
    out, grads = jax.jit(value_and_vjp)(*arrays)
  return jaxpr, out, grads


def _reference(fn, arrays, cts):
  """Outputs and gradients of a `reference` function by plain autodiff (no `ops` dispatch)."""
  def value_and_vjp(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(cts)
  return jax.jit(value_and_vjp)(*arrays)


def _skip_unavailable(op, name):
  if not ops.CANDIDATES[op][name].available():
    pytest.skip(f"{op} candidate {name!r} is not built here (g++ / libdnnl-dev: make sysdeps)")


# (must appear, must not appear) in a candidate's forward jaxpr.
SIGNATURES = {
    "conv2d": {"reference": (["conv_general_dilated"], ["bireal_"]),
               "onednn": (["bireal_onednn_conv_fwd"], ["conv_general_dilated"]),
               "onednn_bwd_data": (["bireal_onednn_conv_fwd"], ["conv_general_dilated"]),
               "onednn_flip": (["bireal_onednn_conv_fwd"], ["conv_general_dilated"])},
    "binary_conv2d": {
        "reference": (["conv_general_dilated"], ["bireal_", "population_count", "i8"]),
        "onednn": (["bireal_onednn_conv_fwd"], ["population_count", "i8"]),
        "xor": (["bireal_xor_conv_fwd"], ["conv_general_dilated", "i8"]),
        "xor_jax": (["population_count"], ["bireal_", "conv_general_dilated"]),
        "int8": (["i8"], ["bireal_", "population_count"]),
        "onednn_bf16": (["bireal_onednn_conv_bf16_fwd"], ["population_count", "i8"])},
    "max_pool": {"reference": (["reduce_window_max"], ["bireal_"]),
                 "sliced": ([], ["reduce_window", "bireal_"]),
                 "onednn": (["bireal_onednn_pool_fwd"], ["reduce_window"])},
    "batch_norm_train": {"reference": ([], ["custom_vjp_call", "bireal_"]),
                         "fused_bwd": (["custom_vjp_call"], ["bireal_"])},
    # Packed inference only (tests/test_packed.py tests it: exactness, candidates bit for bit).
    "packed_conv2d": {"reference": (["population_count"], ["bireal_"]),
                      "xor_cpp": (["bireal_packed_conv"], ["population_count"]),
                      "onednn_bf16": (["bireal_onednn_packed_conv_bf16"], ["population_count"])},
}
TRAINING_OPS = set(SIGNATURES) - {"packed_conv2d"}  # what a training workload runs


def _check_signature(op, name, jaxpr, applies=True):
  must, must_not = SIGNATURES[op][name]
  if not applies:  # a named candidate that does not apply: the reference runs
    must, must_not = SIGNATURES[op]["reference"]
  for s in must:
    assert s in jaxpr, f"{op}/{name}: {s!r} missing from the jaxpr"
  for s in must_not:
    assert s not in jaxpr, f"{op}/{name}: {s!r} in the jaxpr"


def test_registry_matches_the_signatures_tested_here():
  assert set(ops.CANDIDATES) == set(ops.OPS) == set(SIGNATURES)
  for op in ops.OPS:
    assert set(ops.CANDIDATES[op]) == set(SIGNATURES[op]), op
    for preset in ops.PRESETS.values():
      names = preset[op]
      names = (names,) if isinstance(names, str) else names
      assert names == ("auto",) or set(names) <= set(ops.CANDIDATES[op])


# ------------------------------------------------------------------------------------------------
# Convolutions: conv2d and binary_conv2d on Bi-Real's geometries
# ------------------------------------------------------------------------------------------------

def _same(x_shape, k, s):
  return ops.explicit_pads("SAME", x_shape, (k, k), (s, s))


# id -> (x shape, kernel shape, strides, pads). H/W odd and even, channels not multiples of 32.
CONVS = {
    "3x3s1p1": ((2, 9, 8, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),
    "3x3s2p1": ((2, 10, 9, 5), (3, 3, 5, 7), (2, 2), ((1, 1), (1, 1))),
    "3x3s1p1_c40": ((1, 6, 7, 40), (3, 3, 40, 33), (1, 1), ((1, 1), (1, 1))),
    "1x1s1p0": ((2, 8, 7, 33), (1, 1, 33, 6), (1, 1), ((0, 0), (0, 0))),
    "1x1s2p0": ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0))),  # shortcut-style
    # TF 'SAME' at stride 2: padding ((0, 1), (1, 1)), asymmetric: no XOR kernel takes it.
    "same_s2": ((2, 10, 11, 5), (3, 3, 5, 6), (2, 2), _same((2, 10, 11, 5), 3, 2)),
}
STEM = {"stem7x7s2p3": ((1, 11, 10, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)))}
SYMMETRIC = {k for k, (_, _, s, p) in CONVS.items()
             if s[0] == s[1] and len({v for pair in p for v in pair}) == 1}


def test_the_same_padding_geometry_is_asymmetric():
  assert CONVS["same_s2"][3] == ((0, 1), (1, 1))
  assert SYMMETRIC == set(CONVS) - {"same_s2"}


def _exact_binary(xq, wq, strides, pads):
  """α·D rounded once to f32, D the integer sums computed exactly in numpy."""
  x, w = np.asarray(xq, np.float64), np.asarray(wq)
  alpha = np.abs(w).max(axis=(0, 1, 2))  # f32
  s = np.where(w >= 0, 1.0, -1.0)
  kh, kw = w.shape[:2]
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh, ow = ops.geometry.out_hw(x.shape, (kh, kw), strides, pads)
  d = sum(xp[:, i:i + strides[0] * (oh - 1) + 1:strides[0],
             j:j + strides[1] * (ow - 1) + 1:strides[1], :] @ s[i, j]
          for i in range(kh) for j in range(kw))
  return d.astype(np.float32) * alpha


@pytest.mark.parametrize("geometry", [*CONVS, *STEM])
@pytest.mark.parametrize("name", list(ops.CANDIDATES["conv2d"]))
def test_conv2d_candidate_matches_the_reference(name, geometry):
  _skip_unavailable("conv2d", name)
  x, w, g, statics = conv_operands({**CONVS, **STEM}[geometry], binary=False)
  applies = name in ops.applicable("conv2d", (x, w), statics)
  # The flipped-kernel input gradient needs stride 1; every other candidate takes them all.
  assert applies == (name != "onednn_flip" or statics["strides"] == (1, 1))
  jaxpr, y, grads = _run(_only("conv2d", name),
                         lambda a, b: ops.conv2d(a, b, **statics), (x, w), g)
  _check_signature("conv2d", name, jaxpr, applies)
  y_ref, grads_ref = _reference(lambda a, b: reference.conv2d(a, b, **statics), (x, w), g)
  _close(y, y_ref)
  _close(grads[0], grads_ref[0])
  _close(grads[1], grads_ref[1])


@pytest.mark.parametrize("size", [8, 28])
def test_onednn_input_gradient_forms(size):
  """"onednn_bwd_data" runs oneDNN's backward-data primitive, "onednn_flip" the flipped-kernel
  forward conv, and "onednn" (what `native` runs) the flipped form from 28×28 up only."""
  _skip_unavailable("conv2d", "onednn")
  x, w = _x(1, size, size, 4, seed=1), _x(3, 3, 4, 5, seed=2)
  statics = dict(strides=(1, 1), pads=((1, 1), (1, 1)))
  for name, uses_bwd_data in [("onednn_bwd_data", True), ("onednn_flip", False),
                              ("onednn", size < 28)]:
    with ops.implementation(_only("conv2d", name)):
      grad = jax.make_jaxpr(jax.grad(lambda a, b: ops.conv2d(a, b, **statics).sum()))(x, w)
    assert ("bireal_onednn_conv_bwd_data" in str(grad)) == uses_bwd_data, name
  # `auto` times the forward once in eval and the two input-gradient forms in training.
  names = ops.applicable("conv2d", (x, w), statics)
  assert autotune.timed_candidates("conv2d", names, train=False) == ["reference", "onednn"]
  assert autotune.timed_candidates("conv2d", names, train=True) == ["reference", "onednn_bwd_data",
                                                               "onednn_flip"]


EXACT = ("xor", "xor_jax", "int8", "onednn_bf16")  # integer sums scaled by α once


@pytest.mark.parametrize("geometry", list(CONVS))
@pytest.mark.parametrize("name", list(ops.CANDIDATES["binary_conv2d"]))
def test_binary_conv2d_candidate_matches_the_reference(name, geometry):
  _skip_unavailable("binary_conv2d", name)
  xq, wq, g, statics = conv_operands(CONVS[geometry], binary=True)
  applies = name in ops.applicable("binary_conv2d", (xq, wq), statics)
  # The XOR kernels take equal strides and one padding on all four sides only.
  assert applies == (name not in ("xor", "xor_jax") or geometry in SYMMETRIC)
  jaxpr, y, grads = _run(_only("binary_conv2d", name),
                         lambda a, b: ops.binary_conv2d(a, b, **statics), (xq, wq), g)
  _check_signature("binary_conv2d", name, jaxpr, applies)
  y_ref, grads_ref = _reference(lambda a, b: reference.conv2d(a, b, **statics), (xq, wq), g)
  # The exact kernels compute α·D rounded once, the f32 convolution sums ±α terms: the values
  # agree to f32 rounding; the gradients are the f32 convolution's transpose in every candidate.
  _close(y, y_ref)
  _close(grads[0], grads_ref[0])
  _close(grads[1], grads_ref[1])
  if applies and name in EXACT:
    np.testing.assert_array_equal(np.asarray(y), _exact_binary(xq, wq, **statics))


def test_applicable_follows_dtype_and_geometry():
  x, w, _, statics = conv_operands(CONVS["3x3s1p1"], binary=True)
  native = lambda op, names: [n for n in names if ops.CANDIDATES[op][n].available()]  # noqa
  assert ops.applicable("binary_conv2d", (x, w), statics) == native(
      "binary_conv2d", ["reference", "onednn", "xor", "xor_jax", "int8", "onednn_bf16"])
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  assert ops.applicable("conv2d", (x16, w16), statics) == ["reference"]
  assert ops.applicable("binary_conv2d", (x16, w16), statics) == ["reference"]
  pool = dict(window=(3, 3), strides=(2, 2), pads=((1, 1), (1, 1)))
  assert ops.applicable("max_pool", (x16,), pool) == ["reference", "sliced"]
  assert ops.applicable("max_pool", (x,), pool) == native("max_pool",
                                                         ["reference", "sliced", "onednn"])
  # oneDNN's pooling: padding smaller than the window.
  wide = dict(window=(2, 3), strides=(1, 2), pads=((0, 1), (2, 0)))
  assert ops.applicable("max_pool", (x,), wide) == ["reference", "sliced"]
  s = jnp.ones((5,))
  assert ops.applicable("batch_norm_train", (x, s, s), dict(epsilon=1e-5, axis_name=None)) == [
      "reference", "fused_bwd"]
  assert ops.applicable("batch_norm_train", (x16, s, s),
                        dict(epsilon=1e-5, axis_name=None)) == ["reference"]


# ------------------------------------------------------------------------------------------------
# max_pool: the stem's 3×3/2, odd and even sizes, 'SAME'; ties routed to the first maximum
# ------------------------------------------------------------------------------------------------

POOLS = {
    "stem_odd": ((2, 9, 8, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),
    "stem_even": ((2, 10, 10, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),
    "same_s2": ((2, 10, 11, 3), (3, 3), (2, 2),
                ops.explicit_pads("SAME", (2, 10, 11, 3), (3, 3), (2, 2))),
}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("geometry", list(POOLS))
@pytest.mark.parametrize("name", list(ops.CANDIDATES["max_pool"]))
def test_max_pool_candidate_matches_the_reference_exactly(name, geometry, ties):
  _skip_unavailable("max_pool", name)
  shape, window, strides, pads = POOLS[geometry]
  statics = dict(window=window, strides=strides, pads=pads)
  x = _x(*shape, seed=4)
  if ties:  # few distinct values: most windows hold several equal maxima
    x = jnp.round(x)
  assert name in ops.applicable("max_pool", (x,), statics)
  out = jax.eval_shape(lambda v: reference.max_pool(v, **statics), x)
  # Integer cotangents: every gradient entry is an exact small sum, so routing must match exactly.
  g = jnp.asarray(np.random.default_rng(5).integers(1, 50, out.shape).astype(np.float32))
  jaxpr, y, grads = _run(_only("max_pool", name), lambda v: ops.max_pool(v, **statics), (x,), g)
  _check_signature("max_pool", name, jaxpr)
  y_ref, grads_ref = _reference(lambda v: reference.max_pool(v, **statics), (x,), g)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(grads[0], grads_ref[0])


# ------------------------------------------------------------------------------------------------
# batch_norm_train
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (2, 9, 8, 40)])
@pytest.mark.parametrize("name", list(ops.CANDIDATES["batch_norm_train"]))
def test_batch_norm_train_candidate_matches_the_reference(name, shape):
  x, scale, bias, cts = bn_operands(shape)
  statics = dict(epsilon=1e-5, axis_name=None)
  assert name in ops.applicable("batch_norm_train", (x, scale, bias), statics)
  jaxpr, out, grads = _run(_only("batch_norm_train", name),
                           lambda *a: ops.batch_norm_train(*a, **statics), (x, scale, bias), cts)
  _check_signature("batch_norm_train", name, jaxpr)
  out_ref, grads_ref = _reference(lambda *a: reference.batch_norm_train(*a, **statics),
                                  (x, scale, bias), cts)
  for a, b in zip(out, out_ref):  # y, mean, var
    _close(a, b, rtol=1e-5)
  for a, b in zip(grads, grads_ref):  # x, scale, bias
    _close(a, b, rtol=1e-5)


@pytest.mark.parametrize("name", list(ops.CANDIDATES["batch_norm_train"]))
def test_batch_norm_train_over_replicas_equals_the_whole_batch(name):
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  n, shape = 2, (3, 5, 4, 6)
  x, scale, bias, (g, zc, _) = bn_operands((n * shape[0],) + shape[1:], seed=8)
  statics = dict(epsilon=1e-5)

  def replica(xi, gi):
    out, vjp = jax.vjp(lambda *a: ops.batch_norm_train(*a, axis_name="r", **statics),
                       xi, scale, bias)
    return out, vjp((gi, zc, zc))

  split = lambda v: v.reshape((n,) + shape)  # noqa: E731
  with ops.implementation(_only("batch_norm_train", name)):
    (y, mu, var), (dx, dscale, dbias) = jax.pmap(lambda a, b: replica(a, b), axis_name="r")(
        split(x), split(g))
  (y_w, mu_w, var_w), (dx_w, dscale_w, dbias_w) = _reference(
      lambda *a: reference.batch_norm_train(*a, axis_name=None, **statics), (x, scale, bias),
      (g, zc, zc))
  for i in range(n):  # every replica holds the statistics of the whole batch
    _close(mu[i], mu_w, rtol=1e-5)
    _close(var[i], var_w, rtol=1e-5)
  _close(y.reshape(x.shape), y_w, rtol=1e-5)
  _close(dx.reshape(x.shape), dx_w, rtol=1e-5)
  # Parameter gradients are per-replica partial sums; their sum is the whole batch's.
  _close(dscale.sum(0), dscale_w, rtol=1e-5)
  _close(dbias.sum(0), dbias_w, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# auto
# ------------------------------------------------------------------------------------------------

def _memo_entries():
  """[(op, arrays as ShapeDtypeStructs, statics, mode, pick)] of `auto`'s in-memory picks."""
  out = []
  for key, pick in autotune.cached_picks().items():
    op, shapes, stat, mode = json.loads(key)
    arrays = tuple(jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d)) for s, d in shapes)
    stat = {k: (tuple(tuple(p) if isinstance(p, list) else p for p in v)
                if isinstance(v, list) else v) for k, v in stat.items()}
    if op == "batch_norm_train":
      stat["axis_name"] = None
    out.append((op, arrays, stat, mode, pick))
  return out


def test_auto_picks_valid_candidates_that_match_the_reference(autotune_env):
  results = auto_workload()
  entries = _memo_entries()
  assert {e[0] for e in entries} == TRAINING_OPS
  for op, arrays, statics, mode, pick in entries:
    assert pick in ops.applicable(op, arrays, statics), (op, mode, pick)
  # Training (forward + backward) and inference (forward) picks are made apart for conv2d;
  # the binary conv has one forward for both (its backward is conv2d's).
  modes = {(e[0], e[3]) for e in entries}
  assert {("conv2d", "train"), ("conv2d", "eval"), ("max_pool", "train"), ("max_pool", "eval"),
          ("batch_norm_train", "train"), ("binary_conv2d", "eval")} == modes
  choices = ops.choices()
  assert set(choices) == TRAINING_OPS
  assert {k.split()[0] for k in choices["conv2d"]} == {"train", "eval"}
  for op, picks in choices.items():
    assert set(picks.values()) <= set(ops.CANDIDATES[op])
  assert sum(sum(c.values()) for c in autotune.summary().values()) == len(entries)

  refs = {"conv2d": reference.conv2d, "binary_conv2d": reference.conv2d,
          "max_pool": reference.max_pool, "batch_norm_train": reference.batch_norm_train}
  for op, (arrays, statics, cts) in auto_cases().items():
    ev, (out, grads) = results[op]
    out_ref, grads_ref = _reference(lambda *a: refs[op](*a, **statics), arrays, cts)
    rtol = 1e-5 if op == "batch_norm_train" else 2e-5
    _close(out, out_ref, rtol)
    _close(grads, grads_ref, rtol)
    if ev is not None:
      _close(ev, out_ref, rtol)
  # The binary conv's forward is one program in training and inference: bit for bit.
  ev, (out, _) = results["binary_conv2d"]
  np.testing.assert_array_equal(np.asarray(ev), np.asarray(out))


def test_auto_caches_picks_on_disk_for_a_later_process(autotune_env):
  auto_workload()
  files = list((autotune_env / "autotune").glob("*.json"))
  assert len(files) == 1
  table = json.loads(files[0].read_text())
  picks = autotune.cached_picks()
  assert set(table) == set(picks)
  for key, entry in table.items():
    assert entry["pick"] == picks[key]
    assert entry["pick"] in entry["ms"] and all(t >= 0 for t in entry["ms"].values())
  # A second process reads every pick from the file: it times nothing (`measure` would raise) and
  # logs no "ops auto:" line, which each timing writes.
  code = (f"import sys, json, logging; sys.path.insert(0, {str(TESTS)!r});"
          "logging.basicConfig(level=logging.INFO);"
          "import op_cases; from bireal_jax.ops import autotune;"
          "autotune.measure = lambda *a, **k: (_ for _ in ()).throw(AssertionError('timed'));"
          "op_cases.auto_workload(); print(json.dumps(autotune.cached_picks()))")
  out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True,
                       text=True, timeout=300, cwd=TESTS.parent)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ops auto:" not in out.stderr
  assert json.loads(out.stdout.splitlines()[-1]) == picks


def test_auto_below_the_work_threshold_runs_the_reference_untimed(autotune_env, monkeypatch,
                                                                 caplog):
  monkeypatch.setenv("BIREAL_AUTOTUNE_MIN_WORK", "1e12")
  cases = auto_cases()
  for op, (arrays, statics, _) in cases.items():
    assert autotune.work(op, arrays, statics) < 1e12
    assert autotune.pick(op, arrays, statics) == "reference"
  with caplog.at_level(logging.INFO):
    results = auto_workload()
  assert "ops auto:" not in caplog.text
  assert autotune.cached_picks() == {} and ops.choices() == {}
  assert not (autotune_env / "autotune").exists()
  arrays, statics, g = cases["conv2d"]
  with ops.implementation("auto"):
    jaxpr = str(jax.make_jaxpr(lambda *a: ops.conv2d(*a, **statics))(*arrays))
  _check_signature("conv2d", "reference", jaxpr)
  _close(results["conv2d"][0], reference.conv2d(*arrays, **statics))


def test_auto_without_the_disk_cache_keeps_picks_in_memory(autotune_env, monkeypatch):
  monkeypatch.setenv("BIREAL_AUTOTUNE_CACHE", "0")
  arrays, statics, _ = auto_cases()["max_pool"]
  with ops.implementation("auto"):
    jax.make_jaxpr(lambda v: ops.max_pool(v, **statics))(*arrays)
  assert list(ops.choices()) == ["max_pool"]
  assert not (autotune_env / "autotune").exists()


# ---------------------------------------------------------------------------------------------
# CPU tuning is opt-in; ops.explain
# ---------------------------------------------------------------------------------------------

_USER_PROGRAM = """
import os, jax, jax.numpy as jnp, optax
from flax import nnx
import flax.linen as nn
import bireal_jax.nnx as bnnx
from bireal_jax import BinaryConv, ops

class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.bconv = bnnx.BinaryConv(32, 32, (3, 3), padding=1, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)
  def __call__(self, x):
    x = self.conv(x)
    return self.head((x + self.bconv(x)).mean(axis=(1, 2)))

class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(32, (3, 3))(x)
    return nn.Dense(10)((x + BinaryConv(32, (3, 3), padding=1)(x)).mean(axis=(1, 2)))

x, y = jnp.ones((8, 16, 16, 1)), jnp.arange(8) % 10
model = Net(nnx.Rngs(0))
opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

@nnx.jit
def step(model, opt, x, y):
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  l, g = nnx.value_and_grad(loss)(model)
  opt.update(model, g)
  return l

step(model, opt, x, y)
lin = LinenNet()
v = lin.init(jax.random.key(0), x)
jax.jit(jax.grad(lambda v: lin.apply(v, x).sum()))(v)
print("OMP", os.environ.get("OMP_WAIT_POLICY"))
print(ops.explain(lin, x, train=True))
"""


def test_importing_and_tracing_compiles_times_and_writes_nothing_by_default(tmp_path):
  """A user's NNX and Linen nets with our binary conv, one training step each, default settings:
  nothing built or timed (the cache directory stays absent), nothing set in the environment,
  and XLA's own ops run (ops.explain says so)."""
  cache = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if k not in ("BIREAL_OPS", "OMP_WAIT_POLICY")}
  env.update(BIREAL_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _USER_PROGRAM], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not cache.exists(), sorted(str(p) for p in cache.rglob("*"))
  assert "OMP None" in r.stdout
  lines = [l for l in r.stdout.splitlines() if l.startswith(("conv2d", "binary_conv2d"))]
  assert lines and all(l.rstrip().endswith("reference (setting)") for l in lines), r.stdout
  assert "setting: conv2d=reference, binary_conv2d=reference" in r.stdout


def test_explain_says_what_auto_and_named_settings_would_run_without_timing(tmp_path,
                                                                           monkeypatch):
  from bireal_jax import models
  monkeypatch.setenv("BIREAL_JAX_CACHE", str(tmp_path / "cache"))
  model = models.get("bireal18", num_classes=10, stem="small", base_width=16,
                     stage_sizes=(1, 1))
  x = jnp.zeros((8, 32, 32, 3))
  with ops.implementation("auto"):
    text = ops.explain(model, x, train=True)
  assert text.startswith("setting: conv2d=auto, binary_conv2d=auto, max_pool=auto, "
                         "batch_norm_train=auto")
  rows = text.splitlines()[1:]
  assert any(r.startswith("binary_conv2d 8x32x32x16 float32") and "auto: times " in r
             for r in rows), text
  assert any("(auto: too little work to time)" in r or "auto: times" in r
             for r in rows if r.startswith("conv2d"))
  assert not (tmp_path / "cache").exists()  # explaining timed and built nothing
  with ops.implementation({"binary_conv2d": "xor_jax"}):
    text = ops.explain(model, x)
  assert any(r.startswith("binary_conv2d") and "xor_jax (setting" in r
             for r in text.splitlines()), text
  assert ops.DEFAULT == "reference"


# ------------------------------------------------------------------------------------------------
# The CPU compiler options; the switch: `ops.implementation`
# ------------------------------------------------------------------------------------------------

def test_cpu_compiler_options_move_convolutions_off_ynnpack():
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
  plain = jax.jit(conv).lower(x, w).compile().as_text()
  tuned = jax.jit(conv).lower(x, w).compile(compiler_options=ops.compiler_options())
  # Guards the option's spelling: jaxlib rejects unknown enum names, and a no-op would show here.
  assert "__ynn_fusion" in plain
  assert "__ynn_fusion" not in tuned.as_text()
  assert ops.compiler_options(train=False) == {}  # eval keeps YNNPACK's faster forward convs


def test_cpu_compiler_options_keep_gradients():
  opts = ops.compiler_options()
  model = models.get("bireal18", num_classes=5, base_width=8, stem="small")
  images = _x(2, 12, 12, 3, seed=6)
  labels = jnp.asarray([1, 4])
  variables = jax.jit(model.init)(_key(7), images[:1])
  fn = functools.partial(loss_and_grads, model)
  with ops.implementation("native"):
    tuned = jax.jit(lambda *a: fn(*a), compiler_options=opts)(variables, images, labels)
    plain = jax.jit(lambda *a: fn(*a))(variables, images, labels)
  _close(tuned, plain, rtol=1e-5)


def _pool_path() -> str:
  """Which max-pool a function traced now takes: "onednn", "sliced" or "reference"."""
  jaxpr = str(jax.make_jaxpr(lambda v: layers.max_pool(v))(jnp.zeros((1, 6, 6, 2))))
  if "bireal_onednn_pool_fwd" in jaxpr:
    return "onednn"
  return "reference" if "reduce_window_max" in jaxpr else "sliced"


def test_implementation_switch_nests_and_restores_state():
  native = "onednn" if onednn.available() else "sliced"
  with ops.implementation("native"):
    assert _pool_path() == native
    with ops.implementation("reference"):
      assert _pool_path() == "reference"
      with ops.implementation({"max_pool": "sliced"}):
        assert _pool_path() == "sliced"
      with ops.implementation("max_pool=reference,conv2d=reference"):
        assert _pool_path() == "reference"
      assert _pool_path() == "reference"
    assert _pool_path() == native
    with pytest.raises(RuntimeError, match="inside"):  # an exception unwinds the setting too
      with ops.implementation("reference"):
        raise RuntimeError("inside")
    assert _pool_path() == native
    # Per thread: another thread sees the process default (BIREAL_OPS), not this block's.
    with ops.implementation("reference"):
      seen = []
      t = threading.Thread(target=lambda: seen.append(_pool_path()))
      t.start()
      t.join()
      assert _pool_path() == "reference"
  if not os.environ.get("BIREAL_OPS"):  # the library's default: XLA's own ops
    assert seen == ["reference"]
    assert _pool_path() == "reference"


@pytest.mark.parametrize("setting,bad,choices", [
    ("fastest", "'fastest'", "native"),
    ({"conv3d": "reference"}, "'conv3d'", "batch_norm_train"),
    ({"conv2d": "cudnn"}, "'cudnn'", "onednn"),
    ({"binary_conv2d": ("xor", "popcnt")}, "'popcnt'", "xor_jax"),
    ("max_pool=sliced,conv2d=mkl", "'mkl'", "reference"),
    ("pool=sliced", "'pool'", "max_pool"),
])
def test_implementation_rejects_bad_names_naming_the_choices(setting, bad, choices):
  with pytest.raises(ValueError) as e:
    with ops.implementation(setting):
      pass
  assert bad in str(e.value) and choices in str(e.value)


def test_implementation_from_the_environment_in_a_subprocess():
  code = ("import jax, jax.numpy as jnp; from bireal_jax import layers;"
          "print(str(jax.make_jaxpr(layers.max_pool)(jnp.zeros((1, 6, 6, 2)))).count("
          "'reduce_window_max'))")
  counts = {}
  for setting in ("reference", "max_pool=sliced"):
    env = dict(os.environ, BIREAL_OPS=setting, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    counts[setting] = int(out.stdout.split()[-1])
  assert counts == {"reference": 1, "max_pool=sliced": 0}
  env = dict(os.environ, BIREAL_OPS="nope", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0 and "'nope'" in out.stderr and "ValueError" in out.stderr
