"""BinaryConv against an independent numpy convolution; Bi-Real blocks' wiring, dtypes, errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bireal_jax import layers
from bireal_jax.layers import BinaryConv, BiRealBlock, BiRealBottleneck, Downsample


def _init(module, *args, seed=1):
  # Jitted, with an rbg key: compiles in about a second (threefry init takes ~10x longer on CPU).
  return jax.jit(module.init)(jax.random.key(seed, impl="rbg"), *args)


def _apply(module, variables, *args, **kwargs):
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _np_conv(x, w, stride, pad):
  """Direct NHWC × HWIO convolution in float64 with explicit zero padding (no lax involved)."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
  w = np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      out += patch @ w[i, j]
  return out


def _sign(a):
  return np.where(np.asarray(a) >= 0, 1.0, -1.0)


@pytest.mark.parametrize("ksize,stride,padding,np_pad", [
    (3, 1, 1, ((1, 1), (1, 1))),
    (3, 2, 1, ((1, 1), (1, 1))),
    (3, 1, "SAME", ((1, 1), (1, 1))),
    (3, 2, "VALID", ((0, 0), (0, 0))),
    (1, 2, 0, ((0, 0), (0, 0))),
    (3, 2, ((2, 0), (0, 1)), ((2, 0), (0, 1))),
])
@pytest.mark.parametrize("kernel_quantizer", ["magnitude_aware", "official"])
def test_binary_conv_equals_conv_of_plus_minus_one_inputs_and_alpha_kernels(
    ksize, stride, padding, np_pad, kernel_quantizer):
  x = _x(2, 9, 8, 3)
  conv = BinaryConv(5, (ksize, ksize), stride, padding=padding, kernel_quantizer=kernel_quantizer,
                    kernel_init="lecun_normal")  # signed kernels, unlike the official U[0, 1e-3)
  params = _init(conv, x)
  w = np.asarray(params["params"]["kernel"])
  alpha = np.mean(np.abs(w), axis=(0, 1, 2), keepdims=True)
  # Quantize first, then zero-pad: the padded border contributes 0, not ±1.
  expected = _np_conv(_sign(x), alpha * _sign(w), stride, np_pad)
  y = conv.apply(params, x)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_binary_conv_sign_kernel_gives_integer_popcount_outputs():
  x = _x(1, 6, 6, 4)
  conv = BinaryConv(3, kernel_quantizer="sign", kernel_init="lecun_normal", padding="VALID")
  y = np.asarray(conv.apply(_init(conv, x), x))
  # ±1 · ±1 summed over 3·3·4 = 36 terms: an even integer in [-36, 36].
  np.testing.assert_array_equal(y, np.round(y))
  assert np.all(np.abs(y) <= 36) and np.all(y % 2 == 0)


def test_real_binary_conv_equals_nn_conv_with_the_same_kernel():
  x = _x(2, 8, 8, 3)
  conv = BinaryConv(4, (3, 3), 2, padding=1, input_quantizer=None, kernel_quantizer=None,
                    kernel_init="lecun_normal")
  params = _init(conv, x)
  ref = nn.Conv(4, (3, 3), (2, 2), padding=[(1, 1), (1, 1)], use_bias=False)
  np.testing.assert_allclose(conv.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-6)


def test_binary_conv_bias_and_official_init():
  x = jnp.ones((1, 4, 4, 2))
  conv = BinaryConv(3, use_bias=True, bias_init=nn.initializers.constant(0.5))
  params = _init(conv, x)["params"]
  assert set(params) == {"kernel", "bias"}
  k = np.asarray(params["kernel"])
  assert k.shape == (3, 3, 2, 3) and k.min() >= 0 and k.max() < 1e-3  # torch.rand * 1e-3


def test_binary_conv_input_gradient_follows_approx_sign():
  # With a 1×1 conv and one output channel, dL/dx = approxsign'(x) · w_b.
  x = jnp.array([-1.5, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0]).reshape(1, 1, 8, 1)
  conv = BinaryConv(1, (1, 1), padding=0)
  params = {"params": {"kernel": jnp.full((1, 1, 1, 1), -0.3)}}
  g = jax.grad(lambda x: conv.apply(params, x).sum())(x).reshape(-1)
  xs = np.asarray(x).reshape(-1)
  approx = np.where((xs >= -1) & (xs < 0), 2 + 2 * xs,
                    np.where((xs >= 0) & (xs < 1), 2 - 2 * xs, 0))
  np.testing.assert_allclose(g, -0.3 * approx, rtol=1e-6, atol=1e-7)


def test_binary_conv_bfloat16_compute_keeps_float32_params():
  x = _x(1, 6, 6, 3)
  conv = BinaryConv(4, dtype=jnp.bfloat16, kernel_init="lecun_normal")
  params = _init(conv, x)
  assert params["params"]["kernel"].dtype == jnp.float32
  y = conv.apply(params, x)
  assert y.dtype == jnp.bfloat16
  y32 = BinaryConv(4, kernel_init="lecun_normal").apply(params, x)
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=2e-2, atol=2e-2)


def test_binary_conv_errors_name_the_bad_value():
  conv = BinaryConv(4)
  with pytest.raises(ValueError, match=r"rank 4, got shape \(6, 6, 3\)"):
    _init(conv, jnp.ones((6, 6, 3)))
  params = _init(conv, jnp.ones((1, 6, 6, 3)))
  with pytest.raises(ValueError) as e:
    conv.apply(params, jnp.ones((1, 6, 6, 5)))
  assert "5 channels" in str(e.value) and "expects 3" in str(e.value)
  with pytest.raises(ValueError, match=r"unknown kernel init 'gauss'.*official"):
    BinaryConv(4, kernel_init="gauss").init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
  with pytest.raises(ValueError, match=r"padding must be .*got 'FULL'"):
    BinaryConv(4, padding="FULL").init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
  with pytest.raises(ValueError, match=r"strides must be .*got 0"):
    BinaryConv(4, strides=0).init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
  with pytest.raises(ValueError, match=r"unknown quantizer 'sgn'"):
    BinaryConv(4, input_quantizer="sgn").init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def _bn(train=True):
  return lambda name: nn.BatchNorm(use_running_average=not train, name=name)


def test_bireal_block_adds_identity_shortcut_around_the_binary_conv():
  x = _x(2, 6, 6, 8)
  block = BiRealBlock(8, norm=_bn(False), kernel_init="lecun_normal")
  variables = _init(block, x)
  assert "downsample" not in variables["params"]
  branch = BiRealBlock(8, norm=_bn(False), kernel_init="lecun_normal", shortcut=False)
  diff = _apply(block, variables, x) - _apply(branch, variables, x)
  np.testing.assert_allclose(diff, x, rtol=1e-5, atol=1e-5)


def test_bireal_block_downsample_shortcut_on_stride_or_width_change():
  x = _x(2, 8, 8, 4)
  for stride, width in [(2, 8), (1, 8)]:  # stride change; width change
    block = BiRealBlock(width, stride, norm=_bn(False))
    variables = _init(block, x)
    assert set(variables["params"]["downsample"]) == {"conv", "bn"}
    y = _apply(block, variables, x)
    assert y.shape == (2, 8 // stride, 8 // stride, width)
    # The shortcut equals Downsample on its own (avg-pool → real 1×1 conv → BN).
    down = _apply(Downsample(width, stride, _bn(False)),
                  {"params": variables["params"]["downsample"],
                   "batch_stats": variables["batch_stats"]["downsample"]}, x)
    branch = _apply(BiRealBlock(width, stride, norm=_bn(False), shortcut=False), variables, x)
    np.testing.assert_allclose(y - branch, down, rtol=1e-5, atol=1e-5)


def test_downsample_averages_2x2_windows_before_the_1x1_conv():
  x = _x(1, 4, 4, 2)
  down = Downsample(3, 2, _bn(False))
  v = _init(down, x)
  k = np.asarray(v["params"]["conv"]["kernel"])[0, 0]
  pooled = np.asarray(x).reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4))
  # Fresh BN (mean 0, var 1, scale 1, bias 0) is x / sqrt(1 + eps).
  np.testing.assert_allclose(_apply(down, v, x), pooled @ k / np.sqrt(1 + 1e-5), rtol=1e-5,
                             atol=1e-6)


def test_block_train_mode_updates_batch_stats():
  x = _x(4, 6, 6, 8) + 3.0
  block = BiRealBlock(8, 2, norm=_bn(True))
  v = _init(block, x)
  _, upd = _apply(block, v, x, mutable=["batch_stats"])
  old = np.asarray(v["batch_stats"]["downsample"]["bn"]["mean"])
  new = np.asarray(upd["batch_stats"]["downsample"]["bn"]["mean"])
  assert not np.allclose(old, new)


def test_bottleneck_streams_and_real_first_conv():
  x = _x(1, 8, 8, 8)
  first = BiRealBottleneck(16, 1, is_downsample=True, is_first_block=True, norm=_bn(False))
  v = _init(first, x, x)
  x1, x2 = _apply(first, v, x, x)
  assert x1.shape == (1, 8, 8, 4) and x2.shape == (1, 8, 8, 16)
  assert "down_conv1x1" not in v["params"]  # first block: no mid-stream shortcut
  nxt = BiRealBottleneck(32, 2, is_downsample=True, norm=_bn(False))
  v2 = _init(nxt, x1, x2)
  y1, y2 = _apply(nxt, v2, x1, x2)
  assert y1.shape == (1, 4, 4, 8) and y2.shape == (1, 4, 4, 32)
  assert {"down_conv1x1", "downsample", "conv1", "conv2", "conv3"} <= set(v2["params"])

