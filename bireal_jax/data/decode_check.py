"""The decode check: every image of a split decoded once before the first batch, the outcome
recorded beside the dataset (through bireal_jax.storage), and `bad_images` applied."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import numpy as np

from bireal_jax import config as config_lib
from bireal_jax import storage
from bireal_jax.data.augment import decode_rgb
from bireal_jax.data.imagenet_prep import (archive_path, imagenet_builder, imagenet_sizes,
                                           read_examples, tf_error_text)
from bireal_jax.data.options import get_option
from bireal_jax.data.splits import resolve_split
from bireal_jax.data.tf_env import tf


_CHECK_FILE = "bireal_jax_decode_check.{split}.json"


_CHECK_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BadImage:
  """An image of a prepared imagenet2012 split that does not decode."""
  split: str      # tfds split name
  index: int      # position in the split (tfds order, as "train[index]")
  file_name: str  # tfds' file_name feature
  path: str       # where it is in the archives, e.g. "ILSVRC2012_img_val.tar/ILSVRC2012_val_..."
  error: str      # the decoder's message


def _bad_images_policy(config) -> str:
  policy = get_option(config, "bad_images")
  if policy not in config_lib.BAD_IMAGES:
    raise ValueError(f"bad_images={policy!r}; expected one of {list(config_lib.BAD_IMAGES)}")
  return policy


def _describe_bad(builder, split: str, index: int) -> BadImage:
  """Re-reads example `index` alone, for its file name and the decoder's error message."""
  file_name, error = "?", "its record could not be read"
  try:
    ex = next(iter(read_examples(builder, f"{split}[{index}:{index + 1}]", shuffle_seed=None)))
    file_name = ex["file_name"].numpy().decode("utf-8", "replace")
    try:
      decode_rgb(ex["image"], ratio=8)
      error = "failed to decode in the check pass, decodes when read alone"
    except tf.errors.OpError as e:
      error = tf_error_text(e)
  except (tf.errors.OpError, StopIteration) as e:
    error = f"its record could not be read: {tf_error_text(e)}"
  return BadImage(split=split, index=index, file_name=file_name,
                  path=archive_path(split, file_name) if file_name != "?" else
                  f"{split}[{index}] (name unreadable)", error=error)


def _scan_split(builder, split: str, num_examples: int) -> tuple[BadImage, ...]:
  """Decodes every image of `split` (JPEGs at 1/8 scale: all their data is still read)."""
  ds = read_examples(builder, split, shuffle_seed=None).enumerate()
  # The shape of the decoded image needs the decode to have run to its end.
  ds = ds.map(lambda i, ex: (i, tf.shape(decode_rgb(ex["image"], ratio=8))),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors().map(lambda i, _: i).batch(4096)
  ok = np.zeros(num_examples, bool)
  for idx in ds.as_numpy_iterator():
    ok[idx] = True
  return tuple(_describe_bad(builder, split, int(i)) for i in np.flatnonzero(~ok))


def check_record_path(builder, split: str) -> str:
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
  num_examples = imagenet_sizes(builder)[split]
  path = check_record_path(builder, split)
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


def usable_range(config, builder, split: str) -> tuple[str, int, int, tuple[int, ...]]:
  """(name, start, end, sorted indices of the bad images in [start, end)) of a split spec.

  Applies `bad_images`: raises for "error", logs the skipped files once for "skip".
  """
  policy = _bad_images_policy(config)
  name, start, end = resolve_split(split, imagenet_sizes(builder))
  bad = [b for b in _bad_images_cached(builder, name) if start <= b.index < end]
  if bad:
    shown = 20
    listing = "\n".join(f"  {b.path}: {b.error}" for b in bad[:shown])
    if len(bad) > shown:
      listing += f"\n  ... and {len(bad) - shown} more"
    head = (f"imagenet2012 {split}: {len(bad)} of {end - start} images do not decode "
            f"(recorded in {check_record_path(builder, name)})")
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


def imagenet_bad_images(config, split: str = "train") -> tuple[BadImage, ...]:
  """The images of `split` (a name or a slice, e.g. "validation[:1000]") that do not decode.

  Runs the decode check the first time (see the module docstring); ignores `bad_images`.
  """
  builder = imagenet_builder(config)
  name, start, end = resolve_split(split, imagenet_sizes(builder))
  return tuple(b for b in _bad_images_cached(builder, name) if start <= b.index < end)
