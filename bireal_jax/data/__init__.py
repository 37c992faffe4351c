"""Input pipelines (Fashion-MNIST, ImageNet 2012): tf.data in, numpy batches out.

The only package that imports TensorFlow (`tf_env` hides GPUs/TPUs from it on import, so tf.data
never takes accelerator memory from JAX). One module per job: `options` (the config's data
keys), `splits` (split grammar, shards), `augment` (seeds, decoding, per-image preprocessing),
`fashion_mnist`, `imagenet_prep` (preparation, reading), `decode_check`, `imagenet`
(iterators); this file is the public face. `bireal_jax.input_pipeline` is an alias of it.

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
    ImageNet's train iterator is one tf.data pipeline through all epochs (each epoch's shuffle
    seeds drawn inside it), so epoch boundaries neither rebuild nor pause it.
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

from typing import Any, Callable, Iterator

from bireal_jax.data.decode_check import usable_range
from bireal_jax.data.fashion_mnist import (fmnist_eval_iter, fmnist_sizes, fmnist_train_iter,
                                           fashion_mnist_arrays)
from bireal_jax.data.imagenet import imagenet_eval_iter, imagenet_train_iter
from bireal_jax.data.imagenet_prep import imagenet_builder
from bireal_jax.data.options import (DATASETS, DatasetInfo, check_batch_size, dataset_name,
                                     get_option, image_size_of, resolve_processes)
from bireal_jax.data.splits import resolve_split

# The rest of the public face, for tools and tests.
from bireal_jax.data.augment import (  # noqa: E402,F401
    decode_rgb, imagenet_eval_image, imagenet_train_image, random_resized_crop_window)
from bireal_jax.data.decode_check import BadImage, clear_caches, imagenet_bad_images  # noqa: F401
from bireal_jax.data.splits import shard_range  # noqa: F401
from bireal_jax.data.tf_env import tf, tfds  # noqa: F401
from bireal_jax.pixels import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401


def dataset_info(config) -> DatasetInfo:
  """Classes, preprocessed image shape and split sizes (ImageNet: the images that decode;
  prepares the dataset and runs the decode check if needed)."""
  name, size = dataset_name(config), image_size_of(config)
  eval_split = str(get_option(config, "eval_split"))
  if name == "fashion_mnist":
    sizes = fmnist_sizes()
    _, start, end = resolve_split(eval_split, sizes)
    return DatasetInfo(num_classes=10, image_shape=(size, size, 1), num_train=sizes["train"],
                       num_eval=end - start, eval_split=eval_split)
  builder = imagenet_builder(config)
  num = {}
  for key, split in (("train", "train"), ("eval", eval_split)):  # images that decode
    _, start, end, bad = usable_range(config, builder, split)
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
  name = dataset_name(config)
  if int(start_step) < 0:
    raise ValueError(f"start_step={start_step}; expected >= 0")
  if not 0 <= int(seed) < 2**63:
    raise ValueError(f"seed={seed}; expected an int in [0, 2**63)")
  pidx, pcount = resolve_processes(process_index, process_count)
  fn: Callable[..., Any] = fmnist_train_iter if name == "fashion_mnist" else imagenet_train_iter
  return fn(config, check_batch_size(batch_size), int(seed), int(start_step), pidx, pcount)


def create_eval_iter(config, *, batch_size: int, split: str | None = None,
                     process_index: int | None = None,
                     process_count: int | None = None) -> Iterator[dict]:
  """One pass over `split` (default config.eval_split) as {'image', 'label', 'mask'} batches.

  Across processes every example appears exactly once with mask 1.0; padding (zero image,
  label 0, mask 0.0) fills the last batch, and every process yields the same number of batches.
  """
  name = dataset_name(config)
  split = str(split or get_option(config, "eval_split"))
  pidx, pcount = resolve_processes(process_index, process_count)
  fn = fmnist_eval_iter if name == "fashion_mnist" else imagenet_eval_iter
  return fn(config, check_batch_size(batch_size), split, pidx, pcount)


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
