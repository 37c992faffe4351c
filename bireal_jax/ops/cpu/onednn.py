"""oneDNN convolutions and max-pooling for XLA:CPU, as `jax.ffi` custom calls.

XLA:CPU runs convolutions with Eigen (or YNNPACK); oneDNN's direct convolutions (what TensorFlow
and PyTorch use on CPUs) can run the same shapes closer to the matmul rate, so `conv2d` computes
the forward pass, input gradient and kernel gradient of NHWC/HWIO f32 convolutions with them, and
`max_pool2d` does the same for max-pooling with a one-byte argmax. Whether either is faster than
XLA's own depends on the CPU (on AVX2-only machines it often is not): `bireal_jax.ops` times them
and picks per shape; nothing here decides it.

The C++ source (`csrc/onednn_ops.cc`, oneDNN 2.x or 3.x API) is compiled on first use against
oneDNN's headers (`build.py`) — Debian/Ubuntu: `apt-get install g++ libdnnl-dev` (`make
sysdeps`); elsewhere set `BIREAL_ONEDNN_ROOT` to a prefix with `include/dnnl.hpp` and
`lib/libdnnl.so`. Without them, or with `BIREAL_ONEDNN=0`, `available()` is false.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax.ops.cpu import build
from bireal_jax.ops.geometry import Pads, out_hw

log = logging.getLogger(__name__)

_SOURCES = (build.CSRC / "onednn_ops.cc",)
_TARGETS = {"bireal_onednn_conv_fwd": "BirealOnednnConvFwd",
            "bireal_onednn_conv_bf16_fwd": "BirealOnednnConvBf16Fwd",
            "bireal_onednn_packed_conv_bf16_fwd": "BirealOnednnPackedConvBf16Fwd",
            "bireal_onednn_conv_bwd_data": "BirealOnednnConvBwdData",
            "bireal_onednn_conv_bwd_kernel": "BirealOnednnConvBwdKernel",
            "bireal_onednn_pool_fwd": "BirealOnednnPoolFwd",
            "bireal_onednn_pool_bwd": "BirealOnednnPoolBwd"}
_HEADER_DIRS = ("/usr/include", "/usr/local/include")


def _root_flags() -> list[str]:
  root = os.environ.get("BIREAL_ONEDNN_ROOT")
  if not root:
    return []
  lib = Path(root) / "lib"
  return [f"-I{Path(root) / 'include'}", f"-L{lib}", f"-Wl,-rpath,{lib}"]


def unavailable_reason() -> str | None:
  """Why the oneDNN custom calls cannot be built here (disabled, no headers, no compiler), or
  None when nothing stands in the way (the build itself may still fail: `available`)."""
  if os.environ.get("BIREAL_ONEDNN", "1") == "0":
    return "disabled by BIREAL_ONEDNN=0"
  dirs = _HEADER_DIRS
  if os.environ.get("BIREAL_ONEDNN_ROOT"):
    dirs = (str(Path(os.environ["BIREAL_ONEDNN_ROOT"]) / "include"),)
  if not any((Path(d) / "dnnl.hpp").exists() for d in dirs):
    return f"oneDNN headers (dnnl.hpp) not found in {', '.join(dirs)}: apt-get install libdnnl-dev"
  if build.compiler() is None:
    return "no C++ compiler (apt-get install g++)"
  return None


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when the oneDNN custom calls are built and registered for the CPU platform."""
  reason = unavailable_reason()
  if reason is None:
    try:
      build.load("onednn_ops", _SOURCES, _TARGETS, [*_root_flags(), "-ldnnl"])
      return True
    except (OSError, RuntimeError, AttributeError) as e:
      reason = str(e)
  log.warning("bireal_jax: oneDNN custom calls unavailable (%s)", reason)
  return False




def _attrs(strides, pads):
  (pt, pb), (pl, pr) = pads
  return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pt),
              pb=np.int64(pb), pl=np.int64(pl), pr=np.int64(pr))


def _call(name, out_shape, *args, strides, pads):
  return jax.ffi.ffi_call(f"bireal_onednn_conv_{name}",
                          jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(*args, **_attrs(strides, pads))


INPUT_GRADS = ("rule", "bwd_data", "flipped")


def flip_fits(kernel_shape, strides, pads) -> bool:
  """Whether the input gradient can run as a forward conv with the flipped kernel: stride 1 and
  padding at most kernel − 1 on every side."""
  kh, kw = kernel_shape[:2]
  return (tuple(strides) == (1, 1) and max(pads[0]) <= kh - 1 and max(pads[1]) <= kw - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, k, strides, pads, input_grad):
  oh, ow = out_hw(x.shape, k.shape, strides, pads)
  return _call("fwd", (x.shape[0], oh, ow, k.shape[3]), x, k, strides=strides, pads=pads)


def _conv_fwd(x, k, strides, pads, input_grad):
  return _conv(x, k, strides, pads, input_grad), (x, k)


def _conv_bwd(strides, pads, input_grad, res, dy):
  x, k = res
  kh, kw = k.shape[:2]
  flip = flip_fits(k.shape, strides, pads) and (
      input_grad == "flipped" or (input_grad == "rule" and x.shape[1] * x.shape[2] >= 28 * 28))
  if flip:
    # The input gradient as a forward conv of dy with the flipped, I/O-swapped kernel. "rule"
    # does this at stride 1 on images of at least 28×28, because oneDNN 2.6's forward kernels
    # outran its backward-data ones there on the AVX-512 machine it was set on (docs/speed.md,
    # "Fixed choices"); `auto` times "bwd_data" against "flipped" on each CPU instead.
    flipped_pads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
                    (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
    k_t = jnp.flip(k, (0, 1)).swapaxes(2, 3)
    dx = _call("fwd", x.shape, dy, k_t, strides=strides, pads=flipped_pads)
  else:
    dx = _call("bwd_data", x.shape, dy, k, strides=strides, pads=pads)
  dk = _call("bwd_kernel", k.shape, x, dy, strides=strides, pads=pads)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def _fitted_hw(x_shape, window, strides, pads, what: str) -> tuple[int, int]:
  """The output (height, width), or ValueError when the window (`what`) does not fit."""
  oh, ow = out_hw(x_shape, window, strides, pads)
  if min(oh, ow) < 1:
    raise ValueError(f"{what} {tuple(window[:2])} with padding {pads} does not fit input "
                     f"{tuple(x_shape[1:3])}")
  return oh, ow


def _conv_operands(name: str, dtype, x, kernel, strides, pads):
  """Checks NHWC `x` and HWIO `kernel` of `dtype` for oneDNN's `name`: (int strides, int pads,
  output (height, width))."""
  if x.dtype != dtype or kernel.dtype != dtype:
    raise TypeError(f"oneDNN {name} takes {jnp.dtype(dtype).name} operands, got {x.dtype} and "
                    f"{kernel.dtype}")
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
    raise ValueError(f"expected NHWC input and HWIO kernel with matching channels, got "
                     f"{x.shape} and {kernel.shape}")
  strides = tuple(int(v) for v in strides)
  pads = tuple((int(a), int(b)) for a, b in pads)
  return strides, pads, _fitted_hw(x.shape, kernel.shape, strides, pads, "kernel")


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads: Pads,
           input_grad: str = "rule") -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, strides, pads, ("NHWC", "HWIO", "NHWC"))` via oneDNN.

  f32 only, explicit padding `((top, bottom), (left, right))`, no dilation or groups; call it
  only when `available()` (the layers do) — XLA has no other lowering for it. `input_grad`
  says how the input gradient runs: "bwd_data" (oneDNN's backward-data primitive), "flipped"
  (a forward conv with the flipped kernel, where `flip_fits`) or "rule" (flipped at stride 1 on
  images of at least 28×28, else backward-data).
  """
  if input_grad not in INPUT_GRADS:
    raise ValueError(f"input_grad must be one of {INPUT_GRADS}, got {input_grad!r}")
  strides, pads, _ = _conv_operands("conv2d", jnp.float32, x, kernel, strides, pads)
  if kernel.shape[:2] == (1, 1) and strides != (1, 1) and pads == ((0, 0), (0, 0)):
    # A strided 1×1 conv reads every s-th pixel only: the same conv at stride 1 on those pixels.
    # Also avoids oneDNN 2.6's jit_1x1 kernel gradient at stride 2, which returned wrong values
    # (and corrupted memory) for some small channel counts (e.g. 4 → 8 channels, 8×8 input).
    return _conv(x[:, ::strides[0], ::strides[1], :], kernel, (1, 1), pads, input_grad)
  return _conv(x, kernel, strides, pads, input_grad)


def conv2d_bf16(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                pads: Pads) -> jax.Array:
  """The forward of `conv2d` with bfloat16 operands and a float32 result, via oneDNN (its sums
  in f32). Exact for ±1 operands: every product is ±1 and the integer sums stay below 2^24; for
  other values it is a bf16 convolution. No gradient (the binary convs' candidates take theirs
  from `ops.conv2d`); call it only when `available()`. oneDNN runs it with AMX where the CPU
  has it (see `build.has_amx`), else with avx512_bf16 or a slower emulation."""
  strides, pads, (oh, ow) = _conv_operands("conv2d_bf16", jnp.bfloat16, x, kernel, strides,
                                           pads)
  return _call("bf16_fwd", (x.shape[0], oh, ow, kernel.shape[3]), x, kernel, strides=strides,
               pads=pads)


def packed_conv2d_bf16(x: jax.Array, bits: jax.Array, stride: int, pad: int) -> jax.Array:
  """`D = conv(x, ŵ)` as float32 for ±1 bf16 activations `x` (NHWC) and the kernel's sign bits
  `bits[kh, kw, ceil(C/32), O]` (`ops/bits.py`), zero padding `pad` on every side; exact.
  The kernel is unpacked and reordered for oneDNN in C++ and kept there between calls (keyed by
  the bits), so an inference call pays only the convolution. Call only when `available()`."""
  if x.dtype != jnp.bfloat16 or bits.dtype != jnp.uint32:
    raise TypeError(f"oneDNN packed_conv2d_bf16 takes bfloat16 activations and uint32 bits, "
                    f"got {x.dtype} and {bits.dtype}")
  if x.ndim != 4 or bits.ndim != 4 or bits.shape[2] != -(-x.shape[3] // 32):
    raise ValueError(f"expected NHWC activations and bits [kh, kw, ceil(C/32), O], got "
                     f"{x.shape} and {bits.shape}")
  strides, pads = (int(stride),) * 2, ((int(pad), int(pad)),) * 2
  oh, ow = _fitted_hw(x.shape, bits.shape, strides, pads, "kernel")
  return jax.ffi.ffi_call("bireal_onednn_packed_conv_bf16_fwd",
                          jax.ShapeDtypeStruct((x.shape[0], oh, ow, bits.shape[3]), jnp.float32),
                          vmap_method="sequential")(x, bits, **_attrs(strides, pads))


def _pool_attrs(window, strides, pads):
  return dict(kh=np.int64(window[0]), kw=np.int64(window[1]), **_attrs(strides, pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return _max_pool_fwd(x, window, strides, pads)[0]


def _max_pool_fwd(x, window, strides, pads):
  n, _, _, c = x.shape
  oh, ow = out_hw(x.shape, window, strides, pads)
  y, ws = jax.ffi.ffi_call("bireal_onednn_pool_fwd",
                           (jax.ShapeDtypeStruct((n, oh, ow, c), jnp.float32),
                            jax.ShapeDtypeStruct((n, oh, ow, c), jnp.uint8)),
                           vmap_method="sequential")(x, **_pool_attrs(window, strides, pads))
  return y, (ws, x.shape)


def _max_pool_bwd(window, strides, pads, res, dy):
  ws, x_shape = res
  dx = jax.ffi.ffi_call("bireal_onednn_pool_bwd", jax.ShapeDtypeStruct(x_shape, jnp.float32),
                        vmap_method="sequential")(dy, ws, **_pool_attrs(window, strides, pads))
  return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def pool_fits(window: Sequence[int], pads: Pads) -> bool:
  """What oneDNN's max-pool takes here: at most 256 taps (the one-byte workspace) and padding
  smaller than the window."""
  return window[0] * window[1] <= 256 and all(max(p) < min(window) for p in pads)


def max_pool2d(x: jax.Array, window: Sequence[int], strides: Sequence[int], pads: Pads):
  """NHWC f32 max-pool with explicit padding (padding never wins), via oneDNN; its gradient goes
  to each window's first maximum in row-major order, as `nn.max_pool`'s does. Windows of at most
  256 taps (the one-byte workspace); call it only when `available()`."""
  if x.dtype != jnp.float32 or x.ndim != 4:
    raise TypeError(f"oneDNN max_pool2d takes NHWC float32 input, got {x.dtype} {x.shape}")
  window, strides = tuple(int(k) for k in window), tuple(int(s) for s in strides)
  pads = tuple((int(a), int(b)) for a, b in pads)
  if not pool_fits(window, pads):
    raise ValueError(f"window {window} with padding {pads}: expected at most 256 taps and "
                     f"padding smaller than the window")
  _fitted_hw(x.shape, window, strides, pads, "window")
  return _max_pool(x, window, strides, pads)
