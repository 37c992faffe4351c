"""Step 1 of the paper's two-step scheme: the real-valued clip twin of Bi-Real-18 on ImageNet.

Source: Liu et al., ECCV 2018, §3.4 ("real-valued network with clip(·) in place of ReLU and
sign as initialisation") and the IJCV 2020 extension. The paper gives no full recipe for this
step; we train it like the official binary recipe (Adam 1e-3, batch 512, per-epoch linear
decay, label smoothing 0.1) for fewer epochs, since a real-valued net converges far faster.
Its checkpoint initialises configs/imagenet_bireal18_twostep.py (identical parameter trees).
"""
from bireal_jax import config as config_lib


def get_config():
  c = config_lib.from_file("imagenet_bireal18.py", relative_to=__file__)
  c.model = "bireal18_real"  # activation hardtanh, real kernels, same tree as bireal18
  c.num_epochs = 90.0
  return c
