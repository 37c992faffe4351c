"""Training and evaluation of Bi-Real Nets: `bireal_jax/train.py` moved to `train/loop.py`, to be
split by job (next commit)."""
from bireal_jax.train.loop import *  # noqa: F401,F403
from bireal_jax.train.loop import _identity, _Setup  # noqa: F401
