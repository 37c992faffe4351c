"""oneDNN convolutions and max-pooling for XLA:CPU training steps, as `jax.ffi` custom calls.

XLA:CPU runs convolutions with Eigen (or YNNPACK); on Bi-Real-18 they are most of a float
train step, and the stem and weight gradients run far below the matmul rate. oneDNN's direct
convolutions (what TensorFlow and PyTorch use on CPUs) run the same shapes close to it, so on
the CPU `conv2d` computes the forward pass, input gradient and kernel gradient of NHWC/HWIO f32
convolutions with them. GPUs and TPUs never see this module: `layers` only calls it when the
default backend is the CPU and `active()` is true. `max_pool2d` does the same for max-pooling,
whose gradient XLA:CPU otherwise recomputes from the input in every fused consumer. Built into the
same library, `xor_conv` is the binary convolutions' exact forward (XOR + popcount, AVX-512 where
the CPU has it), a C++ twin of `packed.xor_popcount_conv` that also packs its own operands.

The C++ sources (`csrc/onednn_ops.cc`, oneDNN 2.x or 3.x API; `csrc/xor_conv.cc`) are compiled
on first use with the system compiler against oneDNN's headers — Debian/Ubuntu: `apt-get install
g++ libdnnl-dev` (`make sysdeps`); elsewhere set `BIREAL_ONEDNN_ROOT` to a prefix with
`include/dnnl.hpp` and `lib/libdnnl.so` — and cached under `$BIREAL_JAX_CACHE` (default
`~/.cache/bireal_jax`). Without them, or with `BIREAL_ONEDNN=0`, `available()` is false and XLA's
own ops are used; nothing else changes.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_SOURCES = (Path(__file__).with_name("csrc") / "onednn_ops.cc",
            Path(__file__).with_name("csrc") / "xor_conv.cc")
_TARGETS = {"bireal_onednn_conv_fwd": "BirealOnednnConvFwd",
            "bireal_onednn_conv_bwd_data": "BirealOnednnConvBwdData",
            "bireal_onednn_conv_bwd_kernel": "BirealOnednnConvBwdKernel",
            "bireal_onednn_pool_fwd": "BirealOnednnPoolFwd",
            "bireal_onednn_pool_bwd": "BirealOnednnPoolBwd",
            "bireal_xor_conv_fwd": "BirealXorConvFwd"}
_HEADER_DIRS = ("/usr/include", "/usr/local/include")


def _cache_dir() -> Path:
  return Path(os.environ.get("BIREAL_JAX_CACHE", Path.home() / ".cache" / "bireal_jax"))


def _root_flags() -> list[str]:
  root = os.environ.get("BIREAL_ONEDNN_ROOT")
  if not root:
    return []
  lib = Path(root) / "lib"
  return [f"-I{Path(root) / 'include'}", f"-L{lib}", f"-Wl,-rpath,{lib}"]


def _compile(out: Path) -> None:
  """Builds the shared library into `out` atomically (concurrent test workers may race)."""
  cxx = os.environ.get("CXX", "g++")
  # -march=native: the XOR kernel's popcounts vectorise with AVX-512 where the CPU has it; the
  # library is cached per CPU model (`_library_path`).
  cmd = [cxx, "-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
         f"-I{jax.ffi.include_dir()}", *_root_flags(), *map(str, _SOURCES), "-ldnnl"]
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_out = Path(tmp) / out.name
    proc = subprocess.run(cmd + ["-o", str(tmp_out)], capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp_out, out)


def _cpu_id() -> str:
  """The CPU's model name and feature flags (Linux), else what `platform` knows."""
  try:
    info = Path("/proc/cpuinfo").read_text()
    return "\n".join(sorted({l for l in info.splitlines()
                              if l.startswith(("model name", "flags"))}))
  except OSError:
    import platform
    return platform.processor() + platform.machine()


def _library_path() -> Path:
  # Keyed by the sources, jax version (the FFI headers come from jaxlib), oneDNN location and
  # the CPU (compiled with -march=native; a shared home directory may serve several machines).
  key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES) + jax.__version__.encode()
                       + " ".join(_root_flags()).encode() + _cpu_id().encode()).hexdigest()[:16]
  return _cache_dir() / f"onednn_ops-{key}.so"


def _unavailable_reason() -> str | None:
  if os.environ.get("BIREAL_ONEDNN", "1") == "0":
    return "disabled by BIREAL_ONEDNN=0"
  dirs = _HEADER_DIRS
  if os.environ.get("BIREAL_ONEDNN_ROOT"):
    dirs = (str(Path(os.environ["BIREAL_ONEDNN_ROOT"]) / "include"),)
  if not any((Path(d) / "dnnl.hpp").exists() for d in dirs):
    return f"oneDNN headers (dnnl.hpp) not found in {', '.join(dirs)}: apt-get install libdnnl-dev"
  if shutil.which(os.environ.get("CXX", "g++")) is None:
    return "no C++ compiler (apt-get install g++)"
  return None


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when the oneDNN custom calls are built and registered for the CPU platform."""
  reason = _unavailable_reason()
  if reason is None:
    try:
      path = _library_path()
      if not path.exists():
        logging.info("bireal_jax: compiling the oneDNN custom calls into %s", path)
        _compile(path)
      # oneDNN runs on OpenMP threads; left spinning after each convolution they take the cores
      # from XLA's own threads running the fusions in between (Bi-Real-18 train step beside
      # other processes: median 1.09 s passive vs 1.98 s spinning). Read once, at libgomp load.
      os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
      lib = ctypes.cdll.LoadLibrary(str(path))
      for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name,
                                    jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
      return True
    except (OSError, RuntimeError, AttributeError) as e:
      reason = str(e)
  print(f"bireal_jax: oneDNN custom calls unavailable ({reason}); using XLA's ops",
        file=sys.stderr)
  return False


_ENABLED = [True]


def active() -> bool:
  """True when the layers should use these custom calls: `available()` and not switched off."""
  return _ENABLED[0] and available()


@contextlib.contextmanager
def enabled(on: bool):
  """Switch the oneDNN custom calls on/off for functions traced inside the block (A/B tests);
  the other CPU fast paths are unaffected (`layers.cpu_fast_paths` switches them all)."""
  old = _ENABLED[0]
  _ENABLED[0] = bool(on)
  try:
    yield
  finally:
    _ENABLED[0] = old


Pads = Tuple[Tuple[int, int], Tuple[int, int]]


def _attrs(strides, pads):
  (pt, pb), (pl, pr) = pads
  return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pt),
              pb=np.int64(pb), pl=np.int64(pl), pr=np.int64(pr))


def _call(name, out_shape, *args, strides, pads):
  return jax.ffi.ffi_call(f"bireal_onednn_conv_{name}",
                          jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(*args, **_attrs(strides, pads))


def out_hw(x_shape, k_shape, strides, pads) -> Tuple[int, int]:
  return tuple((x_shape[1 + i] + pads[i][0] + pads[i][1] - k_shape[i]) // strides[i] + 1
               for i in range(2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, k, strides, pads):
  oh, ow = out_hw(x.shape, k.shape, strides, pads)
  return _call("fwd", (x.shape[0], oh, ow, k.shape[3]), x, k, strides=strides, pads=pads)


def _conv_fwd(x, k, strides, pads):
  return _conv(x, k, strides, pads), (x, k)


def _conv_bwd(strides, pads, res, dy):
  x, k = res
  kh, kw = k.shape[:2]
  flipped_pads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
                  (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  if (strides == (1, 1) and min(min(p) for p in flipped_pads) >= 0
      and x.shape[1] * x.shape[2] >= 28 * 28):
    # Stride 1: the input gradient is a forward conv of dy with the flipped, I/O-swapped kernel;
    # oneDNN 2.6's forward kernels beat its backward-data ones at large images (56x56x64: 15 vs
    # 21 ms), while at 7x7x512 the kernel transpose costs more than it saves.
    k_t = jnp.flip(k, (0, 1)).swapaxes(2, 3)
    dx = _call("fwd", x.shape, dy, k_t, strides=strides, pads=flipped_pads)
  else:
    dx = _call("bwd_data", x.shape, dy, k, strides=strides, pads=pads)
  dk = _call("bwd_kernel", k.shape, x, dy, strides=strides, pads=pads)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads: Pads) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, strides, pads, ("NHWC", "HWIO", "NHWC"))` via oneDNN.

  f32 only, explicit padding `((top, bottom), (left, right))`, no dilation or groups; call it
  only when `available()` (the layers do) — XLA has no other lowering for it.
  """
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise TypeError(f"oneDNN conv2d takes float32 operands, got {x.dtype} and {kernel.dtype}")
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
    raise ValueError(f"expected NHWC input and HWIO kernel with matching channels, got "
                     f"{x.shape} and {kernel.shape}")
  strides = tuple(int(s) for s in strides)
  pads = tuple((int(a), int(b)) for a, b in pads)
  if min(out_hw(x.shape, kernel.shape, strides, pads)) < 1:
    raise ValueError(f"kernel {kernel.shape[:2]} with padding {pads} does not fit input "
                     f"{x.shape[1:3]}")
  return _conv(x, kernel, strides, pads)


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
  if min(out_hw(x.shape, window, strides, pads)) < 1:
    raise ValueError(f"window {window} with padding {pads} does not fit input {x.shape[1:3]}")
  return _max_pool(x, window, strides, pads)


def xor_conv(xq: jax.Array, wq: jax.Array, stride: int, pad: int) -> jax.Array:
  """`conv(xq, wq)` for xq ∈ {±1} (NHWC f32) and an HWIO f32 kernel wq = α·sign(W) (α ≥ 0 per
  output channel), equal strides and symmetric zero padding: XOR + popcount on packed sign bits
  in C++ (`csrc/xor_conv.cc`), exact. Forward only (the layers define the gradient); call it only
  when `available()`."""
  if xq.dtype != jnp.float32 or wq.dtype != jnp.float32 or xq.ndim != 4 or wq.ndim != 4 \
     or xq.shape[3] != wq.shape[2]:
    raise ValueError(f"xor_conv expects NHWC and HWIO float32 operands with matching channels, "
                     f"got {xq.dtype}{xq.shape} and {wq.dtype}{wq.shape}")
  pads = ((pad, pad), (pad, pad))
  oh, ow = out_hw(xq.shape, wq.shape, (stride, stride), pads)
  if min(oh, ow) < 1:
    raise ValueError(f"kernel {wq.shape[:2]} with padding {pad} does not fit input "
                     f"{xq.shape[1:3]}")
  return jax.ffi.ffi_call("bireal_xor_conv_fwd",
                          jax.ShapeDtypeStruct((xq.shape[0], oh, ow, wq.shape[3]), jnp.float32),
                          vmap_method="sequential")(xq, wq, stride=np.int64(stride),
                                                    pad=np.int64(pad))
