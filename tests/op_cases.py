"""Test helpers: operands of the ops' tests (tests/test_ops.py), and `auto_workload`, the workload
traced under `auto` in this process and, to check the disk cache, in a fresh one (which imports
this module, not a test module).
"""
import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax import ops, quantizers
from bireal_jax.ops import reference


def normal(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def conv_operands(geometry, binary):
  """(x, w, output cotangent, statics) of a conv geometry (x shape, kernel shape, strides,
  pads); `binary`: xq ∈ {±1}, wq = α·sign(W)."""
  x_shape, k_shape, strides, pads = geometry
  x, w = normal(*x_shape, seed=1), normal(*k_shape, seed=2)
  if binary:  # xq ∈ {±1}, wq = α·sign(W) with α per output channel
    x = jnp.where(x >= 0, 1.0, -1.0)
    w = quantizers.magnitude_aware_sign(w)
  out = jax.eval_shape(lambda a, b: reference.conv2d(a, b, strides, pads), x, w)
  return x, w, normal(*out.shape, seed=3), dict(strides=strides, pads=pads)


def bn_operands(shape, seed=6):
  """(x, scale, bias, cotangents of (y, mean, var)) of a training-mode BatchNorm."""
  c = shape[-1]
  x = normal(*shape, seed=seed) * 2.0 + 0.5
  scale, bias = jnp.linspace(0.5, 2.0, c), jnp.linspace(-1.0, 1.0, c)
  g = normal(*shape, seed=seed + 1)
  # Only y's cotangent: the layers stop the statistics' gradient (fused_bwd ignores theirs).
  return x, scale, bias, (g, jnp.zeros((c,)), jnp.zeros((c,)))


# The operands `auto_workload` traces: op -> (arrays, statics, cotangents).
def auto_cases():
  xq, wq, gc, conv = conv_operands(((2, 10, 9, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1))),
                                    binary=True)
  x = normal(*xq.shape, seed=9)
  pool = dict(window=(3, 3), strides=(2, 2), pads=((1, 1), (1, 1)))
  gp = normal(*jax.eval_shape(lambda v: reference.max_pool(v, **pool), x).shape, seed=10)
  bx, scale, bias, bct = bn_operands((2, 10, 9, 16))
  return {"conv2d": ((x, wq), conv, gc), "binary_conv2d": ((xq, wq), conv, gc),
          "max_pool": ((x,), pool, gp),
          "batch_norm_train": ((bx, scale, bias), dict(epsilon=1e-5, axis_name=None), bct)}


def auto_workload():
  """Each op traced under "auto": a jitted eval forward (not batch_norm_train, training-only)
  and a jitted forward + backward. Returns {op: (eval output or None, (output, gradients))}."""
  results = {}
  with ops.implementation("auto"):
    for op, (arrays, statics, cts) in auto_cases().items():
      fn = lambda *a, op=op, statics=statics: getattr(ops, op)(*a, **statics)  # noqa: E731
      ev = None if op == "batch_norm_train" else jax.jit(lambda *a: fn(*a))(*arrays)

      def train(*a, fn=fn, cts=cts):
        out, vjp = jax.vjp(fn, *a)
        return out, vjp(cts)
      results[op] = (ev, jax.jit(train)(*arrays))
  return results
