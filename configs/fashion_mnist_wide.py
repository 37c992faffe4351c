"""A bigger binary recipe for Fashion-MNIST: the demo at twice the width (stages 32/64/128/256).

Source: the demo's recipe (configs/fashion_mnist.py: official PyTorch recipe, Adam, linear
decay, label smoothing 0.1) with base width 32 instead of 16: about 4x the binary operations.
The longer two-step recipe with crop+flip (configs/fashion_mnist_long.py) did not beat the
demo: augmentation made the width-16 net fit worse, so this recipe adds capacity instead.
Measured: docs/reproduction.md.
"""
from bireal_jax import config as config_lib


def get_config():
  c = config_lib.from_file("fashion_mnist.py", relative_to=__file__)
  c.base_width = 32
  return c
