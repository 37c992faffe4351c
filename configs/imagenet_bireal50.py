"""Bi-Real-50 on ImageNet, the official PyTorch recipe (62.6 % top-1 in the official README).

Source: liuzechun/Bi-Real-net, pytorch_implementation/BiReal_50/train.py and README: Adam
lr 5e-4, batch 256, 256 epochs, lr × (1 − epoch/256) stepped once per epoch, weight decay 0,
label smoothing 0.1 on the training loss.
"""
from bireal_jax import config as config_lib


def get_config():
  # The Bi-Real-18/34 recipe with BiReal_50's learning rate and batch.
  c = config_lib.from_file("imagenet_bireal18.py", relative_to=__file__)
  c.model = "bireal50"
  c.learning_rate = 5e-4
  c.batch_size = 256
  return c
