"""Step 2 of the paper's two-step scheme: binary Bi-Real-18 fine-tuned from the clip twin.

Source: Liu et al., ECCV 2018, §4.1 / the authors' Caffe recipe (see docs/reference.md, "Training
recipes"): SGD momentum 0.9, weight decay 0, batch 128, lr 0.01, 20 epochs, lr × 0.1
at epochs 10 and 15, then one epoch re-estimating BN statistics with ±1 weights. (The shipped
Caffe solver files disagree with these numbers; treat them as approximate.)

Run the clip twin first, then point init_from at its workdir:
  python -m bireal_jax.main --config=configs/imagenet_bireal18_twostep.py \\
      --workdir=runs/r18_twostep --config.init_from=runs/r18_clip
"""
from bireal_jax import config as config_lib

IMAGENET_TRAIN = 1_281_167


def get_config():
  # Bi-Real-18 on ImageNet (data, model), then the Caffe recipe's optimisation.
  c = config_lib.from_file("imagenet_bireal18.py", relative_to=__file__)
  c.init_from = "runs/imagenet_bireal18_real_clip"

  c.optimizer = "sgd"
  c.momentum = 0.9
  c.learning_rate = 0.01
  c.lr_schedule = "piecewise"
  c.lr_boundaries = (10.0, 15.0)
  c.lr_decay_factor = 0.1
  c.weight_decay = 0.0
  c.label_smoothing = 0.0  # the Caffe recipe has none
  c.batch_size = 128
  c.eval_batch_size = 512
  c.num_epochs = 20.0
  c.bn_reestimate_steps = IMAGENET_TRAIN // 128  # one epoch
  c.checkpoint_every_steps = 2000
  return c
