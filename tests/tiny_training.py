"""Test helpers: tiny training runs in this process (tests/test_train.py, test_distill.py,
test_optim.py, test_mapping.py).

Models are Bi-Real-18 blocks with one block in each of two stages, width 4, on 8 px synthetic
images: the real code path, compiled in seconds. Importing this module points JAX at a persistent
XLA cache, so tests (and test processes) that run the same program compile it once.
"""
import functools
import os
import tempfile

import jax
import pytest

from bireal_jax import config as config_lib
from bireal_jax import optim, train

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), f"bireal_jax_test_xla_cache_{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

NDEV = jax.device_count()
needs_8 = pytest.mark.skipif(NDEV < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_"
                             "device_count=8 (set by `make test`)")


def tiny_config(**kw):
  c = config_lib.get_default_config()
  c.dataset = "synthetic"
  c.image_size = 8
  c.model = "bireal18"
  c.stage_sizes = (1, 1)
  c.base_width = 4
  c.stem = "small"
  c.batch_size = 32
  c.eval_batch_size = 40
  c.num_train_steps = 24
  c.learning_rate = 1e-2
  c.lr_schedule = "cosine"
  c.label_smoothing = 0.1
  c.progress_bar = False
  c.tensorboard = False
  c.export_inference = False
  for k, v in kw.items():
    c[k] = v
  config_lib.validate(c)
  return c


def synthetic_batches(config, n, start=0):
  it = train.SyntheticData.create_train_iter(config, batch_size=config.batch_size, seed=0,
                                             start_step=start, process_index=0, process_count=1)
  return [next(it) for _ in range(n)]


def lr_fn_of(config):
  spe, total = optim.total_train_steps(config, train.SyntheticData.NUM_TRAIN)
  return optim.create_learning_rate_fn(config, spe, total)


def new_state(config):
  return train.create_train_state(config, train.create_model(config, 10),
                                  (config.image_size,) * 2 + (3,), lr_fn_of(config))


def run_steps(config, mapping, batches, state=None, **step_kw):
  """Train `batches` through `mapping` with the loop's own step; (host state, [losses])."""
  lr_fn = lr_fn_of(config)
  state = state or new_state(config)
  step = mapping.map(functools.partial(train.train_step, learning_rate_fn=lr_fn,
                                       label_smoothing=config.label_smoothing,
                                       grad_accum_steps=config.grad_accum_steps, **step_kw),
                     batched=(False, True), donate=(0,))
  pstate = mapping.put_replicated(state)
  losses = []
  for b in batches:
    pstate, m = step(pstate, mapping.put_batch(b, config.grad_accum_steps))
    losses.append(float(mapping.to_host(m)["loss"]))
  return mapping.to_host(pstate), losses
