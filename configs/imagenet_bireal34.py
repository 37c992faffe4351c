"""Bi-Real-34 on ImageNet, the official PyTorch recipe (62.2 % top-1 in the paper/README).

Source: liuzechun/Bi-Real-net, pytorch_implementation/BiReal18_34/train.py (`--model
bireal34`): Adam lr 1e-3, batch 512, 256 epochs, lr × (1 − epoch/256) stepped once per epoch,
weight decay 0, label smoothing 0.1 on the training loss.
"""
from bireal_jax import config as config_lib


def get_config():
  c = config_lib.from_file("imagenet_bireal18.py", relative_to=__file__)  # the same recipe
  c.model = "bireal34"
  return c
