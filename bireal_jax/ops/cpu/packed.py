"""Packed inference's binary convolution + folded affine (+ residual) in C++
(`csrc/packed_conv.cc`): `float(D)·scale + bias [+ residual]` from float activations and the
kernel's stored sign bits (`ops/bits.py` format), D exact, split over XLA's intra-op threads.
The `packed_conv2d` op's `xor_cpp` candidate; needs only a C++ compiler."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax.ops import geometry
from bireal_jax.ops.cpu import build

_SOURCES = (build.CSRC / "packed_conv.cc",)
# `d·scale + bias` is one explicit fused multiply-add, as XLA:CPU compiles the reference alone
# on x86-64 (the same bits there); nothing else may be contracted.
_FLAGS = ("-ffp-contract=off",)


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when the kernel is built and registered for the CPU platform."""
  return build.kernel_available("packed_conv", _SOURCES,
                                {"bireal_packed_conv_fwd": "BirealPackedConvFwd",
                                 "bireal_packed_conv_res_fwd": "BirealPackedConvResFwd"},
                                _FLAGS, what="C++ packed conv kernel")


def packed_conv(x, bits, scale, bias, residual=None, *, stride: int, pad: int):
  """`float(D)·scale + bias [+ residual]`, D = conv(sign(x), ŵ) with zero padding, exact.

  `x`: NHWC float32; `bits`: `[kh, kw, ceil(C/32), O]` uint32; `scale`, `bias`: `[O]` float32;
  `residual`: None or float32 of the output's shape. Call only when `available()`."""
  n, h, w, c = x.shape
  kh, kw, nw, o = bits.shape
  oh, ow = geometry.out_hw(x.shape, bits.shape, (stride, stride), ((pad, pad), (pad, pad)))
  args = [x, bits, scale, bias] + ([] if residual is None else [residual])
  target = "bireal_packed_conv_fwd" if residual is None else "bireal_packed_conv_res_fwd"
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((n, oh, ow, o), jnp.float32),
                          vmap_method="sequential")(*args, stride=np.int64(stride),
                                                    pad=np.int64(pad))
