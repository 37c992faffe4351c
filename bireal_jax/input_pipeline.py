"""Alias of `bireal_jax.data` (the input pipelines: see its docstring), kept for existing imports
and for `python -m bireal_jax.input_pipeline --dataset ... [--manual_dir ...] [--data_dir ...]`,
which prepares a dataset once and prints its DatasetInfo."""
import logging

from bireal_jax.data import *  # noqa: F401,F403  (the public face)
from bireal_jax.data import (BadImage, DatasetInfo, IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401
                             clear_caches, create_eval_iter, create_train_iter, dataset_info,
                             decode_rgb, fashion_mnist_arrays, imagenet_bad_images,
                             imagenet_builder, imagenet_eval_image, imagenet_train_image, main,
                             random_resized_crop_window, resolve_split, shard_range, tf, tfds)
from bireal_jax.data.augment import fold_key, is_jpeg  # noqa: F401  (tests compose with these)
from bireal_jax.data.splits import good_ranges, split_of  # noqa: F401
from bireal_jax.idx_files import (FMNIST_DIR, FMNIST_FILE_NAMES, FMNIST_FILES,  # noqa: F401
                                  FMNIST_MEAN, FMNIST_STD, read_fashion_mnist, read_idx)

if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  main()
