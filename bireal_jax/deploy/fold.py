"""Folding a trained float Bi-Real Net into the packed tree: α and BatchNorm → one affine.

A binary conv computes `α·D` with `D = conv(sign(x), sign(W))`, an *integer* (`α = mean|W|` per
output channel, or 1 for the "sign" quantizer); eval-mode BN then computes
`(y − μ)·γ/√(σ²+ε) + β`. Hence

    BN(α·D) = s·D + b,    s = γ·α/√(σ²+ε),    b = β − μ·γ/√(σ²+ε),

so each binary conv + BN becomes one per-channel affine on the integer `D` (exact up to float32
rounding of the folded constants). Real convs (stem, downsample, the first Bi-Real-50 1×1 conv)
keep their float32 kernel with their BN folded into `(s, b)` with `α = 1`; the classifier stays
float32. Binary kernels are stored as bits (`ops/bits.py`: `bits[kh, kw, ceil(C/32), O]`).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from bireal_jax import models, quantizers
from bireal_jax.ops.bits import pack_kernel

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")


def fold_bn(bn_params, bn_stats, eps: float, alpha=None) -> dict:
  """(s, b) with `BN(α·y) = s·y + b`: `s = γ·α/√(σ²+ε)`, `b = β − μ·γ/√(σ²+ε)` (float64 → f32)."""
  g = np.asarray(bn_params["scale"], np.float64)
  beta = np.asarray(bn_params["bias"], np.float64)
  mu = np.asarray(bn_stats["mean"], np.float64)
  var = np.asarray(bn_stats["var"], np.float64)
  mul = g / np.sqrt(var + eps)
  a = 1.0 if alpha is None else np.asarray(alpha, np.float64).reshape(-1)
  return {"scale": (mul * a).astype(np.float32), "bias": (beta - mu * mul).astype(np.float32)}


def _weight_quantizer(kernel_quantizer):
  """The kernel quantizer, checked to output α·sign(W) (its tag): α is read off its output."""
  fn = quantizers.get(kernel_quantizer)
  if quantizers.output_kind(fn) == quantizers.ALPHA_SIGN:
    return fn
  raise ValueError(f"cannot pack kernel_quantizer={kernel_quantizer!r}: expected a binary weight "
                   f"quantizer, one of {sorted(quantizers.BINARY_WEIGHTS)}")


def check_packable(model) -> dict:
  """`models.to_config(model)`, after checking that the model is binary and of a known layout."""
  cfg = models.to_config(model)
  act = cfg["activation"]
  if not (isinstance(act, str) and act in quantizers.BINARY_ACTIVATIONS):
    raise ValueError(f"cannot pack activation={act!r}: expected a binary activation, one of "
                     f"{sorted(quantizers.BINARY_ACTIVATIONS)}")
  _weight_quantizer(cfg["kernel_quantizer"])
  if cfg["block"] not in BLOCKS:
    raise ValueError(f"cannot pack block={cfg['block']!r}: expected one of {BLOCKS}")
  if cfg["stem"] not in STEMS:
    raise ValueError(f"cannot pack stem={cfg['stem']!r}: expected one of {STEMS}")
  if cfg.get("padding", "torch") != "torch":
    # The packed forward pads every conv symmetrically, as the official model; "same" pads
    # stride-2 convs on one side only (larq-zoo weights), which would give other logits.
    raise ValueError(f"cannot pack padding={cfg['padding']!r}: expected 'torch' (symmetric "
                     f"padding, the only layout the packed forward computes)")
  return cfg


def _np32(a):
  return np.asarray(a, np.float32)


def _binary_entry(kernel, bn_p, bn_s, eps, kernel_quantizer):
  kernel = jnp.asarray(kernel, jnp.float32)
  # α per output channel exactly as the float model uses it: max |α·sign(W)| = α.
  alpha = jnp.max(jnp.abs(kernel_quantizer(kernel)), axis=(0, 1, 2))
  return {"bits": np.asarray(pack_kernel(kernel)), **fold_bn(bn_p, bn_s, eps, alpha)}


def _real_entry(conv_p, bn_p=None, bn_s=None, eps=None):
  out = {"kernel": _np32(conv_p["kernel"])}
  if bn_p is not None:
    out.update(fold_bn(bn_p, bn_s, eps))
  return out


def pack_tree(cfg: dict, variables: Mapping[str, Any]) -> dict:
  """The packed tree of `variables` ({'params', 'batch_stats'}) of the model `cfg` describes:
  numpy uint32 bits, float32 real kernels and per-channel affines, keyed like the float model."""
  try:
    P, S = variables["params"], variables["batch_stats"]
  except (KeyError, TypeError):
    raise ValueError("variables must be a mapping with 'params' and 'batch_stats' (as returned "
                     f"by model.init), got keys {list(getattr(variables, 'keys', lambda: [])())}")
  eps = float(cfg["bn_epsilon"])
  ak = _weight_quantizer(cfg["kernel_quantizer"])
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
