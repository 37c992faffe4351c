"""The per-device steps, written once for one device's share of the global batch, with
collectives over the axis named `AXIS` (`mapping.py` runs them on every device); the model and
its train state.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from bireal_jax import models, optim, pixels
from bireal_jax import config as config_lib
from bireal_jax.train.distill import distillation_loss

AXIS = "batch"


class TrainState(train_state.TrainState):
  batch_stats: Any


# ---------------------------------------------------------------------------------------------
# Model and state
# ---------------------------------------------------------------------------------------------


def create_model(config, num_classes: int, axis_name: Optional[str] = AXIS):
  return models.get(config.model, num_classes=num_classes, axis_name=axis_name,
                    **config_lib.model_overrides(config))


def model_input(images):
  """A batch's images as the model takes them: uint8 batches (raw RGB from the ImageNet
  pipeline, `bireal_jax.pixels`) are normalised here, on the device; float ones arrive
  normalised."""
  if images.dtype == jnp.uint8:
    return pixels.normalise_uint8(images, jnp)
  return images


def initialized(key, image_shape, model):
  """Variables {'params', 'batch_stats'} of `model` for images of `image_shape` (H, W, C)."""
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape), jnp.float32), train=False))
  return init(key)


def init_key(seed: int):
  """Key for parameter init. "rbg" (XLA's RngBitGenerator) because the jitted init then
  compiles several times faster on CPU than with threefry; it is just as deterministic."""
  return jax.random.key(seed, impl="rbg")


def create_train_state(config, model, image_shape, learning_rate_fn) -> TrainState:
  variables = initialized(init_key(config.seed), image_shape, model)
  tx = optim.create_optimizer(config, learning_rate_fn, model, variables["params"], image_shape)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables["batch_stats"])
  # Every leaf an array (TrainState.create leaves `step` a Python int) so it checkpoints as one.
  return jax.tree.map(jnp.asarray, state)


# ---------------------------------------------------------------------------------------------
# Per-device steps (run under `AXIS`)
# ---------------------------------------------------------------------------------------------


def metric_sums(logits, labels, loss_per_example, mask):
  """Sums over this device's examples: loss, top-1/top-5 hits and the example count."""
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  hit = topk == labels[:, None]
  return {"loss": jnp.sum(loss_per_example * mask),
          "top1": jnp.sum(hit[:, 0] * mask),
          "top5": jnp.sum(jnp.any(hit, axis=-1) * mask),
          "count": jnp.sum(mask)}


def train_step(state: TrainState, batch, teacher_variables=None, *, learning_rate_fn,
               label_smoothing: float, grad_accum_steps: int, teacher_apply=None,
               distill_weight: float = 0.0, distill_temperature: float = 1.0,
               scan_micro_batches: Optional[bool] = None):
  """One optimizer update from this device's share of the global batch.

  The share is split into `grad_accum_steps` micro-batches whose gradients are summed (BN
  statistics update after each micro-batch, as in successive forward passes), in a `lax.scan`
  (`scan_micro_batches`; default: off the CPU) or an unrolled loop. Gradients and
  metrics are averaged over all devices with `pmean`/`psum`; the model's BatchNorm averages
  its batch statistics over `AXIS` itself, so every replica holds identical state.

  With a teacher (`teacher_apply`, `teacher_variables`), the loss per example is
  (1 - w)·CE(smoothed labels) + w·`distillation_loss` with the teacher's eval-mode logits.
  """
  def loss_fn(params, batch_stats, images, labels):
    logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    if teacher_apply is not None:
      teacher_logits = teacher_apply(teacher_variables, images, train=False)
      per_example = ((1.0 - distill_weight) * per_example + distill_weight *
                     distillation_loss(logits, teacher_logits, distill_temperature))
    return per_example.mean(), (logits, per_example, updates["batch_stats"])

  def micro_step(carry, micro):
    grads, batch_stats = carry
    (_, (logits, per_example, batch_stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch_stats, model_input(micro["image"]), micro["label"])
    grads = jax.tree.map(jnp.add, grads, g)
    mask = jnp.ones_like(per_example)
    return (grads, batch_stats), metric_sums(logits, micro["label"], per_example, mask)

  micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)
  carry = (jax.tree.map(jnp.zeros_like, state.params), state.batch_stats)
  if scan_micro_batches is None:
    scan_micro_batches = jax.default_backend() != "cpu"
  if grad_accum_steps == 1 or not scan_micro_batches:
    # Unrolled on the CPU: XLA:CPU ran the same body inside lax.scan far slower (docs/speed.md).
    sums = []
    for i in range(grad_accum_steps):
      carry, s = micro_step(carry, jax.tree.map(lambda x: x[i], micro))
      sums.append(s)
    sums = jax.tree.map(lambda *x: sum(x), *sums)
  else:  # one compiled body whatever grad_accum_steps is (compile time stays flat)
    carry, sums = jax.lax.scan(micro_step, carry, micro)
    sums = jax.tree.map(lambda x: x.sum(0), sums)
  grads, batch_stats = carry
  grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
  grads = jax.lax.pmean(grads, axis_name=AXIS)
  sums = jax.lax.psum(sums, axis_name=AXIS)

  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {"loss": sums["loss"] / sums["count"], "top1": sums["top1"] / sums["count"],
             "top5": sums["top5"] / sums["count"],
             "learning_rate": learning_rate_fn(state.step)}
  return new_state, metrics


def eval_step(state: TrainState, batch):
  """Metric sums of one eval batch over all devices; padded examples (mask 0) count nothing."""
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          model_input(batch["image"]), train=False)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return jax.lax.psum(metric_sums(logits, batch["label"], per_example, batch["mask"]), AXIS)
