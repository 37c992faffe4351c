"""Quantizers: forward values, surrogate gradients vs the paper's formulas, transforms, dtypes,
the registry and the output tags the exact binary-conv paths rely on."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bireal_jax import quantizers as q

# The breakpoints of every surrogate, the points just beside them, and a few interior points.
POINTS = np.array([-3, -1.5, -1.001, -1, -0.999, -0.5, -1e-3, -0.0, 0, 1e-3, 0.25, 0.999, 1,
                   1.001, 2.5], np.float32)

ACTIVATIONS = ["approx_sign", "ste_sign", "identity_sign"]
WEIGHTS = ["magnitude_aware", "official", "sign"]


def _vjp(fn, x, g):
  _, pull = jax.vjp(fn, x)
  return pull(g)[0]


def _approx_grad(x):
  x = np.asarray(x, np.float32)
  return np.where((x >= -1) & (x < 0), 2 + 2 * x,
                  np.where((x >= 0) & (x < 1), 2 - 2 * x, 0)).astype(np.float32)


def _weights(key=0, shape=(3, 3, 4, 5)):
  """A kernel that holds exact ±1, 0 and values beside and beyond the clip boundary."""
  w = np.array(jax.random.normal(jax.random.key(key), shape, jnp.float32))
  flat = w.reshape(-1)
  flat[:len(POINTS)] = POINTS
  return jnp.asarray(flat.reshape(shape))


def _alpha(w):
  return np.mean(np.abs(np.asarray(w, np.float32)), axis=(0, 1, 2), keepdims=True)


# ---------------------------------------------------------------------------------------------
# Forward values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_forward_is_exactly_plus_minus_one_and_sign0_is_plus1(name):
  y = np.asarray(q.get(name)(jnp.asarray(POINTS)))
  expected = np.where(POINTS >= 0, 1.0, -1.0)  # -0.0 >= 0 too
  np.testing.assert_array_equal(y, expected)
  assert set(np.unique(y)) == {-1.0, 1.0}
  assert q.get(name)(jnp.zeros(())) == 1.0
  assert q.get(name)(jnp.asarray(-0.0)) == 1.0


@pytest.mark.parametrize("name", ["magnitude_aware", "official"])
def test_weight_forward_is_alpha_times_sign(name):
  w = _weights()
  wb = np.asarray(q.get(name)(w))
  expected = _alpha(w) * np.where(np.asarray(w) >= 0, 1.0, -1.0)
  np.testing.assert_allclose(wb, expected, rtol=1e-6)
  # Per output channel only two magnitudes: ±α_c.
  for c in range(w.shape[-1]):
    assert len(np.unique(np.abs(wb[..., c]))) == 1


def test_sign_weight_has_no_alpha():
  w = _weights()
  np.testing.assert_array_equal(q.get("sign")(w), np.where(np.asarray(w) >= 0, 1.0, -1.0))


def test_real_activations():
  x = jnp.asarray(POINTS)
  np.testing.assert_array_equal(q.hardtanh(x), np.clip(POINTS, -1, 1))
  leaky = np.where(POINTS < -1, 0.1 * POINTS - 0.9, np.where(POINTS > 1, 0.1 * POINTS + 0.9,
                                                               POINTS))
  np.testing.assert_allclose(q.leaky_clip(x), leaky, rtol=1e-6, atol=1e-7)
  # Leakyclip is continuous at ±1.
  np.testing.assert_allclose(q.leaky_clip(jnp.array([-1.0, 1.0])), [-1.0, 1.0])
  np.testing.assert_array_equal(q.relu(x), np.maximum(POINTS, 0))


# ---------------------------------------------------------------------------------------------
# Gradients vs the formulas
# ---------------------------------------------------------------------------------------------


def test_approx_sign_gradient_matches_piecewise_polynomial():
  x = jnp.asarray(POINTS)
  grad = np.asarray(jax.vmap(jax.grad(q.approx_sign))(x))
  np.testing.assert_allclose(grad, _approx_grad(POINTS), rtol=1e-6, atol=0)
  # Spot values at the breakpoints: 0 at -1 and 1, peak 2 at 0, 0 beyond.
  at = lambda v: float(grad[np.flatnonzero(POINTS == np.float32(v))[0]])  # noqa: E731
  assert at(-1) == 0.0 and at(0) == 2.0 and at(1) == 0.0
  assert at(-1.001) == 0.0 and at(1.001) == 0.0
  np.testing.assert_allclose([at(-0.999), at(0.999), at(-1e-3), at(1e-3)],
                             [0.002, 0.002, 1.998, 1.998], rtol=1e-3)


def test_approx_sign_gradient_dense_grid_and_upstream_scaling():
  x = jnp.linspace(-2, 2, 4001, dtype=jnp.float32)
  g = jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_allclose(_vjp(q.approx_sign, x, g), np.asarray(g) * _approx_grad(x),
                             rtol=1e-6, atol=1e-7)


def test_approx_sign_gradient_is_derivative_of_F():
  # F(x) = 2x ± x² on [-1, 1): its finite differences must match the custom backward pass.
  def F(x):
    return jnp.where(x < -1, -1.0, jnp.where(x < 0, 2 * x + x * x,
                                             jnp.where(x < 1, 2 * x - x * x, 1.0)))
  x = jnp.array([-0.9, -0.5, -0.1, 0.1, 0.5, 0.9, 1.5, -1.5])
  h = 1e-3
  fd = (F(x + h) - F(x - h)) / (2 * h)
  np.testing.assert_allclose(jax.vmap(jax.grad(q.approx_sign))(x), fd, atol=2e-3)


def test_ste_sign_gradient_is_clipped_identity():
  g = jnp.linspace(0.5, 2.0, len(POINTS))
  np.testing.assert_array_equal(_vjp(q.ste_sign, jnp.asarray(POINTS), g),
                                np.where(np.abs(POINTS) <= 1, np.asarray(g), 0))


def test_identity_sign_gradient_is_one_everywhere():
  g = jnp.linspace(0.5, 2.0, len(POINTS))
  np.testing.assert_array_equal(_vjp(q.identity_sign, jnp.asarray(POINTS), g), g)


def test_magnitude_aware_gradient_is_alpha_times_clipped_identity():
  w = _weights()
  g = jax.random.normal(jax.random.key(2), w.shape)
  mask = np.abs(np.asarray(w)) <= 1
  assert mask.sum() and (~mask).sum(), "the test kernel must hold weights on both sides of 1"
  np.testing.assert_allclose(_vjp(q.magnitude_aware_sign, w, g),
                             _alpha(w) * np.asarray(g) * mask, rtol=1e-6)


def test_official_gradient_is_clipped_identity_without_alpha():
  w = _weights()
  g = jax.random.normal(jax.random.key(2), w.shape)
  np.testing.assert_array_equal(_vjp(q.official_magnitude_sign, w, g),
                                np.asarray(g) * (np.abs(np.asarray(w)) <= 1))


def test_weight_gradient_at_exact_boundaries():
  # One output channel holding exactly the boundary points: α = mean |W|.
  w = jnp.asarray(POINTS).reshape(1, 1, -1, 1)
  alpha = float(np.mean(np.abs(POINTS)))
  ones = jnp.ones_like(w)
  inside = (np.abs(POINTS) <= 1).reshape(w.shape)
  np.testing.assert_allclose(_vjp(q.magnitude_aware_sign, w, ones), alpha * inside, rtol=1e-6)
  np.testing.assert_array_equal(_vjp(q.official_magnitude_sign, w, ones), 1.0 * inside)


# ---------------------------------------------------------------------------------------------
# Transformations and dtypes
# ---------------------------------------------------------------------------------------------


def _value_and_grad(name):
  fn = q.get(name)
  return lambda x, g: (fn(x), _vjp(fn, x, g))


def _inputs(name, n):
  """`n` stacked inputs for the quantizer (activations: vectors, weights: HWIO kernels)."""
  if name in ACTIVATIONS:
    x = jnp.tile(jnp.asarray(POINTS), (n, 1)) * jnp.arange(1, n + 1)[:, None] / n
  else:
    x = jnp.stack([_weights(k, (3, 3, 2, 3)) for k in range(n)])
  return x, jax.random.normal(jax.random.key(3), x.shape)


@pytest.mark.parametrize("name", ACTIVATIONS + WEIGHTS)
def test_same_results_under_jit_vmap_pmap_checkpoint(name):
  n = jax.local_device_count()  # 8 under the Makefile's XLA_FLAGS, 1 on a bare CPU
  xs, gs = _inputs(name, n)
  f = _value_and_grad(name)
  eager = [f(x, g) for x, g in zip(xs, gs)]
  eager_y = np.stack([e[0] for e in eager])
  eager_g = np.stack([e[1] for e in eager])
  variants = {
      "jit": jax.jit(jax.vmap(f)),  # vmap over the stack, each call is one kernel / vector
      "vmap": jax.vmap(f),
      "pmap": jax.pmap(f),
      "checkpoint": jax.vmap(jax.checkpoint(f)),
      "grad-of-checkpoint": jax.vmap(lambda x, g: (q.get(name)(x), _vjp(
          jax.checkpoint(q.get(name)), x, g))),
  }
  for label, fn in variants.items():
    y, g = fn(xs, gs)
    np.testing.assert_array_equal(np.asarray(y), eager_y, err_msg=f"{name} forward under {label}")
    np.testing.assert_array_equal(np.asarray(g), eager_g, err_msg=f"{name} grad under {label}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ACTIVATIONS + WEIGHTS + ["hardtanh", "leaky_clip", "relu"])
def test_dtype_is_preserved(name, dtype):
  x = _inputs(name, 1)[0][0].astype(dtype)
  fn = q.get(name)
  y = fn(x)
  assert y.dtype == dtype
  g = _vjp(fn, x, jnp.ones_like(x))
  assert g.dtype == dtype
  if name in ACTIVATIONS:
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.where(np.asarray(x, np.float32) >= 0, 1.0, -1.0))


def test_bfloat16_approx_sign_gradient_matches_formula():
  x = jnp.asarray(POINTS).astype(jnp.bfloat16)
  grad = jax.vmap(jax.grad(q.approx_sign))(x)
  expected = _approx_grad(np.asarray(x, np.float32))
  np.testing.assert_allclose(np.asarray(grad, np.float32), expected, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_lookup():
  assert q.get("approx_sign") is q.approx_sign
  assert q.get("magnitude_aware") is q.magnitude_aware_sign
  assert q.get("official") is q.official_magnitude_sign
  assert q.get(None) is None and q.get("none") is None
  assert q.get(jnp.tanh) is jnp.tanh
  assert set(ACTIVATIONS + WEIGHTS) <= set(q.names())


def test_is_binary():
  for name in ACTIVATIONS + WEIGHTS:
    assert q.is_binary(name) and q.is_binary(q.get(name)), name
  for name in ["hardtanh", "clip", "leaky_clip", "relu", None]:
    assert not q.is_binary(name), name
  assert not q.is_binary(jnp.tanh)


def test_unknown_quantizer_name_error_names_it_and_lists_choices():
  with pytest.raises(ValueError) as e:
    q.get("aprox_sign")
  msg = str(e.value)
  assert "'aprox_sign'" in msg and "approx_sign" in msg and "magnitude_aware" in msg


def test_bad_quantizer_type_error():
  with pytest.raises(TypeError, match=r"got 3"):
    q.get(3)


def test_register_refuses_to_shadow():
  with pytest.raises(ValueError, match="'approx_sign' is already registered"):
    q.register("approx_sign", jnp.sign)


# ---------------------------------------------------------------------------------------------
# latent_weight_clip
# ---------------------------------------------------------------------------------------------


def test_latent_weight_clip_keeps_masked_params_in_range():
  params = {"binary": jnp.array([0.9, -0.95, 0.0, 0.5]), "real": jnp.array([0.9, -0.95, 0.0, 0.5])}
  mask = {"binary": True, "real": False}
  tx = optax.chain(optax.sgd(1.0), q.latent_weight_clip(1.0, mask=mask))
  state = tx.init(params)
  grads = {"binary": jnp.array([-5.0, 5.0, -0.5, 0.1]), "real": jnp.array([-5.0, 5.0, -0.5, 0.1])}
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert float(jnp.max(jnp.abs(params["binary"]))) <= 1.0
  np.testing.assert_allclose(params["binary"], [1.0, -1.0, 1.0, 0.2], rtol=1e-6)
  # The unmasked leaf moved freely beyond ±1.
  np.testing.assert_allclose(params["real"], [15.9, -15.95, 1.5, 0.2], rtol=1e-6)


def test_latent_weight_clip_without_mask_and_custom_value():
  params = jnp.array([0.0, 0.4, -0.4])
  tx = optax.chain(optax.sgd(1.0), q.latent_weight_clip(0.5))
  updates, _ = tx.update(jnp.array([-1.0, -1.0, 1.0]), tx.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, updates), [0.5, 0.5, -0.5])


def test_latent_weight_clip_errors():
  with pytest.raises(ValueError, match=r"clip_value must be > 0, got -1"):
    q.latent_weight_clip(-1)
  tx = q.latent_weight_clip()
  with pytest.raises(ValueError, match="needs params"):
    tx.update(jnp.zeros(2), tx.init(jnp.zeros(2)))


# ---------------------------------------------------------------------------------------------
# Tags the binary convolutions' exact paths rely on
# ---------------------------------------------------------------------------------------------


def test_quantizer_tags_name_registered_binary_quantizers():
  # The XOR and int8 paths rely on these producing exactly ±1 / α·sign: keep them tagged.
  for fn in (q.approx_sign, q.ste_sign, q.identity_sign):
    assert q.output_kind(fn) == q.PM1 == "pm1"
    name = next(n for n in q.names() if q.get(n) is fn)
    assert name in q.BINARY_ACTIVATIONS
  for fn in (q.magnitude_aware_sign, q.official_magnitude_sign, q.sign_weight):
    assert q.output_kind(fn) == q.ALPHA_SIGN == "alpha_sign"
    name = next(n for n in q.names() if q.get(n) is fn)
    assert name in q.BINARY_WEIGHTS
  for name in q.BINARY_ACTIVATIONS:
    assert q.output_kind(name) == "pm1"
  for name in q.BINARY_WEIGHTS:
    assert q.output_kind(name) == "alpha_sign"
  assert q.output_kind(None) == "real"
  assert q.output_kind("hardtanh") == "real"
  assert q.output_kind(lambda v: v) == "real"  # untagged user quantizers: real
