"""Flax NNX: the Linen models via `nnx.bridge.ToNNX`, one training step checked against Linen."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bireal_jax import models, nnx_bridge
from bireal_jax.layers import BinaryConv

TINY = dict(num_classes=4, base_width=4, stem="small", stage_sizes=(1, 1, 1, 1))


def _rngs(seed=0):
  # rbg keys: jitted init compiles in about a second instead of ~15 s with threefry on CPU.
  return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((8, 8, 8, 3), np.float32))
  labels = jnp.asarray(np.arange(8) % 4)
  return images, labels


def test_nnx_forward_equals_linen_apply(batch):
  images, _ = batch
  module = models.get("bireal18", **TINY)
  model = nnx_bridge.to_nnx(module, images, rngs=_rngs())
  assert isinstance(model, nnx.bridge.ToNNX)
  variables = nnx_bridge.linen_variables(model)
  assert set(variables) == {"params", "batch_stats"}
  ref_shapes = jax.eval_shape(module.init, jax.random.key(0), images)
  assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, ref_shapes)
  np.testing.assert_allclose(nnx_bridge.predict(model, images),
                             jax.jit(module.apply)(variables, images), rtol=1e-6, atol=1e-6)


def test_nnx_adam_step_matches_the_linen_step_and_learns(batch):
  images, labels = batch
  module = models.get("bireal18", **TINY)
  model = nnx_bridge.to_nnx(module, images, rngs=_rngs())
  before = nnx_bridge.linen_variables(model)
  tx = optax.adam(1e-2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  loss0 = nnx_bridge.train_step(model, optimizer, images, labels)
  after = nnx_bridge.linen_variables(model)

  # The same step written in plain Linen + optax, from the same starting variables.
  @jax.jit
  def linen_step(variables, opt_state):
    def loss_fn(params):
      logits, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 images, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return loss, {"params": optax.apply_updates(variables["params"], updates), **upd}

  ref_loss, ref = linen_step(before, tx.init(before["params"]))
  np.testing.assert_allclose(loss0, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), after, ref)

  # Params moved (Adam's first step moves every leaf with a nonzero gradient) and BN stats updated.
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before["params"], after["params"])
  assert np.mean(jax.tree.leaves(moved)) > 0.9
  stats = jax.tree.map(lambda a, b: bool(np.any(a != b)), before["batch_stats"],
                       after["batch_stats"])
  assert all(jax.tree.leaves(stats))

  # A few more steps on the same batch: the training loss goes down.
  losses = [float(loss0)] + [float(nnx_bridge.train_step(model, optimizer, images, labels))
                             for _ in range(5)]
  assert min(losses[1:]) < losses[0], losses
  assert int(optimizer.step[...]) == 6


def test_load_linen_variables_round_trip_and_mismatch(batch):
  images, _ = batch
  module = models.get("bireal18_real", **TINY)  # e.g. a pre-trained real twin from Linen
  linen_vars = jax.jit(module.init)(jax.random.key(7, impl="rbg"), images)
  model = nnx_bridge.to_nnx(module, images, rngs=_rngs())
  apply = jax.jit(module.apply)
  assert not np.allclose(nnx_bridge.predict(model, images), apply(linen_vars, images))
  nnx_bridge.load_linen_variables(model, linen_vars)
  np.testing.assert_allclose(nnx_bridge.predict(model, images), apply(linen_vars, images),
                             rtol=1e-6, atol=1e-6)

  wider = jax.eval_shape(models.get("bireal18", **dict(TINY, num_classes=5)).init,
                         jax.random.key(0), images)
  with pytest.raises(ValueError) as e:
    nnx_bridge.load_linen_variables(model, wider)
  assert "'params'" in str(e.value) and "['fc']['kernel']" in str(e.value)


def test_binary_conv_inside_an_nnx_module():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.bridge.ToNNX(BinaryConv(4, kernel_init="lecun_normal"), rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.conv(x).mean(axis=(1, 2)))

  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 5, 3), np.float32))
  net = Net(_rngs(1))
  nnx.bridge.lazy_init(net, x)
  kernel = net.conv.kernel
  assert isinstance(kernel, nnx.Param) and kernel.shape == (3, 3, 3, 4)
  grads = nnx.grad(lambda m: m(x).sum())(net)
  # Gradient reaches the latent binary kernel through magnitude_aware_sign's surrogate.
  assert np.any(np.asarray(grads["conv"]["kernel"][...]) != 0)
  y = BinaryConv(4).apply({"params": {"kernel": kernel[...]}}, x)
  np.testing.assert_allclose(net.conv(x), y, rtol=1e-6)
