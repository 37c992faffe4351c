"""ImageNet preparation and reading: the tfds imagenet2012 builder prepared once from the two
ILSVRC archives, the archive path of a file, and the raw (undecoded) record reader."""
from __future__ import annotations

import functools
import logging
import os
import re

from bireal_jax.data.options import get_option
from bireal_jax.data.tf_env import tf, tfds


IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


_SPLIT_ARCHIVES = {"train": IMAGENET_ARCHIVES[0], "validation": IMAGENET_ARCHIVES[1],
                   "test": "ILSVRC2012_img_test.tar"}


# One builder per (data_dir, manual_dir) for the process's life, never evicted: the eval dataset
# and the decode-check verdict are memoised on the builder object, so a new builder would cost
# each later eval pass a retrace of its map function (~0.25 s) and a reread of the record.
@functools.lru_cache(maxsize=None)
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
              return archive_path("train", m.name), tf_error_text(e)
  except (OSError, tarfile.TarError):
    return None
  return None


def imagenet_builder(config):
  """The prepared tfds `imagenet2012` builder, preparing it from manual_dir the first time."""
  return _imagenet_builder_cached(get_option(config, "data_dir"), get_option(config, "manual_dir"))


def imagenet_sizes(builder) -> dict[str, int]:
  return {name: info.num_examples for name, info in builder.info.splits.items()}


def archive_path(split: str, file_name: str) -> str:
  archive = _SPLIT_ARCHIVES.get(split, split)
  if split == "train":  # the train tar holds one tar per synset: n01440764.tar/n01440764_*.JPEG
    return f"{archive}/{file_name.split('_')[0]}.tar/{file_name}"
  return f"{archive}/{file_name}"


def tf_error_text(e: BaseException) -> str:
  msg = getattr(e, "message", None) or str(e)
  msg = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", msg)
  msg = re.sub(r"\s*\[Op:\w+\](\s*name:\s*\S*)?", "", msg)
  return " ".join(msg.split()) or type(e).__name__


def read_options():
  opts = tf.data.Options()
  opts.deterministic = True
  return opts


def read_examples(builder, split: str, *, shuffle_seed: int | None):
  return builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                  skip_prefetch=True, options=read_options()))
