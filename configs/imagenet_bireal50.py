"""Bi-Real-50 on ImageNet, the official PyTorch recipe (62.6 % top-1 in the official README).

Source: liuzechun/Bi-Real-net, pytorch_implementation/BiReal_50/train.py and README: Adam
lr 5e-4, batch 256, 256 epochs, lr × (1 − epoch/256) stepped once per epoch, weight decay 0,
label smoothing 0.1 on the training loss.
"""
from bireal_jax.config import get_default_config


def get_config():
  c = get_default_config()
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.eval_split = "validation"
  c.model = "bireal50"
  c.stem = "imagenet"
  c.base_width = 64

  c.optimizer = "adam"
  c.learning_rate = 5e-4
  c.lr_schedule = "linear_epoch"
  c.weight_decay = 0.0
  c.label_smoothing = 0.1
  c.batch_size = 256
  c.eval_batch_size = 512
  c.num_epochs = 256.0
  c.checkpoint_every_steps = 1000
  return c
