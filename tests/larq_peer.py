"""Peer run for the larq-zoo converter test; runs in the larq venv (`make larq-env`), not in .venv.

  TF_USE_LEGACY_KERAS=1 .venv-larq/bin/python tests/larq_peer.py OUT_DIR [--size 64] [--classes 10]

Builds larq-zoo's BiRealNet with random weights (no download), randomises the BatchNorm
statistics and the dense bias too (their defaults would hide mapping mistakes), and writes to
OUT_DIR: `weights.h5` (Keras `save_weights`, the layout of larq-zoo's published
`birealnet_weights.h5`), `x.npy` (a fixed NHWC input), `logits.npy` (the Dense output before
larq-zoo's softmax, inference mode) and `meta.json` (BN epsilon/momentum and layer names).
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # larq needs Keras 2
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import larq_zoo  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("out")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  tf.keras.utils.set_random_seed(a.seed)
  rng = np.random.default_rng(a.seed)

  model = larq_zoo.literature.BiRealNet(weights=None, input_shape=(a.size, a.size, 3),
                                        num_classes=a.classes)
  bns = []
  for layer in model.layers:
    if isinstance(layer, tf.keras.layers.BatchNormalization):
      c = layer.gamma.shape[0]
      layer.set_weights([1 + 0.2 * rng.standard_normal(c), 0.2 * rng.standard_normal(c),
                         0.3 * rng.standard_normal(c), 0.5 + rng.random(c)])
      bns.append(dict(name=layer.name, epsilon=float(layer.epsilon),
                      momentum=float(layer.momentum)))
    elif isinstance(layer, tf.keras.layers.Dense):
      k, b = layer.get_weights()
      layer.set_weights([k, 0.5 * rng.standard_normal(b.shape)])
  model.save_weights(os.path.join(a.out, "weights.h5"))

  dense = [l for l in model.layers if isinstance(l, tf.keras.layers.Dense)][-1]
  logits_model = tf.keras.Model(model.inputs, dense.output)
  x = rng.standard_normal((a.batch, a.size, a.size, 3)).astype(np.float32)
  logits = logits_model(x, training=False).numpy()
  np.save(os.path.join(a.out, "x.npy"), x)
  np.save(os.path.join(a.out, "logits.npy"), logits)
  meta = dict(tensorflow=tf.__version__, larq_zoo=getattr(larq_zoo, "__version__", "?"),
              batch_norm=bns, layers=[[l.name, type(l).__name__] for l in model.layers])
  with open(os.path.join(a.out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
