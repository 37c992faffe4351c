"""bireal_jax.zoo: the shipped Fashion-MNIST model loads with one call and scores on the test set
what the README's results table says (float and packed)."""
import json
import os
import re

import numpy as np
import pytest

from bireal_jax import deploy, pretrained, zoo
from bireal_jax.idx_files import FMNIST_DIR, FMNIST_MEAN, FMNIST_STD, read_fashion_mnist

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST IDX files not installed in {FMNIST_DIR}; `make data` installs them")


def _readme_top1() -> float:
  """The shipped model's top-1 as the README's results table states it (its Checkpoint cell
  links the shipped directory)."""
  name = zoo.MODELS["fashion_mnist"]
  for line in open(README):
    if line.startswith("|") and name in line:
      return float(re.search(r"\| (\d+\.\d+) \(shipped model", line).group(1))
  raise AssertionError(f"no row of README.md links {name}")


@needs_fmnist
@pytest.mark.parametrize("packed", [False, True])
def test_shipped_model_scores_the_readme_top1_on_the_test_set(packed):
  m = deploy.load(pretrained("fashion_mnist", packed=packed))
  assert m.kind == ("packed" if packed else "float")
  pre = m.source.get("preprocessing") or m.source["from"]["preprocessing"]
  assert pre == {"scale": 1 / 255, "mean": FMNIST_MEAN, "std": FMNIST_STD}
  images, labels = read_fashion_mnist(FMNIST_DIR, "test")
  x = ((images.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD)
  predictions = np.concatenate([np.asarray(m(x[i:i + 1000])).argmax(-1)
                                for i in range(0, len(x), 1000)])
  top1 = 100.0 * float((predictions == labels).mean())
  # Float sums may round differently on another CPU: a few of 10,000 predictions can flip.
  assert abs(top1 - _readme_top1()) <= 0.1, top1


def test_unknown_name_and_sizes():
  with pytest.raises(ValueError, match=r"unknown pretrained model 'imagenet': expected one of "
                                       r"\['fashion_mnist'\]"):
    pretrained("imagenet")
  sizes = {kind: deploy.directory_bytes(pretrained("fashion_mnist", packed=kind == "packed"))
           for kind in ("float", "packed")}
  assert sizes["float"] < 4e6 and sizes["packed"] < sizes["float"] / 4, sizes
  meta = json.load(open(os.path.join(pretrained("fashion_mnist"), "model.json")))
  assert meta["model"]["stem"] == "small" and meta["model"]["base_width"] == 16
