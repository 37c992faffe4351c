"""Model registry: `bireal_jax.models.get("bireal18", num_classes=10, stem="small")`.

Names: bireal18, bireal34, bireal50, bireal152, and their real-valued clip twins with the
suffix `_real` (activation hardtanh, real kernels, same parameter tree). Keyword arguments
override any `BiRealNet` attribute.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from bireal_jax.models.bireal import BiRealNet

ARCHS: dict[str, dict[str, Any]] = {
    "bireal18": dict(stage_sizes=(4, 4, 4, 4), block="basic"),
    "bireal34": dict(stage_sizes=(6, 8, 12, 6), block="basic"),
    "bireal50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "bireal152": dict(stage_sizes=(3, 8, 36, 3), block="bottleneck"),
}
REAL_TWIN = dict(activation="hardtanh", kernel_quantizer=None)
FIELDS = {f.name for f in dataclasses.fields(BiRealNet)} - {"parent", "name"}


def names() -> list[str]:
  return sorted(list(ARCHS) + [f"{n}_real" for n in ARCHS])


def _dtype(v):
  return jnp.dtype(v) if isinstance(v, str) else v


def get(name: str, **overrides: Any) -> BiRealNet:
  """Build a registered model; `overrides` set any `BiRealNet` attribute."""
  base, real = (name[:-5], True) if name.endswith("_real") else (name, False)
  if base not in ARCHS:
    raise ValueError(f"unknown model {name!r}; expected one of {names()}")
  unknown = set(overrides) - FIELDS
  if unknown:
    raise ValueError(f"unknown model option(s) {sorted(unknown)} for {name!r}; "
                     f"expected some of {sorted(FIELDS)}")
  kw = dict(ARCHS[base], **(REAL_TWIN if real else {}), **overrides)
  for k in ("dtype", "param_dtype"):
    if k in kw:
      kw[k] = _dtype(kw[k])
  return BiRealNet(**kw)


def to_config(model: BiRealNet) -> dict[str, Any]:
  """JSON-able description of `model` (inverse of `from_config`)."""
  cfg = {}
  for f in sorted(FIELDS):
    v = getattr(model, f)
    if f in ("dtype", "param_dtype"):
      v = jnp.dtype(v).name
    elif isinstance(v, tuple):
      v = list(v)
    elif callable(v):
      raise ValueError(f"model attribute {f}={v!r} is a callable and cannot be serialised")
    cfg[f] = v
  return cfg


def from_config(cfg: dict[str, Any]) -> BiRealNet:
  """Rebuild a model from `to_config` output."""
  unknown = set(cfg) - FIELDS
  if unknown:
    raise ValueError(f"unknown model option(s) {sorted(unknown)}; expected some of {sorted(FIELDS)}")
  kw = dict(cfg)
  if "stage_sizes" in kw:
    kw["stage_sizes"] = tuple(kw["stage_sizes"])
  for k in ("dtype", "param_dtype"):
    if k in kw:
      kw[k] = _dtype(kw[k])
  return BiRealNet(**kw)


__all__ = ["BiRealNet", "get", "names", "to_config", "from_config", "REAL_TWIN"]
