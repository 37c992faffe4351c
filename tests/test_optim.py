"""bireal_jax.optim: the learning-rate schedules (the official Bi-Real recipe's epoch-wise linear
decay against its formula), the optimizer chains (coupled and decoupled weight decay, the latent
weight clip) and their parameter masks, and the step counts of a recipe.

Tiny models as in tests/tiny_training.py (in-process, one CPU device).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_training import run_steps, synthetic_batches, tiny_config  # tests/tiny_training.py

from bireal_jax import config as config_lib
from bireal_jax import models, optim, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN = 1_281_167  # ILSVRC2012 training images


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def test_the_imagenet_recipe_schedule_is_the_papers_formula_at_known_steps():
  """Bi-Real-18 on ImageNet (configs/imagenet_bireal18.py): Adam at 1e-3, batch 512, 256 epochs,
  lr(step) = 1e-3 × (1 − ⌊step / steps_per_epoch⌋ / 256), as PyTorch's LambdaLR stepped once per
  epoch in the official training script."""
  c = config_lib.from_file(os.path.join(REPO, "configs", "imagenet_bireal18.py"))
  spe, total = optim.total_train_steps(c, IMAGENET_TRAIN)
  assert (spe, total) == (IMAGENET_TRAIN // 512, 256 * (IMAGENET_TRAIN // 512)) == (2502, 640512)
  fn = optim.create_learning_rate_fn(c, spe, total)
  formula = lambda step: 1e-3 * (1 - (step // spe) / 256)  # noqa: E731
  steps = [0, 1, spe - 1, spe, spe + 1, 100 * spe + 7, 128 * spe, 255 * spe, total - 1]
  np.testing.assert_allclose([float(fn(s)) for s in steps], [formula(s) for s in steps],
                             rtol=1e-6)
  assert float(fn(128 * spe)) == pytest.approx(5e-4)  # half-way: half the rate
  assert float(fn(total - 1)) == pytest.approx(1e-3 / 256)  # the last epoch still learns
  assert float(fn(total)) == 0.0


def test_linear_epoch_schedule_is_the_official_stepwise_decay():
  c = tiny_config(learning_rate=1e-3, lr_schedule="linear_epoch", num_epochs=4.0)
  fn = optim.create_learning_rate_fn(c, steps_per_epoch=10, total_steps=40)
  got = [float(fn(s)) for s in (0, 9, 10, 19, 20, 39)]
  np.testing.assert_allclose(got, [1e-3, 1e-3, 7.5e-4, 7.5e-4, 5e-4, 2.5e-4], rtol=1e-6)


def test_piecewise_cosine_and_warmup_schedules():
  c = tiny_config(learning_rate=0.01, lr_schedule="piecewise", lr_boundaries=(10.0, 15.0),
                  lr_decay_factor=0.1)
  fn = optim.create_learning_rate_fn(c, steps_per_epoch=5, total_steps=100)
  np.testing.assert_allclose([float(fn(s)) for s in (49, 50, 74, 75)],
                             [0.01, 0.001, 0.001, 0.0001], rtol=1e-5)
  c = tiny_config(learning_rate=0.1, lr_schedule="cosine", warmup_epochs=1.0)
  fn = optim.create_learning_rate_fn(c, steps_per_epoch=10, total_steps=110)
  np.testing.assert_allclose([float(fn(s)) for s in (0, 5, 10, 60, 110)],
                             [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Masks: binary kernels (the latent weight clip), kernels (weight decay)
# ---------------------------------------------------------------------------------------------


def _paths(mask):
  return sorted("/".join(p) for p, v in
                __import__("flax").traverse_util.flatten_dict(mask).items() if v)


def test_binary_kernel_mask_selects_only_binarised_kernels():
  model = models.get("bireal18", stage_sizes=(1, 1, 1, 1), base_width=4, stem="small",
                     num_classes=10)
  params = train.initialized(train.init_key(0), (8, 8, 3), model)["params"]
  assert _paths(optim.binary_kernel_mask(model, params, (8, 8, 3))) == [
      f"layer{i}_0/binary_conv/kernel" for i in range(1, 5)]
  kernels = _paths(optim.kernel_mask(params))
  assert "conv1/kernel" in kernels and "fc/kernel" in kernels
  assert "layer2_0/downsample/conv/kernel" in kernels
  assert not any("bn" in k or k.endswith("bias") for k in kernels)
  # The real twin has the same tree and no binary kernel.
  real = models.get("bireal18_real", stage_sizes=(1, 1, 1, 1), base_width=4, stem="small",
                    num_classes=10)
  assert _paths(optim.binary_kernel_mask(real, params, (8, 8, 3))) == []
  # Bi-Real-50: the first block's real 1×1 conv is not binary, every other conv1/2/3 is.
  m50 = models.get("bireal50", stage_sizes=(2, 1, 1, 1), base_width=4, stem="small",
                   num_classes=10)
  p50 = train.initialized(train.init_key(0), (8, 8, 3), m50)["params"]
  got = _paths(optim.binary_kernel_mask(m50, p50, (8, 8, 3)))
  assert "layers_0/conv1/kernel" not in got
  assert {"layers_0/conv2/kernel", "layers_0/conv3/kernel", "layers_1/conv1/kernel"} <= set(got)
  assert not any("down" in k for k in got)


def test_latent_weight_clip_and_weight_decay_masks_in_the_optimizer():
  c = tiny_config(optimizer="sgd", momentum=0.0, learning_rate=50.0, lr_schedule="constant",
                  latent_weight_clip=0.5, weight_decay=1e-2)
  one = train.Mapping("pmap", devices=jax.devices()[:1])
  state, _ = run_steps(c, one, synthetic_batches(c, 1))
  model = train.create_model(c, 10)
  bmask = optim.binary_kernel_mask(model, state.params, (8, 8, 3))
  clipped = [np.max(np.abs(np.asarray(p))) for p, m in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(bmask)) if m]
  others = [np.max(np.abs(np.asarray(p))) for p, m in
            zip(jax.tree.leaves(state.params), jax.tree.leaves(bmask)) if not m]
  assert len(clipped) == 2 and max(clipped) <= 0.5 + 1e-6
  assert max(others) > 0.5  # lr 50 throws the real weights far: only binary ones were clipped
  # Weight decay touches kernels only: with zero gradient a BN scale stays exactly 1.
  params = {"bn1": {"scale": jnp.ones(3)}, "conv1": {"kernel": jnp.ones((1, 1, 3, 3))}}
  tx = optim.create_optimizer(tiny_config(optimizer="sgd", momentum=0.0, learning_rate=1.0,
                                          lr_schedule="constant", weight_decay=0.5),
                              optax.constant_schedule(1.0), model, params, (8, 8, 3))
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, upd)
  np.testing.assert_allclose(new["bn1"]["scale"], 1.0)
  np.testing.assert_allclose(new["conv1"]["kernel"], 0.5)


def test_schedule_steps_of_a_recipe_and_their_errors():
  c = tiny_config(num_train_steps=0, num_epochs=2.5, batch_size=32)
  assert optim.total_train_steps(c, 1000) == (31, 78)  # drop-remainder epochs; ceil(2.5 × 31)
  assert optim.total_train_steps(tiny_config(num_train_steps=7), 1000) == (31, 7)
  with pytest.raises(ValueError, match=r"config.batch_size=32 is larger than the training set "
                     r"\(20 images\): expected at most 20"):
    optim.total_train_steps(c, 20)
  bad = tiny_config()
  bad.lr_schedule = "step"  # past validate: the schedule itself names what it does not know
  with pytest.raises(ValueError, match="config.lr_schedule='step': unknown schedule"):
    optim.create_learning_rate_fn(bad, 10, 100)


# ---------------------------------------------------------------------------------------------
# Optimizer chains: weight decay as PyTorch's (coupled) or AdamW's (decoupled), on kernels only
# ---------------------------------------------------------------------------------------------


def _one_update(params, grads, **kw):
  model = models.get("bireal18", stage_sizes=(1, 1), base_width=4, stem="small",
                     num_classes=10)
  c = tiny_config(lr_schedule="constant", **kw)
  tx = optim.create_optimizer(c, optax.constant_schedule(c.learning_rate), model, params,
                              (8, 8, 3))
  upd, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, upd)


def test_adamw_decays_kernels_apart_from_the_gradient_and_only_kernels():
  params = {"bn1": {"scale": jnp.full(3, 2.0)}, "conv1": {"kernel": jnp.full((1, 1, 3, 3), 2.0)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  new = _one_update(params, zeros, optimizer="adamw", learning_rate=0.5, weight_decay=0.1)
  # Zero gradient: Adam's step is 0, the decoupled decay alone moves p to p − lr·wd·p.
  np.testing.assert_allclose(new["conv1"]["kernel"], 2.0 - 0.5 * 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(new["bn1"]["scale"], 2.0)
  new = _one_update(params, zeros, optimizer="adamw", learning_rate=0.5, weight_decay=0.1,
                    weight_decay_on="all")
  np.testing.assert_allclose(new["bn1"]["scale"], 2.0 - 0.5 * 0.1 * 2.0, rtol=1e-6)


def test_sgd_adds_the_decay_to_the_gradient_as_pytorch():
  params = {"bn1": {"bias": jnp.full(3, 1.0)}, "fc": {"kernel": jnp.full((3, 2), 1.0)}}
  grads = {"bn1": {"bias": jnp.full(3, 0.25)}, "fc": {"kernel": jnp.full((3, 2), 0.25)}}
  new = _one_update(params, grads, optimizer="sgd", momentum=0.0, learning_rate=0.1,
                    weight_decay=0.5)
  np.testing.assert_allclose(new["fc"]["kernel"], 1.0 - 0.1 * (0.25 + 0.5 * 1.0), rtol=1e-6)
  np.testing.assert_allclose(new["bn1"]["bias"], 1.0 - 0.1 * 0.25, rtol=1e-6)
