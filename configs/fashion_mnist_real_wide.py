"""Real-valued clip twin of the wide binary net (base width 32): step one of the two-step recipe.

Source: Liu et al., ECCV 2018, §3.4 (train the real-valued network with clip(x) in place of
sign first), applied to configs/fashion_mnist_wide.py's architecture; everything else is the
demo's recipe (configs/fashion_mnist_real.py). Its checkpoint initialises
configs/fashion_mnist_twostep.py. Measured: README (Fashion-MNIST results).
"""
from bireal_jax import config as config_lib


def get_config():
  c = config_lib.from_file("fashion_mnist_real.py", relative_to=__file__)
  c.base_width = 32
  return c
