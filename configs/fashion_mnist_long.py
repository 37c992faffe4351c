"""Longer binary recipe for Fashion-MNIST: step 2 of two-step training (aims at ≥ 93.5 %).

Source: Liu et al., ECCV 2018, §3.4 / §4.1 (initialise the binary net from its real-valued clip
twin, then fine-tune; re-estimate BN statistics at the end as the authors' Caffe recipe does),
with the demo's Adam + linear-decay recipe (official PyTorch code) run longer and with
crop+flip augmentation. Train configs/fashion_mnist_real.py first:

  python -m bireal_jax.main --config=configs/fashion_mnist_real.py --workdir=runs/fm_real
  python -m bireal_jax.main --config=configs/fashion_mnist_long.py --workdir=runs/fm_long \\
      --config.init_from=runs/fm_real
"""
from bireal_jax import config as config_lib


def get_config():
  # The demo's recipe and architecture (shared with its clip twin), then this recipe's changes.
  c = config_lib.from_file("fashion_mnist.py", relative_to=__file__)
  c.init_from = "runs/fm_real"
  c.augment = "crop_flip"
  c.learning_rate = 1e-3  # starting from a trained twin: half the from-scratch rate
  c.num_epochs = 20.0
  c.eval_every_epochs = 5.0
  c.bn_reestimate_steps = 100
  return c
