"""Default CPU demo: binary Bi-Real-18 layout on Fashion-MNIST (28×28 grey, 10 classes).

Source: the official Bi-Real PyTorch recipe (Adam, weight decay 0, label smoothing 0.1,
learning rate decayed linearly to 0), scaled down for a 2-core CPU: small-image stem (3×3/1,
no max-pool), base width 16 (stages 16/32/64/128), batch 128, 10 epochs, no augmentation
(crop+flip cost accuracy at this short horizon: docs/training.md, "Why the code is as it is").
Measured: docs/reproduction.md.
"""
from bireal_jax.config import get_default_config


def get_config():
  c = get_default_config()
  c.dataset = "fashion_mnist"
  c.image_size = 28
  c.eval_split = "test"
  c.augment = "none"

  c.model = "bireal18"
  c.stem = "small"
  c.base_width = 16

  c.optimizer = "adam"
  c.learning_rate = 2e-3
  c.lr_schedule = "linear"
  c.label_smoothing = 0.1
  c.weight_decay = 0.0
  c.batch_size = 128
  c.eval_batch_size = 512
  c.num_epochs = 10.0
  c.eval_every_epochs = 2.0

  c.checkpoint_every_steps = 500
  c.log_every_steps = 50
  return c
