"""The pipeline's view of the config: dataset name, data options (defaults in
`bireal_jax.config.data_option`), image size, prefetch, process index/count, batch size."""
from __future__ import annotations

import dataclasses

from bireal_jax import config as config_lib
from bireal_jax.data.tf_env import tf


DATASETS = ("fashion_mnist", "imagenet2012")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  image_shape: tuple  # (H, W, C) after preprocessing
  num_train: int
  num_eval: int
  eval_split: str


def dataset_name(config) -> str:
  name = config.get("dataset")
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
  return name


def get_option(config, key: str):
  # Defaults and their documentation live in bireal_jax.config, one place for every job.
  return config_lib.data_option(config, key)


def image_size_of(config) -> int:
  size = int(get_option(config, "image_size"))
  if size < 1:
    raise ValueError(f"image_size={size}; expected a positive int")
  return size


def prefetch_of(config) -> int:
  p = int(get_option(config, "prefetch"))
  return tf.data.AUTOTUNE if p < 0 else p


def resolve_processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only for the defaults; the pipeline itself never touches JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}; expected "
                     "0 <= process_index < process_count")
  return int(process_index), int(process_count)


def check_batch_size(batch_size: int) -> int:
  if int(batch_size) < 1:
    raise ValueError(f"batch_size={batch_size}; expected a positive int (per process)")
  return int(batch_size)
