"""Float inference checkpoints: params + batch_stats + the model's config, nothing else.

    from bireal_jax import export
    model, variables = export.load_inference("runs/demo/inference")
    logits = model.apply(variables, images, train=False)

The directory holds `model.json` (`bireal_jax.models.to_config`) and `variables/` (an Orbax
PyTree checkpoint), so loading needs only `bireal_jax.models` and `orbax-checkpoint`: no
optimizer state, no training code, no TensorFlow.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bireal_jax import models

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
FORMAT = "bireal_jax.inference/1"


def save_inference(path: str, model: models.BiRealNet, variables: dict[str, Any]) -> str:
  """Write `model`'s config and `variables` ({'params', 'batch_stats'}) to `path`.

  The model is stored without `axis_name` (cross-device BN only matters for training).
  Overwrites an existing export at `path`. Call on every process (Orbax coordinates hosts).
  """
  path = os.path.abspath(path)
  missing = {"params", "batch_stats"} - set(variables)
  if missing:
    raise ValueError(f"variables lack {sorted(missing)}: expected keys 'params' and "
                     f"'batch_stats', got {sorted(variables)}")
  variables = {k: jax.tree.map(np.asarray, variables[k]) for k in ("params", "batch_stats")}
  cfg = models.to_config(model.clone(axis_name=None))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, VARIABLES_DIR), variables, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    tmp = os.path.join(path, MODEL_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"format": FORMAT, "model": cfg}, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, MODEL_FILE))
  return path


def load_inference(path: str) -> tuple[models.BiRealNet, dict[str, Any]]:
  """`(model, variables)` from `save_inference` output; `model.apply(variables, x)` runs it."""
  path = os.path.abspath(path)
  model_file = os.path.join(path, MODEL_FILE)
  if not os.path.exists(model_file):
    raise FileNotFoundError(f"{model_file} not found: expected a directory written by "
                            f"bireal_jax.export.save_inference")
  with open(model_file) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{model_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
  model = models.from_config(meta["model"])
  ckptr = ocp.StandardCheckpointer()
  variables = ckptr.restore(os.path.join(path, VARIABLES_DIR))
  return model, {k: variables[k] for k in ("params", "batch_stats")}
