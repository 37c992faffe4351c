"""Data sources: synthetic in-memory data, or the real input pipeline (imported lazily)."""
from __future__ import annotations

import itertools

import jax
import numpy as np


class SyntheticData:
  """Deterministic in-memory data with the `bireal_jax.data` interface.

  For smoke tests and throughput measurements without a dataset (`config.dataset =
  "synthetic"`): each image is its class's fixed random pattern plus noise, so a model can
  learn it. The global batch of step k is a pure function of (seed, k), and a process gets its
  slice of it, so any process/device split sees the same global batches.
  """

  NUM_CLASSES = 10
  NUM_TRAIN = 2048
  NUM_EVAL = 200

  @classmethod
  def dataset_info(cls, config):
    from types import SimpleNamespace
    s = config.image_size
    return SimpleNamespace(num_classes=cls.NUM_CLASSES, image_shape=(s, s, 3),
                           num_train=cls.NUM_TRAIN, num_eval=cls.NUM_EVAL,
                           eval_split=config.eval_split)

  @classmethod
  def _examples(cls, config, key, n):
    s = config.image_size
    protos = np.random.default_rng(1234).normal(
        size=(cls.NUM_CLASSES, s, s, 3)).astype(np.float32)
    rng = np.random.default_rng(key)
    labels = rng.integers(0, cls.NUM_CLASSES, n).astype(np.int32)
    images = protos[labels] + rng.normal(size=(n, s, s, 3)).astype(np.float32)
    return images.astype(np.float32), labels

  @classmethod
  def create_train_iter(cls, config, *, batch_size, seed, start_step=0, process_index=None,
                        process_count=None):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    for step in itertools.count(start_step):
      images, labels = cls._examples(config, [seed, step], batch_size * pc)
      sl = slice(pi * batch_size, (pi + 1) * batch_size)
      yield {"image": images[sl], "label": labels[sl]}

  @classmethod
  def create_eval_iter(cls, config, *, batch_size, split=None, process_index=None,
                       process_count=None):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    images, labels = cls._examples(config, [999], cls.NUM_EVAL)
    per_step = batch_size * pc
    for start in range(0, cls.NUM_EVAL, per_step):
      idx = np.arange(start, start + per_step)[pi * batch_size:(pi + 1) * batch_size]
      mask = (idx < cls.NUM_EVAL).astype(np.float32)
      idx = np.minimum(idx, cls.NUM_EVAL - 1)
      yield {"image": images[idx], "label": labels[idx], "mask": mask}


def get_data(config):
  """The data source for `config.dataset` (module or object with the pipeline interface)."""
  if config.dataset == "synthetic":
    return SyntheticData
  from bireal_jax import data  # imports TensorFlow: only when real data is needed
  return data
