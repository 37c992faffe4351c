"""CPU fast paths (XOR/popcount and int8 binary-conv forwards, oneDNN f32 convs, oneDNN and sliced
max-pools, the BatchNorm backward, compiler options) against the plain lax reference paths: same values and gradients to float
tolerance, ties routed alike."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bireal_jax import layers, models, quantizers
from bireal_jax.ops.cpu import onednn
from bireal_jax.layers import BinaryConv

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the fast paths are CPU-only by design")


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


def _traced(fn, *args, fast):
  """Jaxpr text of `fn` traced with the fast paths on or off."""
  with layers.cpu_fast_paths(fast):
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))  # fresh lambda: no trace-cache reuse


def _branch(jaxpr: str) -> str:
  """Which binary-conv forward a traced jaxpr took: packed XOR, int8 dot, or the f32 conv."""
  if "population_count" in jaxpr or "bireal_xor_conv_fwd" in jaxpr:  # JAX or C++ XOR kernel
    return "xor"
  return "int8" if "i8" in jaxpr else "f32"


def _both(fn, *args):
  """`fn(*args)` jitted once with the fast paths and once with the reference paths."""
  out = []
  for fast in (True, False):
    with layers.cpu_fast_paths(fast):
      out.append(jax.jit(lambda *a: fn(*a))(*args))  # fresh lambda: no trace-cache sharing
  return out


def _close(a, b, rtol=2e-5):
  """Leafwise close relative to each leaf's scale (sums of many terms reorder rounding). Leaves
  that are zero up to cancellation noise (e.g. a BN bias whose gradient cancels) are compared
  relative to 1e-2 of the largest leaf instead of their own noise."""
  pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  assert len(pairs) == len(jax.tree.leaves(b)) and pairs
  floor = 1e-2 * max(np.abs(y).max() for _, y in pairs)
  for x, y in pairs:
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), floor, 1e-30))


# ------------------------------------------------------------------------------------------------
# Max-pool
# ------------------------------------------------------------------------------------------------

POOLS = [
    ((2, 9, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # stem geometry, odd/even sizes
    ((2, 10, 10, 4), (3, 3), (2, 2), "SAME"),
    ((1, 7, 6, 2), (2, 3), (1, 2), ((0, 1), (2, 0))),   # asymmetric window, stride and pads
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
]


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
  with onednn.enabled(use_onednn):
    jaxpr = _traced(new, x, fast=True)
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


def test_max_pool_sends_each_tied_window_gradient_to_its_first_maximum():
  x = jnp.zeros((1, 4, 4, 1))  # all equal: the first valid pixel of each window wins
  g = jnp.asarray(np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1))
  dx = jax.vjp(lambda v: layers.max_pool(v), x)[1](g)[0][0, :, :, 0]
  expected = np.zeros((4, 4), np.float32)
  expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1, 2, 3, 4
  np.testing.assert_array_equal(dx, expected)


def test_max_pool_reference_path_off_cpu_fast_paths():
  x = _x(1, 6, 6, 2)
  assert "reduce_window_max" in _traced(lambda v: layers.max_pool(v), x, fast=False)


def test_max_pool_rejects_bad_ranks():
  with pytest.raises(ValueError, match="NHWC"):
    layers.max_pool(jnp.zeros((4, 4, 2)))


# ------------------------------------------------------------------------------------------------
# BatchNorm
# ------------------------------------------------------------------------------------------------

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


def test_batchnorm_fast_path_matches_nn_batchnorm():
  x = _x(4, 5, 6, 8) * 3.0 + 1.0
  g = _x(4, 5, 6, 8, seed=2)
  fast = jax.jit(lambda a, b: _bn_outputs(layers.BatchNorm, a, b))
  m = layers.BatchNorm(use_running_average=False)
  variables = m.init(_key(), x)
  forward = str(jax.make_jaxpr(lambda v: m.apply(variables, v, mutable=["batch_stats"]))(x))
  assert "custom_vjp_call" in forward  # the hand-written backward, not autodiff of flax's ops
  _close(fast(x, g), _bn_outputs(nn.BatchNorm, x, g), rtol=1e-5)


def test_batchnorm_fast_path_averages_statistics_and_gradients_across_replicas():
  n = min(jax.local_device_count(), 4)
  if n < 2:
    pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  x = _x(n, 2, 3, 3, 4) * 2.0 - 0.5
  g = _x(n, 2, 3, 3, 4, seed=3)
  out = [jax.pmap(lambda a, b: _bn_outputs(cls, a, b, axis_name="r"), axis_name="r")(x, g)
         for cls in (layers.BatchNorm, nn.BatchNorm)]
  _close(out[0], out[1], rtol=1e-5)
  # And the global statistics equal one device's over the whole batch.
  whole = _bn_outputs(nn.BatchNorm, x.reshape(-1, 3, 3, 4), g.reshape(-1, 3, 3, 4))
  _close(out[0][1], jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), whole[1]),
         rtol=1e-5)


def test_batchnorm_keeps_flax_paths_for_eval_init_and_other_cases():
  x = _x(2, 3, 3, 4)
  m = layers.BatchNorm(use_running_average=False)
  assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda v: m.init(_key(), v))(x))
  variables = m.init(_key(), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, nn.BatchNorm(use_running_average=False).init(_key(), x))
  ev = layers.BatchNorm(use_running_average=True)
  np.testing.assert_array_equal(ev.apply(variables, x),
                                nn.BatchNorm(use_running_average=True).apply(variables, x))
  for other in (_traced(lambda v: m.apply(variables, v, mutable=["batch_stats"]), x, fast=False),
                str(jax.make_jaxpr(lambda v: layers.BatchNorm(
                    use_running_average=False, use_fast_variance=False).apply(
                        variables, v, mutable=["batch_stats"]))(x))):
    assert "custom_vjp_call" not in other


# ------------------------------------------------------------------------------------------------
# Binary convolution
# ------------------------------------------------------------------------------------------------

CONVS = [  # (input shape, features, kernel, stride, padding, forward branch expected)
    ((2, 9, 8, 3), 5, 3, 1, 1, "xor"),           # odd/even sizes
    ((2, 16, 16, 4), 6, 3, 1, 1, "xor"),
    ((2, 16, 16, 4), 6, 3, 2, 1, "xor"),          # strided
    ((1, 9, 9, 2), 3, 3, 2, "VALID", "xor"),
    ((2, 8, 8, 4), 8, 1, 2, 0, "xor"),            # 1x1 shortcut-style conv
    ((2, 11, 10, 3), 4, 3, 2, "SAME", "int8"),    # TF 'SAME' at stride 2: asymmetric padding
    ((1, 9, 8, 3), 5, 3, 2, ((2, 0), (0, 1)), "int8"),
    ((2, 16, 16, 4), 6, 3, 1, ((1, 1), (0, 2)), "f32"),  # asymmetric, 16x16 output
]


@pytest.mark.parametrize("shape,features,k,stride,padding,branch", CONVS)
@pytest.mark.parametrize("activation,kernel_quantizer", [
    ("approx_sign", "magnitude_aware"), ("ste_sign", "official"), ("identity_sign", "sign")])
def test_binary_conv_fast_path_matches_lax_conv_values_and_gradients(
    shape, features, k, stride, padding, branch, activation, kernel_quantizer):
  x = _x(*shape)
  conv = BinaryConv(features, (k, k), stride, padding=padding, input_quantizer=activation,
                    kernel_quantizer=kernel_quantizer, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(1), x)
  g = _x(*jax.eval_shape(conv.apply, params, x).shape, seed=2)

  def value_and_grads(p, v):
    y, vjp = jax.vjp(conv.apply, p, v)
    return y, vjp(g)

  assert _branch(_traced(value_and_grads, params, x, fast=True)) == branch
  assert _branch(_traced(value_and_grads, params, x, fast=False)) == "f32"
  (y_fast, grads_fast), (y_ref, grads_ref) = _both(value_and_grads, params, x)
  _close(y_fast, y_ref)
  _close(grads_fast, grads_ref)


@pytest.mark.parametrize("shape,features,k,stride,padding",
                         [row[:5] for row in CONVS if row[5] == "xor"])
def test_binary_conv_pure_jax_xor_path_without_onednn(shape, features, k, stride, padding):
  # The XOR forward when the C++ custom calls are unavailable: `packed.xor_popcount_conv`.
  x = _x(*shape)
  conv = BinaryConv(features, (k, k), stride, padding=padding, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(1), x)
  g = _x(*jax.eval_shape(conv.apply, params, x).shape, seed=2)

  def value_and_grads(p, v):
    y, vjp = jax.vjp(conv.apply, p, v)
    return y, vjp(g)

  with onednn.enabled(False):
    jaxpr = _traced(value_and_grads, params, x, fast=True)
    fast = jax.jit(lambda *a: value_and_grads(*a))(params, x)
  assert "population_count" in jaxpr and "bireal_" not in jaxpr
  with layers.cpu_fast_paths(False):
    ref = jax.jit(lambda *a: value_and_grads(*a))(params, x)
  _close(fast, ref)


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
  assert _branch(_traced(conv.apply, params, x, fast=True)) == "xor"
  y_fast, y_ref = _both(conv.apply, params, x)
  err_fast = np.abs(np.asarray(y_fast, np.float64) - exact).max()
  err_ref = np.abs(np.asarray(y_ref, np.float64) - exact).max()
  assert err_fast <= err_ref + 1e-12
  assert err_fast <= 4 * np.finfo(np.float32).eps * np.abs(exact).max()


@pytest.mark.parametrize("activation,kernel_quantizer", [("hardtanh", None), ("approx_sign", None),
                                                          (None, "magnitude_aware")])
def test_non_binary_convs_keep_the_lax_conv(activation, kernel_quantizer):
  x = _x(1, 6, 6, 3)
  conv = BinaryConv(4, (3, 3), 2, padding=1, input_quantizer=activation,
                    kernel_quantizer=kernel_quantizer, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(0), x)
  assert _branch(_traced(conv.apply, params, x, fast=True)) == "f32"


def test_bfloat16_convs_keep_the_lax_conv():
  x = _x(1, 6, 6, 3)
  conv = BinaryConv(4, (3, 3), 2, padding=1, dtype=jnp.bfloat16, kernel_init="lecun_normal")
  params = jax.jit(conv.init)(_key(0), x)
  assert _branch(_traced(conv.apply, params, x, fast=True)) == "f32"


# ------------------------------------------------------------------------------------------------
# Whole model: gradients of a tiny net, fast vs reference paths, and under the compiler options
# ------------------------------------------------------------------------------------------------


def _loss_and_grads(model, variables, images, labels):
  def loss_fn(params):
    logits, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              images, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
  (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  return loss, grads, upd["batch_stats"]


@pytest.mark.parametrize("stem,size", [("imagenet", 64), ("small", 14)])
def test_tiny_bireal18_gradients_match_the_reference_paths(stem, size):
  model = models.get("bireal18", num_classes=7, base_width=8, stem=stem,
                     binary_kernel_init="lecun_normal")
  images = _x(3, size, size, 3, seed=4)
  labels = jnp.asarray([0, 3, 6])
  variables = jax.jit(model.init)(_key(5), images[:1])
  fn = functools.partial(_loss_and_grads, model)
  assert _branch(_traced(fn, variables, images, labels, fast=True)) == "xor"
  fast, ref = _both(fn, variables, images, labels)
  _close(fast[0], ref[0], rtol=1e-5)
  _close(fast[1], ref[1], rtol=1e-4)  # 11 binary layers deep: reordered f32 sums compound
  _close(fast[2], ref[2], rtol=1e-5)


def test_cpu_compiler_options_move_convolutions_off_ynnpack():
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
  plain = jax.jit(conv).lower(x, w).compile().as_text()
  tuned = jax.jit(conv).lower(x, w).compile(compiler_options=layers.cpu_compiler_options())
  # Guards the option's spelling: jaxlib rejects unknown enum names, and a no-op would show here.
  assert "__ynn_fusion" in plain
  assert "__ynn_fusion" not in tuned.as_text()


def test_cpu_compiler_options_keep_gradients():
  opts = layers.cpu_compiler_options()
  model = models.get("bireal18", num_classes=5, base_width=8, stem="small")
  images = _x(2, 12, 12, 3, seed=6)
  labels = jnp.asarray([1, 4])
  variables = jax.jit(model.init)(_key(7), images[:1])
  fn = functools.partial(_loss_and_grads, model)
  tuned = jax.jit(lambda *a: fn(*a), compiler_options=opts)
  plain = jax.jit(lambda *a: fn(*a))
  _close(tuned(variables, images, labels), plain(variables, images, labels), rtol=1e-5)


def test_fast_path_switch_restores_state():
  assert layers.on_cpu()
  with layers.cpu_fast_paths(False):
    assert not layers.on_cpu()
    with layers.cpu_fast_paths(True):
      assert layers.on_cpu()
    assert not layers.on_cpu()
  assert layers.on_cpu()


def test_quantizer_tuples_name_registered_binary_quantizers():
  # The XOR and int8 paths rely on these producing exactly ±1 / α·sign: keep them registered.
  for fn in layers._PM1_ACTIVATIONS:
    name = next(n for n in quantizers.names() if quantizers.get(n) is fn)
    assert name in quantizers.BINARY_ACTIVATIONS
  for fn in layers._ALPHA_SIGN_WEIGHTS:
    name = next(n for n in quantizers.names() if quantizers.get(n) is fn)
    assert name in quantizers.BINARY_WEIGHTS
