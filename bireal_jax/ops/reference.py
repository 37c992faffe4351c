"""Reference implementations: plain `lax` ops, what every backend (GPU, TPU) runs.

Each is the definition its faster twins are tested against: same values (up to the rounding of
reordered sums) and same gradients.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bireal_jax.ops.geometry import Pads

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int], pads: Pads) -> jax.Array:
  """NHWC × HWIO convolution with explicit zero padding."""
  return lax.conv_general_dilated(x, w, tuple(strides), pads,
                                  dimension_numbers=DIMENSION_NUMBERS)


def binary_conv2d(xq: jax.Array, wq: jax.Array, strides: Sequence[int],
                  pads: Pads) -> jax.Array:
  """`conv2d` of ±1 inputs and an α·sign(W) kernel: the float convolution itself."""
  return conv2d(xq, wq, strides, pads)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
             pads: Pads) -> jax.Array:
  """NHWC max-pool, −inf padding; the gradient goes to each window's first maximum."""
  # A scalar −inf init makes lax emit its differentiable `reduce_window_max` (as nn.max_pool).
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *pads, (0, 0)))


def batch_stats(x: jax.Array, axis_name: Optional[str]):
  """Flax's fast-variance batch statistics over all axes but the last: mean and
  max(0, E[x²] − E[x]²), averaged over the replicas of `axis_name` in one collective."""
  axes = tuple(range(x.ndim - 1))
  mu, mu2 = jnp.mean(x, axes), jnp.mean(x * x, axes)
  if axis_name is not None:
    mu, mu2 = lax.pmean(jnp.stack([mu, mu2]), axis_name)
  return mu, jnp.maximum(0.0, mu2 - mu * mu)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: Optional[str]):
  """Training-mode BatchNorm over N, H, W as `flax.linen.BatchNorm` computes it:
  `y = (x − μ)·(rsqrt(σ² + ε)·γ) + β`. Returns `(y, μ, σ²)`; gradients flow through the
  statistics as in flax."""
  mu, var = batch_stats(x, axis_name)
  return (x - mu) * (lax.rsqrt(var + epsilon) * scale) + bias, mu, var
