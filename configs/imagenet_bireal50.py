"""Bi-Real-50 on ImageNet, the official PyTorch recipe (README: 62.6 / 83.9 top-1/top-5).

Source: github liuzechun/Bi-Real-net, pytorch_implementation/BiReal_50/{train.py,run.sh}:
as Bi-Real-18 but batch 256 and Adam lr 5e-4.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling config files
import imagenet_bireal18  # noqa: E402


def get_config():
  c = imagenet_bireal18.get_config()
  c.model = "bireal50"
  c.batch_size = 256
  c.eval_batch_size = 250
  c.learning_rate = 5e-4
  return c
