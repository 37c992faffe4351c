"""BinaryConv against an independent numpy convolution; Bi-Real blocks' wiring, dtypes, errors;
and on the CPU fast paths (`ops.implementation`: "native", "jax", "reference"): the max-pool,
BatchNorm and binary convolution against flax's layers and the lax reference, same values and
gradients to float tolerance, ties routed alike."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_paths import both, conv_branch, cpu_only, traced  # tests/fast_paths.py
from numerics import assert_close  # tests/numerics.py

from bireal_jax import layers, ops
from bireal_jax.layers import BinaryConv, BiRealBlock, BiRealBottleneck, Downsample
from bireal_jax.ops.cpu import onednn


def _init(module, *args, seed=1):
  # Jitted, with an rbg key: compiles in about a second (threefry init takes ~10x longer on CPU).
  return jax.jit(module.init)(jax.random.key(seed, impl="rbg"), *args)


def _apply(module, variables, *args, **kwargs):
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


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


# ---------------------------------------------------------------------------------------------
# On the CPU fast paths: layers.max_pool, layers.BatchNorm and BinaryConv against flax's
# layers and the lax reference (ops.implementation)
# ---------------------------------------------------------------------------------------------


POOLS = [
    ((2, 9, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # stem geometry, odd/even sizes
    ((2, 10, 10, 4), (3, 3), (2, 2), "SAME"),
    ((1, 7, 6, 2), (2, 3), (1, 2), ((0, 1), (2, 0))),   # asymmetric window, stride and pads
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
]


@cpu_only
@pytest.mark.parametrize("shape,window,strides,padding", POOLS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("use_onednn", [True, False])
def test_max_pool_values_and_gradients_match_nn_max_pool(shape, window, strides, padding, ties,
                                                         use_onednn):
  x = _x(*shape)
  if ties:  # few distinct values: most windows hold several equal maxima
    x = jnp.round(x)
  ref = lambda v: nn.max_pool(v, window, strides, padding=padding)
  new = lambda v: layers.max_pool(v, window, strides, padding)
  setting = "native" if use_onednn else "jax"  # "jax": no custom calls, the sliced max-pool
  jaxpr = traced(new, x, fast=setting)
  with ops.implementation(setting):
    y_new, vjp_new = jax.vjp(new, x)
  assert "reduce_window_max" not in jaxpr
  # oneDNN takes every geometry here but the one whose padding reaches the window size.
  wants_onednn = use_onednn and onednn.available() and padding != ((0, 1), (2, 0))
  assert ("bireal_onednn_pool_fwd" in jaxpr) == wants_onednn
  y_ref, vjp_ref = jax.vjp(ref, x)
  np.testing.assert_array_equal(y_new, y_ref)
  # Integer cotangents: every gradient entry is an exact small sum, so routing must match exactly.
  g = jnp.asarray(np.random.default_rng(1).integers(1, 50, y_ref.shape).astype(np.float32))
  np.testing.assert_array_equal(vjp_new(g)[0], vjp_ref(g)[0])


@cpu_only
def test_max_pool_sends_each_tied_window_gradient_to_its_first_maximum():
  x = jnp.zeros((1, 4, 4, 1))  # all equal: the first valid pixel of each window wins
  g = jnp.asarray(np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1))
  with ops.implementation("native"):
    dx = jax.vjp(lambda v: layers.max_pool(v), x)[1](g)[0][0, :, :, 0]
  expected = np.zeros((4, 4), np.float32)
  expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1, 2, 3, 4
  np.testing.assert_array_equal(dx, expected)


@cpu_only
def test_max_pool_reference_path_off_cpu_fast_paths():
  x = _x(1, 6, 6, 2)
  assert "reduce_window_max" in traced(lambda v: layers.max_pool(v), x, fast=False)


@cpu_only
def test_max_pool_rejects_bad_ranks():
  with pytest.raises(ValueError, match="NHWC"):
    layers.max_pool(jnp.zeros((4, 4, 2)))


def _bn_outputs(cls, x, g, **kw):
  """Output, updated batch stats and gradients (x, scale, bias) of a training-mode BatchNorm."""
  m = cls(use_running_average=False, momentum=0.9, **kw)
  c = x.shape[-1]
  params = {"scale": jnp.linspace(0.5, 2.0, c), "bias": jnp.linspace(-1.0, 1.0, c)}
  stats = {"mean": jnp.full((c,), 0.3), "var": jnp.full((c,), 2.0)}

  def f(p, v):
    y, upd = m.apply({"params": p, "batch_stats": stats}, v, mutable=["batch_stats"])
    return jnp.sum(y * g), (y, upd["batch_stats"])
  (_, (y, upd)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
  return y, upd, grads


@cpu_only
def test_batchnorm_fast_path_matches_nn_batchnorm():
  x = _x(4, 5, 6, 8) * 3.0 + 1.0
  g = _x(4, 5, 6, 8, seed=2)
  m = layers.BatchNorm(use_running_average=False)
  variables = m.init(_key(), x)
  forward = traced(lambda v: m.apply(variables, v, mutable=["batch_stats"]), x, fast=True)
  assert "custom_vjp_call" in forward  # the hand-written backward, not autodiff of flax's ops
  with ops.implementation("native"):
    fast = jax.jit(lambda a, b: _bn_outputs(layers.BatchNorm, a, b))(x, g)
  assert_close(fast, _bn_outputs(nn.BatchNorm, x, g), rtol=1e-5)


@cpu_only
def test_batchnorm_fast_path_averages_statistics_and_gradients_across_replicas():
  n = min(jax.local_device_count(), 4)
  if n < 2:
    pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  x = _x(n, 2, 3, 3, 4) * 2.0 - 0.5
  g = _x(n, 2, 3, 3, 4, seed=3)
  with ops.implementation("native"):
    out = [jax.pmap(lambda a, b: _bn_outputs(cls, a, b, axis_name="r"), axis_name="r")(x, g)
           for cls in (layers.BatchNorm, nn.BatchNorm)]
    m = layers.BatchNorm(use_running_average=False, axis_name="r")
    variables = m.init(_key(), x[0])
    forward = str(jax.make_jaxpr(lambda v: m.apply(variables, v, mutable=["batch_stats"]),
                                 axis_env=[("r", n)])(x[0]))
  assert "custom_vjp_call" in forward  # the hand-written backward, with the replicas' statistics
  assert_close(out[0], out[1], rtol=1e-5)
  # And the global statistics equal one device's over the whole batch.
  whole = _bn_outputs(nn.BatchNorm, x.reshape(-1, 3, 3, 4), g.reshape(-1, 3, 3, 4))
  assert_close(out[0][1], jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), whole[1]),
         rtol=1e-5)


@cpu_only
def test_batchnorm_keeps_flax_paths_for_eval_init_and_other_cases():
  x = _x(2, 3, 3, 4)
  m = layers.BatchNorm(use_running_average=False)
  assert "custom_vjp_call" not in traced(lambda v: m.init(_key(), v), x, fast=True)
  variables = m.init(_key(), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, nn.BatchNorm(use_running_average=False).init(_key(), x))
  ev = layers.BatchNorm(use_running_average=True)
  np.testing.assert_array_equal(ev.apply(variables, x),
                                nn.BatchNorm(use_running_average=True).apply(variables, x))
  for other in (traced(lambda v: m.apply(variables, v, mutable=["batch_stats"]), x, fast=False),
                traced(lambda v: layers.BatchNorm(
                    use_running_average=False, use_fast_variance=False).apply(
                        variables, v, mutable=["batch_stats"]), x, fast=True)):
    assert "custom_vjp_call" not in other


# The "native" preset without the int8 forward: where the XOR kernel does not apply (asymmetric
# padding), the binary conv falls back to the f32 convolution.
XOR_ONLY = dict(ops.PRESETS["native"], binary_conv2d=("xor",))


CONVS = [  # (input shape, features, kernel, stride, padding, forward branch expected, setting)
    ((2, 9, 8, 3), 5, 3, 1, 1, "xor", "native"),           # odd/even sizes
    ((2, 16, 16, 4), 6, 3, 1, 1, "xor", "native"),
    ((2, 16, 16, 4), 6, 3, 2, 1, "xor", "native"),          # strided
    ((1, 9, 9, 2), 3, 3, 2, "VALID", "xor", "native"),
    ((2, 8, 8, 4), 8, 1, 2, 0, "xor", "native"),            # 1x1 shortcut-style conv
    ((2, 11, 10, 3), 4, 3, 2, "SAME", "int8", "native"),    # TF 'SAME' at stride 2: asymmetric
    ((1, 9, 8, 3), 5, 3, 2, ((2, 0), (0, 1)), "int8", "native"),
    ((2, 16, 16, 4), 6, 3, 1, ((1, 1), (0, 2)), "int8", "native"),  # asymmetric, 16x16 output
    ((2, 16, 16, 4), 6, 3, 1, ((1, 1), (0, 2)), "f32", XOR_ONLY),   # no exact kernel applies
]


@cpu_only
@pytest.mark.parametrize("shape,features,k,stride,padding,branch,setting", CONVS)
@pytest.mark.parametrize("activation,kernel_quantizer", [
    ("approx_sign", "magnitude_aware"), ("ste_sign", "official"), ("identity_sign", "sign")])
def test_binary_conv_fast_path_matches_lax_conv_values_and_gradients(
    shape, features, k, stride, padding, branch, setting, activation, kernel_quantizer):
  x = _x(*shape)
  conv = BinaryConv(features, (k, k), stride, padding=padding, input_quantizer=activation,
                    kernel_quantizer=kernel_quantizer, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(1), x)
  g = _x(*jax.eval_shape(conv.apply, params, x).shape, seed=2)

  def value_and_grads(p, v):
    y, vjp = jax.vjp(conv.apply, p, v)
    return y, vjp(g)

  assert conv_branch(traced(value_and_grads, params, x, fast=setting)) == branch
  assert conv_branch(traced(value_and_grads, params, x, fast=False)) == "f32"
  (y_fast, grads_fast), (y_ref, grads_ref) = both(value_and_grads, params, x, fast=setting)
  assert_close(y_fast, y_ref)
  assert_close(grads_fast, grads_ref)


@cpu_only
@pytest.mark.parametrize("shape,features,k,stride,padding",
                         [row[:5] for row in CONVS if row[5] == "xor"])
def test_binary_conv_pure_jax_xor_path_without_onednn(shape, features, k, stride, padding):
  # The XOR forward without the C++ custom calls (the "jax" preset): `bits.xor_popcount_conv`.
  x = _x(*shape)
  conv = BinaryConv(features, (k, k), stride, padding=padding, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(1), x)
  g = _x(*jax.eval_shape(conv.apply, params, x).shape, seed=2)

  def value_and_grads(p, v):
    y, vjp = jax.vjp(conv.apply, p, v)
    return y, vjp(g)

  jaxpr = traced(value_and_grads, params, x, fast="jax")
  with ops.implementation("jax"):
    fast = jax.jit(lambda *a: value_and_grads(*a))(params, x)
  assert "population_count" in jaxpr and "bireal_" not in jaxpr
  with ops.implementation("reference"):
    ref = jax.jit(lambda *a: value_and_grads(*a))(params, x)
  assert_close(fast, ref)


@cpu_only
def test_xor_branch_is_at_least_as_exact_as_the_f32_conv():
  # ±1 inputs times ±α kernels: the exact result is α·(integer sum), computed in float64.
  x = _x(2, 7, 7, 64)
  conv = BinaryConv(16, (3, 3), 1, padding=1, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(3), x)
  kernel = np.asarray(params["params"]["kernel"], np.float64)
  alpha = np.abs(kernel).mean(axis=(0, 1, 2))
  xs = np.pad(np.where(np.asarray(x) >= 0, 1.0, -1.0), ((0, 0), (1, 1), (1, 1), (0, 0)))
  ws = np.where(kernel >= 0, 1.0, -1.0)
  exact = sum(xs[:, i:i + 7, j:j + 7, :] @ ws[i, j] for i in range(3) for j in range(3)) * alpha
  assert conv_branch(traced(conv.apply, params, x, fast=True)) == "xor"
  y_fast, y_ref = both(conv.apply, params, x)
  err_fast = np.abs(np.asarray(y_fast, np.float64) - exact).max()
  err_ref = np.abs(np.asarray(y_ref, np.float64) - exact).max()
  assert err_fast <= err_ref + 1e-12
  assert err_fast <= 4 * np.finfo(np.float32).eps * np.abs(exact).max()


@cpu_only
@pytest.mark.parametrize("activation,kernel_quantizer", [("hardtanh", None), ("approx_sign", None),
                                                          (None, "magnitude_aware")])
def test_non_binary_convs_keep_the_lax_conv(activation, kernel_quantizer):
  x = _x(1, 6, 6, 3)
  conv = BinaryConv(4, (3, 3), 2, padding=1, input_quantizer=activation,
                    kernel_quantizer=kernel_quantizer, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(0), x)
  assert conv_branch(traced(conv.apply, params, x, fast=True)) == "f32"


@cpu_only
def test_bfloat16_convs_keep_the_lax_conv():
  x = _x(1, 6, 6, 3)
  conv = BinaryConv(4, (3, 3), 2, padding=1, dtype=jnp.bfloat16, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(0), x)
  assert conv_branch(traced(conv.apply, params, x, fast=True)) == "f32"
