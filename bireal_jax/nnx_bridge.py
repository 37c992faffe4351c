"""Using the Linen models and layers from Flax NNX, through `flax.nnx.bridge.ToNNX`.

    from flax import nnx
    import optax
    from bireal_jax import models, nnx_bridge

    model = nnx_bridge.to_nnx(models.get("bireal18", num_classes=10, stem="small"), images)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    loss = nnx_bridge.train_step(model, optimizer, images, labels)  # updates params and BN stats
    logits = model(images)                                          # eval: running BN statistics

`ToNNX` keeps the Linen collections as NNX variables: "params" → `nnx.Param`, "batch_stats" →
`nnx.BatchStat`, under the same nested names as the Linen variable dict. `linen_variables` and
`load_linen_variables` convert in both directions, so Linen checkpoints (e.g. a pre-trained
real-valued twin) load into NNX and back.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import optax
from flax import nnx
from flax.core import unfreeze

_COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))


@nnx.jit
def _lazy_init(model, *args):
  # Jitted: eager Linen init runs op by op and is many times slower on CPU.
  model.lazy_init(*args)


def to_nnx(module: nn.Module, sample_input: jax.Array, *, rngs: Optional[nnx.Rngs] = None,
           seed: int = 0) -> nnx.bridge.ToNNX:
  """Wrap a Linen `module` as an NNX module, initialised on `sample_input`'s shape."""
  model = nnx.bridge.ToNNX(module, rngs=rngs if rngs is not None else nnx.Rngs(seed))
  _lazy_init(model, sample_input)
  return model


def linen_variables(model: nnx.Module) -> dict[str, Any]:
  """The model's `{"params": ..., "batch_stats": ...}` as plain Linen variable dicts."""
  out = {col: nnx.to_pure_dict(nnx.state(model, t)) for col, t in _COLLECTIONS}
  return {col: v for col, v in out.items() if v}


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> None:
  """Copy Linen variables into an initialised NNX model in place; trees and shapes must match."""
  for col, var_type in _COLLECTIONS:
    state = nnx.state(model, var_type)
    current = nnx.to_pure_dict(state)
    new = unfreeze(variables.get(col, {}))
    cur_shapes = jax.tree.map(lambda a: tuple(a.shape), current)
    new_shapes = jax.tree.map(lambda a: tuple(a.shape), new)
    if cur_shapes != new_shapes:
      cur_flat = dict(jax.tree_util.tree_flatten_with_path(cur_shapes, is_leaf=_is_shape)[0])
      new_flat = dict(jax.tree_util.tree_flatten_with_path(new_shapes, is_leaf=_is_shape)[0])
      diff = sorted({jax.tree_util.keystr(k) for k in cur_flat.keys() ^ new_flat.keys()}
                    | {jax.tree_util.keystr(k) for k in cur_flat.keys() & new_flat.keys()
                       if cur_flat[k] != new_flat[k]})
      raise ValueError(f"{col!r} do not match the model at {diff[:5]}"
                       f"{' ...' if len(diff) > 5 else ''}: expected the model's tree and shapes")
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def cross_entropy_loss(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy in train mode; BatchNorm statistics update on the model."""
  logits = model(images, train=True, mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def predict(model: nnx.Module, images: jax.Array) -> jax.Array:
  """Eval-mode logits (running BatchNorm statistics), jitted."""
  return model(images)


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images: jax.Array,
               labels: jax.Array) -> jax.Array:
  """One optimizer step on the model's `nnx.Param`s; returns the loss before the step."""
  loss, grads = nnx.value_and_grad(cross_entropy_loss)(model, images, labels)
  optimizer.update(model, grads)
  return loss
