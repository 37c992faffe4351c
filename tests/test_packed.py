"""Packed inference (bireal_jax.deploy): bit packing, exact XOR/popcount convs, folded models, save/load.

Models here are tiny (base_width 8, one or two blocks per stage) with random, trained-looking
variables: random-sign kernels and BN statistics / scales (some negative) far from their init, so
that the folding of α and BN and every border correction is exercised.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bireal_jax import deploy, models, ops, quantizers
from bireal_jax.ops import bits as bitops


def _conv_pm1(x, kernel, stride, pad):
  """Reference D: float conv of sign(x) and sign(W), zero padding (exact small integers)."""
  return jax.lax.conv_general_dilated(
      quantizers.binary_sign(x), quantizers.binary_sign(kernel), (stride, stride),
      [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def _trained_looking(variables, seed):
  """Replace every leaf with random values of a trained net's kind (not the init values)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = np.shape(leaf)
    if "'var'" in name:
      return rng.uniform(0.3, 3.0, shape).astype(np.float32)
    if "'mean'" in name:
      return rng.normal(0, 0.5, shape).astype(np.float32)
    if "'scale'" in name:  # some negative BN scales: the folded affine must keep the sign
      return (rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape, p=[.2, .8])).astype(
          np.float32)
    if "'bias'" in name:
      return rng.normal(0, 0.3, shape).astype(np.float32)
    return rng.normal(0, 0.1, shape).astype(np.float32)  # kernels: random signs and magnitudes

  return jax.tree_util.tree_map_with_path(fill, variables)


def _model_and_vars(name, size, seed=0, **kw):
  model = models.get(name, base_width=8, num_classes=10, **kw)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return model, _trained_looking(shapes, seed)


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 100])
def test_pack_bits_round_trip_and_layout(n):
  rng = np.random.default_rng(n)
  bits = rng.random((3, n)) < 0.5
  words = np.asarray(bitops.pack_bits(bits))
  assert words.dtype == np.uint32 and words.shape == (3, -(-n // 32))
  np.testing.assert_array_equal(np.asarray(bitops.unpack_bits(words, n)), bits)
  # documented layout: element i is bit i % 32 of word i // 32, tail bits 0
  expect = np.zeros_like(words)
  for r, i in zip(*np.nonzero(bits)):
    expect[r, i // 32] |= np.uint32(1) << np.uint32(i % 32)
  np.testing.assert_array_equal(words, expect)


def test_pack_signs_matches_binary_sign_including_zero():
  x = jnp.array([0.0, -0.0, -1e-30, 1e-30, -3.0, 2.0], jnp.float32)
  bits = np.asarray(bitops.unpack_bits(bitops.pack_signs(x), 6))
  np.testing.assert_array_equal(bits, [False, False, True, False, True, False])
  np.testing.assert_array_equal(np.asarray(bitops.unpack_signs(bitops.pack_signs(x), 6)),
                                np.asarray(quantizers.binary_sign(x)))


def test_pack_kernel_round_trip_with_channel_padding():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 40, 24))  # 40 channels: 2 words, 24 pad
  bits = bitops.pack_kernel(kernel)
  assert bits.shape == (3, 3, 2, 24) and bits.dtype == jnp.uint32
  assert not np.any(np.asarray(bits[:, :, 1]) >> 8)  # tail bits of the last word are 0
  np.testing.assert_array_equal(np.asarray(bitops.unpack_kernel(bits, 40)),
                                np.asarray(quantizers.binary_sign(kernel)))


def test_unpack_bits_rejects_bad_input():
  with pytest.raises(TypeError, match="uint32"):
    bitops.unpack_bits(jnp.zeros((2,), jnp.int32), 3)
  with pytest.raises(ValueError, match="n=65"):
    bitops.unpack_bits(jnp.zeros((2,), jnp.uint32), 65)


# ---------------------------------------------------------------------------------------------
# Exact binary convolution
# ---------------------------------------------------------------------------------------------

CONV_CASES = [
    # (h, w, cin, cout, k, stride, pad, group)
    (13, 13, 8, 16, 3, 1, 1, None),
    (15, 11, 40, 8, 3, 2, 1, None),  # odd, non-square, stride 2, channels not a multiple of 32
    (14, 14, 64, 24, 3, 2, 1, 6),    # even size stride 2; 18 words summed 6 at a time (scan)
    (7, 9, 64, 32, 3, 1, 1, 9),
    (5, 5, 96, 16, 1, 1, 0, None),   # 1×1 conv (bottleneck), no padding
]


@pytest.mark.parametrize("h,w,cin,cout,k,stride,pad,group", CONV_CASES)
def test_binary_convs_are_exact(h, w, cin, cout, k, stride, pad, group):
  kx, kw_ = jax.random.split(jax.random.key(h * w + cin))
  x = jax.random.normal(kx, (2, h, w, cin))
  x = x.at[:, ::3, ::2, ::5].set(0.0)  # exact zeros: sign(0) = +1 on every path
  kernel = jax.random.normal(kw_, (k, k, cin, cout))
  ref = np.asarray(_conv_pm1(x, kernel, stride, pad)).astype(np.int64)
  bits = bitops.pack_kernel(kernel)
  d_xor = jax.jit(bitops.xor_popcount_conv, static_argnums=(2, 3, 4))(x, bits, stride, pad, group)
  assert d_xor.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(d_xor), ref)
  pm1 = bitops.unpack_kernel(bits, cin, jnp.int8)
  d_i8 = jax.jit(bitops.int8_conv, static_argnums=(2, 3))(x, pm1, stride, pad)
  assert d_i8.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(d_i8), ref)
  np.testing.assert_array_equal(np.asarray(bitops.float_conv(x, pm1.astype(jnp.float32), stride,
                                                             pad)), ref)
  if pad:  # the border correction is what makes the borders exact: it must be non-trivial
    corr = np.asarray(bitops.border_correction(bits, cin, h, w, stride, pad))
    assert np.any(corr[0, :] != 0) and np.any(corr[:, 0] != 0)
    assert not np.any(corr[1:-1, 1:-1])  # interior outputs never touch the padding


PACKED_OP_CASES = [
    # (n, h, w, cin, cout, k, stride, pad)
    (1, 13, 13, 64, 64, 3, 1, 1),    # 64-channel blocks, interior runs of 4 pixels
    (2, 15, 11, 40, 24, 3, 2, 1),    # odd, non-square, stride 2, channel tails
    (1, 7, 7, 512, 80, 3, 1, 1),     # 16 words per tap, a 64 block + a 16 block
    (3, 5, 5, 96, 128, 1, 1, 0),     # 1x1, no padding: every pixel interior
    (1, 1, 1, 32, 64, 3, 1, 1),      # one pixel, all taps but the centre on the padding
]


@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,pad", PACKED_OP_CASES)
def test_packed_conv2d_candidates_are_exact_and_agree_bitwise(n, h, w, cin, cout, k, stride, pad):
  """`ops.packed_conv2d`: every candidate gives `D·scale + bias [+ residual]` with D exact, and
  here the C++ kernel the same bits as XLA's reference (both one fused multiply-add)."""
  keys = jax.random.split(jax.random.key(n * h * w + cin + cout), 5)
  x = jax.random.normal(keys[0], (n, h, w, cin))
  x = x.at[:, ::3, ::2, ::5].set(0.0)  # exact zeros: sign(0) = +1 on every path
  kernel = jax.random.normal(keys[1], (k, k, cin, cout))
  bits = bitops.pack_kernel(kernel)
  scale = jax.random.uniform(keys[2], (cout,), minval=0.5, maxval=1.5)
  bias = jax.random.normal(keys[3], (cout,))
  d = np.asarray(_conv_pm1(x, kernel, stride, pad)).astype(np.int64)
  res = jax.random.normal(keys[4], d.shape)
  outs = {}
  for name in ops.applicable("packed_conv2d", (x, bits, scale, bias), dict(stride=stride, pad=pad)):
    with ops.implementation({"packed_conv2d": name}):
      f = jax.jit(lambda *a: ops.packed_conv2d(*a[:4], a[4] if len(a) > 4 else None, stride, pad))
      outs[name] = (np.asarray(f(x, bits, scale, bias)), np.asarray(f(x, bits, scale, bias, res)))
  assert "reference" in outs
  want = d.astype(np.float32) * np.asarray(scale) + np.asarray(bias)
  for name, (plain, with_res) in outs.items():
    np.testing.assert_allclose(plain, want, rtol=1e-6, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(with_res, want + np.asarray(res), rtol=1e-6, atol=1e-5,
                               err_msg=name)
    np.testing.assert_array_equal(plain, outs["reference"][0], err_msg=name)
    np.testing.assert_array_equal(with_res, outs["reference"][1], err_msg=name)
  if jax.default_backend() == "cpu" and ops.CANDIDATES["packed_conv2d"]["xor_cpp"].available():
    assert "xor_cpp" in outs


@pytest.mark.skipif(not (jax.default_backend() == "cpu"
                         and ops.CANDIDATES["packed_conv2d"]["xor_cpp"].available()),
                    reason="the C++ packed conv kernel runs on the CPU (g++ needed)")
def test_packed_forward_runs_its_binary_convs_through_the_ops_layer():
  """impl="xor" calls `ops.packed_conv2d`: the C++ kernel or XLA's popcount loops (the other ops
  on their reference), with the same logits to float rounding (D is exact on both; whether XLA
  contracts `D·scale + bias` into one multiply-add depends on its fusion, the kernel always does)."""
  model, variables = _model_and_vars("bireal18", 16, stem="small")
  pm = deploy.pack(model, variables)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  rp = pm.runtime_params("xor")
  out = {}
  for name in ("xor_cpp", "reference"):
    with ops.implementation({**{op: "reference" for op in ops.OPS}, "packed_conv2d": name}):
      f = lambda p, v: deploy.forward(pm.config, p, v, "xor")  # noqa: E731 (fresh trace)
      out[name] = (str(jax.make_jaxpr(f)(rp, x)), np.asarray(jax.jit(f)(rp, x)))
  assert "population_count" in out["reference"][0]
  assert "bireal_packed_conv" not in out["reference"][0]
  assert "bireal_packed_conv" in out["xor_cpp"][0]
  assert "population_count" not in out["xor_cpp"][0]
  ref = out["reference"][1]
  np.testing.assert_allclose(out["xor_cpp"][1], ref, rtol=0, atol=2e-6 * np.abs(ref).max())
  np.testing.assert_array_equal(out["xor_cpp"][1].argmax(-1), ref.argmax(-1))


def _border_correction_reference(bits, c, h, w, stride, pad):
  """Tap by tap over every output position (numpy, int64): Σ_{taps on padding} (C − 2·popcount)."""
  bits = np.asarray(bits)
  kh, kw, _, o = bits.shape
  ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
  ones = np.unpackbits(bits[..., None].view(np.uint8), axis=-1).sum(axis=(2, 4), dtype=np.int64)
  tap = c - 2 * ones  # [kh, kw, O]
  out = np.zeros((ho, wo, o), np.int64)
  for p in range(ho):
    for q in range(wo):
      for i in range(kh):
        for j in range(kw):
          r, s = p * stride + i - pad, q * stride + j - pad
          if not (0 <= r < h and 0 <= s < w):
            out[p, q] += tap[i, j]
  return out


@pytest.mark.parametrize("h,w,c,k,stride,pad", [
    (13, 13, 8, 3, 1, 1), (15, 11, 40, 3, 2, 1), (14, 14, 64, 3, 2, 1),
    (1, 1, 32, 3, 1, 1),  # one pixel: every tap but the centre is padding
    (2, 3, 16, 3, 1, 1),  # rows padded at the top and the bottom at once
    (9, 10, 3, 7, 2, 3),  # stem-like 7×7/2, pad 3
])
def test_border_correction_matches_tap_by_tap_reference(h, w, c, k, stride, pad):
  bits = bitops.pack_kernel(jax.random.normal(jax.random.key(h * 7 + w), (k, k, c, 5)))
  got = np.asarray(bitops.border_correction(bits, c, h, w, stride, pad))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, _border_correction_reference(bits, c, h, w, stride, pad))


def test_xor_conv_rejects_channel_mismatch():
  bits = bitops.pack_kernel(jnp.ones((3, 3, 64, 8)))
  with pytest.raises(ValueError, match="input has 96 channels"):
    bitops.xor_popcount_conv(jnp.ones((1, 5, 5, 96)), bits, 1, 1)
  with pytest.raises(ValueError, match="group=5"):
    bitops.xor_popcount_conv(jnp.ones((1, 5, 5, 64)), bits, 1, 1, group=5)


def test_word_group_fits_cache_and_divides():
  for kw, o in [(18, 64), (36, 128), (72, 256), (144, 512), (72, 512), (16, 2048)]:
    g = bitops.word_group(kw, o, backend="cpu")
    assert kw % g == 0 and g >= 16
  assert bitops.word_group(144, 512, backend="cpu") == 16  # 16·512·4 B = 32 KiB
  assert bitops.word_group(144, 512, backend="gpu") == 144


# ---------------------------------------------------------------------------------------------
# Folded / packed models against the float model
# ---------------------------------------------------------------------------------------------

MODEL_CASES = [
    # (name, image size, overrides, impls)
    ("bireal18", 13, dict(stem="small", stage_sizes=(2, 1, 1, 1)), deploy.IMPLS),
    ("bireal18", 36, dict(stem="imagenet", stage_sizes=(1, 1, 1, 1)), deploy.IMPLS),
    ("bireal18", 15, dict(stem="small", stage_sizes=(2, 1, 1, 1), shortcut="resnet",
                          kernel_quantizer="sign"), ("xor",)),
    ("bireal50", 15, dict(stem="small", stage_sizes=(1, 1, 1, 1)), ("xor", "int8")),
]


@pytest.mark.parametrize("name,size,kw,impls", MODEL_CASES,
                         ids=["basic-13px", "basic-imagenet-36px", "resnet-sign-15px",
                              "bottleneck-15px"])
def test_packed_model_matches_float_model(name, size, kw, impls):
  model, variables = _model_and_vars(name, size, **kw)
  x = jax.random.normal(jax.random.key(7), (3, size, size, 3))
  ref = np.asarray(jax.jit(model.apply)(variables, x))
  assert np.ptp(ref, axis=-1).min() > 0.1 and np.ptp(ref, axis=0).max() > 0.01  # not degenerate
  pm = deploy.pack(model, variables)
  scale = np.abs(ref).max()
  for impl in impls:
    out = np.asarray(pm(x, impl=impl))
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * scale, err_msg=impl)
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1), err_msg=impl)
  if size == 13:  # micro-batching with a remainder (2 + 1 images) gives the same logits
    np.testing.assert_allclose(np.asarray(pm(x, impl="xor", micro_batch=2)), ref, rtol=0,
                               atol=2e-5 * scale)


def test_packed_model_is_a_jittable_pytree_and_uses_its_bits():
  model, variables = _model_and_vars("bireal18", 13, stem="small", stage_sizes=(1, 1, 1, 1))
  x = jax.random.normal(jax.random.key(3), (2, 13, 13, 3))
  pm = deploy.pack(model, variables, impl="xor")
  out = pm(x)
  jitted = jax.jit(lambda m, x: m(x), compiler_options=deploy.compiler_options() or None)
  np.testing.assert_array_equal(np.asarray(jitted(pm, x)), np.asarray(out))
  # flipping the sign of one output channel's kernel in the last binary conv changes the logits
  flipped = jax.tree.map(lambda a: a, pm.params)
  flipped["layer4_0"] = dict(flipped["layer4_0"], bits=np.asarray(pm.params["layer4_0"]["bits"]) ^
                             np.uint32(0xFFFFFFFF))
  assert not np.allclose(np.asarray(deploy.PackedModel(pm.config, flipped, "xor")(x)),
                         np.asarray(out), atol=1e-3)


def test_split_streams_cuts_at_micro_batches():
  for n in range(1, 40):
    for streams in (1, 2, 3, 8):
      for mb in (None, 1, 2, 4):
        chunks = deploy.split_streams(n, streams, mb)
        assert chunks[0][0] == 0 and chunks[-1][1] == n and len(chunks) <= streams
        assert all(a < b for a, b in chunks)
        assert all(b == c for (_, b), (c, _) in zip(chunks[:-1], chunks[1:]))  # contiguous
        assert all(a % (mb or 1) == 0 for a, _ in chunks)  # whole micro-batches per stream
        if streams > 1 and n >= 2 * (mb or 1):
          assert len(chunks) > 1
  assert deploy.split_streams(32, 2, 2) == [(0, 16), (16, 32)]
  assert deploy.split_streams(33, 2, 2) == [(0, 16), (16, 33)]
  assert deploy.default_streams("gpu") == 1
  assert deploy.default_streams("cpu") in range(1, max(1, len(os.sched_getaffinity(0))) + 1)


def test_streams_give_the_same_logits_bitwise():
  """Concurrent chunks keep every image in its micro-batch: logits bitwise equal to one call."""
  model, variables = _model_and_vars("bireal18", 13, stem="small", stage_sizes=(1, 1, 1, 1))
  x = jax.random.normal(jax.random.key(4), (7, 13, 13, 3))
  pm = deploy.pack(model, variables, impl="xor")
  one = np.asarray(pm(x, micro_batch=2, streams=1))
  for streams in (2, 3, 8):
    np.testing.assert_array_equal(np.asarray(pm(x, micro_batch=2, streams=streams)), one)
  ref = np.asarray(jax.jit(model.apply)(variables, x))
  np.testing.assert_allclose(one, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  # inside a user's jit the batch is one computation (no threads), same logits
  jitted = jax.jit(lambda m, x: m(x, micro_batch=2, streams=2),
                   compiler_options=deploy.compiler_options() or None)
  np.testing.assert_array_equal(np.asarray(jitted(pm, x)), one)


def test_stage_micro_batches_with_remainders_match_one_batch():
  """Stem 2 images at a time, stages 3 at a time (remainders in both phases), alone and in
  concurrent streams: the same logits as the whole batch at once and as the float model."""
  model, variables = _model_and_vars("bireal18", 36, stem="imagenet", stage_sizes=(1, 1, 1, 1))
  x = jax.random.normal(jax.random.key(9), (7, 36, 36, 3))
  pm = deploy.pack(model, variables, impl="xor")
  rp = pm.runtime_params("xor")
  whole = np.asarray(deploy.forward(pm.config, rp, x, "xor"))
  ref = np.asarray(jax.jit(model.apply)(variables, x))
  atol = 2e-5 * np.abs(ref).max()
  np.testing.assert_allclose(whole, ref, rtol=0, atol=atol)
  for mb, smb in [(2, 3), (3, 2), (None, 4), (2, None)]:
    out = np.asarray(jax.jit(lambda rp, x, mb=mb, smb=smb: deploy.forward(
        pm.config, rp, x, "xor", mb, smb))(rp, x))
    np.testing.assert_allclose(out, whole, rtol=0, atol=atol, err_msg=f"{mb}, {smb}")
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
  one = np.asarray(pm(x, micro_batch=2, stage_micro_batch=3, streams=1))
  np.testing.assert_array_equal(np.asarray(pm(x, micro_batch=2, stage_micro_batch=3, streams=2)),
                                one)  # streams cut at multiples of lcm(2, 3) = 6
  with pytest.raises(ValueError, match="stage_micro_batch must be a positive int"):
    deploy.forward(pm.config, rp, x, "xor", 2, 0)


@pytest.mark.parametrize("name,kw", [("bireal18", dict(stem="small", stage_sizes=(1, 2, 1, 1))),
                                     ("bireal18", dict(stem="small", shortcut="resnet",
                                                       stage_sizes=(1, 2, 3, 2))),
                                     ("bireal50", dict(stem="imagenet", stage_sizes=(1, 2, 1, 1)))])
def test_forward_pieces_compose_to_forward(name, kw):
  """The stage-by-stage cut used for profiling computes the same logits, stage names in order."""
  model, variables = _model_and_vars(name, 32, **kw)
  pm = deploy.pack(model, variables)
  rp = pm.runtime_params("xor")
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  pieces = deploy.forward_pieces(pm.config, "xor")
  assert [n for n, _ in pieces] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
  state = x
  for _, f in pieces:
    state = f(rp, state)
  np.testing.assert_array_equal(np.asarray(state),
                                np.asarray(deploy.forward(pm.config, rp, x, "xor")))


def test_folded_affine_formula():
  """s = γ·α/√(σ²+ε), b = β − μ·γ/√(σ²+ε) for one binary conv of a packed model."""
  model, variables = _model_and_vars("bireal18", 13, stem="small", stage_sizes=(1, 1, 1, 1))
  pm = deploy.pack(model, variables)
  p, s = variables["params"]["layer2_0"], variables["batch_stats"]["layer2_0"]
  k = np.asarray(p["binary_conv"]["kernel"], np.float64)
  alpha = np.abs(k).mean(axis=(0, 1, 2))
  mul = np.asarray(p["bn1"]["scale"]) / np.sqrt(np.asarray(s["bn1"]["var"], np.float64) + 1e-5)
  np.testing.assert_allclose(pm.params["layer2_0"]["scale"], mul * alpha, rtol=1e-6)
  np.testing.assert_allclose(pm.params["layer2_0"]["bias"],
                             np.asarray(p["bn1"]["bias"]) - np.asarray(s["bn1"]["mean"]) * mul,
                             rtol=1e-6, atol=1e-7)


def test_pack_rejects_non_binary_models():
  for name, kw, match in [("bireal18_real", {}, "activation='hardtanh'"),
                          ("bireal18", dict(kernel_quantizer=None), "kernel_quantizer=None"),
                          # larq-zoo's one-sided "same" padding: packing would change logits
                          ("bireal18", dict(padding="same"), "cannot pack padding='same'")]:
    model, variables = _model_and_vars(name, 13, stem="small", stage_sizes=(1, 1, 1, 1), **kw)
    with pytest.raises(ValueError, match=match):
      deploy.pack(model, variables)
  model, variables = _model_and_vars("bireal18", 13, stem="small", stage_sizes=(1, 1, 1, 1))
  with pytest.raises(ValueError, match="'params' and 'batch_stats'"):
    deploy.pack(model, variables["params"])


# ---------------------------------------------------------------------------------------------
# Export / load
# ---------------------------------------------------------------------------------------------

_LOAD_SCRIPT = """
import sys, numpy as np
from bireal_jax import deploy
m = deploy.load(sys.argv[1])
assert m.kind == "packed", m
np.save(sys.argv[3], np.asarray(m(np.load(sys.argv[2]))))
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("tensorflow", "optax", "torch"))
assert not bad, bad
"""


def test_packed_save_then_load_in_a_separate_process(tmp_path):
  model, variables = _model_and_vars("bireal18", 15, stem="small", stage_sizes=(1, 1, 1, 1))
  x = np.asarray(jax.random.normal(jax.random.key(5), (2, 15, 15, 3)))
  path = tmp_path / "packed"
  pm = deploy.pack(model, variables)
  deploy.save(path, pm)
  assert sorted(os.listdir(path)) == ["model.json", "variables"]
  with open(path / "model.json") as f:
    meta = json.load(f)
  assert meta["kind"] == "packed" and meta["packing"]["word_bits"] == 32
  assert models.from_config(meta["model"]) == model.clone(axis_name=None)
  with pytest.raises(FileExistsError, match="already exists"):
    deploy.save(path, pm)
  expected = np.asarray(pm(x))
  np.testing.assert_array_equal(np.asarray(deploy.load(path)(x)), expected)
  # Packing on the way (kind="packed" from the float model) writes the same model.
  deploy.save(path, model, variables, kind="packed", overwrite=True)
  np.testing.assert_array_equal(np.asarray(deploy.load(path).packed()(x)), expected)
  np.save(tmp_path / "x.npy", x)
  subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path), str(tmp_path / "x.npy"),
                  str(tmp_path / "y.npy")], check=True, timeout=300,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


def test_bireal18_packed_export_fits_4_2_mb(tmp_path):
  """Full-size Bi-Real-18 (random-sign kernels, so the bits do not compress) takes ≤ 4.2 MB."""
  model = models.get("bireal18")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  variables = _trained_looking(shapes, seed=1)
  pm = deploy.pack(model, variables)
  deploy.save(tmp_path / "b18", pm)
  n_bits = sum(np.asarray(l).size * 32 for p, l in jax.tree_util.tree_leaves_with_path(pm.params)
             if "bits" in jax.tree_util.keystr(p))
  assert n_bits == 10_985_472  # binary 3×3 weights of Bi-Real-18, 1 bit each, no padding words
  # 1 bit per binary weight + 32 bits per real parameter (stem, downsample, fc, folded affines)
  assert pm.num_bytes() == 10_985_472 // 8 + 4 * (9408 + 172032 + 513000 + 2 * 4800)
  size = deploy.directory_bytes(tmp_path / "b18")
  print(f"packed Bi-Real-18 on disk: {size:,} bytes (payload {pm.num_bytes():,})")
  assert size <= 4_200_000


def test_kernel_headers_are_in_the_build_key_and_the_package(tmp_path, monkeypatch):
  """Every `#include "..."` of the C++ sources is a csrc/*.h header that `build.headers()` lists
  (so a changed header rebuilds the libraries that include it) and that setup.cfg ships."""
  import configparser
  import fnmatch
  import re
  import shutil
  from bireal_jax.ops.cpu import build
  external = ("xla/", "dnnl")  # jaxlib's FFI headers and oneDNN's
  included = {name for cc in build.CSRC.glob("*.cc")
              for name in re.findall(r'^#include "([^"]+)"', cc.read_text(), re.M)
              if not name.startswith(external)}
  assert included and included == {p.name for p in build.headers()}, included
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg"))
  patterns = [p.strip() for p in cfg["options.package_data"]["bireal_jax.ops.cpu"].split(",")]
  for path in [*build.CSRC.glob("*.cc"), *build.headers()]:
    assert any(fnmatch.fnmatch(f"csrc/{path.name}", p) for p in patterns), (path.name, patterns)

  src = tmp_path / "csrc"
  shutil.copytree(build.CSRC, src)
  monkeypatch.setattr(build, "CSRC", src)
  sources = [src / "packed_conv.cc"]
  before = build.library_path("packed_conv", sources, ())
  header = src / "popcount_common.h"
  header.write_text(header.read_text() + "\n// a change\n")
  assert build.library_path("packed_conv", sources, ()) != before
