"""The packed forward pass: the stage plan of `models/plan.py` on the packed tree (eval mode).

Four interchangeable implementations of the binary conv's integer `D` (all exact, so all give
the same logits):
  * "xor"     — `D = kh·kw·C − 2·Σ popcount(x̂ XOR ŵ)` on the stored uint32 sign bits, through
                the `ops.packed_conv2d` op (with the folded affine and the residual add): XLA's
                `lax.population_count` loops (`ops/bits.py`, the reference, GPUs/TPUs) or, on
                the CPU, the C++ kernel `ops/cpu/csrc/packed_conv.cc` (`auto` times both);
  * "xor_cpp" — the same sums by the C++ kernel of the training forward (`ops/cpu/xor.py`), on
                the ±1 kernel (α = 1);
  * "int8"    — ±1 int8 operands, `lax.conv_general_dilated(preferred_element_type=int32)`, for
                matrix units that take int8;
  * "float"   — ±1 float32 operands with float32 accumulation (exact while K < 2**24, and in
                bf16/tf32 products too, since ±1 is exact there).

Agreement with the float model: `D` is exact on every path; what differs is float rounding of
the folded affine (`s·D + b` against `BN(α·D)`, ~1e-7 relative). Where a pre-sign activation lies
within that rounding of 0 its sign can differ and the change propagates, as it does in the float
model itself between batch sizes.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bireal_jax import ops, quantizers
from bireal_jax.layers import avg_pool
from bireal_jax.models import plan
from bireal_jax.ops.bits import WORD_BITS, float_conv, int8_conv, unpack_kernel

IMPLS = ("xor", "xor_cpp", "int8", "float")


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  return impl


def default_impl(backend: Optional[str] = None) -> str:
  """The implementation `PackedModel` uses when none is given: "xor" on CPU (XLA CPU fuses the
  XOR/popcount sum into one vectorised loop), "float" elsewhere (±1 through the matrix units).
  Figures per CPU: docs/deployment.md."""
  backend = backend or jax.default_backend()
  return "xor" if backend == "cpu" else "float"


def _affine(d, e):
  return d.astype(jnp.float32) * e["scale"] + e["bias"]


def _binary(e, x, stride, pad, impl, residual=None):
  """`s·D + b [+ residual]` for one binary conv + BN; `e` holds "bits" (xor) or a ±1 "pm1"
  kernel."""
  if impl == "xor":
    return ops.packed_conv2d(x, e["bits"], e["scale"], e["bias"], residual, stride, pad)
  if impl == "xor_cpp":
    from bireal_jax.ops.cpu import xor
    d = xor.xor_conv(x, e["pm1"][:, :, :x.shape[-1]], stride, pad)  # D itself: α = 1
  else:
    k = e["pm1"][:, :, :x.shape[-1]]  # drop the channel padding of the last word, if any
    d = int8_conv(x, k, stride, pad) if impl == "int8" else float_conv(x, k, stride, pad)
  y = _affine(d, e)
  return y if residual is None else y + residual


def _real(e, x, stride, pad):
  """A real conv (stem, shortcut 1×1, Bi-Real-50's first 1×1) through `ops.conv2d`, whose CPU
  candidates (oneDNN) `auto` times against XLA's own convolution."""
  y = ops.conv2d(x, e["kernel"], (stride, stride), ((pad, pad), (pad, pad)))
  return _affine(y, e) if "scale" in e else y


def _downsample(e, x, stride):
  if stride > 1:
    x = avg_pool(x, stride)
  return _real(e, x, 1, 0)


def _basic_unit(p, u, x, impl):
  e = p[u.names[0]]
  if u.kind == "bireal":
    short = _downsample(e[u.downsample_name], x, u.stride) if u.downsample else x
    return _binary(e, x, u.stride, 1, impl, short)
  if u.kind == "pair":
    inp = x
    x = _binary(e, x, u.stride, 1, impl)
    if u.downsample:
      inp = _downsample(p[u.downsample_name], inp, u.stride)
    return _binary(p[u.names[1]], x, 1, 1, impl, inp)
  return _binary(e, x, u.stride, 1, impl)


def _bottleneck_unit(p, u, x1, x2, impl):
  """One `BiRealBottleneck`: (x1, x2) -> (x1, x2) (x1 = the inner shortcut, x2 the block's)."""
  e = p[u.name]
  if u.is_first:
    out1 = _real(e["conv1"], quantizers.leaky_clip(x2), 1, 0)
  else:
    if u.is_downsample:
      x1 = _real(e["down_conv1x1"], x1, 1, 0)
    out1 = _binary(e["conv1"], x2, 1, 0, impl, x1)
  out2 = _binary(e["conv2"], out1, u.stride, 1, impl,
                 avg_pool(out1, 2) if u.is_downsample and u.stride == 2 else out1)
  outer = _downsample(e["downsample"], x2, u.stride) if u.is_downsample else x2
  return out2, _binary(e["conv3"], out2, 1, 0, impl, outer)


def _basic_stages(cfg, p, x, impl):
  for u in plan.basic_plan(cfg["stage_sizes"], cfg["base_width"], cfg["shortcut"]):
    x = _basic_unit(p, u, x, impl)
  return x


def _bottleneck_stages(cfg, p, x, impl):
  x1 = x2 = x
  for u in plan.bottleneck_plan(cfg["stage_sizes"], cfg["base_width"]):
    x1, x2 = _bottleneck_unit(p, u, x1, x2, impl)
  return x2


def _stem(config, params, images):
  stem = params["stem"]
  x = images.astype(jnp.float32)
  if config["stem"] == "imagenet":
    return ops.max_pool(_real(stem, x, 2, 3), (3, 3), (2, 2), ((1, 1), (1, 1)))
  return _real(stem, x, 1, 1)


def _stages_and_head(config, params, x, impl):
  if config["block"] == "basic":
    x = _basic_stages(config, params, x, impl)
  else:
    x = _bottleneck_stages(config, params, x, impl)
  return _head(params, x)


def _head(params, x):
  x = jnp.mean(x, axis=(1, 2))
  return x @ params["fc"]["kernel"] + params["fc"]["bias"]


def forward_pieces(config: Mapping[str, Any], impl: str = "xor") -> list:
  """The forward cut at stage boundaries, for timing it stage by stage (experiments/
  bench_packed.py --stage_profile): `[("stem", f), ("stage1", f), ..., ("head", f)]`, each
  `f(params, state) -> state` with `params` as `forward` takes them; the first takes the images,
  the last gives the logits, and composed in order they compute `forward(config, params, images,
  impl)` (whole batch, no micro-batches)."""
  check_impl(impl)
  out = [("stem", lambda p, x: _stem(config, p, x))]
  bounds = [sum(config["stage_sizes"][:s + 1]) for s in range(len(config["stage_sizes"]))]
  if config["block"] == "basic":
    units = plan.basic_plan(config["stage_sizes"], config["base_width"], config["shortcut"])
    for s in range(len(bounds)):
      mine = [u for u in units if u.names[0].startswith(f"layer{s + 1}_")]
      out.append((f"stage{s + 1}", lambda p, x, mine=mine: functools.reduce(
          lambda h, u: _basic_unit(p, u, h, impl), mine, x)))
    out.append(("head", _head))
  else:
    units = plan.bottleneck_plan(config["stage_sizes"], config["base_width"])
    for s, (lo, hi) in enumerate(zip([0] + bounds[:-1], bounds)):
      def stage(p, state, mine=units[lo:hi]):
        x1, x2 = state if isinstance(state, tuple) else (state, state)
        for u in mine:
          x1, x2 = _bottleneck_unit(p, u, x1, x2, impl)
        return x1, x2
      out.append((f"stage{s + 1}", stage))
    out.append(("head", lambda p, state: _head(p, state[1])))
  return out


def _forward_batch(config, params, images, impl):
  return _stages_and_head(config, params, _stem(config, params, images), impl)


def _map_chunks(fn, xs, micro_batch):
  """`fn(xs)` computed `micro_batch` rows at a time (`lax.map`, then the remainder); whole if
  None."""
  n = xs.shape[0]
  if not micro_batch or n <= micro_batch:
    return fn(xs)
  full = n - n % micro_batch
  out = lax.map(fn, xs[:full].reshape(full // micro_batch, micro_batch, *xs.shape[1:]))
  out = out.reshape(full, *out.shape[2:])
  if full < n:
    out = jnp.concatenate([out, fn(xs[full:])])
  return out


def forward(config: Mapping[str, Any], params: Mapping[str, Any], images: jax.Array,
            impl: str = "xor", micro_batch: Optional[int] = None,
            stage_micro_batch: Optional[int] = None) -> jax.Array:
  """Logits of the packed model: pure JAX, jit-able (`impl` and the micro-batches static).

  `params` must be in the form `impl` expects (`runtime_params`): "bits" for "xor", a ±1
  "pm1" kernel for the others. `micro_batch=m` runs the batch `m` images at a time
  (`lax.map`), which keeps activations in cache on CPU; None runs it whole. With
  `stage_micro_batch=k` only the stem runs `m` at a time and the binary stages and head then run
  `k` at a time (the small late feature maps gain from more images per kernel, while the stem's
  large maps need few to stay in cache); None: everything `m` at a time.
  """
  check_impl(impl)
  if images.ndim != 4:
    raise ValueError(f"expected NHWC images of rank 4, got shape {tuple(images.shape)}")
  k = params["stem"]["kernel"]
  if images.shape[-1] != k.shape[2]:
    raise ValueError(f"images have {images.shape[-1]} channels but the stem kernel "
                     f"{tuple(k.shape)} expects {k.shape[2]}")
  for name, m in (("micro_batch", micro_batch), ("stage_micro_batch", stage_micro_batch)):
    if m is not None and m < 1:
      raise ValueError(f"{name} must be a positive int or None, got {m!r}")
  if stage_micro_batch is None:
    return _map_chunks(lambda xs: _forward_batch(config, params, xs, impl), images, micro_batch)
  x = _map_chunks(lambda xs: _stem(config, params, xs), images, micro_batch)
  return _map_chunks(lambda xs: _stages_and_head(config, params, xs, impl), x, stage_micro_batch)


def _is_binary_entry(e) -> bool:
  return isinstance(e, Mapping) and "bits" in e


def runtime_params(params: Mapping[str, Any], impl: str) -> dict:
  """Convert the stored tree to what `impl` consumes (done once, not per call).

  "xor" keeps the bits; "xor_cpp" (f32), "int8" and "float" unpack them to a ±1 HWIO kernel
  "pm1" of the padded channel count (sliced to the input's channels at trace time).
  """
  check_impl(impl)

  def conv(e):
    if not isinstance(e, Mapping):
      return e
    if not _is_binary_entry(e):
      return {k: conv(v) for k, v in e.items()}
    if impl == "xor":
      return dict(e)
    bits = jnp.asarray(e["bits"])
    dtype = jnp.int8 if impl == "int8" else jnp.float32
    if impl == "xor_cpp":
      from bireal_jax.ops.cpu import xor
      if not xor.available():
        raise ValueError("impl 'xor_cpp' needs the C++ XOR kernel, which could not be built "
                         "here (see the message above); use 'xor'")
    pm1 = unpack_kernel(bits, bits.shape[2] * WORD_BITS, dtype)
    return {**{k: v for k, v in e.items() if k != "bits"}, "pm1": pm1}

  return conv(params)
