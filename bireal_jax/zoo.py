"""Trained models that ship with the package: `pretrained(name)` is a directory for `deploy.load`.

    from bireal_jax import deploy, pretrained
    m = deploy.load(pretrained("fashion_mnist"))               # float export
    pm = deploy.load(pretrained("fashion_mnist", packed=True))  # the same model packed to 1 bit
    logits = m(images)   # NHWC [N, 28, 28, 1]: (pixels / 255 − 0.2860) / 0.3530

Each model sits under `bireal_jax/weights/<name>_v<version>/{float,packed}/` in the export format
of `bireal_jax.deploy` (model.json + Orbax variables/); its model.json `source` records the
training run, the recipe and the input preprocessing. A new training gets a new version: a name
never changes what it loads.
"""
from __future__ import annotations

import importlib.resources
import os

# name -> versioned directory under bireal_jax/weights/
MODELS = {"fashion_mnist": "fashion_mnist_bireal18_w16_v1"}


def pretrained(name: str = "fashion_mnist", *, packed: bool = False) -> str:
  """Path of the shipped model `name` (float, or packed to 1 bit), for `deploy.load`."""
  if name not in MODELS:
    raise ValueError(f"unknown pretrained model {name!r}: expected one of {sorted(MODELS)}")
  root = importlib.resources.files("bireal_jax") / "weights" / MODELS[name]
  path = os.fspath(root / ("packed" if packed else "float"))
  if not os.path.isfile(os.path.join(path, "model.json")):
    raise FileNotFoundError(f"{path}: the pretrained model {name!r} is not installed with this "
                            f"copy of bireal_jax (expected model.json and variables/ there)")
  return path
