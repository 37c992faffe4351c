"""`PackedModel`, the packed Bi-Real Net object, and `pack` (trained float model → PackedModel)."""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax.deploy import fold, runtime
from bireal_jax.deploy.forward import IMPLS, default_impl, forward, runtime_params

OPENVINO = "openvino"
# What `PackedModel.__call__` accepts: the JAX forward's IMPLS, and the model's OpenVINO IR run
# by OpenVINO's CPU plugin (`deploy/openvino.py`; the optional extra bireal_jax[openvino]).
CALL_IMPLS = IMPLS + (OPENVINO,)


@jax.tree_util.register_pytree_node_class
class PackedModel:
  """A packed Bi-Real Net: `PackedModel(images) -> float32 logits [batch, classes]`.

  `config` is `models.to_config` of the float model, `params` the packed tree (uint32 bits,
  float32 real kernels and per-channel affines). `impl` selects how binary convs are computed
  (`CALL_IMPLS`: the JAX `IMPLS`, or "openvino"; None = `default_impl()`). A pytree, so it can
  be passed through `jax.jit` (with a JAX impl).
  """

  def __init__(self, config: Mapping[str, Any], params: Mapping[str, Any],
               impl: Optional[str] = None, micro_batch: Optional[int] = None):
    if impl is not None and impl not in CALL_IMPLS:
      raise ValueError(f"impl must be one of {CALL_IMPLS} or None, got {impl!r}")
    self.config = dict(config)
    self.params = params
    self.impl = impl
    self.micro_batch = micro_batch
    self._runtime: dict[str, Any] = {}
    self._openvino = None
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
    if not runtime.is_traced(self.params):
      rp = jax.device_put(rp)  # once, not a host-to-device copy per call
      self._runtime[impl] = rp
    return rp

  def __call__(self, images: jax.Array, impl: Optional[str] = None,
               micro_batch: Optional[int] = None, streams: Optional[int] = None,
               stage_micro_batch: Optional[int] = None,
               precision: Optional[str] = None) -> jax.Array:
    """Logits for NHWC `images`. `micro_batch` / `stage_micro_batch` as in `forward` (None =
    the per-backend defaults); `streams` chunks of the batch run concurrently (None =
    `default_streams()`: the cores on CPU, 1 elsewhere); inside a jit it is one computation.

    impl="openvino" runs the model's OpenVINO IR on the CPU plugin instead (compiled once per
    input shape; numpy float32 logits; not inside a jit), in float32 or, with
    `precision="bf16"`, bfloat16 (approximate); the batching options are OpenVINO's own then.
    """
    impl = impl or self.impl or default_impl()
    if impl == OPENVINO:
      given = {k: v for k, v in (("micro_batch", micro_batch), ("streams", streams),
                                 ("stage_micro_batch", stage_micro_batch)) if v is not None}
      if given:
        raise ValueError(f"{sorted(given)} apply to the JAX impls {IMPLS}, not to impl="
                         f"{OPENVINO!r} (OpenVINO schedules its own threads); got {given}")
      if runtime.is_traced(images):
        raise ValueError(f"impl={OPENVINO!r} runs outside JAX and cannot be called inside a "
                         f"jit; use one of {IMPLS} there")
      return self.openvino()(images, precision or "f32")
    if precision is not None:
      raise ValueError(f"precision={precision!r} applies to impl={OPENVINO!r} only, got "
                       f"impl={impl!r} (the JAX impls compute in float32)")
    mbs = (micro_batch or self.micro_batch or runtime.default_micro_batch(),
           stage_micro_batch or runtime.default_stage_micro_batch())
    params = self.runtime_params(impl)
    images = jnp.asarray(images)
    if runtime.is_traced((params, images)):  # inside the caller's jit: its options apply
      return forward(self.config, params, images, impl, *mbs)
    return runtime.run_streams(self._cfg_json, impl, mbs, params, images,
                               streams or runtime.default_streams())

  def openvino(self):
    """This model's `deploy.openvino.Runner` (its IR, built once; compiled per input shape)."""
    if self._openvino is None:
      from bireal_jax.deploy import openvino
      self._openvino = openvino.Runner.from_packed(self)
    return self._openvino

  def num_bytes(self) -> int:
    """Bytes of the stored parameters (what `save` writes, before container overhead)."""
    return int(sum(np.asarray(l).nbytes for l in jax.tree.leaves(self.params)))


def pack(model, variables: Mapping[str, Any], impl: Optional[str] = None) -> PackedModel:
  """Fold α and BN into per-channel affines and pack binary kernels: trained model -> PackedModel.

  `model` must use a binary activation and a binary kernel quantizer (`quantizers.BINARY_*`).
  The packed model computes in float32 (a `model.dtype=bfloat16` model matches only to bf16
  tolerance).
  """
  cfg = fold.check_packable(model)
  tree = fold.pack_tree(cfg, variables)
  return PackedModel(cfg, jax.tree.map(np.asarray, tree), impl)
