"""A direct f32 convolution for few input channels (`csrc/stem_conv.cc`): the `conv2d` op's
`stem_cpp` candidate, for the ImageNet stem's 7×7/2 conv of 3-channel images, which oneDNN and
XLA block poorly. Forward in C++ on XLA's intra-op threads; the gradient is the reference
convolution's (the candidate is timed for inference only). Needs only a C++ compiler."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax.ops import geometry, reference
from bireal_jax.ops.cpu import build

_SOURCES = (build.CSRC / "stem_conv.cc",)
MAX_CHANNELS = 4  # input channels it is meant for (and `applies` to)


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when the kernel is built and registered for the CPU platform."""
  return build.kernel_available("stem_conv", _SOURCES, {"bireal_stem_conv_fwd": "BirealStemConvFwd"},
                                ("-ffp-contract=off",), what="C++ stem conv kernel")


def fits(x_shape, kernel_shape, strides, pads) -> bool:
  """What it is for: at most MAX_CHANNELS input channels, output channels a multiple of 16 (its
  vector width), non-negative padding."""
  return (x_shape[3] <= MAX_CHANNELS and kernel_shape[3] % 16 == 0
          and all(p >= 0 for pair in pads for p in pair))


def _forward(x, kernel, strides, pads):
  oh, ow = geometry.out_hw(x.shape, kernel.shape, strides, pads)
  (pt, pb), (pl, pr) = pads
  return jax.ffi.ffi_call("bireal_stem_conv_fwd",
                          jax.ShapeDtypeStruct((x.shape[0], oh, ow, kernel.shape[3]), jnp.float32),
                          vmap_method="sequential")(
      x, kernel, sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pt),
      pb=np.int64(pb), pl=np.int64(pl), pr=np.int64(pr))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
  return _forward(x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
  return _forward(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, res, g):
  return jax.vjp(lambda a, b: reference.conv2d(a, b, strides, pads), *res)[1](g)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, strides, pads, ("NHWC", "HWIO", "NHWC"))` in f32
  (rounding apart), for inputs that `fits`; call only when `available()`."""
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise TypeError(f"stem conv2d takes float32 operands, got {x.dtype} and {kernel.dtype}")
  strides = tuple(int(s) for s in strides)
  pads = tuple((int(a), int(b)) for a, b in pads)
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
    raise ValueError(f"expected NHWC input and HWIO kernel with matching channels, got "
                     f"{x.shape} and {kernel.shape}")
  if not fits(x.shape, kernel.shape, strides, pads):
    raise ValueError(f"stem conv2d takes at most {MAX_CHANNELS} input channels, output channels "
                     f"a multiple of 16 and padding >= 0; got input {x.shape}, kernel "
                     f"{kernel.shape}, padding {pads}")
  if min(geometry.out_hw(x.shape, kernel.shape, strides, pads)) < 1:
    raise ValueError(f"kernel {kernel.shape[:2]} with padding {pads} does not fit input "
                     f"{x.shape[1:3]}")
  return _conv(x, kernel, strides, pads)
