"""Fashion-MNIST: the IDX files read directly (or tfds), exact seeded permutations per epoch,
batch-wise augmentation."""
from __future__ import annotations

import functools
import logging
import os

import numpy as np

from bireal_jax.data.augment import AUGMENT_STREAM, SHUFFLE_STREAM, base_key, fold_key
from bireal_jax.data.options import get_option, image_size_of, prefetch_of
from bireal_jax.data.splits import eval_batch_count, resolve_split, shard_range
from bireal_jax.data.tf_env import tf, tfds
from bireal_jax.idx_files import (FMNIST_FILES, FMNIST_FILE_NAMES, FMNIST_MEAN, FMNIST_PAD,
                                  FMNIST_STD, missing_fashion_mnist_files, read_fashion_mnist)


def _fmnist_files_present(manual_dir: str) -> bool:
  missing = missing_fashion_mnist_files(manual_dir)
  present = [n for n in FMNIST_FILE_NAMES if n not in missing]
  if present and missing:
    raise FileNotFoundError(f"Fashion-MNIST in {manual_dir}: {sorted(missing)} missing (found "
                            f"{present}); expected all of {FMNIST_FILE_NAMES}")
  return bool(present)


@functools.lru_cache(maxsize=2)
def _fmnist_arrays_cached(manual_dir: str, data_dir: str | None, stamp) -> dict:
  del stamp  # only part of the cache key: a rewritten file invalidates the entry
  if manual_dir and _fmnist_files_present(manual_dir):
    return {s: read_fashion_mnist(manual_dir, s) for s in FMNIST_FILES}
  logging.info("Fashion-MNIST IDX files not in %s; loading through tfds", manual_dir)
  try:
    splits = tfds.load("fashion_mnist", split=list(FMNIST_FILES), as_supervised=True,
                       data_dir=data_dir)
  except Exception as e:
    raise RuntimeError(
        f"Fashion-MNIST: the IDX files are not in manual_dir={manual_dir!r} (expected "
        f"{FMNIST_FILE_NAMES}) and tfds could not provide "
        f"the dataset either ({type(e).__name__}: {e}). Install Debian's dataset-fashion-mnist "
        "or point config.manual_dir at the four files.") from e
  arrays = {}
  for (s, (_, _, count)), ds in zip(FMNIST_FILES.items(), splits):
    # One batch holding the whole split (tfds' batch_size=-1 does the same).
    x, y = next(iter(tfds.as_numpy(ds.batch(count))))
    arrays[s] = (np.asarray(x, np.uint8).reshape(-1, 28, 28, 1), np.asarray(y, np.int32))
  return arrays


def fashion_mnist_arrays(config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (uint8 [N, 28, 28, 1], int32 [N])} from the IDX files in manual_dir, else tfds."""
  manual_dir = get_option(config, "manual_dir")
  stamp = []
  for f in FMNIST_FILE_NAMES:
    path = os.path.join(manual_dir or "", f)
    if manual_dir and os.path.exists(path):
      st = os.stat(path)
      stamp.append((f, st.st_mtime_ns, st.st_size))
  return _fmnist_arrays_cached(manual_dir, get_option(config, "data_dir"), tuple(stamp))


def _fmnist_augment(config) -> str:
  aug = get_option(config, "augment")
  if aug not in ("none", "crop_flip"):
    raise ValueError(f"augment={aug!r} for fashion_mnist; expected 'none' or 'crop_flip'")
  return aug


def _fmnist_preprocess(images, size: int, key=None):
  """uint8 [N, 28, 28, 1] -> normalised float32 [N, size, size, 1]; crop+flip drawn from `key`."""
  x = tf.cast(images, tf.float32) / 255.0
  if key is not None:
    n, p = tf.shape(x)[0], FMNIST_PAD
    padded = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])  # zero = black, as torchvision's pad
    r = tf.random.stateless_uniform([3, n], seed=key)
    dy, dx = (tf.cast(r[i] * (2 * p + 1), tf.int32) for i in (0, 1))
    rows = dy[:, None] + tf.range(28)[None]  # per-example crop offsets, by gathering
    cols = dx[:, None] + tf.range(28)[None]
    x = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    x = tf.where((r[2] < 0.5)[:, None, None, None], tf.reverse(x, [2]), x)
  if size != 28:
    x = tf.image.resize(x, [size, size], method="bilinear", antialias=True)
  return (x - FMNIST_MEAN) / FMNIST_STD


def fmnist_sizes():
  return {s: v[2] for s, v in FMNIST_FILES.items()}


def fmnist_train_iter(config, batch_size, seed, start_step, pidx, pcount):
  images, labels = fashion_mnist_arrays(config)["train"]
  a, b = shard_range(0, len(labels), pidx, pcount, drop_remainder=True)
  n = b - a
  steps = n // batch_size
  if steps < 1:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} train examples of process {pidx}")
  size = image_size_of(config)
  augment = _fmnist_augment(config) == "crop_flip"
  images_t, labels_t = tf.constant(images[a:b]), tf.constant(labels[a:b])
  key0 = base_key(seed, pidx)
  first_epoch, skip = divmod(int(start_step), steps)

  def epoch(e):
    # An exact permutation per epoch, cut to whole batches; a batch never straddles two epochs.
    order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                     seed=fold_key(key0, e, SHUFFLE_STREAM))
    order = tf.reshape(order[:steps * batch_size], [steps, batch_size])
    return tf.data.Dataset.from_tensor_slices(order).enumerate().map(lambda k, i: (e, k, i))

  def batch(e, k, i):
    # Augmentation drawn per batch from (seed, process, epoch, step in epoch): vectorised, and
    # still exactly reproducible on resume because batch boundaries are fixed.
    key = fold_key(key0, e, AUGMENT_STREAM, k) if augment else None
    return {"image": _fmnist_preprocess(tf.gather(images_t, i), size, key),
            "label": tf.gather(labels_t, i)}

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(skip)
  ds = ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(prefetch_of(config))
  return iter(ds.as_numpy_iterator())


def fmnist_eval_iter(config, batch_size, split, pidx, pcount):
  arrays = fashion_mnist_arrays(config)
  name, start, end = resolve_split(split, {s: len(v[1]) for s, v in arrays.items()})
  images, labels = arrays[name]
  a, b = shard_range(start, end, pidx, pcount, drop_remainder=False)
  size = image_size_of(config)
  # Padded in numpy, then preprocessed a whole batch at a time: per-example maps are far slower
  # (docs/training.md, "Why the code is as it is").
  total = eval_batch_count(end - start, pcount, batch_size) * batch_size
  mask = np.zeros(total, np.float32)
  mask[:b - a] = 1.0
  x = np.zeros((total, 28, 28, 1), np.uint8)
  x[:b - a] = images[a:b]
  y = np.zeros(total, np.int32)
  y[:b - a] = labels[a:b]
  ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(batch_size)
  ds = ds.map(lambda x, y, m: {"image": _fmnist_preprocess(x, size) * m[:, None, None, None],
                               "label": y, "mask": m}, num_parallel_calls=tf.data.AUTOTUNE)
  return iter(ds.prefetch(prefetch_of(config)).as_numpy_iterator())
