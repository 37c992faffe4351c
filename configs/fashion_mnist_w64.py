"""A binary recipe with margin for Fashion-MNIST: the demo at ResNet-18's own widths (64..512), 20 epochs.

Source: configs/fashion_mnist.py (the demo's recipe — official PyTorch recipe, Adam, linear
decay, label smoothing 0.1, no augmentation) with base width 64 and 20 epochs: the GPU recipe
sweep's w64_e20 (experiments/fm_sweep.py), the best binary recipe there (docs/reproduction.md).
About 4x the width-32 net's work per epoch: hours on a 2-core CPU, so checkpoints come every 200
steps (a killed run loses minutes; the same command resumes it).
"""
from bireal_jax import config as config_lib


def get_config():
  c = config_lib.from_file("fashion_mnist.py", relative_to=__file__)
  c.base_width = 64
  c.num_epochs = 20.0
  c.checkpoint_every_steps = 200
  return c
