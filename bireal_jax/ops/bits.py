"""Sign bits packed 32 to a word, and the exact binary convolutions on them.

Bit format. ±1 values are packed along the channel axis into uint32 words: channel `c` is bit
`c % 32` of word `c // 32`, and the bit is 1 for −1 and 0 for +1 (the IEEE sign bit; `sign(0) =
+1` packs to 0, as `quantizers.binary_sign`). Unused tail bits are 0. Kernels are stored as
`bits[kh, kw, ceil(C/32), O]` (output channel minor, so the popcount loop vectorises over O).

Exact binary convolution. For ±1 vectors `a, w` of length K, `a·w = K − 2·popcount(a XOR w)`.
Zero padding of the signed input contributes 0; the packed input is padded with 0 words (+1)
instead, which adds `Σ_{taps t in padding} Σ_c ŵ[t, c, o]`, a term that depends only on the
output position's border class and the kernel (`border_correction`), so it is subtracted:

    D[p, o] = kh·kw·C − 2·Σ_words popcount(x̂ XOR ŵ) − Σ_{t ∈ pad(p)} S[t, o],
    S[t, o] = Σ_c ŵ[t, c, o] = C − 2·popcount(bits[t, :, o]).

`xor_popcount_conv`, `int8_conv` and `float_conv` all compute this integer `D` exactly; the
training forward (`bireal_jax.ops.binary_conv2d`) and packed inference share them.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bireal_jax.ops import geometry

WORD_BITS = 32
_SHIFTS = np.arange(WORD_BITS, dtype=np.uint32)
_PACK_LEVELS = (8, 4)  # pack_bits: a word = 8 nibbles of 4 bits (product WORD_BITS)


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


def num_words(n: int) -> int:
  """Words needed for `n` bits: ceil(n / 32)."""
  return -(-n // WORD_BITS)


def pack_bits(bits: jax.Array) -> jax.Array:
  """Pack booleans along the last axis into uint32: element `i` -> bit `i % 32` of word `i // 32`.

  `[..., n] -> [..., ceil(n/32)]`; the tail bits of the last word are 0.
  """
  bits = jnp.asarray(bits)
  n = bits.shape[-1]
  nw = num_words(n)
  if nw * WORD_BITS != n:
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, nw * WORD_BITS - n)])
  b = bits.reshape(*bits.shape[:-1], nw, *_PACK_LEVELS).astype(jnp.uint32)
  # Bits are disjoint, so sums are bitwise ORs; a reduce fuses better than 32 ORs on CPU, and
  # two levels (4 bits into a nibble, then 8 nibbles into a word) ran faster than one 32-long
  # reduce on XLA:CPU (same bits; docs/speed.md, "Fixed choices").
  width = 1
  for k in reversed(_PACK_LEVELS):
    b = jnp.sum(b << (width * np.arange(k, dtype=np.uint32)), axis=-1, dtype=jnp.uint32)
    width *= k
  return b


def unpack_bits(words: jax.Array, n: int) -> jax.Array:
  """Inverse of `pack_bits`: `[..., nw]` uint32 -> `[..., n]` bool (tail bits dropped)."""
  words = jnp.asarray(words)
  if words.dtype != jnp.uint32:
    raise TypeError(f"unpack_bits expects uint32 words, got dtype {words.dtype}")
  if not 0 <= n <= words.shape[-1] * WORD_BITS:
    raise ValueError(f"n={n} does not fit {words.shape[-1]} words of {WORD_BITS} bits")
  b = (words[..., None] >> _SHIFTS) & jnp.uint32(1)
  return b.reshape(*words.shape[:-1], -1)[..., :n].astype(bool)


def pack_signs(x: jax.Array) -> jax.Array:
  """Sign bits of `x` along the last axis: bit 1 where `binary_sign(x) = −1`, i.e. `not x >= 0`."""
  return pack_bits(~(x >= 0))


def unpack_signs(words: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
  """±1 values (`dtype`) from sign bits: bit 1 -> −1, bit 0 -> +1."""
  one = jnp.ones((), dtype)
  return jnp.where(unpack_bits(words, n), -one, one)


def pack_kernel(kernel: jax.Array) -> jax.Array:
  """HWIO kernel -> sign bits `[kh, kw, ceil(C/32), O]` uint32 (bit 1 where `binary_sign = −1`)."""
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f"expected an HWIO kernel of rank 4, got shape {kernel.shape}")
  return jnp.swapaxes(pack_signs(jnp.swapaxes(kernel, 2, 3)), 2, 3)


def unpack_kernel(bits: jax.Array, in_channels: int, dtype=jnp.float32) -> jax.Array:
  """`[kh, kw, nw, O]` bits -> ±1 HWIO kernel `[kh, kw, in_channels, O]` in `dtype`."""
  return jnp.swapaxes(unpack_signs(jnp.swapaxes(bits, 2, 3), in_channels, dtype), 2, 3)


# ---------------------------------------------------------------------------------------------
# Exact binary convolution D = conv(sign(x), ŵ) with zero padding of the signed input
# ---------------------------------------------------------------------------------------------


def _out_size(n: int, k: int, stride: int, pad: int) -> int:
  return geometry.out_size(n, k, stride, pad, pad)


def _border_masks(h: int, w: int, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
  """`m[i, j, p, q] = 1` where tap (i, j) of output (p, q) falls on the zero padding (static)."""
  ho, wo = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
  rows = np.arange(ho)[None, :] * stride + np.arange(kh)[:, None] - pad  # [kh, ho]
  cols = np.arange(wo)[None, :] * stride + np.arange(kw)[:, None] - pad  # [kw, wo]
  out_r = (rows < 0) | (rows >= h)
  out_c = (cols < 0) | (cols >= w)
  return (out_r[:, None, :, None] | out_c[None, :, None, :]).astype(np.int32)


def border_correction(bits: jax.Array, in_channels: int, h: int, w: int, stride: int,
                      pad: int) -> jax.Array:
  """`corr[p, q, o] = Σ_{taps t on padding} S[t, o]`, `S[t, o] = C − 2·popcount(bits[t, :, o])`.

  What padding with +1 words adds to the popcount dot product; `[ho, wo, O]` int32, computed
  elementwise (exact on every backend, no matrix unit involved).
  """
  kh, kw = bits.shape[:2]
  masks = _border_masks(h, w, kh, kw, stride, pad)
  tap_sums = in_channels - 2 * jnp.sum(lax.population_count(bits).astype(jnp.int32), axis=2)
  corr = jnp.zeros(masks.shape[2:] + (bits.shape[-1],), jnp.int32)
  for i in range(kh):
    for j in range(kw):
      if masks[i, j].any():  # interior taps never touch the padding
        corr = corr + masks[i, j][:, :, None] * tap_sums[i, j]
  return corr


def word_group(num_words_k: int, out_channels: int, backend: Optional[str] = None) -> int:
  """Words per step of the XOR/popcount sum (a divisor of the reduction length `Kw`).

  CPU: the largest divisor `g ≥ 16` whose kernel slab `g·O·4` bytes fits a 32 KiB L1 cache
  (with < 16 words per step LLVM left the popcount loop scalar, and slabs far beyond L1 ran
  much slower: docs/speed.md, "Fixed choices"); `Kw` when no divisor qualifies. Other backends:
  `Kw` (one fusion; not tuned, no accelerator here).
  """
  kw = num_words_k
  if (backend or jax.default_backend()) != "cpu":
    return kw
  divisors = [d for d in range(16, kw + 1) if kw % d == 0]
  fit = [d for d in divisors if d * out_channels * 4 <= 32 * 1024]
  return max(fit) if fit else (min(divisors) if divisors else kw)


def _popcount_sum(cols, w):
  """`Σ_k popcount(cols[k] XOR w[k, :])`: `g` arrays `[..., 1]` of words × `[g, O]` words ->
  `[..., O]` uint32.

  One elementwise expression (vectorised over O by XLA), no `[..., g, O]` intermediate. `cols`
  may be slices of one padded array (the shifted windows): XLA fuses slices as index offsets,
  whereas a concatenated im2col array fused as a select per word (or cost a copy).
  """
  acc = None
  for k, col in enumerate(cols):
    t = lax.population_count(col ^ w[k])
    acc = t if acc is None else acc + t
  return acc


def xor_popcount_conv(x: jax.Array, bits: jax.Array, stride: int = 1, pad: int = 0,
                      group: Optional[int] = None) -> jax.Array:
  """Exact `D = conv(sign(x), ŵ)` (zero padding) with XOR + popcount on packed words; int32.

  `x`: NHWC real activations (signed and packed here); `bits`: `[kh, kw, nw, O]` from
  `pack_kernel`. The words of the `kh·kw` shifted windows form the reduction axis
  (`Kw = kh·kw·nw` words, im2col on words: 32× smaller than on floats); it is summed `group`
  words at a time (`word_group`), the groups accumulated by a `lax.scan` so that each step's
  kernel slab stays in cache. With one group the windows are read as slices of the padded words
  (no im2col copy).
  """
  n, h, w, c = x.shape
  kh, kw, nw, o = bits.shape
  if num_words(c) != nw:
    raise ValueError(f"input has {c} channels ({num_words(c)} words) but the packed kernel "
                     f"{tuple(bits.shape)} has {nw} words per tap")
  ho, wo = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
  if ho < 1 or wo < 1:
    raise ValueError(f"input {h}×{w} is smaller than the {kh}×{kw} kernel with padding {pad}")
  xb = pack_signs(x)
  if pad:
    xb = jnp.pad(xb, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # 0 words = +1, corrected below
  wins = [lax.slice(xb, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, nw),
                    (1, stride, stride, 1)) for i in range(kh) for j in range(kw)]
  k_words = kh * kw * nw
  wk = bits.reshape(k_words, o)  # (i, j, word) order, the order of `wins`
  g = group or word_group(k_words, o)
  if k_words % g:
    raise ValueError(f"group={g} must divide the {k_words} words of the reduction")
  if g == k_words:
    pc = _popcount_sum([win[..., u:u + 1] for win in wins for u in range(nw)], wk)
  else:
    cols = jnp.stack(wins, axis=0).reshape(kh * kw, n, ho, wo, nw)
    cols = jnp.moveaxis(cols, 0, 3).reshape(n, ho, wo, k_words // g, g)
    cols = jnp.moveaxis(cols, 3, 0)  # [steps, n, ho, wo, g]

    def step(acc, cw):
      c, w_ = cw
      return acc + _popcount_sum([c[..., k:k + 1] for k in range(g)], w_), None

    pc, _ = lax.scan(step, jnp.zeros((n, ho, wo, o), jnp.uint32),
                     (cols, wk.reshape(k_words // g, g, o)))
  d = kh * kw * c - 2 * pc.astype(jnp.int32)
  if pad:
    d = d - border_correction(bits, c, h, w, stride, pad)
  return d


def _conv(x, w, stride, pad, preferred=None):
  return lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad), (pad, pad)],
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  preferred_element_type=preferred)


def int8_conv(x: jax.Array, kernel_i8: jax.Array, stride: int = 1, pad: int = 0) -> jax.Array:
  """Exact `D` with ±1 int8 operands and int32 accumulation (zero padding is exact: 0 adds 0)."""
  xs = jnp.where(x >= 0, jnp.int8(1), jnp.int8(-1))
  return _conv(xs, kernel_i8, stride, pad, jnp.int32)


def float_conv(x: jax.Array, kernel_pm1: jax.Array, stride: int = 1, pad: int = 0) -> jax.Array:
  """Exact `D` with ±1 float operands, float32 accumulation (integers < 2**24 are exact)."""
  xs = jnp.where(x >= 0, 1.0, -1.0).astype(kernel_pm1.dtype)
  return _conv(xs, kernel_pm1, stride, pad, jnp.float32)
