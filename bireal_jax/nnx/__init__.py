"""Bi-Real Net as native Flax NNX modules (twins of the Linen layers and models).

    from flax import nnx
    import optax
    import bireal_jax.nnx as bnnx

    model = bnnx.get("bireal18", num_classes=10, stem="small", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    model.train()  # BatchNorm on batch statistics (the default for a new model)
    model.eval()   # BatchNorm on running statistics

`BinaryConv`, `BatchNorm`, `BiRealBlock`, `BiRealBottleneck` and `BiRealNet` compute through the
same quantizers and backend ops (`bireal_jax.ops`) as the Linen modules and keep the same variable
names and shapes, so Linen variables `{"params": ..., "batch_stats": ...}` (a training export, a
converter output, `module.init`) load with `from_linen_variables` and come back with
`to_linen_variables`. `from_linen(linen_module, variables)` builds the NNX twin of a Linen model
(and loads its variables), `to_linen(model)` goes the other way. Importing this package does not
import TensorFlow.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util
from flax.core import unfreeze

from bireal_jax import models as _models
from bireal_jax.nnx.bireal import BiRealNet
from bireal_jax.nnx.layers import (BatchNorm, BinaryConv, BiRealBlock, BiRealBottleneck, Conv,
                                   Downsample, batch_statistics)

# Linen collection <-> NNX variable type.
COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))
_FIELDS = tuple(sorted(_models.FIELDS))


def names() -> list[str]:
  """Registered model names (as `bireal_jax.models.names()`)."""
  return _models.names()


def get(name: str, *, in_features: int = 3, rngs: Optional[nnx.Rngs] = None,
        use_running_average: bool = False, **overrides: Any) -> BiRealNet:
  """NNX twin of `bireal_jax.models.get(name, **overrides)`, initialised from `rngs`
  (default `nnx.Rngs(0)`)."""
  return from_linen(_models.get(name, **overrides), in_features=in_features, rngs=rngs,
                    use_running_average=use_running_average)


def _fields(module) -> dict[str, Any]:
  return {f: getattr(module, f) for f in _FIELDS}


def from_linen(module: _models.BiRealNet, variables: Optional[Mapping[str, Any]] = None, *,
               in_features: Optional[int] = None, rngs: Optional[nnx.Rngs] = None,
               use_running_average: bool = False) -> BiRealNet:
  """The NNX `BiRealNet` with the options of the Linen `module`.

  With `variables` (Linen `{"params", "batch_stats"}`) the model is built abstractly (no random
  init) and the variables loaded; `in_features` is then read from `conv1`'s kernel. Without, the
  parameters are initialised from `rngs` and `in_features` defaults to 3.
  """
  if not isinstance(module, _models.BiRealNet):
    raise TypeError(f"expected a Linen bireal_jax.models.BiRealNet, got {type(module).__name__}")
  kw = _fields(module)
  if variables is None:
    return BiRealNet(**kw, in_features=3 if in_features is None else in_features,
                     use_running_average=use_running_average, rngs=rngs)
  try:
    cin = int(variables["params"]["conv1"]["kernel"].shape[2])
  except (KeyError, TypeError, IndexError, AttributeError) as e:
    raise ValueError("variables['params']['conv1']['kernel'] (HWIO) is needed to build the "
                     "model") from e
  if in_features is not None and in_features != cin:
    raise ValueError(f"in_features={in_features} but the conv1 kernel expects {cin} channels")
  key = jax.random.key(0, impl="rbg")
  model = nnx.eval_shape(lambda: BiRealNet(**kw, in_features=cin,
                                           use_running_average=use_running_average,
                                           rngs=_FixedKey(key)))
  return from_linen_variables(model, variables)


class _FixedKey:
  """Stands in for `nnx.Rngs` when every value is replaced right after (abstract build): the
  layers only call `rngs.params()`, and a real `Rngs` would trace its counter under
  `nnx.eval_shape` at a cost of seconds for the deep models."""

  def __init__(self, key):
    self._key = key

  def params(self):
    return self._key


def to_linen(model: BiRealNet) -> _models.BiRealNet:
  """The Linen `BiRealNet` with `model`'s options (apply it to `to_linen_variables(model)`)."""
  return _models.BiRealNet(**_fields(model))


def to_config(model: BiRealNet) -> dict[str, Any]:
  """JSON-able options of `model`, as `bireal_jax.models.to_config` writes them."""
  return _models.to_config(to_linen(model))


def from_config(cfg: Mapping[str, Any], variables: Optional[Mapping[str, Any]] = None,
                **kw: Any) -> BiRealNet:
  """`from_linen(models.from_config(cfg), variables, **kw)`, e.g. for a training export's
  `model.json` or a converter's output directory."""
  return from_linen(_models.from_config(dict(cfg)), variables, **kw)


def to_linen_variables(model: nnx.Module) -> dict[str, Any]:
  """`{"params": ..., "batch_stats": ...}` of an NNX model as Linen variable dicts."""
  out = {col: nnx.to_pure_dict(nnx.state(model, t)) for col, t in COLLECTIONS}
  return {col: v for col, v in out.items() if v}


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(unfreeze(tree)) if tree else {}


def from_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
  """Load Linen variables into `model` in place (and return it).

  Trees and shapes must match the model's exactly (an error names the first differing paths);
  values are cast to the dtypes of the model's variables.
  """
  unknown = set(variables) - {c for c, _ in COLLECTIONS}
  if unknown:
    raise ValueError(f"unknown variable collection(s) {sorted(unknown)}: expected 'params' and "
                     f"'batch_stats'")
  updates = []
  for col, var_type in COLLECTIONS:
    state = nnx.state(model, var_type)
    cur = _flat(nnx.to_pure_dict(state))
    new = _flat(variables.get(col, {}))
    diff = sorted("/".join(map(str, k)) for k in cur.keys() ^ new.keys())
    diff += sorted("/".join(map(str, k)) + f" {tuple(new[k].shape)} vs {tuple(cur[k].shape)}"
                   for k in cur.keys() & new.keys()
                   if tuple(jnp.shape(new[k])) != tuple(cur[k].shape))
    if diff:
      raise ValueError(f"{col!r} do not match the model at {diff[:5]}"
                       f"{' ...' if len(diff) > 5 else ''}: expected the model's tree and shapes")
    pure = traverse_util.unflatten_dict(
        {k: jnp.asarray(v, cur[k].dtype) for k, v in new.items()})
    nnx.replace_by_pure_dict(state, pure)
    updates.append(state)
  nnx.update(model, *updates)
  return model


__all__ = ["BinaryConv", "Conv", "BatchNorm", "Downsample", "BiRealBlock", "BiRealBottleneck",
           "BiRealNet", "get", "names", "from_linen", "to_linen", "to_config", "from_config",
           "to_linen_variables", "from_linen_variables", "COLLECTIONS", "batch_statistics"]
