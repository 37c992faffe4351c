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

from bireal_jax import layers, models, ops
from bireal_jax.ops.cpu import onednn

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
