"""Window geometry shared by every convolution and pooling implementation (NHWC, 2-D)."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import jax
from jax import lax

Pads = Tuple[Tuple[int, int], Tuple[int, int]]


def explicit_pads(padding: Union[str, Sequence[Sequence[int]]], x_shape: Sequence[int],
                  window: Sequence[int], strides: Sequence[int]) -> Pads:
  """`((top, bottom), (left, right))` for 'SAME'/'VALID' or explicit pairs, NHWC `x_shape`."""
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(window), tuple(strides), padding)
  else:
    pads = padding
  return tuple((int(a), int(b)) for a, b in pads)


def out_size(n: int, k: int, stride: int, pad_lo: int, pad_hi: int) -> int:
  """Output length of a window `k` with `stride` over `n` padded by `pad_lo + pad_hi`."""
  return (n + pad_lo + pad_hi - k) // stride + 1


def out_hw(x_shape: Sequence[int], window: Sequence[int], strides: Sequence[int],
           pads: Pads) -> Tuple[int, int]:
  """Output height and width for NHWC `x_shape`."""
  return tuple(out_size(x_shape[1 + i], window[i], strides[i], *pads[i]) for i in range(2))


def window_slices(xp: jax.Array, window: Sequence[int], strides: Sequence[int],
                  out: Sequence[int]) -> list:
  """The kh·kw strided views of padded NHWC `xp`, one per window offset, row-major order."""
  (kh, kw), (sh, sw), (oh, ow) = window, strides, out
  n, c = xp.shape[0], xp.shape[3]
  return [lax.slice(xp, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def is_square_symmetric(strides: Sequence[int], pads: Pads) -> bool:
  """Same stride on both axes and one padding on all four sides (what the XOR kernels take)."""
  return strides[0] == strides[1] and len({p for pair in pads for p in pair}) == 1
