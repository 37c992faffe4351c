"""Step 1 of the paper's two-step scheme: the real-valued clip twin of Bi-Real-18 on ImageNet.

Source: Liu et al., ECCV 2018, §3.4 ("real-valued network with clip(·) in place of ReLU and
sign as initialisation") and the IJCV 2020 extension. The paper gives no full recipe for this
step; we train it like the official binary recipe (Adam 1e-3, batch 512, per-epoch linear
decay, label smoothing 0.1) for fewer epochs, since a real-valued net converges far faster.
Its checkpoint initialises configs/imagenet_bireal18_twostep.py (identical parameter trees).
"""
from bireal_jax.config import get_default_config


def get_config():
  c = get_default_config()
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.eval_split = "validation"
  c.model = "bireal18_real"  # activation hardtanh, real kernels, same tree as bireal18
  c.stem = "imagenet"
  c.base_width = 64

  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.lr_schedule = "linear_epoch"
  c.weight_decay = 0.0
  c.label_smoothing = 0.1
  c.batch_size = 512
  c.eval_batch_size = 512
  c.num_epochs = 90.0
  c.checkpoint_every_steps = 1000
  return c
