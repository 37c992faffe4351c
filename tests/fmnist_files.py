"""Test helpers: Fashion-MNIST IDX files written here, for the pipelines that read them (the
`synth_dir` fixture in conftest.py; tests/test_fm_sweep.py).

`synthetic_split` images encode each example's index in pixels (0,0) and (0,1) and the split in
(0,2), so a batch can be traced back to the examples it holds.
"""
import gzip
import os
import struct

import numpy as np

from bireal_jax import input_pipeline as ip


def write_idx(path, array, type_code=0x08, compress=True):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with (gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")) as f:
    f.write(header + array.tobytes())


def synthetic_split(n, split_id):
  """Images whose pixels (0,0), (0,1) hold the index; a y/x-dependent ramp elsewhere."""
  i = np.arange(n)
  yy, xx = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
  ramp = ((7 * yy + 13 * xx) % 256).astype(np.uint8)
  images = ramp[None] + (i % 256).astype(np.uint8)[:, None, None] * np.uint8(3)
  images[:, 0, 0] = i % 256
  images[:, 0, 1] = i // 256
  images[:, 0, 2] = split_id
  labels = ((7 * i + split_id) % 10).astype(np.uint8)
  return images, labels


def write_split_files(folder, split, images, labels):
  images_file, labels_file, _ = ip.FMNIST_FILES[split]
  write_idx(os.path.join(folder, images_file), images)
  write_idx(os.path.join(folder, labels_file), labels)


def write_synthetic_fashion_mnist(folder):
  """Full-size synthetic train and test splits (60,000 + 10,000 images) in `folder`."""
  for split_id, (split, (_, _, n)) in enumerate(ip.FMNIST_FILES.items()):
    write_split_files(folder, split, *synthetic_split(n, split_id))
  return folder
