"""Max-pool as strided slices with an int8 argmax (pure JAX; `reference.max_pool`'s values and
gradient). XLA:CPU lowers the gradient of a `reduce_window` max to an argmax reduce-window over
four s32 index arrays plus a scatter; this keeps a one-byte index of each window's first maximum
and scatters by stride phase, in a few fused loops."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bireal_jax.ops import geometry


def _fwd_and_index(x, window, strides, pads):
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-jnp.inf)
  parts = geometry.window_slices(xp, window, strides, geometry.out_hw(x.shape, window, strides,
                                                                      pads))
  out = functools.reduce(jnp.maximum, parts)
  # Index of the first maximum in row-major window order: where reduce_window's gradient goes.
  idx = jnp.full(out.shape, len(parts) - 1, jnp.int8)
  for k in range(len(parts) - 2, -1, -1):
    idx = jnp.where(parts[k] == out, jnp.int8(k), idx)
  return out, idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _sliced(x, window, strides, pads, shape):
  return _fwd_and_index(x, window, strides, pads)[0]


def _sliced_fwd(x, window, strides, pads, shape):
  return _fwd_and_index(x, window, strides, pads)  # int8 index: 4x less to keep than the input


def _sliced_bwd(window, strides, pads, shape, idx, g):
  """Scatters `g` to each window's first maximum, one stride phase of the input at a time.

  Input pixel `(s·u + a, s·v + b)` is hit only by the taps `(i, j)` with `i ≡ a + pad_top` and
  `j ≡ b + pad_left` (mod the strides), each from the output `(u − δi, v − δj)`: every phase
  plane is a sum of a few shifted, masked copies of `g` at output resolution, and the planes are
  interleaved at the end (3×3/2: 1, 2, 2 and 4 terms instead of 9 strided pads per pixel).
  """
  (kh, kw), (sh, sw) = window, strides
  n, h, w, c = shape
  oh, ow = idx.shape[1:3]
  hu, wu = -(-h // sh), -(-w // sw)  # phase-plane size, cropped after interleaving
  zero = jnp.zeros((), g.dtype)
  rows = []
  for a in range(sh):
    planes = []
    for b in range(sw):
      total = jnp.zeros((n, hu, wu, c), g.dtype)
      for i in range(kh):
        di, ri = divmod(i - pads[0][0] - a, sh)
        for j in range(kw):
          dj, rj = divmod(j - pads[1][0] - b, sw)
          if ri or rj:
            continue
          part = jnp.where(idx == i * kw + j, g, zero)
          # plane[u, v] = part[u − di, v − dj], zero outside (negative padding crops).
          total = total + lax.pad(part, zero, ((0, 0, 0), (di, hu - oh - di, 0),
                                               (dj, wu - ow - dj, 0), (0, 0, 0)))
      planes.append(total)
    rows.append(jnp.stack(planes, axis=3))  # [n, hu, wu, sw, c]
  full = jnp.stack(rows, axis=2).reshape(n, hu * sh, wu * sw, c)
  return (full[:, :h, :w, :],)


_sliced.defvjp(_sliced_fwd, _sliced_bwd)


def max_pool_sliced(x, window, strides, pads):
  """NHWC max-pool of a floating `x` with explicit −inf padding, first-maximum gradient."""
  return _sliced(x, tuple(window), tuple(strides), tuple(pads), tuple(x.shape))
