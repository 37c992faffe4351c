"""Bi-Real-34 on ImageNet, the official PyTorch recipe (62.2 % top-1 in the paper/README).

Source: liuzechun/Bi-Real-net, pytorch_implementation/BiReal18_34/train.py (`--model
bireal34`): Adam lr 1e-3, batch 512, 256 epochs, lr × (1 − epoch/256) stepped once per epoch,
weight decay 0, label smoothing 0.1 on the training loss.
"""
from bireal_jax.config import get_default_config


def get_config():
  c = get_default_config()
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.eval_split = "validation"
  c.model = "bireal34"
  c.stem = "imagenet"
  c.base_width = 64

  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.lr_schedule = "linear_epoch"
  c.weight_decay = 0.0
  c.label_smoothing = 0.1
  c.batch_size = 512
  c.eval_batch_size = 512
  c.num_epochs = 256.0
  c.checkpoint_every_steps = 1000
  return c
