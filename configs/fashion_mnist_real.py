"""Real-valued clip twin of the CPU demo (configs/fashion_mnist.py), step 1 of two-step training.

Source: Liu et al., ECCV 2018, §3.4: the same network with clip(x) = max(-1, min(1, x)) in
place of sign and real-valued kernels (model "bireal18_real": identical parameter tree), so its
checkpoint can initialise the binary net (configs/fashion_mnist_long.py). Everything else is
the demo's recipe, read from fashion_mnist.py so that the two stay twins.
"""
from bireal_jax import config as config_lib


def get_config():
  c = config_lib.from_file("fashion_mnist.py", relative_to=__file__)
  c.model = "bireal18_real"  # activation hardtanh, kernel_quantizer None
  return c
