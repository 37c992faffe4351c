"""Fashion-MNIST's original IDX files: names, statistics and a checked numpy reader.

No TensorFlow here: `bireal_jax.data` builds its tf.data pipeline on these, and
`experiments/fm_sweep.py` its numpy source for machines without TensorFlow.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts them
FMNIST_FILES = {  # split -> (images file, labels file, examples)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
FMNIST_FILE_NAMES = [f for files in FMNIST_FILES.values() for f in files[:2]]
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # over the 60,000 train images, pixels in [0, 1]
FMNIST_PAD = 2  # crop+flip augmentation: zero-pad by 2, random 28x28 crop

_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzip-compressed when the name ends with .gz) of unsigned bytes."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"{path}: not a readable{' gzip' if path.endswith('.gz') else ''} IDX "
                     f"file ({e})") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: header {data[:4].hex()!r} is not an IDX magic number "
                     "(expected 0000 then type and rank, e.g. 00000803)")
  dtype = _IDX_TYPES.get(data[2])
  if dtype is None:
    raise ValueError(f"{path}: IDX data type 0x{data[2]:02x}; expected 0x08 (unsigned byte)")
  rank = data[3]
  header = 4 + 4 * rank
  if len(data) < header:
    raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, rank {rank})")
  dims = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
  if len(data) - header != math.prod(dims):
    raise ValueError(f"{path}: {len(data) - header} data bytes; the header's dims {dims} "
                     f"need {math.prod(dims)}")
  return np.frombuffer(data, dtype, offset=header).reshape(dims)


def missing_fashion_mnist_files(folder: str) -> list[str]:
  """The four IDX .gz file names not present in `folder` (all four when it holds none)."""
  return [n for n in FMNIST_FILE_NAMES if not os.path.exists(os.path.join(folder, n))]


def read_fashion_mnist(manual_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split from the original IDX .gz files: (uint8 [N, 28, 28, 1], int32 [N]), checked."""
  images_file, labels_file, count = FMNIST_FILES[split]
  images_path = os.path.join(manual_dir, images_file)
  labels_path = os.path.join(manual_dir, labels_file)
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.shape != (count, 28, 28):
    raise ValueError(f"{images_path}: images of shape {images.shape}; expected ({count}, 28, 28)")
  if labels.shape != (count,):
    raise ValueError(f"{labels_path}: labels of shape {labels.shape}; expected ({count},)")
  if labels.max() > 9:
    raise ValueError(f"{labels_path}: label {labels.max()} found; expected labels 0..9")
  return images[..., None], labels.astype(np.int32)
