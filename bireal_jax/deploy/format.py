"""The one on-disk format of bireal_jax models, and `load(path)` for every export.

A directory:

    model.json   {"format": "bireal_jax.model", "format_version": 2,
                  "kind": "float" | "packed",
                  "model": models.to_config(model) (without axis_name),
                  "source": where the weights came from (training run, converter, packing),
                  "packing": the bit layout (packed only)}
    variables/   an Orbax (StandardCheckpointer) checkpoint: {"params", "batch_stats"} for
                 "float", the packed tree (uint32 bits, float32 kernels and affines) for "packed"

The training export (`WORKDIR/inference`), the converter's output and a packed model are all
written by `save`. `load` also opens the layouts of format version 1 (training export with
`variables/`, converter output with `variables.msgpack`, packed export with `packed.json` and
`params/`); `load(old).save(new)` rewrites one in this format. Loading needs only bireal_jax's
model code and orbax: no optimizer, no training code, no TensorFlow.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

from bireal_jax import exit_noise, models, storage
from bireal_jax.deploy.model import PackedModel, pack
from bireal_jax.ops.bits import WORD_BITS

FORMAT = "bireal_jax.model"
FORMAT_VERSION = 2
KINDS = ("float", "packed")
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
PACKING = {"word_bits": WORD_BITS,
           "bit_order": "channel c -> bit c % 32 of word c // 32; bit 1 = -1, bit 0 = +1",
           "kernel_bits_layout": "[kh, kw, ceil(C/32), O] uint32"}

# Format version 1: three layouts, read by `_load_v1`.
_V1_INFERENCE = "bireal_jax.inference/1"  # training export: model.json + variables/
_V1_MSGPACK = "variables.msgpack"  # converter: model.json {name, overrides, source, model}
_V1_PACKED = ("bireal_jax.packed", 1, "packed.json", "config.json", "params")

PathLike = Union[str, os.PathLike]


class Exported:
  """A model read by `load`: `exported(images)` gives eval-mode float32 logits.

  `kind` is "float" or "packed"; `config` the model's `models.to_config`; `variables` what
  `variables/` holds; `source` where the weights came from. `model` is the Linen `BiRealNet`
  (for "float", `model.apply(variables, x, train=False)` runs it); `packed(impl)` is the
  `PackedModel` (a float export is packed on the way).
  """

  def __init__(self, kind: str, config: Mapping[str, Any], variables: Mapping[str, Any],
               source: Optional[Mapping[str, Any]] = None, path: Optional[str] = None,
               format_version: int = FORMAT_VERSION):
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    self.kind, self.config, self.variables = kind, dict(config), variables
    self.source, self.path, self.format_version = dict(source or {}), path, format_version
    self._packed: dict = {}
    self._apply = None

  @property
  def model(self) -> models.BiRealNet:
    return models.from_config(self.config)

  def packed(self, impl: Optional[str] = None) -> PackedModel:
    if impl not in self._packed:
      if self.kind == "packed":
        self._packed[impl] = PackedModel(self.config, self.variables, impl)
      else:
        self._packed[impl] = pack(self.model, self.variables, impl)
    return self._packed[impl]

  def __call__(self, images, impl: Optional[str] = None, **options) -> jax.Array:
    """Eval-mode logits. A float export runs its Flax model unless `impl` is given; with `impl`
    (any of `model.CALL_IMPLS`, e.g. "openvino") or for a packed export, the `PackedModel` runs
    (`options` as `PackedModel.__call__`'s)."""
    if self.kind == "packed" or impl is not None or options:
      return self.packed()(images, impl=impl, **options)
    if self._apply is None:
      self._apply = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
    return self._apply(self.variables, images)

  def save(self, path: PathLike, overwrite: bool = False) -> str:
    """Write this model in the current format (e.g. to rewrite a version-1 export)."""
    model = self.packed() if self.kind == "packed" else self.model
    return save(path, model, None if self.kind == "packed" else self.variables,
                source=self.source, overwrite=overwrite)

  def __repr__(self):
    return (f"Exported(kind={self.kind!r}, path={self.path!r}, format_version="
            f"{self.format_version}, source={self.source!r})")


def metadata(kind: str, config: Mapping[str, Any],
             source: Optional[Mapping[str, Any]] = None) -> dict:
  """What model.json holds for a `kind` export of the model `config` (also written into other
  formats' metadata, e.g. the OpenVINO IR's rt_info)."""
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "model": dict(config),
          "source": dict(source or {})}
  if kind == "packed":
    meta["packing"] = PACKING
  return meta


def save(path: PathLike, model, variables: Optional[Mapping[str, Any]] = None, *,
         kind: Optional[str] = None, source: Optional[Mapping[str, Any]] = None,
         overwrite: bool = False) -> str:
  """Write `model` to the directory `path` (local, or a URL such as gs://bucket/model);
  returns its absolute path or URL.

  `model` is a Linen `BiRealNet` with its `variables` ({'params', 'batch_stats'}), written as
  `kind="float"` (default) or packed on the way with `kind="packed"`; or a `PackedModel`
  (written as "packed", no `variables`). `source` (a JSON-able dict) says where the weights
  came from. An existing `path` is an error unless `overwrite`. Call on every process of a
  multi-host job (Orbax coordinates them); process 0 writes model.json, last, so a directory
  with a model.json is complete.
  """
  path = storage.join(path)
  if isinstance(model, PackedModel):
    if kind not in (None, "packed") or variables is not None:
      raise ValueError(f"a PackedModel is saved as kind='packed' without variables, got "
                       f"kind={kind!r} and variables={'given' if variables is not None else None}")
    kind, config, tree = "packed", model.config, model.params
  else:
    kind = kind or "float"
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    missing = {"params", "batch_stats"} - set(variables or {})
    if missing:
      raise ValueError(f"variables lack {sorted(missing)}: expected keys 'params' and "
                       f"'batch_stats', got {sorted(variables or {})}")
    if kind == "packed":
      pm = pack(model, variables)
      config, tree = pm.config, pm.params
    else:
      config = models.to_config(model)
      tree = {k: variables[k] for k in ("params", "batch_stats")}
  config = {**config, "axis_name": None}  # cross-device BN matters only for training
  if storage.listdir(path) and not overwrite:
    raise FileExistsError(f"export path {path!r} already exists; expected a new directory "
                          f"(or pass overwrite=True)")
  meta = metadata(kind, config, source)
  json.dumps(meta)  # fail on a source that is not JSON-able before anything is written
  model_file = storage.path(storage.join(path, MODEL_FILE))
  chief = jax.process_index() == 0
  if chief and model_file.exists():
    model_file.unlink()  # until the new variables are complete, the directory is no export
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(storage.path(storage.join(path, VARIABLES_DIR)), jax.tree.map(np.asarray, tree),
               force=True)
    ckptr.wait_until_finished()
  if chief:
    storage.write_text(model_file, json.dumps(meta, indent=1, sort_keys=True))
  return path


def _restore(directory: str):
  import orbax.checkpoint as ocp
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(storage.path(directory))
  except (ValueError, FileNotFoundError) as e:  # tensorstore's NOT_FOUND / DATA_LOSS, Orbax's
    exit_noise.drop_closed_loop_noise()
    raise FileNotFoundError(
        f"{directory}: the weights are missing or damaged ({type(e).__name__}: "
        f"{storage.short(e, 200)}); expected the Orbax checkpoint written by "
        f"bireal_jax.deploy.save: export the model again or copy the whole directory") from None


def load(path: PathLike) -> Exported:
  """Open any bireal_jax export: a training export, a converter's output or a packed model,
  in this format or format version 1; `path` is local or a URL (gs://...)."""
  path = storage.join(path)
  model_file = storage.join(path, MODEL_FILE)
  if not storage.exists(model_file):
    if storage.exists(storage.join(path, _V1_PACKED[2])):
      return _load_v1_packed(path)
    found = storage.listdir(path) if storage.isdir(path) else "no such directory"
    raise FileNotFoundError(f"{path!r} is not a bireal_jax export: expected {MODEL_FILE} and "
                            f"{VARIABLES_DIR}/ (written by bireal_jax.deploy.save); found "
                            f"{found}")
  try:
    meta = json.loads(storage.read_text(model_file))
  except ValueError as e:
    raise ValueError(f"{model_file} is not valid JSON ({e}): expected the model.json written by "
                     f"bireal_jax.deploy.save") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{model_file} holds a {type(meta).__name__}: expected a JSON object "
                     f"written by bireal_jax.deploy.save")
  fmt = meta.get("format")
  if fmt == FORMAT:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
      raise ValueError(f"{model_file}: format_version {version!r} is newer than this "
                       f"bireal_jax reads ({FORMAT_VERSION}); upgrade bireal_jax to load it")
    if meta.get("kind") == "packed":
      _check_packing(model_file, meta.get("packing", {}))
    tree = _restore(storage.join(path, VARIABLES_DIR))
    if meta.get("kind") == "packed":
      tree = jax.tree.map(np.asarray, tree)
    return Exported(meta.get("kind"), meta["model"], tree, meta.get("source"), path, version)
  if fmt == _V1_INFERENCE:
    tree = _restore(storage.join(path, VARIABLES_DIR))
    return Exported("float", meta["model"], {k: tree[k] for k in ("params", "batch_stats")},
                    {"kind": "training"}, path, 1)
  if fmt is None and "model" in meta and storage.exists(storage.join(path, _V1_MSGPACK)):
    from flax import serialization
    tree = serialization.msgpack_restore(
        storage.path(storage.join(path, _V1_MSGPACK)).read_bytes())
    source = {"kind": "converted", "from": meta.get("source"), "name": meta.get("name"),
              "overrides": meta.get("overrides")}
    return Exported("float", meta["model"], tree, source, path, 1)
  raise ValueError(f"{model_file}: format {fmt!r} is not one bireal_jax writes: expected "
                   f"{FORMAT!r} (or a version-1 export)")


def _check_packing(where: str, packing: Mapping[str, Any]):
  if packing.get("word_bits") != WORD_BITS:
    raise ValueError(f"{where}: word_bits={packing.get('word_bits')!r}, expected {WORD_BITS}")


def _load_v1_packed(path: str) -> Exported:
  name, version, meta_file, config_file, params_dir = _V1_PACKED
  meta = json.loads(storage.read_text(storage.join(path, meta_file)))
  if meta.get("format") != name or meta.get("version") != version:
    raise ValueError(f"{path!r}: format {meta.get('format')!r} v{meta.get('version')!r}, "
                     f"expected {name!r} v{version} or {FORMAT!r} (a {MODEL_FILE})")
  _check_packing(path, meta)
  config_path = storage.join(path, config_file)
  if not storage.exists(config_path):
    raise FileNotFoundError(f"{path!r} is not a complete packed export: missing "
                            f"{config_path}")
  config = json.loads(storage.read_text(config_path))
  tree = jax.tree.map(np.asarray, _restore(storage.join(path, params_dir)))
  return Exported("packed", config, tree, {"kind": "packed"}, path, 1)


def directory_bytes(path: PathLike) -> int:
  """Total size of the files under `path` (what an export occupies on disk, by file size)."""
  return storage.size_of(path)
