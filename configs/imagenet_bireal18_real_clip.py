"""Step 1 of the paper's two-step recipe: the real-valued clip twin of Bi-Real-18 on ImageNet.

Source: paper §3.4 / IJCV (clip(x) = max(-1, min(1, x)) in place of sign and ReLU, real weights).
The paper gives no schedule for this step; we use the official PyTorch Adam recipe shortened to
64 epochs. Its checkpoint initialises configs/imagenet_bireal18_twostep.py (identical trees).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling config files
import imagenet_bireal18  # noqa: E402


def get_config():
  c = imagenet_bireal18.get_config()
  c.model = "bireal18_real"  # activation hardtanh, real kernels
  c.num_epochs = 64.0
  c.label_smoothing = 0.0
  return c
