"""The binary convolutions' exact forward in C++ (`csrc/xor_conv.cc`): XOR + popcount on sign
bits packed 32 channels to a word, AVX-512 VPOPCNTDQ or AVX2 (nibble-table popcount) where the
CPU has them. It packs its own operands, so one custom call replaces sign packing, the popcount
sums and α scaling. Needs only a C++ compiler (no oneDNN)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax.ops import geometry
from bireal_jax.ops.cpu import build

_SOURCES = (build.CSRC / "xor_conv.cc",)


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when the kernel is built and registered for the CPU platform."""
  return build.kernel_available("xor_conv", _SOURCES, {"bireal_xor_conv_fwd": "BirealXorConvFwd"},
                                what="C++ XOR kernel")


def xor_conv(xq: jax.Array, wq: jax.Array, stride: int, pad: int,
             target: str = "bireal_xor_conv_fwd") -> jax.Array:
  """`conv(xq, wq)` for xq ∈ {±1} (NHWC f32) and an HWIO f32 kernel wq = α·sign(W) (α ≥ 0 per
  output channel), equal strides and symmetric zero padding; exact. Forward only (`ops` defines
  the gradient); call it only when `available()`, or with the `target` name under which another
  build of `csrc/xor_conv.cc` was registered (the kernel's tests and benchmark)."""
  if xq.dtype != jnp.float32 or wq.dtype != jnp.float32 or xq.ndim != 4 or wq.ndim != 4 \
     or xq.shape[3] != wq.shape[2]:
    raise ValueError(f"xor_conv expects NHWC and HWIO float32 operands with matching channels, "
                     f"got {xq.dtype}{xq.shape} and {wq.dtype}{wq.shape}")
  pads = ((pad, pad), (pad, pad))
  oh, ow = geometry.out_hw(xq.shape, wq.shape, (stride, stride), pads)
  if min(oh, ow) < 1:
    raise ValueError(f"kernel {wq.shape[:2]} with padding {pad} does not fit input "
                     f"{xq.shape[1:3]}")
  return jax.ffi.ffi_call(target,
                          jax.ShapeDtypeStruct((xq.shape[0], oh, ow, wq.shape[3]), jnp.float32),
                          vmap_method="sequential")(xq, wq, stride=np.int64(stride),
                                                    pad=np.int64(pad))
