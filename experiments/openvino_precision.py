"""Top-1 of the shipped Fashion-MNIST model on the test set: JAX `impl="xor"` beside OpenVINO f32
and bf16 (issue 24, item 2), for the float and the packed export.

  .venv/bin/python experiments/openvino_precision.py [--images 10000] [--kinds float packed]

For each export and runtime it prints the top-1 (%), how many predictions differ from `xor`'s,
the largest |Δlogit| against `xor` (logits are O(10)) and on how many images it exceeds 1e-3. bf16 rounds the real layers' inputs
and weights (stem, shortcuts, FC) and the activations that the binary convs take the sign of, so
a few predictions near a tie may change; f32 should agree with `xor` to float rounding. Needs
bireal_jax[openvino] and the Fashion-MNIST IDX files (`make data`).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

from bireal_jax import deploy, pretrained  # noqa: E402
from bireal_jax.idx_files import FMNIST_DIR, FMNIST_MEAN, FMNIST_STD, read_fashion_mnist  # noqa

RUNTIMES = (("xor", {}), ("openvino", {"precision": "f32"}), ("openvino", {"precision": "bf16"}))


def test_images(n: int | None = None):
  """The first `n` (all when None) Fashion-MNIST test images, normalised as the model was
  trained (NHWC float32), and their labels."""
  images, labels = read_fashion_mnist(FMNIST_DIR, "test")
  images, labels = images[:n], labels[:n]
  return (images.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD, labels


def deploy_name() -> str:
  return os.path.basename(os.path.dirname(pretrained("fashion_mnist")))


def logits(model, x, impl: str, batch: int = 1000, **kw) -> np.ndarray:
  return np.concatenate([np.asarray(model(x[i:i + batch], impl=impl, **kw))
                         for i in range(0, len(x), batch)])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--images", type=int, default=10000)
  ap.add_argument("--kinds", nargs="+", default=["float", "packed"], choices=["float", "packed"])
  args = ap.parse_args()
  x, labels = test_images(args.images)
  print(f"'{machine.cpu_model()}' cores {machine.cores()} load {machine.loadavg()}; "
        f"{len(x)} Fashion-MNIST test images; model {deploy_name()}")
  print(f"{'export':8} {'runtime':16} {'top-1 %':>8} {'≠ xor':>6} {'max |Δlogit|':>13} "
        f"{'|Δlogit| > 1e-3':>16}")
  for kind in args.kinds:
    model = deploy.load(pretrained("fashion_mnist", packed=kind == "packed"))
    ref = None
    for impl, kw in RUNTIMES:
      out = logits(model, x, impl, **kw)
      if ref is None:
        ref = out
      name = impl + (f" {kw['precision']}" if kw else "")
      top1 = 100.0 * float((out.argmax(-1) == labels).mean())
      differ = int((out.argmax(-1) != ref.argmax(-1)).sum())
      delta = np.abs(out - ref).max(-1)
      print(f"{kind:8} {name:16} {top1:8.2f} {differ:6d} {delta.max():13.3g} "
            f"{int((delta > 1e-3).sum()):16d}", flush=True)


if __name__ == "__main__":
  main()
