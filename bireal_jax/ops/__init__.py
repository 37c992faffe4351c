"""The backend layer: every convolution, binary convolution, max-pool and training-mode BatchNorm
that the layers and models run goes through the four operations here, and packed inference's
binary convolutions through a fifth:

    conv2d(x, w, strides, pads)                       NHWC × HWIO, explicit zero padding
    binary_conv2d(xq, wq, strides, pads)              xq ∈ {±1}, wq = α·sign(W): exact sums
    max_pool(x, window, strides, pads)                −inf padding, first-maximum gradient
    batch_norm_train(x, scale, bias, epsilon, axis_name) -> (y, mean, var)   flax's formula
    packed_conv2d(x, bits, scale, bias, residual, stride, pad)   D·scale + bias [+ residual],
                                                      D = conv(sign(x), packed ŵ), exact; no gradient

Each has a reference implementation in plain `lax` (`reference.py`), which is what GPUs and TPUs
always run, and on the CPU some faster candidates (`cpu/`: oneDNN custom calls, the C++ XOR
kernel, pure-JAX rewrites). Which one runs is set by one switch:

    with ops.implementation("reference"):   ...   # the default: plain lax (XLA's own ops)
    with ops.implementation("auto"):        ...   # opt in: fastest on this CPU and shape
    with ops.implementation({"conv2d": "onednn", "binary_conv2d": "xor"}):   # named, per op
    with ops.implementation("native"):      ...   # preset: the C++ kernels wherever they apply

or the environment variable `BIREAL_OPS` (same values; per op as `conv2d=onednn,max_pool=sliced`),
or the training config's `ops` key. CPU tuning is opt-in, as PyTorch's `cudnn.benchmark`: unless a
user (or the training job, `make demo`, the benchmarks) asks for another setting, importing
bireal_jax and tracing its layers, models or packed models runs `reference`, so nothing is
compiled, timed, written to disk or set in the environment. `ops.explain(model, x)` says which
implementation each op runs under the current setting, and why. The choice is made when a function is traced, and JAX reuses
a traced function's trace whatever the setting is later: trace a fresh function (e.g. a new
lambda) under each setting you compare.

`auto` times the candidates that apply on first use of each (op, shapes, dtype, options), on this
CPU, as cuDNN's benchmark mode does, and caches the pick in memory and on disk beside the
compiled libraries (`autotune.py`). Candidates a CPU cannot run fast are not offered to it: the
bf16 binary convs (`onednn_bf16`) only where `cpu.build.has_amx()`; a setting may still name
them. In training it times forward + backward, in inference the forward alone. The binary
convolution's backward is always the float convolution's transpose (`conv2d`, itself chosen), and
its forward is the same in training and inference, so a train-mode and an eval-mode forward
agree bit for bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from bireal_jax.ops import explain as explain_lib
from bireal_jax.ops import geometry, reference
from bireal_jax.ops.geometry import Pads, explicit_pads

OPS = ("conv2d", "binary_conv2d", "max_pool", "batch_norm_train", "packed_conv2d")
DEFAULT = "reference"  # without an opt-in (implementation(), BIREAL_OPS, config.ops)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One implementation of an op: `fn` has the op's signature; `applies(*arrays, **statics)`
  says whether it takes these operands (dtype, geometry); `available()` whether it is built;
  `timed` the `auto` modes ("train": forward + backward, "eval": forward) that time it;
  `offered()` whether `auto` considers it on this machine at all (a candidate that is not
  offered still runs where a setting names it)."""
  fn: Callable
  applies: Callable[..., bool] = lambda *a, **k: True
  available: Callable[[], bool] = lambda: True
  cpu_only: bool = True
  timed: tuple = ("train", "eval")
  offered: Callable[[], bool] = lambda: True


def _f32(*arrays) -> bool:
  return all(a.dtype == jnp.float32 for a in arrays)


def _onednn_available() -> bool:
  from bireal_jax.ops.cpu import onednn
  return onednn.available()


def _amx() -> bool:
  from bireal_jax.ops.cpu import build
  return build.has_amx()


def _xor_available() -> bool:
  from bireal_jax.ops.cpu import xor
  return xor.available()


# --- conv2d ------------------------------------------------------------------------------------

def _conv_onednn(x, w, strides, pads, input_grad="rule"):
  from bireal_jax.ops.cpu import onednn
  return onednn.conv2d(x, w, strides, pads, input_grad)


def _conv_onednn_flip_applies(x, w, strides, pads) -> bool:
  from bireal_jax.ops.cpu import onednn
  return _f32(x, w) and onednn.flip_fits(w.shape, strides, pads)


# --- binary_conv2d: forward candidates; all share the float convolution's backward ----------------

def _with_conv_backward(forward: Callable) -> Callable:
  """`forward(xq, wq, strides, pads)` with the gradient of `conv2d` (whichever it runs)."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def f(xq, wq, strides, pads):
    return forward(xq, wq, strides, pads)

  def f_fwd(xq, wq, strides, pads):
    return forward(xq, wq, strides, pads), (xq, wq)

  def f_bwd(strides, pads, res, g):
    return jax.vjp(lambda a, b: conv2d(a, b, strides, pads), *res)[1](g)

  f.defvjp(f_fwd, f_bwd)
  return f


def _binary_xor(xq, wq, strides, pads):
  from bireal_jax.ops.cpu import xor
  return xor.xor_conv(xq, wq, strides[0], pads[0][0])


def _binary_xor_jax(xq, wq, strides, pads):
  from bireal_jax.ops.cpu import binconv
  return binconv.xor_jax(xq, wq, strides, pads)


def _binary_int8(xq, wq, strides, pads):
  from bireal_jax.ops.cpu import binconv
  return binconv.int8_im2col(xq, wq, strides, pads)


def _binary_onednn_bf16(xq, wq, strides, pads):
  from bireal_jax.ops.cpu import binconv
  return binconv.onednn_bf16(xq, wq, strides, pads)


def _square(xq, wq, strides, pads) -> bool:
  return _f32(xq, wq) and geometry.is_square_symmetric(strides, pads)


# --- max_pool -------------------------------------------------------------------------------------

def _pool_sliced(x, window, strides, pads):
  from bireal_jax.ops.cpu import pool
  return pool.max_pool_sliced(x, window, strides, pads)


def _pool_onednn(x, window, strides, pads):
  from bireal_jax.ops.cpu import onednn
  return onednn.max_pool2d(x, window, strides, pads)


def _pool_onednn_applies(x, window, strides, pads) -> bool:
  from bireal_jax.ops.cpu import onednn
  return _f32(x) and onednn.pool_fits(window, pads)


# --- batch_norm_train ------------------------------------------------------------------------------

def _bn_fused(x, scale, bias, epsilon, axis_name):
  from bireal_jax.ops.cpu import batchnorm
  return batchnorm.batch_norm_train(x, scale, bias, epsilon, axis_name)


# --- packed_conv2d (inference only: packed sign bits, folded affine) --------------------------------

def _packed_reference(x, bits, scale, bias, residual=None, *, stride, pad):
  from bireal_jax.ops import bits as bits_
  y = bits_.xor_popcount_conv(x, bits, stride, pad).astype(jnp.float32) * scale + bias
  return y if residual is None else y + residual


def _packed_cpp(x, bits, scale, bias, residual=None, *, stride, pad):
  from bireal_jax.ops.cpu import packed
  return packed.packed_conv(x, bits, scale, bias, residual, stride=stride, pad=pad)


def _packed_onednn_bf16(x, bits, scale, bias, residual=None, *, stride, pad):
  from bireal_jax.ops.cpu import binconv
  return binconv.packed_onednn_bf16(x, bits, scale, bias, residual, stride=stride, pad=pad)


def _packed_cpp_available() -> bool:
  from bireal_jax.ops.cpu import packed
  return packed.available()


CANDIDATES: dict[str, dict[str, Candidate]] = {
    "conv2d": {
        "reference": Candidate(reference.conv2d, cpu_only=False),
        # One forward; the input gradient by the fixed size rule ("onednn", what `native`
        # runs), by backward-data, or by the flipped-kernel forward conv. `auto` times the
        # forward once in eval and the two pure input-gradient forms in training.
        "onednn": Candidate(_conv_onednn, lambda x, w, **_: _f32(x, w), _onednn_available,
                            timed=("eval",)),
        "onednn_bwd_data": Candidate(functools.partial(_conv_onednn, input_grad="bwd_data"),
                                     lambda x, w, **_: _f32(x, w), _onednn_available,
                                     timed=("train",)),
        "onednn_flip": Candidate(functools.partial(_conv_onednn, input_grad="flipped"),
                                 _conv_onednn_flip_applies, _onednn_available,
                                 timed=("train",)),
    },
    "binary_conv2d": {
        "reference": Candidate(_with_conv_backward(reference.binary_conv2d), cpu_only=False),
        "onednn": Candidate(_with_conv_backward(_conv_onednn), lambda x, w, **_: _f32(x, w),
                            _onednn_available),
        "xor": Candidate(_with_conv_backward(_binary_xor),
                         lambda x, w, strides, pads: _square(x, w, strides, pads),
                         _xor_available),
        "xor_jax": Candidate(_with_conv_backward(_binary_xor_jax),
                             lambda x, w, strides, pads: _square(x, w, strides, pads)),
        "int8": Candidate(_with_conv_backward(_binary_int8), lambda x, w, **_: _f32(x, w)),
        # ±1 in bf16 with f32 sums: exact. oneDNN runs it on AMX where the CPU has it; `auto`
        # times it only there (`build.has_amx`): without AMX the XOR kernels are the fast path.
        "onednn_bf16": Candidate(_with_conv_backward(_binary_onednn_bf16),
                                 lambda x, w, **_: _f32(x, w), _onednn_available, offered=_amx),
    },
    "max_pool": {
        "reference": Candidate(reference.max_pool, cpu_only=False),
        "sliced": Candidate(_pool_sliced, lambda x, **_: jnp.issubdtype(x.dtype, jnp.floating)),
        "onednn": Candidate(_pool_onednn,
                            lambda x, window, strides, pads: _pool_onednn_applies(
                                x, window, strides, pads), _onednn_available),
    },
    "batch_norm_train": {
        "reference": Candidate(reference.batch_norm_train, cpu_only=False),
        "fused_bwd": Candidate(_bn_fused, lambda x, scale, bias, **_: _f32(x, scale, bias)),
    },
    # Inference only (no gradient), so `auto` times the forward alone.
    "packed_conv2d": {
        # XLA's XOR + popcount loops (`bits.xor_popcount_conv`), then the affine and residual.
        "reference": Candidate(_packed_reference, cpu_only=False, timed=("eval",)),
        # C++: sign packing, popcount sums, affine and residual in one call, on XLA's threads.
        "xor_cpp": Candidate(_packed_cpp, lambda x, *a, **_: x.dtype == jnp.float32,
                             _packed_cpp_available, timed=("eval",)),
        # D as oneDNN's bf16 convolution of ±1 operands, f32 sums (exact); AMX CPUs only in auto.
        "onednn_bf16": Candidate(_packed_onednn_bf16, lambda x, *a, **_: x.dtype == jnp.float32,
                                 _onednn_available, timed=("eval",), offered=_amx),
    },
}

# Named settings. A tuple is an order of preference: the first candidate that applies and is
# available runs, else the reference. (A single name that applies but is not built here is an
# error instead, so a named implementation never silently falls back.)
PRESETS: dict[str, dict[str, Union[str, tuple]]] = {
    "reference": {op: "reference" for op in OPS},
    "auto": {op: "auto" for op in OPS},
    # The C++ kernels wherever they apply (what the library did on every CPU before `auto`).
    "native": {"conv2d": ("onednn", "reference"), "binary_conv2d": ("xor", "xor_jax", "int8"),
               "max_pool": ("onednn", "sliced"), "batch_norm_train": ("fused_bwd",),
               "packed_conv2d": ("xor_cpp", "reference")},
    # No custom calls: XLA's convolutions and the pure-JAX rewrites.
    "jax": {"conv2d": ("reference",), "binary_conv2d": ("xor_jax", "int8"),
            "max_pool": ("sliced",), "batch_norm_train": ("fused_bwd",),
            "packed_conv2d": ("reference",)},
}

Setting = Union[str, Mapping[str, Union[str, Sequence[str]]]]


def parse(setting: Setting) -> dict:
  """A setting (see `implementation`) as {op: "auto" | tuple of candidate names}, checked."""
  if isinstance(setting, str):
    s = setting.strip()
    if s in PRESETS:
      setting = PRESETS[s]
    elif "=" in s:
      setting = dict(kv.split("=", 1) for kv in s.split(",") if kv.strip())
      setting = {k.strip(): v.strip() for k, v in setting.items()}
    else:
      raise ValueError(f"unknown ops implementation {setting!r}: expected one of "
                       f"{sorted(PRESETS)} or 'op=name,...' with op in {list(OPS)}")
  out = {op: "auto" for op in OPS}
  for op, names in dict(setting).items():
    if op not in CANDIDATES:
      raise ValueError(f"unknown op {op!r} in ops implementation {setting!r}: expected one of "
                       f"{list(OPS)}")
    if names == "auto":
      out[op] = "auto"
      continue
    names = (names,) if isinstance(names, str) else tuple(names)
    for n in names:
      if n not in CANDIDATES[op]:
        raise ValueError(f"unknown implementation {n!r} of {op}: expected 'auto' or one of "
                         f"{sorted(CANDIDATES[op])}")
    out[op] = names
  return out


_LOCAL = threading.local()


def _current() -> dict:
  stack = getattr(_LOCAL, "stack", None)
  if stack:
    return stack[-1]
  return parse(os.environ.get("BIREAL_OPS") or DEFAULT)


def current_setting() -> dict:
  """The setting in force in this thread: {op: "auto" | tuple of candidate names}."""
  return dict(_current())


@contextlib.contextmanager
def implementation(setting: Setting):
  """Use `setting` ('auto', 'reference', a preset of `PRESETS`, or {op: name}) for functions
  traced inside the block (this thread)."""
  parsed = parse(setting)
  stack = getattr(_LOCAL, "stack", None)
  if stack is None:
    stack = _LOCAL.stack = []
  stack.append(parsed)
  try:
    yield
  finally:
    stack.pop()


def _resolve(op: str, arrays, statics) -> str:
  """The candidate `op` runs for these operands under the current setting."""
  on_cpu = jax.default_backend() == "cpu"
  choice = _current()[op]
  if not on_cpu:
    return "reference"
  if choice == "auto":
    from bireal_jax.ops import autotune
    return autotune.pick(op, arrays, statics)
  unavailable = None
  for name in choice:
    cand = CANDIDATES[op][name]
    if not cand.applies(*arrays, **statics):
      continue
    if cand.available():
      return name
    unavailable = unavailable or name
  if unavailable is not None and len(choice) == 1:  # one name asked for: say why it can't run
    raise ValueError(f"{op} implementation {unavailable!r} is not available on this machine "
                     f"(see the message above); use 'auto' or one of "
                     f"{sorted(n for n, c in CANDIDATES[op].items() if c.available())}")
  return "reference"


def applicable(op: str, arrays, statics) -> list[str]:
  """Candidates of `op` that take these operands and are available here (reference first);
  `auto` considers those of them that are `offered()` on this machine."""
  on_cpu = jax.default_backend() == "cpu"
  return [n for n, c in CANDIDATES[op].items()
          if (on_cpu or not c.cpu_only) and c.applies(*arrays, **statics) and c.available()]


def _call(op: str, arrays, statics):
  calls = explain_lib.recording()
  if calls is not None:  # inside ops.explain: record, decide nothing, build nothing
    return explain_lib.record_and_run_reference(op, arrays, statics, calls)
  name = _resolve(op, arrays, statics)
  if name.startswith("auto:"):  # auto's own custom_vjp: forward pick, forward+backward pick
    from bireal_jax.ops import autotune
    return autotune.auto_call(op, tuple(sorted(statics.items())), *arrays)
  return CANDIDATES[op][name].fn(*arrays, **statics)


def _norm_pads(pads) -> Pads:
  return tuple((int(a), int(b)) for a, b in pads)


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int], pads: Pads) -> jax.Array:
  """NHWC × HWIO convolution, explicit zero padding `((top, bottom), (left, right))`."""
  return _call("conv2d", (x, w), dict(strides=tuple(int(s) for s in strides),
                                      pads=_norm_pads(pads)))


def binary_conv2d(xq: jax.Array, wq: jax.Array, strides: Sequence[int], pads: Pads) -> jax.Array:
  """`conv2d(xq, wq)` for xq ∈ {±1} and wq = α·sign(W) with α ≥ 0 per output channel (what the
  caller guarantees), computed exactly where the candidate can (integer sums scaled by α)."""
  return _call("binary_conv2d", (xq, wq), dict(strides=tuple(int(s) for s in strides),
                                               pads=_norm_pads(pads)))


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
             pads: Pads) -> jax.Array:
  """NHWC max-pool with −inf padding; gradients to each window's first maximum (row-major)."""
  return _call("max_pool", (x,), dict(window=tuple(int(k) for k in window),
                                      strides=tuple(int(s) for s in strides),
                                      pads=_norm_pads(pads)))


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: Optional[str] = None):
  """Training-mode BatchNorm over all axes but the last, statistics averaged over `axis_name`'s
  replicas: `(y, mean, var)` with flax's fast-variance formula."""
  return _call("batch_norm_train", (x, scale, bias), dict(epsilon=float(epsilon),
                                                          axis_name=axis_name))


def packed_conv2d(x: jax.Array, bits: jax.Array, scale: jax.Array, bias: jax.Array,
                  residual: Optional[jax.Array] = None, stride: int = 1,
                  pad: int = 0) -> jax.Array:
  """Packed inference's binary conv: `float(D)·scale + bias [+ residual]` with `D = conv(sign(x),
  ŵ)` (zero padding) computed exactly from the kernel's sign bits `bits[kh, kw, ceil(C/32), O]`
  (`ops/bits.py` format); `scale`, `bias` per output channel; `residual` None or of the output's
  shape. Forward only (packed models are not trained). D is exact on every candidate; the C++
  one rounds `D·scale + bias` as one fused multiply-add, as XLA:CPU compiles the reference
  alone (inside a larger fusion XLA may not contract it: then ~1 ulp apart)."""
  arrays = (x, bits, scale, bias) + (() if residual is None else (residual,))
  return _call("packed_conv2d", arrays, dict(stride=int(stride), pad=int(pad)))


def choices() -> dict:
  """What `auto` picked so far in this process: {op: {shape key: candidate}}."""
  from bireal_jax.ops import autotune
  return autotune.choices()


def compiler_options(train: bool = True) -> dict:
  """XLA options for a jitted Bi-Real *training* step on the CPU (`{}` elsewhere or for eval).

  jaxlib 0.10 sends f32 convolutions to YNNPACK, whose weight-gradient convolutions ran far
  below the matmul rate (docs/speed.md, "Fixed choices"); these options keep dots and reductions
  on YNNPACK and give convolutions to Eigen. `auto` times its training candidates with the same
  options. Pass them as `jax.jit(step).lower(...).compile(compiler_options=ops.compiler_options())`.
  """
  if not train or jax.default_backend() != "cpu":
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type":
          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


explain = explain_lib.explain

__all__ = ["OPS", "DEFAULT", "CANDIDATES", "PRESETS", "conv2d", "binary_conv2d", "max_pool",
           "batch_norm_train", "packed_conv2d", "implementation", "current_setting", "parse",
           "choices", "applicable", "compiler_options", "explain", "explicit_pads", "geometry",
           "reference"]
