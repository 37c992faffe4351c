"""Optimizers, learning-rate schedules and parameter masks, all from optax.

`create_optimizer(config, lr_fn, model, image_shape)` builds the chain
  [coupled weight decay on kernels] → adam | adamw | sgd → [latent-weight clip on binary kernels]
as PyTorch's `weight_decay` (added to the gradient) and larq's `weight_clip` would.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bireal_jax import layers, quantizers

Schedule = Callable[[Any], Any]


def create_learning_rate_fn(config, steps_per_epoch: int, total_steps: int) -> Schedule:
  """The schedule named by `config.lr_schedule`, in optimizer steps, after optional warm-up.

  "linear_epoch" is the official Bi-Real recipe: `lr × (1 − epoch / num_epochs)`, held constant
  within an epoch (PyTorch `LambdaLR` stepped once per epoch). "piecewise" multiplies by
  `lr_decay_factor` at each epoch in `lr_boundaries`.
  """
  base = config.learning_rate
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  steps = max(total_steps - warmup, 1)
  epochs = steps / steps_per_epoch
  kind = config.lr_schedule
  if kind == "linear_epoch":
    def main(step):
      epoch = jnp.floor(step / steps_per_epoch)
      return base * jnp.maximum(1.0 - epoch / epochs, 0.0)
  elif kind == "linear":
    main = optax.linear_schedule(base, 0.0, steps)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(base, steps)
  elif kind == "piecewise":
    main = optax.piecewise_constant_schedule(
        base, {int(round(b * steps_per_epoch)): config.lr_decay_factor
               for b in config.lr_boundaries})
  elif kind == "constant":
    main = optax.constant_schedule(base)
  else:
    raise ValueError(f"config.lr_schedule={kind!r}: unknown schedule")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def kernel_mask(params) -> Any:
  """True on conv/dense kernels, False on BN scales/biases and dense biases."""
  return flax.traverse_util.path_aware_map(lambda path, _: path[-1] == "kernel", params)


def binary_kernel_mask(model: nn.Module, params, image_shape) -> Any:
  """True exactly on the latent kernels of `BinaryConv`s whose kernel quantizer is binary.

  Found by tracing `model.init` (shapes only) and recording which `BinaryConv` modules binarise
  their kernels, so real stems, real 1×1 downsample convs, the real first conv of Bi-Real-50 and
  every kernel of a real-valued twin are excluded whatever their names.
  """
  binary_paths = set()

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if (isinstance(mod, layers.BinaryConv) and context.method_name == "__call__"
        and quantizers.is_binary(mod.kernel_quantizer)):
      binary_paths.add(tuple(mod.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, *image_shape), jnp.float32)))
  return flax.traverse_util.path_aware_map(
      lambda path, _: path[-1] == "kernel" and tuple(path[:-1]) in binary_paths, params)


def create_optimizer(config, learning_rate_fn: Schedule, model: nn.Module, params,
                     image_shape) -> optax.GradientTransformation:
  """Optax chain for `config.optimizer` with the decay and clipping masks of the config."""
  decay_mask = kernel_mask(params) if config.weight_decay_on == "kernels" else None
  parts = []
  if config.optimizer == "adamw":
    parts.append(optax.adamw(learning_rate_fn, b1=config.adam_b1, b2=config.adam_b2,
                             eps=config.adam_eps, weight_decay=config.weight_decay,
                             mask=decay_mask))
  else:
    if config.weight_decay > 0:  # PyTorch-style L2: added to the gradient before the optimizer
      decay = optax.add_decayed_weights(config.weight_decay)
      parts.append(optax.masked(decay, decay_mask) if decay_mask is not None else decay)
    if config.optimizer == "adam":
      parts.append(optax.adam(learning_rate_fn, b1=config.adam_b1, b2=config.adam_b2,
                              eps=config.adam_eps))
    elif config.optimizer == "sgd":
      parts.append(optax.sgd(learning_rate_fn, momentum=config.momentum or None,
                             nesterov=config.nesterov))
    else:
      raise ValueError(f"config.optimizer={config.optimizer!r}: expected adam, adamw or sgd")
  if config.latent_weight_clip > 0:
    mask = binary_kernel_mask(model, params, image_shape)
    parts.append(quantizers.latent_weight_clip(config.latent_weight_clip, mask=mask))
  return optax.chain(*parts)


def total_train_steps(config, num_train: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) for `config.batch_size` (drop-remainder epochs)."""
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the training set "
                     f"({num_train} images): expected at most {num_train}")
  if config.num_train_steps > 0:
    return steps_per_epoch, int(config.num_train_steps)
  return steps_per_epoch, int(math.ceil(config.num_epochs * steps_per_epoch))
