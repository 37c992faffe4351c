"""Step 2 of the paper's two-step recipe: binary Bi-Real-18 fine-tuned from the clip twin.

Source: paper §4.1 (Caffe): SGD momentum 0.9, weight decay 0, batch 128, lr 0.01, 20 epochs,
× 0.1 at epochs 10 and 15; then one epoch re-estimating BN statistics with ±1 weights (the
Caffe retrain-BN step). The shipped Caffe solvers disagree slightly; treat as approximate.
Set `--config.init_from=<workdir of configs/imagenet_bireal18_real_clip.py>`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling config files
import imagenet_bireal18  # noqa: E402


def get_config():
  c = imagenet_bireal18.get_config()
  c.model = "bireal18"
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.learning_rate = 0.01
  c.lr_schedule = "piecewise"
  c.lr_boundaries = (10.0, 15.0)
  c.lr_decay_factor = 0.1
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 20.0
  c.label_smoothing = 0.0
  c.bn_reestimate_steps = 10_000  # 1.28 M images / 128: one epoch
  return c
