"""Exact forwards of the binary convolution `conv(xq, wq)`, xq ∈ {±1}, wq = α·sign(W) (α ≥ 0 per
output channel), in pure JAX: the integer sums D computed exactly, then scaled by α once."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from bireal_jax.ops import bits, geometry


def alpha(wq):
  """α per output channel of an HWIO kernel wq = α·sign(W)."""
  return jnp.max(jnp.abs(wq), axis=(0, 1, 2))


def int8_im2col(xq, wq, strides, pads):
  """D as an int8 im2col dot with int32 sums (any strides and padding)."""
  kh, kw, cin, cout = wq.shape
  ws = jnp.where(wq >= 0, jnp.int8(1), jnp.int8(-1)).reshape(kh * kw * cin, cout)
  x8 = xq.astype(jnp.int8)
  if (kh, kw) == (1, 1) and all(p == (0, 0) for p in pads):
    cols = x8[:, ::strides[0], ::strides[1], :]
  else:
    x8 = jnp.pad(x8, ((0, 0), pads[0], pads[1], (0, 0)))
    out = geometry.out_hw(xq.shape, (kh, kw), strides, pads)
    cols = jnp.concatenate(geometry.window_slices(x8, (kh, kw), strides, out), axis=-1)
  n, oh, ow, k = cols.shape
  y = lax.dot_general(cols.reshape(n * oh * ow, k), ws, (((1,), (0,)), ((), ())),
                      preferred_element_type=jnp.int32)
  return y.reshape(n, oh, ow, cout).astype(jnp.float32) * alpha(wq)


def xor_jax(xq, wq, strides, pads):
  """D by XOR + popcount on packed words (`bits.xor_popcount_conv`); equal strides and
  symmetric padding only. Values bit for bit those of the C++ kernel."""
  d = bits.xor_popcount_conv(xq, bits.pack_kernel(wq), strides[0], pads[0][0])
  return d.astype(jnp.float32) * alpha(wq)


def onednn_bf16(xq, wq, strides, pads):
  """D as oneDNN's bf16 convolution with f32 sums (`onednn.conv2d_bf16`): ±1 is exact in bf16,
  so D is exact (any strides and padding). On AMX CPUs oneDNN runs it on the tile units."""
  from bireal_jax.ops.cpu import onednn
  ws = jnp.where(wq >= 0, 1.0, -1.0).astype(jnp.bfloat16)
  d = onednn.conv2d_bf16(xq.astype(jnp.bfloat16), ws, strides, pads)
  return d * alpha(wq)


def packed_onednn_bf16(x, packed, scale, bias, residual=None, *, stride, pad):
  """`packed_conv2d` with D from oneDNN's bf16 convolution: sign(x) as ±1 bf16 (zero padding of
  the signed input adds 0, as the packed format's) and the kernel's bits unpacked in C++, then
  the affine and residual in XLA, as the reference does."""
  from bireal_jax.ops.cpu import onednn
  xs = jnp.where(x >= 0, 1.0, -1.0).astype(jnp.bfloat16)  # sign(0) = +1, as bits.pack_signs
  d = onednn.packed_conv2d_bf16(xs, packed, stride, pad)
  y = d * scale + bias
  return y if residual is None else y + residual
