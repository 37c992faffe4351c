"""CPU fast paths (XOR/popcount and int8 binary-conv forwards, oneDNN f32 convs, oneDNN and sliced
max-pools, the BatchNorm backward, compiler options) against the plain lax reference paths: same
values and gradients to float tolerance, ties routed alike. Paths are chosen with
`ops.implementation`: the "native" preset (the C++ kernels wherever they apply), "jax" (no custom
calls) and "reference" (plain lax)."""
import functools
import os
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numerics import assert_close  # tests/numerics.py

from bireal_jax import layers, models, ops, quantizers
from bireal_jax.ops.cpu import onednn
from bireal_jax.layers import BinaryConv

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the fast paths are CPU-only by design")


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


def _setting(fast):
  """`fast`: True = the "native" preset, False = "reference", else an `ops.implementation`
  setting itself."""
  if fast is True:
    return "native"
  return "reference" if fast is False else fast


def _traced(fn, *args, fast):
  """Jaxpr text of `fn` traced with the fast paths on or off (or under a setting)."""
  with ops.implementation(_setting(fast)):
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))  # fresh lambda: no trace-cache reuse


def _branch(jaxpr: str) -> str:
  """Which binary-conv forward a traced jaxpr took: packed XOR, int8 dot, or the f32 conv."""
  if "population_count" in jaxpr or "bireal_xor_conv_fwd" in jaxpr:  # JAX or C++ XOR kernel
    return "xor"
  return "int8" if "i8" in jaxpr else "f32"


def _both(fn, *args, fast=True):
  """`fn(*args)` jitted once with the fast paths (or setting `fast`) and once with the
  reference paths."""
  out = []
  for f in (fast, False):
    with ops.implementation(_setting(f)):
      out.append(jax.jit(lambda *a: fn(*a))(*args))  # fresh lambda: no trace-cache sharing
  return out


_close = assert_close


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
  setting = "native" if use_onednn else "jax"  # "jax": no custom calls, the sliced max-pool
  jaxpr = _traced(new, x, fast=setting)
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


def test_max_pool_sends_each_tied_window_gradient_to_its_first_maximum():
  x = jnp.zeros((1, 4, 4, 1))  # all equal: the first valid pixel of each window wins
  g = jnp.asarray(np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1))
  with ops.implementation("native"):
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
  m = layers.BatchNorm(use_running_average=False)
  variables = m.init(_key(), x)
  forward = _traced(lambda v: m.apply(variables, v, mutable=["batch_stats"]), x, fast=True)
  assert "custom_vjp_call" in forward  # the hand-written backward, not autodiff of flax's ops
  with ops.implementation("native"):
    fast = jax.jit(lambda a, b: _bn_outputs(layers.BatchNorm, a, b))(x, g)
  _close(fast, _bn_outputs(nn.BatchNorm, x, g), rtol=1e-5)


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
  _close(out[0], out[1], rtol=1e-5)
  # And the global statistics equal one device's over the whole batch.
  whole = _bn_outputs(nn.BatchNorm, x.reshape(-1, 3, 3, 4), g.reshape(-1, 3, 3, 4))
  _close(out[0][1], jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), whole[1]),
         rtol=1e-5)


def test_batchnorm_keeps_flax_paths_for_eval_init_and_other_cases():
  x = _x(2, 3, 3, 4)
  m = layers.BatchNorm(use_running_average=False)
  assert "custom_vjp_call" not in _traced(lambda v: m.init(_key(), v), x, fast=True)
  variables = m.init(_key(), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, nn.BatchNorm(use_running_average=False).init(_key(), x))
  ev = layers.BatchNorm(use_running_average=True)
  np.testing.assert_array_equal(ev.apply(variables, x),
                                nn.BatchNorm(use_running_average=True).apply(variables, x))
  for other in (_traced(lambda v: m.apply(variables, v, mutable=["batch_stats"]), x, fast=False),
                _traced(lambda v: layers.BatchNorm(
                    use_running_average=False, use_fast_variance=False).apply(
                        variables, v, mutable=["batch_stats"]), x, fast=True)):
    assert "custom_vjp_call" not in other


# ------------------------------------------------------------------------------------------------
# Binary convolution
# ------------------------------------------------------------------------------------------------

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

  assert _branch(_traced(value_and_grads, params, x, fast=setting)) == branch
  assert _branch(_traced(value_and_grads, params, x, fast=False)) == "f32"
  (y_fast, grads_fast), (y_ref, grads_ref) = _both(value_and_grads, params, x, fast=setting)
  _close(y_fast, y_ref)
  _close(grads_fast, grads_ref)


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

  jaxpr = _traced(value_and_grads, params, x, fast="jax")
  with ops.implementation("jax"):
    fast = jax.jit(lambda *a: value_and_grads(*a))(params, x)
  assert "population_count" in jaxpr and "bireal_" not in jaxpr
  with ops.implementation("reference"):
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
  fn = functools.partial(_loss_and_grads, model)
  with ops.implementation("native"):
    tuned = jax.jit(lambda *a: fn(*a), compiler_options=opts)(variables, images, labels)
    plain = jax.jit(lambda *a: fn(*a))(variables, images, labels)
  _close(tuned, plain, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The switch: `ops.implementation`
# ------------------------------------------------------------------------------------------------

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


def test_quantizer_tags_name_registered_binary_quantizers():
  # The XOR and int8 paths rely on these producing exactly ±1 / α·sign: keep them tagged.
  for fn in (quantizers.approx_sign, quantizers.ste_sign, quantizers.identity_sign):
    assert quantizers.output_kind(fn) == quantizers.PM1 == "pm1"
    name = next(n for n in quantizers.names() if quantizers.get(n) is fn)
    assert name in quantizers.BINARY_ACTIVATIONS
  for fn in (quantizers.magnitude_aware_sign, quantizers.official_magnitude_sign,
             quantizers.sign_weight):
    assert quantizers.output_kind(fn) == quantizers.ALPHA_SIGN == "alpha_sign"
    name = next(n for n in quantizers.names() if quantizers.get(n) is fn)
    assert name in quantizers.BINARY_WEIGHTS
  for name in quantizers.BINARY_ACTIVATIONS:
    assert quantizers.output_kind(name) == "pm1"
  for name in quantizers.BINARY_WEIGHTS:
    assert quantizers.output_kind(name) == "alpha_sign"
  assert quantizers.output_kind(None) == "real"
  assert quantizers.output_kind("hardtanh") == "real"
  assert quantizers.output_kind(lambda v: v) == "real"  # untagged user quantizers: real
