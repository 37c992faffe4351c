"""The longer binary recipe for Fashion-MNIST: the width-32 net trained for 30 epochs.

Source: configs/fashion_mnist_wide.py (the demo's recipe — official PyTorch recipe, Adam,
linear decay, label smoothing 0.1, no augmentation — at base width 32) with 30 epochs instead
of 10. Chosen from the GPU recipe sweep (experiments/fm_sweep.py, recipe w32_e30; figures in
docs/reproduction.md), the best width-32 binary recipe there; one stage, so no real-valued twin
to train first.
"""
from bireal_jax import config as config_lib


def get_config():
  c = config_lib.from_file("fashion_mnist_wide.py", relative_to=__file__)
  c.num_epochs = 30.0
  return c
