"""Input pipelines (Fashion-MNIST, ImageNet 2012): tf.data in, numpy batches out.

The only module that imports TensorFlow (the ImageNet test fixture reaches it through here). It
hides GPUs/TPUs from TensorFlow on import, so tf.data never takes accelerator memory from JAX.

Config keys read (an ml_collections ConfigDict; a key left out or None takes its default from
`bireal_jax.config.data_option`, the one place the data options are defaulted; `config.validate`
checks them for the command line):
  dataset              "fashion_mnist" | "imagenet2012" (required).
  data_dir             tfds data dir; None = tfds' default ($TFDS_DATA_DIR or
                       ~/tensorflow_datasets).
  manual_dir           fashion_mnist: folder with the four original IDX .gz files, default
                       "/usr/share/datasets/fashion-mnist" (Debian's dataset-fashion-mnist); read
                       directly when present, else tfds downloads the dataset.
                       imagenet2012: folder with ILSVRC2012_img_train.tar and
                       ILSVRC2012_img_val.tar, needed once to prepare the tfds dataset;
                       default <data_dir>/downloads/manual.
  image_size           side of the square model input: default 28 (fashion_mnist; other sizes are
                       resized bilinearly) and 224 (imagenet2012).
  eval_split           default "test" (fashion_mnist), "validation" (imagenet2012); a tfds-style
                       slice such as "validation[:1000]" or "train[90%:]" is accepted.
  cache                imagenet2012: keep this process's encoded examples in memory after the first
                       pass (default False). fashion_mnist: no effect, the arrays live in memory.
  shuffle_buffer_size  imagenet2012 train: tf.data shuffle buffer of encoded examples after the
                       seeded per-epoch file shuffle, default 16384. fashion_mnist: not used, every
                       epoch is an exact seeded permutation.
  augment              fashion_mnist: "none" (default) | "crop_flip" (zero-pad 2, random 28x28
                       crop, horizontal flip). imagenet2012: not used, train always gets the
                       official augmentation (RandomResizedCrop 0.08-1 + flip).
  prefetch             batches tf.data prefetches, default 2 (-1 = tf.data.AUTOTUNE).
  bad_images           imagenet2012: what to do with images that do not decode (see below):
                       "skip" (default; counted, logged by name, left out of the splits) or
                       "error" (a ValueError naming them, before any batch is read).

Semantics shared by both datasets:
  * Sharding: process p of n reads the p-th contiguous slice of the split (tfds.even_splits
    semantics). Train drops the < n leftover examples so every process has as many steps per
    epoch; eval keeps them, and every process yields the same number of batches (padding with
    mask 0), so collective eval steps stay in lock-step.
  * Train epochs: this process's shard in an order drawn from (seed, process index, epoch);
    `shard // batch_size` batches per epoch, batches never straddle epochs (the dropped remainder
    differs each epoch). Random augmentation comes from tf.random.stateless_* ops seeded from
    (seed, process index, epoch, position in the epoch: per example for ImageNet, per batch
    for Fashion-MNIST, which augments a whole batch at once), so an iterator started at step k
    yields exactly what a fresh one yields from its k-th batch on. Resuming ImageNet mid-epoch
    reads (without decoding) the part of the epoch already seen; Fashion-MNIST skips indices only.
  * Images: Fashion-MNIST float32 [H, W, 1], pixels scaled to [0, 1] and normalised with its
    train set's mean/std (0.2860/0.3530). ImageNet uint8 RGB [H, W, 3] (4x fewer bytes to the
    device, no float work on the host), which the train steps normalise on the device with
    the usual (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225) (`bireal_jax.pixels`,
    `bireal_jax.train.steps.model_input`). Labels int32.
  * ImageNet decoding reads only what the output needs: the crop window (train) or the centre
    crop's region of the image (eval), at JPEG DCT scale 1/2 or 1/4 when that region is at least
    2x or 4x the output; one antialiased bilinear resize (tf.image.resize's kernel) computes the
    output pixels alone. Without DCT scaling the pixels are those of a float resize of the full
    decode, rounded; with it they differ slightly (tests/test_imagenet_pipeline.py,
    test_uint8_pixels_match_the_float_pipeline, states by how much).

ImageNet's odd and damaged files:
  * Decoding looks at the bytes, not the name: JPEGs (grayscale, RGB and CMYK alike) go through
    the JPEG decoder, anything else (the archive's PNG named .JPEG) through tf.io.decode_image;
    every image comes out RGB. tfds' builder re-encodes the 22 CMYK JPEGs and the PNG of the real
    train archive as RGB JPEGs, but only those whose names are on its lists; an odd file under
    another name is stored as it is, and still decodes here.
  * Damaged images (a truncated JPEG, a file that is no image) are found before the first batch:
    the first use of a split (dataset_info, create_train_iter, create_eval_iter) decodes every
    image of it once (JPEGs at 1/8 scale, which still reads all their data; minutes for the full
    train split on a many-core host) and records the outcome in
    <builder.data_dir>/bireal_jax_decode_check.<split>.json, which later runs read instead.
    Each bad image is named by its path in the archives (e.g.
    ILSVRC2012_img_train.tar/n01440764.tar/n01440764_10026.JPEG) with the decoder's error.
    bad_images="skip": they are logged (a warning per file, and the count) and left out of the
    split as if never there: num_train / num_eval, the shards and the epochs count only the
    images that decode, so no epoch meets one. bad_images="error": ValueError listing them.
    `imagenet_bad_images(config, split)` returns them.
  * A damaged file that tfds itself converts (a name on its CMYK/PNG lists) fails the
    preparation; the error then names the file in the archive.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError:  # TF was initialised before this module was imported
      logging.warning("input_pipeline: TensorFlow already initialised; could not hide its %s "
                      "devices (import bireal_jax.input_pipeline before using TensorFlow)", kind)


_hide_accelerators_from_tf()

import tensorflow_datasets as tfds  # noqa: E402  (after the devices are hidden)

DATASETS = ("fashion_mnist", "imagenet2012")

# The IDX files and their constants live in a TensorFlow-free module (experiments read them too).
from bireal_jax import config as config_lib  # noqa: E402
from bireal_jax import storage  # noqa: E402
from bireal_jax.idx_files import (FMNIST_DIR, FMNIST_FILE_NAMES, FMNIST_FILES,  # noqa: E402
                                  FMNIST_MEAN, FMNIST_PAD, FMNIST_STD, missing_fashion_mnist_files,
                                  read_fashion_mnist, read_idx)

from bireal_jax.pixels import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_SPLIT_ARCHIVES = {"train": IMAGENET_ARCHIVES[0], "validation": IMAGENET_ARCHIVES[1],
                   "test": "ILSVRC2012_img_test.tar"}
_CHECK_FILE = "bireal_jax_decode_check.{split}.json"
_CHECK_VERSION = 1
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10  # as torchvision RandomResizedCrop

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  image_shape: tuple  # (H, W, C) after preprocessing
  num_train: int
  num_eval: int
  eval_split: str


# --------------------------------------------------------------------------- config

def _dataset(config) -> str:
  name = config.get("dataset")
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
  return name


def _get(config, key: str):
  # Defaults and their documentation live in bireal_jax.config, one place for every job.
  return config_lib.data_option(config, key)


def _image_size(config) -> int:
  size = int(_get(config, "image_size"))
  if size < 1:
    raise ValueError(f"image_size={size}; expected a positive int")
  return size


def _prefetch(config) -> int:
  p = int(_get(config, "prefetch"))
  return tf.data.AUTOTUNE if p < 0 else p


def _processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only for the defaults; the pipeline itself never touches JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}; expected "
                     "0 <= process_index < process_count")
  return int(process_index), int(process_count)


def _check_batch_size(batch_size: int) -> int:
  if int(batch_size) < 1:
    raise ValueError(f"batch_size={batch_size}; expected a positive int (per process)")
  return int(batch_size)


# --------------------------------------------------------------------------- splits, shards

_SPLIT_RE = re.compile(r"^\s*(\w+)\s*(?:\[\s*(-?[\d_]+%?)?\s*:\s*(-?[\d_]+%?)?\s*\])?\s*$")


def resolve_split(spec: str, sizes: dict[str, int]) -> tuple[str, int, int]:
  """`"name"` or `"name[from:to]"` (ints, negative ints or percents, as tfds) -> (name, a, b)."""
  m = _SPLIT_RE.match(str(spec))
  if not m:
    raise ValueError(f"split {spec!r} not understood; expected 'name' or 'name[from:to]' with "
                     "names from " + str(sorted(sizes)))
  name, lo, hi = m.groups()
  if name not in sizes:
    raise ValueError(f"unknown split {name!r} in {spec!r}; expected one of {sorted(sizes)}")
  n = sizes[name]

  def bound(v, default):
    if v is None:
      return default
    x = int(round(float(v[:-1]) * n / 100)) if v.endswith("%") else int(v)
    x = n + x if x < 0 else x
    if not 0 <= x <= n:
      raise ValueError(f"split {spec!r}: bound {v} outside the {n} examples of {name!r}")
    return x

  start, end = bound(lo, 0), bound(hi, n)
  if end < start:
    raise ValueError(f"split {spec!r} selects nothing (start {start} > end {end})")
  return name, start, end


def shard_range(start: int, end: int, index: int, count: int,
                drop_remainder: bool) -> tuple[int, int]:
  """Process `index`'s contiguous slice of [start, end), as tfds.even_splits."""
  n = end - start
  per, rem = divmod(n, count)
  if drop_remainder:
    a = start + per * index
    return a, a + per
  a = start + per * index + min(index, rem)
  return a, a + per + (index < rem)


def _eval_batches(num_examples: int, count: int, batch_size: int) -> int:
  # The largest shard decides, so every process runs the same number of eval steps.
  return max(1, math.ceil(math.ceil(num_examples / count) / batch_size))


# --------------------------------------------------------------------------- seeds

def _base_key(seed: int, process_index: int) -> tf.Tensor:
  return tf.constant([int(seed), process_index], tf.int64)


def _fold(key, *data):
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


_SHUFFLE, _AUGMENT = 0, 1  # streams folded into an epoch's key


def _int_seeds(key, n: int) -> list[int]:
  """`n` Python ints drawn from `key` (for APIs that take an int seed, e.g. tf.data shuffle)."""
  draws = tf.random.stateless_uniform([n], seed=key, minval=0, maxval=2**62, dtype=tf.int64)
  return [int(v) for v in draws.numpy()]


# --------------------------------------------------------------------------- Fashion-MNIST

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
  manual_dir = _get(config, "manual_dir")
  stamp = []
  for f in FMNIST_FILE_NAMES:
    path = os.path.join(manual_dir or "", f)
    if manual_dir and os.path.exists(path):
      st = os.stat(path)
      stamp.append((f, st.st_mtime_ns, st.st_size))
  return _fmnist_arrays_cached(manual_dir, _get(config, "data_dir"), tuple(stamp))


def _fmnist_augment(config) -> str:
  aug = _get(config, "augment")
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


def _fmnist_sizes():
  return {s: v[2] for s, v in FMNIST_FILES.items()}


def _fmnist_train(config, batch_size, seed, start_step, pidx, pcount):
  images, labels = fashion_mnist_arrays(config)["train"]
  a, b = shard_range(0, len(labels), pidx, pcount, drop_remainder=True)
  n = b - a
  steps = n // batch_size
  if steps < 1:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} train examples of process {pidx}")
  size = _image_size(config)
  augment = _fmnist_augment(config) == "crop_flip"
  images_t, labels_t = tf.constant(images[a:b]), tf.constant(labels[a:b])
  key0 = _base_key(seed, pidx)
  first_epoch, skip = divmod(int(start_step), steps)

  def epoch(e):
    # An exact permutation per epoch, cut to whole batches; a batch never straddles two epochs.
    order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                     seed=_fold(key0, e, _SHUFFLE))
    order = tf.reshape(order[:steps * batch_size], [steps, batch_size])
    return tf.data.Dataset.from_tensor_slices(order).enumerate().map(lambda k, i: (e, k, i))

  def batch(e, k, i):
    # Augmentation drawn per batch from (seed, process, epoch, step in epoch): vectorised, and
    # still exactly reproducible on resume because batch boundaries are fixed.
    key = _fold(key0, e, _AUGMENT, k) if augment else None
    return {"image": _fmnist_preprocess(tf.gather(images_t, i), size, key),
            "label": tf.gather(labels_t, i)}

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(skip)
  ds = ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(_prefetch(config))
  return iter(ds.as_numpy_iterator())


def _fmnist_eval(config, batch_size, split, pidx, pcount):
  arrays = fashion_mnist_arrays(config)
  name, start, end = resolve_split(split, {s: len(v[1]) for s, v in arrays.items()})
  images, labels = arrays[name]
  a, b = shard_range(start, end, pidx, pcount, drop_remainder=False)
  size = _image_size(config)
  # Padded in numpy, then preprocessed a whole batch at a time: per-example maps are far slower
  # (docs/training.md, "Why the code is as it is").
  total = _eval_batches(end - start, pcount, batch_size) * batch_size
  mask = np.zeros(total, np.float32)
  mask[:b - a] = 1.0
  x = np.zeros((total, 28, 28, 1), np.uint8)
  x[:b - a] = images[a:b]
  y = np.zeros(total, np.int32)
  y[:b - a] = labels[a:b]
  ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(batch_size)
  ds = ds.map(lambda x, y, m: {"image": _fmnist_preprocess(x, size) * m[:, None, None, None],
                               "label": y, "mask": m}, num_parallel_calls=tf.data.AUTOTUNE)
  return iter(ds.prefetch(_prefetch(config)).as_numpy_iterator())


# --------------------------------------------------------------------------- ImageNet

@functools.lru_cache(maxsize=4)
def _imagenet_builder_cached(data_dir, manual_dir):
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = manual_dir or os.fspath(builder.data_dir_root / "downloads" / "manual")
  status = {f: os.path.isfile(os.path.join(manual_dir, f)) for f in IMAGENET_ARCHIVES}
  if not all(status.values()):
    listed = ", ".join(f"{f} ({'found' if ok else 'MISSING'})" for f, ok in status.items())
    raise FileNotFoundError(
        f"ImageNet (tfds imagenet2012) is not prepared in {builder.data_dir} and cannot be built: "
        f"searched manual_dir={manual_dir!r} for {listed}. Download both archives from "
        "https://image-net.org/download-images into one folder and point manual_dir at it "
        "(preparation runs once and writes the dataset under data_dir).")
  logging.info("Preparing imagenet2012 from %s into %s (once; hours for the full archives)",
               manual_dir, builder.data_dir)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:
    damaged = _damaged_converted_file(manual_dir)
    if damaged is None:
      raise
    path, error = damaged
    raise ValueError(
        f"imagenet2012 preparation: tfds could not re-encode {path} (a name on its list of "
        f"CMYK/PNG images it converts to RGB JPEG): {error.rstrip('.')}. The archive is "
        "damaged; download it again.") from e
  return builder


def _tfds_converted_names() -> tuple[str, ...]:
  """The train file names tfds' imagenet2012 builder re-encodes (CMYK and PNG), by its public
  module constants; () where this tfds has none."""
  try:
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as m
  except ImportError:
    return ()
  return tuple(getattr(m, "CMYK_IMAGES", ())) + tuple(getattr(m, "PNG_IMAGES", ()))


def _damaged_converted_file(manual_dir: str) -> tuple[str, str] | None:
  """(archive path, decoder error) of the first file on tfds' conversion lists that does not
  decode, else None. Read only after a failed preparation: tfds' own error says nothing of which
  file it was. Looks at the listed files alone (one synset tar each)."""
  import tarfile
  names = set(_tfds_converted_names())
  synsets = {n.split("_")[0] + ".tar" for n in names}
  try:
    with tarfile.open(os.path.join(manual_dir, IMAGENET_ARCHIVES[0])) as outer:
      for member in outer:
        if member.name not in synsets:
          continue
        with tarfile.open(fileobj=outer.extractfile(member)) as inner:
          for m in inner:
            if m.name not in names:
              continue
            data = inner.extractfile(m).read()
            try:
              tf.io.decode_image(data, channels=3, expand_animations=False)
            except tf.errors.OpError as e:
              return _archive_path("train", m.name), _tf_error_text(e)
  except (OSError, tarfile.TarError):
    return None
  return None


def imagenet_builder(config):
  """The prepared tfds `imagenet2012` builder, preparing it from manual_dir the first time."""
  return _imagenet_builder_cached(_get(config, "data_dir"), _get(config, "manual_dir"))


def _imagenet_sizes(builder) -> dict[str, int]:
  return {name: info.num_examples for name, info in builder.info.splits.items()}


# --------------------------------------------------------------------------- damaged images

@dataclasses.dataclass(frozen=True)
class BadImage:
  """An image of a prepared imagenet2012 split that does not decode."""
  split: str      # tfds split name
  index: int      # position in the split (tfds order, as "train[index]")
  file_name: str  # tfds' file_name feature
  path: str       # where it is in the archives, e.g. "ILSVRC2012_img_val.tar/ILSVRC2012_val_..."
  error: str      # the decoder's message


def _archive_path(split: str, file_name: str) -> str:
  archive = _SPLIT_ARCHIVES.get(split, split)
  if split == "train":  # the train tar holds one tar per synset: n01440764.tar/n01440764_*.JPEG
    return f"{archive}/{file_name.split('_')[0]}.tar/{file_name}"
  return f"{archive}/{file_name}"


def _tf_error_text(e: BaseException) -> str:
  msg = getattr(e, "message", None) or str(e)
  msg = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", msg)
  msg = re.sub(r"\s*\[Op:\w+\](\s*name:\s*\S*)?", "", msg)
  return " ".join(msg.split()) or type(e).__name__


def _bad_images_policy(config) -> str:
  policy = _get(config, "bad_images")
  if policy not in config_lib.BAD_IMAGES:
    raise ValueError(f"bad_images={policy!r}; expected one of {list(config_lib.BAD_IMAGES)}")
  return policy


def _describe_bad(builder, split: str, index: int) -> BadImage:
  """Re-reads example `index` alone, for its file name and the decoder's error message."""
  file_name, error = "?", "its record could not be read"
  try:
    ex = next(iter(_imagenet_read(builder, f"{split}[{index}:{index + 1}]", shuffle_seed=None)))
    file_name = ex["file_name"].numpy().decode("utf-8", "replace")
    try:
      decode_rgb(ex["image"], ratio=8)
      error = "failed to decode in the check pass, decodes when read alone"
    except tf.errors.OpError as e:
      error = _tf_error_text(e)
  except (tf.errors.OpError, StopIteration) as e:
    error = f"its record could not be read: {_tf_error_text(e)}"
  return BadImage(split=split, index=index, file_name=file_name,
                  path=_archive_path(split, file_name) if file_name != "?" else
                  f"{split}[{index}] (name unreadable)", error=error)


def _scan_split(builder, split: str, num_examples: int) -> tuple[BadImage, ...]:
  """Decodes every image of `split` (JPEGs at 1/8 scale: all their data is still read)."""
  ds = _imagenet_read(builder, split, shuffle_seed=None).enumerate()
  # The shape of the decoded image needs the decode to have run to its end.
  ds = ds.map(lambda i, ex: (i, tf.shape(decode_rgb(ex["image"], ratio=8))),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors().map(lambda i, _: i).batch(4096)
  ok = np.zeros(num_examples, bool)
  for idx in ds.as_numpy_iterator():
    ok[idx] = True
  return tuple(_describe_bad(builder, split, int(i)) for i in np.flatnonzero(~ok))


def _check_path(builder, split: str) -> str:
  return storage.join(os.fspath(builder.data_dir), _CHECK_FILE.format(split=split))


def _read_check(path: str, split: str, num_examples: int):
  try:
    if not storage.exists(path):
      return None
    rec = json.loads(storage.read_text(path))
    if (rec.get("version"), rec.get("split"), rec.get("num_examples")) == (
        _CHECK_VERSION, split, num_examples):
      return tuple(BadImage(**b) for b in rec["bad"])
    logging.info("%s is for another preparation of the dataset; checking again", path)
  except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError) as e:
    logging.warning("%s unreadable (%s: %s); checking again", path, type(e).__name__, e)
  return None


def _write_check(path: str, split: str, num_examples: int, bad, seconds: float) -> None:
  rec = {"version": _CHECK_VERSION, "split": split, "num_examples": num_examples,
         "seconds": round(seconds, 1), "bad": [dataclasses.asdict(b) for b in bad]}
  try:  # whole or not at all (storage.write_text): several processes may check at once
    storage.write_text(path, json.dumps(rec, indent=1))
  except (OSError, tf.errors.OpError) as e:
    logging.warning("could not record the decode check of imagenet2012 %s in %s (%s); it will "
                    "run again next time", split, path, e)


@functools.lru_cache(maxsize=16)
def _bad_images_cached(builder, split: str) -> tuple[BadImage, ...]:
  num_examples = _imagenet_sizes(builder)[split]
  path = _check_path(builder, split)
  bad = _read_check(path, split, num_examples)
  if bad is None:
    logging.info("imagenet2012 %s: checking that its %d images decode (once; recorded in %s)",
                 split, num_examples, path)
    t0 = time.time()
    bad = _scan_split(builder, split, num_examples)
    seconds = time.time() - t0
    logging.info("imagenet2012 %s: decode check done in %.1f s, %d of %d images do not decode",
                 split, seconds, len(bad), num_examples)
    _write_check(path, split, num_examples, bad, seconds)
  return bad


_SKIPS_LOGGED: set = set()  # (data_dir, split) whose skipped images this process has logged


def clear_caches() -> None:
  """Forget the decode-check records read and the skip warnings shown by this process, as a
  new process would (the records on disk stay)."""
  _bad_images_cached.cache_clear()
  _SKIPS_LOGGED.clear()


def _usable(config, builder, split: str) -> tuple[str, int, int, tuple[int, ...]]:
  """(name, start, end, sorted indices of the bad images in [start, end)) of a split spec.

  Applies `bad_images`: raises for "error", logs the skipped files once for "skip".
  """
  policy = _bad_images_policy(config)
  name, start, end = resolve_split(split, _imagenet_sizes(builder))
  bad = [b for b in _bad_images_cached(builder, name) if start <= b.index < end]
  if bad:
    shown = 20
    listing = "\n".join(f"  {b.path}: {b.error}" for b in bad[:shown])
    if len(bad) > shown:
      listing += f"\n  ... and {len(bad) - shown} more"
    head = (f"imagenet2012 {split}: {len(bad)} of {end - start} images do not decode "
            f"(recorded in {_check_path(builder, name)})")
    if policy == "error":
      raise ValueError(f"{head}; bad_images='error' (bad_images='skip' leaves them out):\n"
                       f"{listing}")
    if (builder.data_dir, split) not in _SKIPS_LOGGED:
      _SKIPS_LOGGED.add((builder.data_dir, split))
      for b in bad:
        logging.warning("imagenet2012 %s: skipping %s (%s)", split, b.path, b.error)
      logging.warning("%s; skipping them (bad_images='skip'): %d images used", head,
                      end - start - len(bad))
  return name, start, end, tuple(sorted(b.index for b in bad))


def _good_ranges(start: int, end: int, bad, lo: int, hi: int) -> list[tuple[int, int]]:
  """[a, b) index ranges holding the lo-th to (hi-1)-th good image of [start, end).

  `bad`: sorted indices left out. With none, this is [(start + lo, start + hi)].
  """
  out, seen, a = [], 0, start
  for stop in [*(i for i in bad if start <= i < end), end]:
    n = stop - a  # good images in [a, stop)
    x, y = max(lo - seen, 0), min(hi - seen, n)
    if x < y:
      out.append((a + x, a + y))
    seen, a = seen + n, stop + 1
  return out


def _split_of(name: str, ranges, at: int) -> str:
  """tfds split string of index ranges ("train[0:5]+train[6:9]"), `name[at:at]` when empty."""
  return "+".join(f"{name}[{a}:{b}]" for a, b in ranges) if ranges else f"{name}[{at}:{at}]"


def imagenet_bad_images(config, split: str = "train") -> tuple[BadImage, ...]:
  """The images of `split` (a name or a slice, e.g. "validation[:1000]") that do not decode.

  Runs the decode check the first time (see the module docstring); ignores `bad_images`.
  """
  builder = imagenet_builder(config)
  name, start, end = resolve_split(split, _imagenet_sizes(builder))
  return tuple(b for b in _bad_images_cached(builder, name) if start <= b.index < end)


def random_resized_crop_window(image_hw, key):
  """torchvision RandomResizedCrop's window (y, x, h, w) for an image of shape `image_hw`.

  Ten attempts drawn at once: area fraction ~ U(0.08, 1), log aspect ~ U(log 3/4, log 4/3); the
  first that fits wins, else the centre crop with the aspect clamped into [3/4, 4/3].
  """
  height = tf.cast(image_hw[0], tf.float32)
  width = tf.cast(image_hw[1], tf.float32)
  u = tf.random.stateless_uniform([4, RRC_ATTEMPTS], seed=key)
  area = height * width * (RRC_SCALE[0] + u[0] * (RRC_SCALE[1] - RRC_SCALE[0]))
  log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
  ratio = tf.exp(log_lo + u[1] * (log_hi - log_lo))
  w = tf.round(tf.sqrt(area * ratio))
  h = tf.round(tf.sqrt(area / ratio))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  y = tf.floor(u[2] * (height - h + 1))
  x = tf.floor(u[3] * (width - w + 1))
  k = tf.argmax(tf.cast(fits, tf.int32))  # first fitting attempt (0 when none fits)
  in_ratio = width / height
  fb_w = tf.where(in_ratio > RRC_RATIO[1], tf.round(height * RRC_RATIO[1]), width)  # too wide
  fb_h = tf.where(in_ratio < RRC_RATIO[0], tf.round(width / RRC_RATIO[0]), height)  # too tall
  ok = tf.reduce_any(fits)
  window = tf.where(ok, tf.stack([y[k], x[k], h[k], w[k]]),
                    tf.stack([tf.floor((height - fb_h) / 2), tf.floor((width - fb_w) / 2),
                              fb_h, fb_w]))
  return tf.cast(window, tf.int32)


def _is_jpeg(encoded):
  return tf.equal(tf.strings.substr(encoded, 0, 3), b"\xff\xd8\xff")  # SOI + first marker


def _decode_other(encoded):
  """A non-JPEG image (PNG, GIF: first frame, BMP, WebP) -> uint8 [H, W, 3]."""
  x = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  x.set_shape([None, None, 3])
  return x


def decode_rgb(encoded, ratio: int = 1):
  """Encoded image -> uint8 [H, W, 3], by its bytes (a PNG named .JPEG decodes as PNG).

  Grayscale and CMYK JPEGs come out RGB. `ratio` (1, 2, 4, 8) scales JPEGs down while decoding.
  """
  return tf.cond(_is_jpeg(encoded),
                 lambda: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio),
                 lambda: _decode_other(encoded))


_DCT_RATIOS = (1, 2, 4)  # JPEG decode scales used (1/8 would need windows of 8x the output)


def _resize_region(image, top, left, height, width, out_hw):
  """Bilinear antialiased resize of the region (top, left, height, width) of `image` (float
  coordinates in its pixels) to `out_hw`: uint8 [out_h, out_w, 3].

  One ScaleAndTranslate, the kernel tf.image.resize(antialias=True) runs, computing only the
  output pixels (its float32 kernel is faster than its uint8 one, cast included).
  """
  out_h, out_w = out_hw
  scale = tf.stack([tf.cast(out_h, tf.float32) / height, tf.cast(out_w, tf.float32) / width])
  x = tf.raw_ops.ScaleAndTranslate(
      images=tf.cast(image, tf.float32)[None], size=tf.stack([out_h, out_w]), scale=scale,
      translation=-tf.stack([top, left]) * scale, kernel_type="triangle", antialias=True)[0]
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _decode_region(encoded, box, out_hw, margin: bool):
  """Encoded image -> its region `box` = (y, x, h, w) (float, original pixels) resized to
  `out_hw`, uint8 [out_h, out_w, 3].

  JPEGs decode only the rows and columns the resize reads (decode_and_crop_jpeg), at the DCT
  scale 1/r (r in 1, 2, 4) when the region is at least r times the output in both sides: the
  decoder's own downscale then does what the antialiased resize would (pixels differ slightly:
  tests/test_imagenet_pipeline.py states by how much). `margin`: also decode the pixels around
  the region that the resize kernel reaches (a resize of the whole image, then a crop, as eval);
  without, the region's edge is the image's edge (a resize of the crop, as RandomResizedCrop).
  Other images (PNG, ...) decode whole, then are cut.
  """
  y, x, h, w = [tf.cast(v, tf.float32) for v in box]
  out_h, out_w = [tf.cast(v, tf.float32) for v in out_hw]
  # The triangle kernel reaches max(1, source/output) source pixels on each side.
  my = tf.maximum(1.0, h / out_h) + 1.0 if margin else 0.0
  mx = tf.maximum(1.0, w / out_w) + 1.0 if margin else 0.0

  def cut(full_hw, r: int):
    """(y0, x0, y1, x1): the window to decode, in pixels of the image decoded at 1/r."""
    rh = tf.math.ceil(tf.cast(full_hw[0], tf.float32) / r)
    rw = tf.math.ceil(tf.cast(full_hw[1], tf.float32) / r)
    y0 = tf.clip_by_value(tf.floor((y - my) / r), 0.0, rh - 1)
    x0 = tf.clip_by_value(tf.floor((x - mx) / r), 0.0, rw - 1)
    y1 = tf.clip_by_value(tf.math.ceil((y + h + my) / r), y0 + 1, rh)
    x1 = tf.clip_by_value(tf.math.ceil((x + w + mx) / r), x0 + 1, rw)
    return y0, x0, y1, x1

  def jpeg():
    full_hw = tf.image.extract_jpeg_shape(encoded)[:2]
    fits = [tf.logical_and(h >= r * out_h, w >= r * out_w) for r in _DCT_RATIOS]
    pick = tf.reduce_sum(tf.cast(tf.stack(fits[1:]), tf.int32))  # ratios are nested

    def branch(r):
      def fn():
        y0, x0, y1, x1 = cut(full_hw, r)
        window = tf.cast(tf.stack([y0, x0, y1 - y0, x1 - x0]), tf.int32)
        crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, ratio=r)
        return crop, y0, x0, tf.constant(float(r))
      return fn

    return tf.switch_case(pick, [branch(r) for r in _DCT_RATIOS])

  def other():
    image = _decode_other(encoded)
    y0, x0, y1, x1 = cut(tf.shape(image)[:2], 1)
    crop = image[tf.cast(y0, tf.int32):tf.cast(y1, tf.int32),
                 tf.cast(x0, tf.int32):tf.cast(x1, tf.int32)]
    return crop, y0, x0, tf.constant(1.0)

  crop, y0, x0, r = tf.cond(_is_jpeg(encoded), jpeg, other)
  crop.set_shape([None, None, 3])
  return _resize_region(crop, y / r - y0, x / r - x0, h / r, w / r, out_hw)


def _image_hw(encoded):
  """(height, width) of an encoded image, from the JPEG header without decoding."""
  return tf.cond(_is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                 lambda: tf.shape(_decode_other(encoded))[:2])


def imagenet_train_image(encoded, size: int, key):
  """Encoded image -> RandomResizedCrop(size) + flip, uint8 [size, size, 3] (normalised on the
  device: `normalise_images`)."""
  window = random_resized_crop_window(_image_hw(encoded), key)
  x = _decode_region(encoded, tf.unstack(window), (size, size), margin=False)
  flip = tf.random.stateless_uniform([], seed=_fold(key, 1)) < 0.5
  return tf.cond(flip, lambda: tf.reverse(x, [1]), lambda: x)


def imagenet_eval_image(encoded, size: int):
  """Encoded image -> resize shorter side to 256*size/224, centre crop size, uint8."""
  hw = tf.cast(_image_hw(encoded), tf.float64)
  h, w = hw[0], hw[1]
  short = float(round(256 * size / 224))
  # As torchvision Resize(int): shorter side -> `short`, the longer one truncated, not rounded.
  new_hw = tf.where(h <= w, tf.stack([short, tf.floor(w * short / h)]),
                    tf.stack([tf.floor(h * short / w), short]))
  top = tf.round((new_hw[0] - size) / 2)
  left = tf.round((new_hw[1] - size) / 2)
  # The centre crop's region in the original image: only that part (and the resize kernel's
  # reach around it) is decoded and resized.
  sy, sx = h / new_hw[0], w / new_hw[1]
  box = [top * sy, left * sx, size * sy, size * sx]
  return _decode_region(encoded, box, (size, size), margin=True)


def _read_options():
  opts = tf.data.Options()
  opts.deterministic = True
  return opts


def _pipeline_options():
  """As big_vision's input pipeline: each op of the per-image map runs on one thread (the map's
  parallel calls already occupy every core; op-level threads only contend with them), in a
  thread pool of this pipeline's own."""
  opts = _read_options()
  opts.threading.max_intra_op_parallelism = 1
  opts.threading.private_threadpool_size = len(os.sched_getaffinity(0)) if hasattr(
      os, "sched_getaffinity") else (os.cpu_count() or 1)
  return opts


def _imagenet_read(builder, split: str, *, shuffle_seed: int | None):
  return builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                  skip_prefetch=True, options=_read_options()))


@contextlib.contextmanager
def _decode_errors_explained(builder, split: str, where: str, *,
                             decode_error=tf.errors.InvalidArgumentError):
  """A decode error despite the decode check (the dataset changed since?) says so, and where.

  `decode_error` is bound when this is defined: an iterator still open at interpreter exit is
  closed (GeneratorExit through here) after the module's globals are gone, when looking `tf`
  up would raise AttributeError.
  """
  try:
    yield
  except GeneratorExit:
    raise
  except decode_error as e:
    raise RuntimeError(
        f"imagenet2012 {where}: an image failed to decode ({_tf_error_text(e)}) although the "
        f"decode check recorded in {_check_path(builder, split)} passed it: were the dataset "
        "files rewritten since? Delete that record to check them again, and see which file it "
        "is.") from e


def _imagenet_train(config, batch_size, seed, start_step, pidx, pcount):
  builder = imagenet_builder(config)
  _, start, end, bad = _usable(config, builder, "train")  # before any epoch: raises or skips
  a, b = shard_range(0, end - start - len(bad), pidx, pcount, drop_remainder=True)
  steps = (b - a) // batch_size
  if steps < 1:
    raise ValueError(f"batch_size={batch_size} exceeds the {b - a} train examples of "
                     f"process {pidx}")
  split = _split_of("train", _good_ranges(start, end, bad, a, b), start + a)
  size = _image_size(config)
  buffer = int(_get(config, "shuffle_buffer_size"))
  key0 = _base_key(seed, pidx)
  cached = _imagenet_read(builder, split, shuffle_seed=None).cache() if _get(
      config, "cache") else None

  def epoch_batches(e: int, skip: int):
    file_seed, buffer_seed = _int_seeds(_fold(key0, e, _SHUFFLE), 2)
    aug_key = _fold(key0, e, _AUGMENT)
    if cached is not None:
      ds = cached
    else:
      ds = _imagenet_read(builder, split, shuffle_seed=file_seed)
    ds = ds.shuffle(buffer, seed=buffer_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps * batch_size).enumerate().skip(skip * batch_size)
    ds = ds.map(lambda pos, ex: {"image": imagenet_train_image(ex["image"], size,
                                                               _fold(aug_key, pos)),
                                 "label": tf.cast(ex["label"], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(_prefetch(config))
    return ds.with_options(_pipeline_options()).as_numpy_iterator()

  def batches():
    e, skip = divmod(int(start_step), steps)
    while True:
      with _decode_errors_explained(builder, "train", f"train epoch {e}"):
        yield from epoch_batches(e, skip)
      e, skip = e + 1, 0

  return batches()


@functools.lru_cache(maxsize=8)
def _imagenet_eval_dataset(builder, split, size, cache):
  ds = _imagenet_read(builder, split, shuffle_seed=None)
  if cache:
    ds = ds.cache()
  return ds.map(lambda ex: {"image": imagenet_eval_image(ex["image"], size),
                            "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(1.0)},
                num_parallel_calls=tf.data.AUTOTUNE)


def _imagenet_eval(config, batch_size, split, pidx, pcount):
  builder = imagenet_builder(config)
  name, start, end, bad = _usable(config, builder, split)
  num_good = end - start - len(bad)
  a, b = shard_range(0, num_good, pidx, pcount, drop_remainder=False)
  size = _image_size(config)
  # Memoised, so an in-memory cache survives from one evaluation to the next.
  ds = _imagenet_eval_dataset(builder, _split_of(name, _good_ranges(start, end, bad, a, b),
                                                 start + a),
                              size, bool(_get(config, "cache")))
  it = _pad_and_batch(ds, b - a, _eval_batches(num_good, pcount, batch_size), batch_size,
                      (size, size, 3), _prefetch(config))

  def batches():
    with _decode_errors_explained(builder, name, f"eval of {split}"):
      yield from it

  return batches()


# --------------------------------------------------------------------------- shared

def _pad_and_batch(ds, num_real: int, num_batches: int, batch_size: int, image_shape,
                   prefetch: int) -> Iterator[dict]:
  pad = num_batches * batch_size - num_real
  blank = {"image": tf.zeros(image_shape, ds.element_spec["image"].dtype), "label": tf.constant(0, tf.int32),
           "mask": tf.constant(0.0)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
  ds = ds.batch(batch_size).prefetch(prefetch).with_options(_pipeline_options())
  return iter(ds.as_numpy_iterator())


def dataset_info(config) -> DatasetInfo:
  """Classes, preprocessed image shape and split sizes (ImageNet: the images that decode;
  prepares the dataset and runs the decode check if needed)."""
  name, size = _dataset(config), _image_size(config)
  eval_split = str(_get(config, "eval_split"))
  if name == "fashion_mnist":
    sizes = _fmnist_sizes()
    _, start, end = resolve_split(eval_split, sizes)
    return DatasetInfo(num_classes=10, image_shape=(size, size, 1), num_train=sizes["train"],
                       num_eval=end - start, eval_split=eval_split)
  builder = imagenet_builder(config)
  num = {}
  for key, split in (("train", "train"), ("eval", eval_split)):  # images that decode
    _, start, end, bad = _usable(config, builder, split)
    num[key] = end - start - len(bad)
  return DatasetInfo(num_classes=builder.info.features["label"].num_classes,
                     image_shape=(size, size, 3), num_train=num["train"], num_eval=num["eval"],
                     eval_split=eval_split)


def create_train_iter(config, *, batch_size: int, seed: int, start_step: int = 0,
                      process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[dict]:
  """Infinite numpy batches {'image': f32 [B, H, W, C], 'label': i32 [B]} of this process's shard.

  `batch_size` is per process. Deterministic in (seed, process_index, process_count); an
  iterator with start_step=k yields what a start_step=0 one yields from its k-th batch on.
  """
  name = _dataset(config)
  if int(start_step) < 0:
    raise ValueError(f"start_step={start_step}; expected >= 0")
  if not 0 <= int(seed) < 2**63:
    raise ValueError(f"seed={seed}; expected an int in [0, 2**63)")
  pidx, pcount = _processes(process_index, process_count)
  fn: Callable[..., Any] = _fmnist_train if name == "fashion_mnist" else _imagenet_train
  return fn(config, _check_batch_size(batch_size), int(seed), int(start_step), pidx, pcount)


def create_eval_iter(config, *, batch_size: int, split: str | None = None,
                     process_index: int | None = None,
                     process_count: int | None = None) -> Iterator[dict]:
  """One pass over `split` (default config.eval_split) as {'image', 'label', 'mask'} batches.

  Across processes every example appears exactly once with mask 1.0; padding (zero image,
  label 0, mask 0.0) fills the last batch, and every process yields the same number of batches.
  """
  name = _dataset(config)
  split = str(split or _get(config, "eval_split"))
  pidx, pcount = _processes(process_index, process_count)
  fn = _fmnist_eval if name == "fashion_mnist" else _imagenet_eval
  return fn(config, _check_batch_size(batch_size), split, pidx, pcount)


def main(argv=None) -> None:
  """`python -m bireal_jax.input_pipeline --dataset imagenet2012 --manual_dir DIR [--data_dir DIR]`

  Prepares the dataset once (ImageNet: builds the tfds dataset from the two archives) and prints
  its DatasetInfo.
  """
  import argparse
  import ml_collections
  p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
  p.add_argument("--dataset", required=True, choices=DATASETS)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--manual_dir", default=None)
  args = p.parse_args(argv)
  config = ml_collections.ConfigDict(vars(args))
  if args.dataset == "fashion_mnist":
    fashion_mnist_arrays(config)
  print(dataset_info(config))


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  main()
