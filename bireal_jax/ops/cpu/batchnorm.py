"""Training-mode BatchNorm with a hand-written backward (same values as `reference`).

Autodiff of flax's formula makes XLA write x − μ (and x̂) out once per layer in the forward
pass; this keeps x (alive anyway as the conv output) and computes the closed-form gradient from
two plain reductions over it."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bireal_jax.ops import reference


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon, axis_name):
  """`reference.batch_norm_train` (values bit for bit) with the closed-form backward."""
  return _fwd(x, scale, bias, epsilon, axis_name)[0]


def _fwd(x, scale, bias, epsilon, axis_name):
  mu, var = reference.batch_stats(x, axis_name)
  inv = lax.rsqrt(var + epsilon)
  return ((x - mu) * (inv * scale) + bias, mu, var), (x, mu, inv, scale)


def _bwd(epsilon, axis_name, res, cts):
  """dx = γ·inv·(g − mean(g) − x̂·mean(g·x̂)), means over all replicas.

  The cotangents of the returned statistics are ignored: the layers stop their gradient (they
  only feed the running averages)."""
  x, mu, inv, scale = res
  g = cts[0]
  axes = tuple(range(x.ndim - 1))
  # Σ g·x̂ as inv·(Σ g·x − μ·Σ g): two plain reductions over the inputs XLA already has, so x̂ is
  # never written out (it would be, as the operand of the reduction).
  dbias = jnp.sum(g, axes)
  dscale = (jnp.sum(g * x, axes) - mu * dbias) * inv
  count = x.size // x.shape[-1]
  mg, mgx = dbias, dscale
  if axis_name is not None:
    mg, mgx = lax.psum(jnp.stack([mg, mgx]), axis_name)
    count = count * lax.psum(1, axis_name)
  dx = (scale * inv) * (g - mg / count - (x - mu) * (inv * mgx / count))
  return dx, dscale, dbias


batch_norm_train.defvjp(_fwd, _bwd)
