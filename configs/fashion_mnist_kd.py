"""Knowledge distillation on Fashion-MNIST: the binary demo net taught by its real-valued twin.

Source: Hinton et al., 2015 (soft labels at temperature T), in the form later BNN work uses to
go past Bi-Real's accuracy (ReActNet, Liu et al. ECCV 2020, and Real-to-Binary, Martinez et
al. ICLR 2020: KL to a real-valued teacher's output distribution, T = 1, in place of the
label loss). The student starts from the teacher, as in Bi-Real's two-step recipe (§3.4);
everything else is the demo's recipe. Train the teacher first:
  python -m bireal_jax.main --config=configs/fashion_mnist_real.py --workdir=runs/fm_real
  python -m bireal_jax.main --config=configs/fashion_mnist_kd.py --workdir=runs/fm_kd
"""
from bireal_jax import config as config_lib


def get_config():
  # The demo's recipe and architecture (shared with its clip twin), then this recipe's changes.
  c = config_lib.from_file("fashion_mnist.py", relative_to=__file__)
  c.init_from = "runs/fm_real"
  c.distill_from = "runs/fm_real"
  c.distill_weight = 1.0  # soft labels only (label smoothing then has no effect)
  c.distill_temperature = 1.0
  return c
