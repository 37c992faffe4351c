"""Bi-Real-34 on ImageNet, the official PyTorch recipe (paper / README: 62.2 % top-1).

Source: github liuzechun/Bi-Real-net, pytorch_implementation/BiReal18_34 (same train.py as
Bi-Real-18): Adam 1e-3, batch 512, 256 epochs, linear per-epoch decay, wd 0, label smoothing 0.1.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling config files
import imagenet_bireal18  # noqa: E402


def get_config():
  c = imagenet_bireal18.get_config()
  c.model = "bireal34"
  return c
