"""oneDNN convolutions (jax.ffi custom calls, CPU only) against `lax.conv_general_dilated`:
values, input and kernel gradients, under jit/pmap/vmap, and how the layers choose them. (The
C++ XOR binary-conv forward, `bireal_jax.ops.cpu.xor`: test_xor_kernel.py.)"""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bireal_jax import deploy, layers, models, ops
from bireal_jax.ops import autotune
from bireal_jax.ops import bits as bitops
from bireal_jax.ops.cpu import build, onednn

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="oneDNN convolutions are CPU-only"),
    pytest.mark.skipif(jax.default_backend() == "cpu" and not onednn.available(),
                       reason=f"oneDNN convolutions not built here: {onednn.unavailable_reason()}"
                       " (make sysdeps installs g++ and libdnnl-dev)"),
]

DN = ("NHWC", "HWIO", "NHWC")

# (x shape, kernel shape, strides, pads): odd/even sizes, strides 1/2/mixed, asymmetric and
# over-wide padding, 1×1, the 7×7 stem, more channels than one SIMD block, and both ways of
# computing the input gradient.
GEOMETRIES = [
    ((2, 9, 7, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((1, 11, 10, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    ((2, 6, 6, 5), (1, 1, 5, 4), (1, 1), ((0, 0), (0, 0))),
    ((2, 7, 9, 3), (3, 3, 3, 4), (2, 1), ((0, 1), (1, 0))),
    ((2, 5, 5, 2), (3, 3, 2, 3), (1, 1), ((3, 2), (0, 2))),
    ((3, 5, 5, 40), (3, 3, 40, 33), (1, 1), ((1, 1), (1, 1))),
    ((2, 13, 13, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1))),
    # >= 28x28 at stride 1: input gradient as a forward conv with the flipped kernel
    ((1, 28, 30, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
    ((1, 28, 28, 4), (3, 3, 4, 5), (1, 1), ((0, 2), (1, 1))),
    ((1, 28, 28, 4), (3, 3, 4, 5), (1, 1), ((3, 0), (0, 2))),  # pad > k-1: backward-data kernel
]


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _ref(x, k, strides, pads):
  return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=DN)


def _assert_close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("x_shape,k_shape,strides,pads", GEOMETRIES)
def test_conv2d_values_and_gradients_match_lax(x_shape, k_shape, strides, pads):
  x, k = _rand(x_shape, 0), _rand(k_shape, 1)
  y = jax.jit(lambda a, b: onednn.conv2d(a, b, strides, pads))(x, k)
  y_ref = _ref(x, k, strides, pads)
  _assert_close(y, y_ref)
  dy = _rand(y_ref.shape, 2)
  grads = jax.jit(lambda a, b, g: jax.vjp(lambda a, b: onednn.conv2d(a, b, strides, pads),
                                          a, b)[1](g))(x, k, dy)
  grads_ref = jax.vjp(lambda a, b: _ref(a, b, strides, pads), x, k)[1](dy)
  _assert_close(grads[0], grads_ref[0])
  _assert_close(grads[1], grads_ref[1])


def test_conv2d_lowers_to_the_custom_calls():
  x, k = _rand((1, 6, 6, 4), 0), _rand((3, 3, 4, 8), 1)
  f = lambda a, b: onednn.conv2d(a, b, (1, 1), ((1, 1), (1, 1))).sum()  # noqa: E731
  hlo = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(x, k).as_text()
  for target in ("fwd", "bwd_data", "bwd_kernel"):
    assert f"bireal_onednn_conv_{target}" in hlo
  assert "convolution" not in hlo


def test_conv2d_under_pmap_and_vmap():
  n = min(jax.local_device_count(), 4)
  x, k = _rand((n, 2, 7, 7, 3), 0), _rand((n, 3, 3, 3, 4), 1)
  strides, pads = (2, 2), ((1, 1), (1, 1))
  ref = jax.vmap(lambda a, b: _ref(a, b, strides, pads))(x, k)
  _assert_close(jax.pmap(lambda a, b: onednn.conv2d(a, b, strides, pads))(x, k), ref)
  _assert_close(jax.jit(jax.vmap(lambda a, b: onednn.conv2d(a, b, strides, pads)))(x, k), ref)


def test_conv2d_rejects_bad_input():
  x, k = jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
  with pytest.raises(TypeError, match="bfloat16"):
    onednn.conv2d(x.astype(jnp.bfloat16), k, (1, 1), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="matching channels"):
    onednn.conv2d(x, jnp.ones((3, 3, 2, 4)), (1, 1), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="does not fit"):
    onednn.conv2d(x, jnp.ones((7, 7, 3, 4)), (1, 1), ((0, 0), (0, 0)))


POOLS = [  # (x shape, window, strides, pads)
    ((2, 9, 11, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),   # stem geometry, odd sizes
    ((2, 8, 8, 3), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((1, 10, 7, 4), (3, 2), (1, 2), ((1, 0), (0, 1))),   # asymmetric window, stride and pads
]


@pytest.mark.parametrize("x_shape,window,strides,pads", POOLS)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool2d_values_and_gradients_match_nn_max_pool(x_shape, window, strides, pads, ties):
  x = _rand(x_shape, 3)
  if ties:  # few distinct values: most windows hold several equal maxima
    x = jnp.round(x)
  ref = lambda v: nn.max_pool(v, window, strides, padding=pads)  # noqa: E731
  y_ref, vjp_ref = jax.vjp(ref, x)
  y, vjp = jax.vjp(lambda v: onednn.max_pool2d(v, window, strides, pads), x)
  np.testing.assert_array_equal(y, y_ref)
  # Integer cotangents: exact sums, so the routing to the first maximum must match exactly.
  g = jnp.asarray(np.random.default_rng(1).integers(1, 50, y_ref.shape).astype(np.float32))
  np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


def test_max_pool2d_lowers_to_the_custom_calls_and_maps():
  pads = ((1, 1), (1, 1))
  f = lambda v: onednn.max_pool2d(v, (3, 3), (2, 2), pads)  # noqa: E731
  x = _rand((4, 2, 9, 9, 3), 4)
  hlo = jax.jit(jax.grad(lambda v: f(v).sum())).lower(x[0]).as_text()
  assert "bireal_onednn_pool_fwd" in hlo and "bireal_onednn_pool_bwd" in hlo
  ref = jax.vmap(lambda v: nn.max_pool(v, (3, 3), (2, 2), padding=pads))(x)
  n = min(jax.local_device_count(), 4)
  np.testing.assert_array_equal(jax.pmap(f)(x[:n]), ref[:n])
  np.testing.assert_array_equal(jax.jit(jax.vmap(f))(x), ref)


def test_max_pool2d_rejects_bad_input():
  x = jnp.ones((1, 6, 6, 2))
  with pytest.raises(TypeError, match="float32"):
    onednn.max_pool2d(x.astype(jnp.bfloat16), (3, 3), (2, 2), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="padding smaller than the window"):
    onednn.max_pool2d(x, (2, 2), (2, 2), ((2, 2), (0, 0)))
  with pytest.raises(ValueError, match="does not fit"):
    onednn.max_pool2d(x, (9, 9), (1, 1), ((0, 0), (0, 0)))


def test_layers_choose_onednn_only_on_the_cpu_fast_paths():
  model = models.get("bireal18", num_classes=5, base_width=8, stem="imagenet")
  x = _rand((2, 32, 32, 3), 3)
  variables = jax.eval_shape(model.init, jax.random.key(0), x[:1])  # tracing needs shapes only
  train = lambda v, a: model.apply(v, a, train=True, mutable=["batch_stats"])[0]  # noqa: E731
  trace = lambda: str(jax.make_jaxpr(lambda v, a: train(v, a))(variables, x))  # noqa: E731
  with ops.implementation("native"):
    fast = trace()
    with ops.implementation("reference"):
      ref = trace()
    with ops.implementation("jax"):
      xla = trace()
    assert trace() == fast  # the switch restored
  assert "bireal_onednn_conv_fwd" in fast and "conv_general_dilated" not in fast
  assert "bireal_onednn" not in ref and "conv_general_dilated" in ref
  # oneDNN off, the other fast paths on: XLA's convolutions and the XOR binary forward.
  assert "bireal_onednn" not in xla and "conv_general_dilated" in xla
  assert "population_count" in xla


@pytest.mark.parametrize("kwargs", [dict(kernel_dilation=2), dict(feature_group_count=2),
                                    dict(strides=2, padding="SAME")])
def test_nn_conv_adapter_matches_lax(kwargs):
  conv = nn.Conv(6, (3, 3), use_bias=False, conv_general_dilated=layers.conv_general_dilated,
                 **kwargs)
  plain = nn.Conv(6, (3, 3), use_bias=False, **kwargs)
  x = _rand((2, 9, 9, 4), 4)
  variables = plain.init(jax.random.key(1), x)
  with ops.implementation("native"):
    jaxpr = str(jax.make_jaxpr(conv.apply)(variables, x))
    y = jax.jit(conv.apply)(variables, x)
    g = jax.jit(jax.grad(lambda v: conv.apply(v, x).sum()))(variables)
  # Only plain convolutions go to `ops.conv2d` (oneDNN under "native"); 'SAME' at stride 2 is one.
  assert ("bireal_onednn_conv_fwd" in jaxpr) == ("strides" in kwargs)
  _assert_close(y, plain.apply(variables, x))
  g_ref = jax.grad(lambda v: plain.apply(v, x).sum())(variables)
  _assert_close(g["params"]["kernel"], g_ref["params"]["kernel"])


def test_disabled_by_environment_falls_back_with_a_message():
  # `auto` (and `applicable`) leave oneDNN out; naming it raises a ValueError saying so.
  env = dict(os.environ, BIREAL_ONEDNN="0", JAX_PLATFORMS="cpu", BIREAL_OPS="auto")
  code = ("from bireal_jax import ops; from bireal_jax.ops.cpu import onednn; import jax, jax.numpy as jnp;"
          "x = jnp.ones((1, 5, 5, 3)); k = jnp.ones((3, 3, 3, 2)); s = dict(strides=(1, 1),"
          " pads=((1, 1), (1, 1)));"
          "f = lambda a, b: ops.conv2d(a, b, (1, 1), ((1, 1), (1, 1)));"
          "print(onednn.available(), 'onednn' in ops.applicable('conv2d', (x, k), s),"
          " jax.jit(f).lower(x, k).as_text().count('bireal_onednn'))\n"
          "try:\n"
          "  with ops.implementation({'conv2d': 'onednn'}): jax.jit(lambda a, b: f(a, b)).lower(x, k)\n"
          "except ValueError as e: print('ValueError:', e)")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0].split() == ["False", "False", "0"]
  assert lines[1].startswith("ValueError:") and "'onednn' is not available" in lines[1]
  assert "disabled by BIREAL_ONEDNN=0" in out.stderr


# ------------------------------------------------------------------------------------------------
# bf16 binary convolutions (the AMX candidates, issue 24 item 3): exact for ±1, offered to `auto`
# only where the CPU has AMX, runnable by name everywhere oneDNN is built
# ------------------------------------------------------------------------------------------------

def test_has_amx_reads_the_cpu_flags_and_the_override(monkeypatch):
  monkeypatch.delenv("BIREAL_AMX", raising=False)
  assert build.has_amx() == ("amx_bf16" in build.cpu_flags() and build.isa_cap() is None)
  monkeypatch.setenv("BIREAL_AMX", "1")
  assert build.has_amx()
  monkeypatch.setenv("BIREAL_AMX", "0")
  assert not build.has_amx()
  monkeypatch.setenv("BIREAL_AMX", "yes")
  with pytest.raises(ValueError, match=r"BIREAL_AMX='yes': expected '1', '0' or unset"):
    build.has_amx()


def _pm1(shape, seed):
  return jnp.asarray(np.where(np.random.default_rng(seed).standard_normal(shape) >= 0, 1.0, -1.0),
                     jnp.float32)


def test_packed_bf16_conv_is_exact_and_its_kernel_cache_follows_the_bits():
  """D for ±1 activations equals XLA's XOR + popcount D, at the borders too, for channels not a
  multiple of 32; a second kernel of the same geometry, the first again, and the first with one
  bit flipped each give their own D (the C++ side keeps reordered kernels keyed by the bits)."""
  x = _rand((2, 9, 8, 40), 0)
  x = x.at[:, ::3, ::2, ::5].set(0.0)  # sign(0) = +1
  f = jax.jit(lambda a, b: onednn.packed_conv2d_bf16(
      jnp.where(a >= 0, 1.0, -1.0).astype(jnp.bfloat16), b, 1, 1))
  a = bitops.pack_kernel(_rand((3, 3, 40, 33), 1))
  b = bitops.pack_kernel(_rand((3, 3, 40, 33), 2))
  a_flipped = a.at[1, 2, 1, 7].set(a[1, 2, 1, 7] ^ jnp.uint32(1 << 3))
  for bits in (a, b, a, a_flipped):
    np.testing.assert_array_equal(np.asarray(f(x, bits)),
                                  np.asarray(bitops.xor_popcount_conv(x, bits, 1, 1)))
  with pytest.raises(TypeError, match="bfloat16 activations and uint32 bits, got float32"):
    onednn.packed_conv2d_bf16(x, a, 1, 1)
  with pytest.raises(ValueError, match=r"bits \[kh, kw, ceil\(C/32\), O\], got \(2, 9, 8, 40\)"):
    onednn.packed_conv2d_bf16(x.astype(jnp.bfloat16), a[:, :, :1], 1, 1)


def test_bf16_conv_of_pm1_operands_is_exact():
  x, k = _pm1((2, 9, 7, 40), 0), _pm1((3, 3, 40, 33), 1)
  for strides, pads in [((1, 1), ((1, 1), (1, 1))), ((2, 1), ((0, 1), (2, 0)))]:
    got = jax.jit(lambda a, b: onednn.conv2d_bf16(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                                  strides, pads))(x, k)
    want = lax.conv_general_dilated(np.asarray(x, np.float64), np.asarray(k, np.float64),
                                    strides, pads, dimension_numbers=DN)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.float32))
  with pytest.raises(TypeError, match="bfloat16 operands, got float32 and float32"):
    onednn.conv2d_bf16(x, k, (1, 1), ((1, 1), (1, 1)))


@pytest.mark.parametrize("amx", ["0", "1"])
def test_auto_times_the_bf16_candidates_only_with_amx(amx, autotune_env, monkeypatch):
  """BIREAL_AMX=1 stands in for an AMX CPU: then `auto` times `onednn_bf16` beside the others
  (real timings, read back from its disk cache) and `explain` lists it; with 0 it does neither."""
  tmp_path = autotune_env  # conftest.py: a fresh autotune cache
  monkeypatch.setenv("BIREAL_AMX", amx)
  try:
    x = _rand((1, 8, 8, 64), 0)
    cases = {"binary_conv2d": ((jnp.sign(x) + (x == 0), _pm1((3, 3, 64, 64), 1) * 0.01),
                               dict(strides=(1, 1), pads=((1, 1), (1, 1)))),
             "packed_conv2d": ((x, bitops.pack_kernel(_rand((3, 3, 64, 64), 2)), jnp.ones(64),
                                jnp.zeros(64)), dict(stride=1, pad=1))}
    for op, (arrays, statics) in cases.items():
      pick = autotune.pick(op, arrays, statics)  # times the candidates, writes the cache
      entry = autotune.stored_timings(op, arrays, statics)
      assert entry is not None and entry["pick"] == pick
      assert ("onednn_bf16" in entry["ms"]) == (amx == "1"), entry
      assert "reference" in entry["ms"]
      autotune.clear_cache()
      (tmp_path / "autotune").rename(tmp_path / f"autotune-{op}")  # explain: nothing cached
      with ops.implementation("auto"):
        said = ops.explain(lambda *a: getattr(ops, op)(*a, **statics), *arrays)
      assert ("onednn_bf16" in said) == (amx == "1"), said
  finally:
    autotune.clear_cache()


def test_bf16_candidates_run_by_name_on_this_cpu():
  """Named in a setting string (as BIREAL_OPS takes it), the bf16 candidates run here whether
  or not the CPU has AMX: the packed model's binary convs and the float model's eval-mode
  binary convs go through the bf16 custom calls and give the reference's logits."""
  model = models.get("bireal18", num_classes=10, stem="small", base_width=32,
                     stage_sizes=(1, 1, 1, 1))
  x = _rand((2, 16, 16, 3), 3)
  variables = model.init(jax.random.key(0), x)
  pm = deploy.pack(model, variables)
  rp = pm.runtime_params("xor")
  others = ",".join(f"{op}=reference" for op in ops.OPS if op not in ("packed_conv2d",
                                                                      "binary_conv2d"))
  out = {}
  for name in ("reference", "onednn_bf16"):
    with ops.implementation(f"{others},packed_conv2d={name},binary_conv2d={name}"):
      packed = lambda p, v: deploy.forward(pm.config, p, v, "xor")  # noqa: E731 (fresh trace)
      floating = lambda v, xs: model.apply(v, xs, train=False)  # noqa: E731
      out[name] = (str(jax.make_jaxpr(packed)(rp, x)), np.asarray(jax.jit(packed)(rp, x)),
                   str(jax.make_jaxpr(floating)(variables, x)),
                   np.asarray(jax.jit(floating)(variables, x)))
  assert "bireal_onednn_packed_conv_bf16_fwd" in out["onednn_bf16"][0]
  assert "population_count" not in out["onednn_bf16"][0]
  assert "bireal_onednn_conv_bf16_fwd" in out["onednn_bf16"][2]
  assert "bireal_onednn" not in out["reference"][0] + out["reference"][2]
  for i in (1, 3):  # D exact on both; the affine may round once apart inside larger fusions
    ref = out["reference"][i]
    np.testing.assert_allclose(out["onednn_bf16"][i], ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    np.testing.assert_array_equal(out["onednn_bf16"][i].argmax(-1), ref.argmax(-1))
