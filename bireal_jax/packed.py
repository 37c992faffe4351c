"""Packed 1-bit inference for Bi-Real Net: fold, pack to bits, export, load, run with XOR/popcount.

What is folded (exactly, up to float32 rounding of the folded constants). A binary conv computes
`α·D` with `D = conv(sign(x), sign(W))`, an *integer* (`α = mean|W|` per output channel, or 1 for
the "sign" quantizer); eval-mode BN then computes `(y − μ)·γ/√(σ²+ε) + β`. Hence

    BN(α·D) = s·D + b,    s = γ·α/√(σ²+ε),    b = β − μ·γ/√(σ²+ε),

so each binary conv + BN becomes one per-channel affine on the integer `D`. Real convs (stem,
downsample, the first Bi-Real-50 1×1 conv) keep their float32 kernel with their BN folded into an
affine `(s, b)` with `α = 1`; the classifier stays float32.

Bit format and the exact binary convolution `D = kh·kw·C − 2·Σ popcount(x̂ XOR ŵ) − border
correction`: `bireal_jax/ops/bits.py` (shared with the training forward). Kernels are stored as
`bits[kh, kw, ceil(C/32), O]`.

Four interchangeable implementations of `D` (all exact integers, so all give the same logits):
  * "xor"   — the formula above with `lax.population_count` on uint32 words;
  * "xor_cpp" — the same sums by the C++ kernel of the training forward (`ops/cpu/xor.py`:
              AVX-512 VPOPCNTDQ or AVX2 nibble-table popcount), on the ±1 kernel (α = 1);
  * "int8"  — ±1 int8 operands, `lax.conv_general_dilated(preferred_element_type=int32)`, for
              matrix units that take int8;
  * "float" — ±1 float32 operands with float32 accumulation (exact while K < 2**24; stays exact
              when a backend computes the products in bf16/tf32, since ±1 is exact there).
`default_impl()` picks per backend (see there for what was measured). On CPU, `PackedModel`
also splits a batch into `default_streams()` chunks that run concurrently (XLA CPU runs this
forward's kernels one at a time), cut at micro-batch boundaries so that the logits are bitwise
those of one call.

Agreement with the float model. `D` is exact on every path; what differs is float rounding of
the folded affine (`s·D + b` against `BN(α·D)`, ~1e-7 relative). Where a pre-sign activation lies
within that rounding of 0 its sign can differ and the change propagates; the float model itself
does this between batch sizes (whole batch vs `lax.map` chunks: max |Δlogit| 1.2 at batch 32,
224², same top-1). The tests check logits and top-1 on tiny models with random variables.

On disk (`export`): a directory with `config.json` (`models.to_config`), `packed.json` (format
name, version, bit layout) and `params/`, an Orbax checkpoint of the packed tree (uint32 bits,
float32 kernels and affines). `load` needs only bireal_jax and orbax.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bireal_jax import models, ops, quantizers
from bireal_jax.models import plan
from bireal_jax.layers import _avg_pool
from bireal_jax.ops.bits import (WORD_BITS, _conv, border_correction, float_conv,  # noqa: F401
                                 int8_conv, num_words, pack_bits, pack_kernel, pack_signs,
                                 unpack_bits, unpack_kernel, unpack_signs, word_group,
                                 xor_popcount_conv)

FORMAT = "bireal_jax.packed"
FORMAT_VERSION = 1
IMPLS = ("xor", "xor_cpp", "int8", "float")
CONFIG_FILE = "config.json"
PACKED_FILE = "packed.json"
PARAMS_DIR = "params"


# ---------------------------------------------------------------------------------------------
# Folding a trained float model into the packed tree
# ---------------------------------------------------------------------------------------------


def _fold_bn(bn_params, bn_stats, eps: float, alpha=None):
  """(s, b) with `BN(α·y) = s·y + b`: `s = γ·α/√(σ²+ε)`, `b = β − μ·γ/√(σ²+ε)` (float64 → f32)."""
  g = np.asarray(bn_params["scale"], np.float64)
  beta = np.asarray(bn_params["bias"], np.float64)
  mu = np.asarray(bn_stats["mean"], np.float64)
  var = np.asarray(bn_stats["var"], np.float64)
  mul = g / np.sqrt(var + eps)
  a = 1.0 if alpha is None else np.asarray(alpha, np.float64).reshape(-1)
  return {"scale": (mul * a).astype(np.float32), "bias": (beta - mu * mul).astype(np.float32)}


def _weight_alpha_kind(kernel_quantizer):
  """The kernel quantizer, checked to output α·sign(W) (its tag): α is read off its output."""
  fn = quantizers.get(kernel_quantizer)
  if quantizers.output_kind(fn) == quantizers.ALPHA_SIGN:
    return fn
  raise ValueError(f"cannot pack kernel_quantizer={kernel_quantizer!r}: expected a binary weight "
                   f"quantizer, one of {sorted(quantizers.BINARY_WEIGHTS)}")


def _check_packable(model) -> dict:
  cfg = models.to_config(model)
  act = cfg["activation"]
  if not (isinstance(act, str) and act in quantizers.BINARY_ACTIVATIONS):
    raise ValueError(f"cannot pack activation={act!r}: expected a binary activation, one of "
                     f"{sorted(quantizers.BINARY_ACTIVATIONS)}")
  _weight_alpha_kind(cfg["kernel_quantizer"])
  if cfg["block"] not in ("basic", "bottleneck"):
    raise ValueError(f"cannot pack block={cfg['block']!r}: expected 'basic' or 'bottleneck'")
  if cfg["stem"] not in ("imagenet", "small"):
    raise ValueError(f"cannot pack stem={cfg['stem']!r}: expected 'imagenet' or 'small'")
  return cfg


def _np32(a):
  return np.asarray(a, np.float32)


def _binary_entry(kernel, bn_p, bn_s, eps, kernel_quantizer):
  kernel = jnp.asarray(kernel, jnp.float32)
  # α per output channel exactly as the float model uses it: max |α·sign(W)| = α.
  alpha = jnp.max(jnp.abs(kernel_quantizer(kernel)), axis=(0, 1, 2))
  return {"bits": np.asarray(pack_kernel(kernel)), **_fold_bn(bn_p, bn_s, eps, alpha)}


def _real_entry(conv_p, bn_p=None, bn_s=None, eps=None):
  out = {"kernel": _np32(conv_p["kernel"])}
  if bn_p is not None:
    out.update(_fold_bn(bn_p, bn_s, eps))
  return out


def _pack_tree(cfg: dict, variables: Mapping[str, Any]) -> dict:
  try:
    P, S = variables["params"], variables["batch_stats"]
  except (KeyError, TypeError):
    raise ValueError("variables must be a mapping with 'params' and 'batch_stats' (as returned "
                     f"by model.init), got keys {list(getattr(variables, 'keys', lambda: [])())}")
  eps = float(cfg["bn_epsilon"])
  ak = _weight_alpha_kind(cfg["kernel_quantizer"])
  out = {"stem": _real_entry(P["conv1"], P["bn1"], S["bn1"], eps),
         "fc": {"kernel": _np32(P["fc"]["kernel"]), "bias": _np32(P["fc"]["bias"])}}
  for name in P:
    if name in ("conv1", "bn1", "fc"):
      continue
    p, s = P[name], S.get(name, {})
    if cfg["block"] == "basic" and name.startswith("layer") and name.endswith("_downsample"):
      out[name] = _real_entry(p["conv"], p["bn"], s["bn"], eps)
    elif cfg["block"] == "basic" and name.startswith("layer"):
      e = _binary_entry(p["binary_conv"]["kernel"], p["bn1"], s["bn1"], eps, ak)
      if "downsample" in p:
        d, ds = p["downsample"], s["downsample"]
        e["downsample"] = _real_entry(d["conv"], d["bn"], ds["bn"], eps)
      out[name] = e
    elif cfg["block"] == "bottleneck" and name.startswith("layers_"):
      e = {}
      if name == "layers_0":  # the first block's 1×1 conv is real (leaky_clip input)
        e["conv1"] = _real_entry(p["conv1"], p["bn1"], s["bn1"], eps)
      else:
        e["conv1"] = _binary_entry(p["conv1"]["kernel"], p["bn1"], s["bn1"], eps, ak)
      e["conv2"] = _binary_entry(p["conv2"]["kernel"], p["bn2"], s["bn2"], eps, ak)
      e["conv3"] = _binary_entry(p["conv3"]["kernel"], p["bn3"], s["bn3"], eps, ak)
      if "down_conv1x1" in p:
        e["down_conv1x1"] = _real_entry(p["down_conv1x1"])
      if "downsample" in p:
        d, ds = p["downsample"], s["downsample"]
        e["downsample"] = _real_entry(d["conv"], d["bn"], ds["bn"], eps)
      out[name] = e
    else:
      raise ValueError(f"unexpected parameter group {name!r} for block={cfg['block']!r}")
  return out


# ---------------------------------------------------------------------------------------------
# Forward pass on the packed tree (mirrors models.BiRealNet in eval mode)
# ---------------------------------------------------------------------------------------------


def _affine(d, e):
  return d.astype(jnp.float32) * e["scale"] + e["bias"]


def _binary(e, x, stride, pad, impl):
  """`s·D + b` for one binary conv + BN; `e` holds "bits" (xor) or a ±1 "kernel" (int8/float)."""
  if impl == "xor":
    d = xor_popcount_conv(x, e["bits"], stride, pad)
  elif impl == "xor_cpp":
    from bireal_jax.ops.cpu import xor
    d = xor.xor_conv(x, e["pm1"][:, :, :x.shape[-1]], stride, pad)  # D itself: α = 1
  else:
    k = e["pm1"][:, :, :x.shape[-1]]  # drop the channel padding of the last word, if any
    d = int8_conv(x, k, stride, pad) if impl == "int8" else float_conv(x, k, stride, pad)
  return _affine(d, e)


def _real(e, x, stride, pad):
  y = _conv(x, e["kernel"], stride, pad)
  return _affine(y, e) if "scale" in e else y


def _downsample(e, x, stride):
  if stride > 1:
    x = _avg_pool(x, stride)
  return _real(e, x, 1, 0)


def _basic_stages(cfg, p, x, impl):
  for u in plan.basic_plan(cfg["stage_sizes"], cfg["base_width"], cfg["shortcut"]):
    e = p[u.names[0]]
    if u.kind == "bireal":
      y = _binary(e, x, u.stride, 1, impl)
      x = y + (_downsample(e[u.downsample_name], x, u.stride) if u.downsample else x)
    elif u.kind == "pair":
      inp = x
      x = _binary(e, x, u.stride, 1, impl)
      x = _binary(p[u.names[1]], x, 1, 1, impl)
      if u.downsample:
        inp = _downsample(p[u.downsample_name], inp, u.stride)
      x = x + inp
    else:
      x = _binary(e, x, u.stride, 1, impl)
  return x


def _bottleneck_stages(cfg, p, x, impl):
  x1 = x2 = x
  for u in plan.bottleneck_plan(cfg["stage_sizes"], cfg["base_width"]):
    e = p[u.name]
    if u.is_first:
      out1 = _real(e["conv1"], quantizers.leaky_clip(x2), 1, 0)
    else:
      out1 = _binary(e["conv1"], x2, 1, 0, impl)
      if u.is_downsample:
        x1 = _real(e["down_conv1x1"], x1, 1, 0)
      out1 = out1 + x1
    out2 = _binary(e["conv2"], out1, u.stride, 1, impl)
    out2 = out2 + (_avg_pool(out1, 2) if u.is_downsample and u.stride == 2 else out1)
    out3 = _binary(e["conv3"], out2, 1, 0, impl)
    outer = _downsample(e["downsample"], x2, u.stride) if u.is_downsample else x2
    x1, x2 = out2, out3 + outer
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
  x = jnp.mean(x, axis=(1, 2))
  return x @ params["fc"]["kernel"] + params["fc"]["bias"]


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
  "pm1" kernel for "int8" / "float". `micro_batch=m` runs the batch `m` images at a time
  (`lax.map`), which keeps activations in cache on CPU; None runs it whole. With
  `stage_micro_batch=k` only the stem runs `m` at a time and the binary stages and head then run
  `k` at a time (on CPU the small late feature maps gain from more images per kernel, while the
  stem's 112² maps need few to stay in cache); None: everything `m` at a time.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
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
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

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


def default_impl(backend: Optional[str] = None) -> str:
  """Fastest exact implementation per backend.

  CPU: "xor" (XLA CPU fuses the XOR/popcount sum into one loop vectorised with AVX-512
  VPOPCNTD). Bi-Real-18 at 224² on 2 shared EPYC cores, medians of 7 interleaved rounds at load
  ~5.5: batch 1 "xor" 3.3 ms, "int8" 15.5 ms, "float" 21.9 ms (float Flax model 22.1 ms); batch
  32 "xor" 332 img/s, "int8" 67, "float" 40 (float Flax model 37). At load ~8 (other sessions'
  training) the same run gave 7.4 ms and 150 img/s for "xor": the figures follow the load. See
  experiments/bench_packed.py.
  Accelerators: "float" (±1 through the matrix units; not measured here — no GPU/TPU on the
  development machine).
  """
  backend = backend or jax.default_backend()
  return "xor" if backend == "cpu" else "float"


def default_micro_batch(backend: Optional[str] = None) -> Optional[int]:
  """CPU: MICRO_BATCH_CPU images per step (activations stay in cache); else None (whole batch)."""
  return MICRO_BATCH_CPU if (backend or jax.default_backend()) == "cpu" else None


def default_stage_micro_batch(backend: Optional[str] = None) -> Optional[int]:
  """CPU: STAGE_MICRO_BATCH_CPU images per step of the binary stages; else None (as the stem)."""
  return STAGE_MICRO_BATCH_CPU if (backend or jax.default_backend()) == "cpu" else None


# Bi-Real-18 at 224², batch 32, 2 streams, one loop for stem and stages: micro-batch 1, 2, 4 gave
# 309, 331, 261 images per CPU-second (medians of 7 interleaved rounds, load ~5.5)
MICRO_BATCH_CPU = 2
# Bi-Real-18 at 224², 16 images (one stream's share of 32): stem 2 at a time and then the stages
# 2, 4, 8 at a time gave 328, 362, 349 images per CPU-second (one 2-at-a-time loop: 322)
STAGE_MICRO_BATCH_CPU = 4


def compiler_options(backend: Optional[str] = None) -> dict:
  """XLA options for jitting `forward`. CPU: 512-bit vectors (`xla_cpu_prefer_vector_width`),
  which made the XOR/popcount loops ~1.8× faster with AVX-512 VPOPCNTD (XLA CPU defaults to
  256-bit); applied to this jit only. Pass them to your own `jax.jit(..., compiler_options=...)`
  when you call a PackedModel inside it. Other backends: none."""
  return {"xla_cpu_prefer_vector_width": 512} if (backend or jax.default_backend()) == "cpu" else {}


def _forward_static(cfg_json, impl, micro_batches, params, images):
  return forward(json.loads(cfg_json), params, images, impl, *micro_batches)


_JITTED: dict = {}


def _jitted():
  backend = jax.default_backend()
  if backend not in _JITTED:
    _JITTED[backend] = jax.jit(_forward_static, static_argnums=(0, 1, 2),
                               compiler_options=compiler_options(backend) or None)
  return _JITTED[backend]


def _jit_forward(*args):
  if any(isinstance(l, jax.core.Tracer) for l in jax.tree.leaves(args[3:])):
    return _forward_static(*args)  # inside the caller's jit: its compiler options apply
  return _jitted()(*args)


def default_streams(backend: Optional[str] = None) -> int:
  """CPU: the usable cores (at most MAX_STREAMS_CPU); other backends: 1.

  XLA CPU runs the packed forward's kernels one after another (profile of Bi-Real-18, batch 32,
  2-core EPYC: two threads busy at once for 1 ms of 482 ms of kernel time; the 7×7 stem conv
  too), so the batch is split into this many chunks run concurrently (`split_streams`); with 2
  streams both threads were busy for 325 of 387 ms. This buys time only where the cores are
  free: on a machine shared with other sessions, the kernel's per-session fair share (autogroup)
  stays the same whatever the thread count."""
  if (backend or jax.default_backend()) != "cpu":
    return 1
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    cores = os.cpu_count() or 1
  return max(1, min(cores, MAX_STREAMS_CPU))


MAX_STREAMS_CPU = 8  # beyond this, chunks of a typical eval batch get too small to pay off

_POOL: list = []


def split_streams(n: int, streams: int, micro_batch: Optional[int]) -> list[tuple[int, int]]:
  """`[(start, stop), ...]`: at most `streams` contiguous chunks of `n` images, cut at multiples
  of `micro_batch`, so that every image lands in the same micro-batch as in one whole call (the
  logits are then bitwise those of one call)."""
  unit = micro_batch or 1
  units = -(-n // unit)
  k = max(1, min(streams, units))
  bounds = [min(n, (units * i // k) * unit) for i in range(k + 1)]
  return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _run_streams(cfg_json, impl, mbs, params, images, streams):
  """`_jit_forward` on `split_streams` chunks, one Python thread each (XLA releases the GIL while
  it computes), concatenated in order."""
  unit = math.lcm(*(m or 1 for m in mbs))  # whole micro-batches of every phase per stream
  chunks = split_streams(images.shape[0], streams, unit)
  fwd = _jitted()  # created here, not by racing threads
  if len(chunks) == 1:
    return fwd(cfg_json, impl, mbs, params, images)
  if not _POOL or _POOL[0]._max_workers < len(chunks):
    from concurrent.futures import ThreadPoolExecutor
    if _POOL:
      _POOL[0].shutdown(wait=False)
    _POOL[:] = [ThreadPoolExecutor(len(chunks), thread_name_prefix="bireal_packed")]

  def run(ab):
    return jax.block_until_ready(fwd(cfg_json, impl, mbs, params, images[ab[0]:ab[1]]))

  return jnp.concatenate(list(_POOL[0].map(run, chunks)))


# ---------------------------------------------------------------------------------------------
# PackedModel, pack / export / load
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class PackedModel:
  """A packed Bi-Real Net: `PackedModel(images) -> float32 logits [batch, classes]`.

  `config` is `models.to_config` of the float model, `params` the packed tree (uint32 bits,
  float32 real kernels and per-channel affines). `impl` selects how binary convs are computed
  (`IMPLS`; None = `default_impl()`). A pytree, so it can be passed through `jax.jit`.
  """

  def __init__(self, config: Mapping[str, Any], params: Mapping[str, Any],
               impl: Optional[str] = None, micro_batch: Optional[int] = None):
    if impl is not None and impl not in IMPLS:
      raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    self.config = dict(config)
    self.params = params
    self.impl = impl
    self.micro_batch = micro_batch
    self._runtime: dict[str, Any] = {}
    self._cfg_json = json.dumps(self.config, sort_keys=True)

  def tree_flatten(self):
    return (self.params,), (self._cfg_json, self.impl, self.micro_batch)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(json.loads(aux[0]), children[0], aux[1], aux[2])

  def runtime_params(self, impl: str):
    """Parameters converted for `impl`, cached (unless traced, e.g. inside a user's jit)."""
    if impl in self._runtime:
      return self._runtime[impl]
    rp = runtime_params(self.params, impl)
    if not any(isinstance(l, jax.core.Tracer) for l in jax.tree.leaves(self.params)):
      rp = jax.device_put(rp)  # once, not a host-to-device copy per call
      self._runtime[impl] = rp
    return rp

  def __call__(self, images: jax.Array, impl: Optional[str] = None,
               micro_batch: Optional[int] = None, streams: Optional[int] = None,
               stage_micro_batch: Optional[int] = None) -> jax.Array:
    """Logits for NHWC `images`. `micro_batch` / `stage_micro_batch` as in `forward` (None =
    the per-backend defaults); `streams` chunks of the batch run concurrently (None =
    `default_streams()`: the cores on CPU, 1 elsewhere); inside a jit it is one computation."""
    impl = impl or self.impl or default_impl()
    mbs = (micro_batch or self.micro_batch or default_micro_batch(),
           stage_micro_batch or default_stage_micro_batch())
    params = self.runtime_params(impl)
    images = jnp.asarray(images)
    if any(isinstance(l, jax.core.Tracer) for l in jax.tree.leaves((params, images))):
      return _jit_forward(self._cfg_json, impl, mbs, params, images)
    return _run_streams(self._cfg_json, impl, mbs, params, images, streams or default_streams())

  def num_bytes(self) -> int:
    """Bytes of the stored parameters (what `export` writes, before container overhead)."""
    return int(sum(np.asarray(l).nbytes for l in jax.tree.leaves(self.params)))


def pack(model, variables: Mapping[str, Any], impl: Optional[str] = None) -> PackedModel:
  """Fold α and BN into per-channel affines and pack binary kernels: trained model -> PackedModel.

  `model` must use a binary activation and a binary kernel quantizer (`quantizers.BINARY_*`).
  The packed model computes in float32 (a `model.dtype=bfloat16` model matches only to bf16
  tolerance).
  """
  cfg = _check_packable(model)
  tree = _pack_tree(cfg, variables)
  return PackedModel(cfg, jax.tree.map(np.asarray, tree), impl)


def export(path: str, model, variables: Mapping[str, Any]) -> PackedModel:
  """Pack `model`/`variables` and write the inference checkpoint directory `path`.

  Layout: `path/config.json` (`models.to_config`), `path/packed.json` (format, version, bit
  layout), `path/params/` (Orbax StandardCheckpointer). `path` must not exist yet.
  """
  import orbax.checkpoint as ocp

  pm = pack(model, variables)
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    raise FileExistsError(f"export path {path!r} already exists; expected a new directory")
  os.makedirs(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, PARAMS_DIR), pm.params)
    ckptr.wait_until_finished()
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(pm.config, f, indent=1, sort_keys=True)
  meta = {"format": FORMAT, "version": FORMAT_VERSION, "word_bits": WORD_BITS,
          "bit_order": "channel c -> bit c % 32 of word c // 32; bit 1 = -1, bit 0 = +1",
          "kernel_bits_layout": "[kh, kw, ceil(C/32), O] uint32"}
  with open(os.path.join(path, PACKED_FILE), "w") as f:
    json.dump(meta, f, indent=1)
  return pm


def load(path: str, impl: Optional[str] = None) -> PackedModel:
  """Read an `export`ed directory back into a `PackedModel` (needs only bireal_jax + orbax)."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  try:
    with open(os.path.join(path, PACKED_FILE)) as f:
      meta = json.load(f)
    with open(os.path.join(path, CONFIG_FILE)) as f:
      cfg = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path!r} is not a packed export: missing {e.filename}") from None
  if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path!r}: format {meta.get('format')!r} v{meta.get('version')!r}, expected "
                     f"{FORMAT!r} v{FORMAT_VERSION}")
  if meta.get("word_bits") != WORD_BITS:
    raise ValueError(f"{path!r}: word_bits={meta.get('word_bits')!r}, expected {WORD_BITS}")
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(path, PARAMS_DIR))
  tree = jax.tree.map(np.asarray, tree)
  return PackedModel(cfg, tree, impl)


def directory_bytes(path: str) -> int:
  """Total size of the files under `path` (what an export occupies on disk, by file size)."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


__all__ = ["WORD_BITS", "IMPLS", "PackedModel", "pack", "export", "load", "forward",
           "runtime_params", "default_impl", "default_micro_batch", "default_stage_micro_batch",
           "default_streams", "split_streams", "pack_bits", "unpack_bits", "pack_signs",
           "unpack_signs", "pack_kernel", "unpack_kernel", "xor_popcount_conv", "int8_conv",
           "float_conv", "border_correction", "directory_bytes"]
