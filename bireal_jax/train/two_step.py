"""Two-step training (initialise from another run, e.g. the real-valued clip twin) and the
re-estimation of BatchNorm statistics after training."""
from __future__ import annotations

import functools
import itertools
import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax import checkpoint
from bireal_jax.train.mapping import Mapping, prefetch
from bireal_jax.train.setup import Setup
from bireal_jax.train.steps import TrainState, model_input


def init_from_checkpoint(state: TrainState, path: str, mapping: Mapping) -> TrainState:
  """Two-step training: copy params and batch_stats of another run (e.g. the clip twin)."""
  abstract = mapping.abstract({"params": state.params, "batch_stats": state.batch_stats})
  directory = checkpoint.find_checkpoint_dir(path)
  restored, _ = checkpoint.restore_subtrees(directory, abstract)
  return state.replace(params=restored["params"], batch_stats=restored["batch_stats"])


def bn_stats_step(stats_sum, state: TrainState, batch, *, apply_fn):
  """Add this batch's BN statistics (train-mode forward, ±1 weights) to a running sum.

  `apply_fn` is the model with `bn_momentum=0`, so the returned "running" statistics are
  exactly the (cross-device) batch statistics; their mean over batches is the estimate.
  """
  _, updates = apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        model_input(batch["image"]), train=True, mutable=["batch_stats"])
  return jax.tree.map(jnp.add, stats_sum, updates["batch_stats"])


def reestimate_batch_stats(s: Setup, pstate, num_steps: int, start_step: int):
  """Replace BN running statistics by their mean over `num_steps` training batches."""
  config, mapping = s.config, s.mapping
  frozen_bn = s.model.clone(bn_momentum=0.0)
  p_bn_step = mapping.map(functools.partial(bn_stats_step, apply_fn=frozen_bn.apply),
                          batched=(False, False, True))
  it = s.data.create_train_iter(config, batch_size=config.batch_size // jax.process_count(),
                                seed=config.seed + 1, start_step=start_step,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  zeros = jax.tree.map(np.zeros_like, mapping.to_host(pstate.batch_stats))
  total = mapping.put_replicated(zeros)
  for batch in prefetch(itertools.islice(it, num_steps), mapping.put_batch, config.prefetch):
    total = p_bn_step(total, pstate, batch)
  stats = jax.tree.map(lambda x: x / num_steps, mapping.to_host(total))
  return pstate.replace(batch_stats=mapping.put_replicated(stats))
