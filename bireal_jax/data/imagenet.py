"""ImageNet iterators: seeded, resumable train epochs and padded, sharded eval passes."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

from bireal_jax.data.augment import (AUGMENT_STREAM, SHUFFLE_STREAM, base_key, fold_key,
                                     imagenet_eval_image, imagenet_train_image, seed_tensors)
from bireal_jax.data.decode_check import check_record_path, usable_range
from bireal_jax.data.imagenet_prep import (read_examples, read_options, tf_error_text,
                                           imagenet_builder)
from bireal_jax.data.options import get_option, image_size_of, prefetch_of
from bireal_jax.data.splits import eval_batch_count, good_ranges, split_of, shard_range
from bireal_jax.data.tf_env import tf


def pipeline_options():
  """As big_vision's input pipeline: each op of the per-image map runs on one thread (the map's
  parallel calls already occupy every core; op-level threads only contend with them), in a
  thread pool of this pipeline's own."""
  opts = read_options()
  opts.threading.max_intra_op_parallelism = 1
  opts.threading.private_threadpool_size = len(os.sched_getaffinity(0)) if hasattr(
      os, "sched_getaffinity") else (os.cpu_count() or 1)
  return opts


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
        f"imagenet2012 {where}: an image failed to decode ({tf_error_text(e)}) although the "
        f"decode check recorded in {check_record_path(builder, split)} passed it: were the dataset "
        "files rewritten since? Delete that record to check them again, and see which file it "
        "is.") from e


def imagenet_train_iter(config, batch_size, seed, start_step, pidx, pcount):
  builder = imagenet_builder(config)
  _, start, end, bad = usable_range(config, builder, "train")  # before any epoch: raises or skips
  a, b = shard_range(0, end - start - len(bad), pidx, pcount, drop_remainder=True)
  steps = (b - a) // batch_size
  if steps < 1:
    raise ValueError(f"batch_size={batch_size} exceeds the {b - a} train examples of "
                     f"process {pidx}")
  split = split_of("train", good_ranges(start, end, bad, a, b), start + a)
  size = image_size_of(config)
  buffer = int(get_option(config, "shuffle_buffer_size"))
  key0 = base_key(seed, pidx)
  cached = read_examples(builder, split, shuffle_seed=None).cache() if get_option(
      config, "cache") else None
  per_epoch = steps * batch_size
  e0, skip = divmod(int(start_step), steps)

  # Traced by flat_map: AutoGraph would try (and warn about failing) to convert tfds' wrapped
  # as_dataset; nothing here branches on tensors.
  @tf.autograph.experimental.do_not_convert
  def epoch_examples(e):
    """Epoch `e`'s examples as (e, position, example), in its order: the split's files shuffled
    and a shuffle buffer, both seeded from (seed, process, e), in-graph, so the whole run is one
    pipeline (built and traced once, autotuned throughout; epochs follow without a pause)."""
    file_seed, buffer_seed = seed_tensors(fold_key(key0, e, SHUFFLE_STREAM), 2)
    ds = cached if cached is not None else read_examples(builder, split, shuffle_seed=file_seed)
    ds = ds.shuffle(buffer, seed=buffer_seed, reshuffle_each_iteration=False)
    return ds.take(per_epoch).enumerate().map(lambda pos, ex: (e, pos, ex))

  def image(e, pos, ex):
    key = fold_key(key0, e, AUGMENT_STREAM, pos)
    return {"image": imagenet_train_image(ex["image"], size, key),
            "label": tf.cast(ex["label"], tf.int32)}

  ds = tf.data.Dataset.counter(start=e0).flat_map(epoch_examples)
  ds = ds.skip(skip * batch_size)  # read, not decoded
  ds = ds.map(image, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(prefetch_of(config))
  it = ds.with_options(pipeline_options()).as_numpy_iterator()

  def batches():
    step = int(start_step)
    while True:
      with _decode_errors_explained(builder, "train", f"train epoch {step // steps}"):
        batch = next(it)
      yield batch
      step += 1

  return batches()


@functools.lru_cache(maxsize=16)
def _imagenet_eval_dataset(builder, split, size, cache):
  ds = read_examples(builder, split, shuffle_seed=None)
  if cache:
    ds = ds.cache()
  return ds.map(lambda ex: {"image": imagenet_eval_image(ex["image"], size),
                            "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(1.0)},
                num_parallel_calls=tf.data.AUTOTUNE)


def imagenet_eval_iter(config, batch_size, split, pidx, pcount):
  builder = imagenet_builder(config)
  name, start, end, bad = usable_range(config, builder, split)
  num_good = end - start - len(bad)
  a, b = shard_range(0, num_good, pidx, pcount, drop_remainder=False)
  size = image_size_of(config)
  # Memoised, so an in-memory cache survives from one evaluation to the next.
  ds = _imagenet_eval_dataset(builder, split_of(name, good_ranges(start, end, bad, a, b),
                                                 start + a),
                              size, bool(get_option(config, "cache")))
  it = _pad_and_batch(ds, b - a, eval_batch_count(num_good, pcount, batch_size), batch_size,
                      (size, size, 3), prefetch_of(config))

  def batches():
    with _decode_errors_explained(builder, name, f"eval of {split}"):
      yield from it

  return batches()


def _pad_and_batch(ds, num_real: int, num_batches: int, batch_size: int, image_shape,
                   prefetch: int) -> Iterator[dict]:
  pad = num_batches * batch_size - num_real
  blank = {"image": tf.zeros(image_shape, ds.element_spec["image"].dtype),
           "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
  ds = ds.batch(batch_size).prefetch(prefetch).with_options(pipeline_options())
  return iter(ds.as_numpy_iterator())
