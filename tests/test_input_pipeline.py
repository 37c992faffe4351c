"""Fashion-MNIST input pipeline: IDX reader, determinism/resume, sharding, eval padding.

Most tests run on full-size synthetic IDX files written here (60,000 + 10,000 images), whose
pixels encode each example's index, so a batch can be traced back to the examples it holds.
"""
import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest

from bireal_jax import input_pipeline as ip
from fmnist_files import synthetic_split, write_idx, write_split_files  # tests/fmnist_files.py

REAL_DIR = ip.FMNIST_DIR
REAL_PRESENT = all(os.path.exists(os.path.join(REAL_DIR, f))
                   for files in ip.FMNIST_FILES.values() for f in files[:2])


def config(manual_dir, **kw):
  return ml_collections.ConfigDict(dict(dataset="fashion_mnist", manual_dir=manual_dir, **kw))


def pixels(batch_images):
  """Normalised float images -> the uint8 pixels they came from (exact for augment='none')."""
  return np.rint((batch_images * ip.FMNIST_STD + ip.FMNIST_MEAN) * 255).astype(np.int64)


def ids(batch):
  p = pixels(batch["image"])
  return p[:, 0, 0, 0] + 256 * p[:, 0, 1, 0]


def take(it, k):
  return [next(it) for _ in range(k)]


# ------------------------------------------------------------------ IDX reader

def test_read_idx_round_trip_gzip_and_raw(tmp_path):
  data = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  write_idx(tmp_path / "a.gz", data)
  write_idx(tmp_path / "b", data, compress=False)
  np.testing.assert_array_equal(ip.read_idx(str(tmp_path / "a.gz")), data)
  np.testing.assert_array_equal(ip.read_idx(str(tmp_path / "b")), data)


def test_read_idx_rejects_corrupt_files(tmp_path):
  bad_gzip = tmp_path / "bad.gz"
  bad_gzip.write_bytes(b"this is not gzip data")
  with pytest.raises(ValueError, match=r"bad\.gz: not a readable gzip IDX"):
    ip.read_idx(str(bad_gzip))

  wrong_magic = tmp_path / "magic.gz"
  with gzip.open(wrong_magic, "wb") as f:
    f.write(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
  with pytest.raises(ValueError, match=r"magic\.gz: header '12340801' is not an IDX magic"):
    ip.read_idx(str(wrong_magic))

  wrong_type = tmp_path / "type.gz"
  write_idx(wrong_type, np.zeros(4), type_code=0x0D)
  with pytest.raises(ValueError, match=r"type\.gz: IDX data type 0x0d; expected 0x08"):
    ip.read_idx(str(wrong_type))

  truncated = tmp_path / "short.gz"
  with gzip.open(truncated, "wb") as f:
    f.write(bytes([0, 0, 8, 2]) + struct.pack(">2I", 3, 4) + b"\x00" * 11)
  with pytest.raises(ValueError, match=r"short\.gz: 11 data bytes; the header's dims \(3, 4\) "
                     r"need 12"):
    ip.read_idx(str(truncated))


def test_read_fashion_mnist_checks_dims_counts_labels(tmp_path):
  images, labels = synthetic_split(100, 0)
  write_split_files(str(tmp_path), "test", images, labels)
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: images of shape "
                     r"\(100, 28, 28\); expected \(10000, 28, 28\)"):
    ip.read_fashion_mnist(str(tmp_path), "test")

  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10000, 28, 28)))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10000, 12))
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: label 12 found; expected "
                     r"labels 0\.\.9"):
    ip.read_fashion_mnist(str(tmp_path), "test")

  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10000, 3))
  x, y = ip.read_fashion_mnist(str(tmp_path), "test")
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
  assert y.dtype == np.int32 and set(y) == {3}


def test_partial_file_set_is_an_error_not_a_download(tmp_path):
  images, labels = synthetic_split(60000, 0)
  write_split_files(str(tmp_path), "train", images, labels)
  with pytest.raises(FileNotFoundError, match=r"\['t10k-images-idx3-ubyte\.gz', "
                     r"'t10k-labels-idx1-ubyte\.gz'\] missing"):
    ip.fashion_mnist_arrays(config(str(tmp_path)))


@pytest.mark.skipif(not REAL_PRESENT, reason=f"Fashion-MNIST IDX files not installed in {REAL_DIR} "
                    "(Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
  train_x, train_y = ip.read_fashion_mnist(REAL_DIR, "train")
  test_x, test_y = ip.read_fashion_mnist(REAL_DIR, "test")
  assert train_x.shape == (60000, 28, 28, 1) and test_x.shape == (10000, 28, 28, 1)
  # Fashion-MNIST is balanced: 6,000 / 1,000 images per class.
  np.testing.assert_array_equal(np.bincount(train_y), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test_y), [1000] * 10)
  mean = train_x.mean(dtype=np.float64) / 255
  std = np.sqrt((train_x.astype(np.float32) ** 2).mean(dtype=np.float64) / 255**2 - mean**2)
  assert abs(mean - ip.FMNIST_MEAN) < 1e-4 and abs(std - ip.FMNIST_STD) < 1e-4


@pytest.mark.skipif(not REAL_PRESENT, reason=f"Fashion-MNIST IDX files not installed in {REAL_DIR}")
def test_real_files_through_the_pipeline_are_normalised():
  batch = next(ip.create_eval_iter(config(REAL_DIR), batch_size=10000, process_index=0,
                                   process_count=1))
  assert batch["image"].shape == (10000, 28, 28, 1) and batch["mask"].sum() == 10000
  # The test set's statistics are close to the train set's used for normalising.
  assert abs(batch["image"].mean()) < 0.02 and abs(batch["image"].std() - 1) < 0.02


def test_falls_back_to_tfds_when_files_absent(tmp_path):
  import tensorflow_datasets as tfds
  cfg = config(str(tmp_path / "empty"), data_dir=str(tmp_path / "tfds"))
  # mock_data stands in for tfds' download (no network here); the fallback code itself is real.
  with tfds.testing.mock_data(num_examples=20):
    arrays = ip.fashion_mnist_arrays(cfg)
    batches = list(ip.create_eval_iter(cfg, batch_size=8, process_index=0, process_count=1))
  assert {s: a[0].shape for s, a in arrays.items()} == {"train": (20, 28, 28, 1),
                                                        "test": (20, 28, 28, 1)}
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 20


# ------------------------------------------------------------------ config, info, splits

def test_dataset_info_and_config_errors(synth_dir):
  info = ip.dataset_info(config(synth_dir))
  assert info == ip.DatasetInfo(num_classes=10, image_shape=(28, 28, 1), num_train=60000,
                                num_eval=10000, eval_split="test")
  info = ip.dataset_info(config(synth_dir, image_size=32, eval_split="train[90%:]"))
  assert info.image_shape == (32, 32, 1) and info.num_eval == 6000
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; expected one of "
                     r"\['fashion_mnist', 'imagenet2012'\]"):
    ip.dataset_info(ml_collections.ConfigDict(dict(dataset="mnist")))
  with pytest.raises(ValueError, match=r"augment='mixup' for fashion_mnist"):
    ip.create_train_iter(config(synth_dir, augment="mixup"), batch_size=4, seed=0,
                         process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"process_index=2, process_count=2"):
    ip.create_eval_iter(config(synth_dir), batch_size=4, process_index=2, process_count=2)


def test_resolve_split_and_shard_range():
  sizes = {"train": 100, "test": 10}
  assert ip.resolve_split("train", sizes) == ("train", 0, 100)
  assert ip.resolve_split("train[10:-20]", sizes) == ("train", 10, 80)
  assert ip.resolve_split("test[:50%]", sizes) == ("test", 0, 5)
  with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
    ip.resolve_split("validation", sizes)
  with pytest.raises(ValueError, match=r"bound 200 outside the 100 examples"):
    ip.resolve_split("train[:200]", sizes)
  # As tfds.even_splits: 11 over 3 -> 4, 4, 3 (or 3 each, dropping the remainder).
  assert [ip.shard_range(0, 11, i, 3, False) for i in range(3)] == [(0, 4), (4, 8), (8, 11)]
  assert [ip.shard_range(5, 16, i, 3, True) for i in range(3)] == [(5, 8), (8, 11), (11, 14)]


# ------------------------------------------------------------------ train

def test_train_epoch_is_a_permutation_with_matching_labels(synth_dir):
  it = ip.create_train_iter(config(synth_dir), batch_size=1000, seed=3, process_index=0,
                            process_count=1)
  epoch = take(it, 60)
  b = epoch[0]
  assert b["image"].shape == (1000, 28, 28, 1) and b["image"].dtype == np.float32
  assert b["label"].shape == (1000,) and b["label"].dtype == np.int32
  seen = np.concatenate([ids(b) for b in epoch])
  np.testing.assert_array_equal(np.sort(seen), np.arange(60000))
  labels = np.concatenate([b["label"] for b in epoch])
  np.testing.assert_array_equal(labels, (7 * seen) % 10)
  assert not np.array_equal(seen[:1000], np.arange(1000))  # shuffled
  # Next epoch: the same examples in a new order.
  nxt = ids(next(it))
  assert not np.array_equal(nxt, seen[:1000])


def test_train_is_deterministic_and_resumes_exactly(synth_dir):
  cfg = config(synth_dir, augment="crop_flip")
  kw = dict(batch_size=2500, process_index=5, process_count=8)  # shard 7,500: 3 steps / epoch
  ref = take(ip.create_train_iter(cfg, seed=11, **kw), 5)
  again = take(ip.create_train_iter(cfg, seed=11, **kw), 2)
  for a, b in zip(again, ref):
    np.testing.assert_array_equal(a["image"], b["image"])
  for k in (2, 3, 4):  # within the first epoch, at and after the epoch boundary
    first = next(ip.create_train_iter(cfg, seed=11, start_step=k, **kw))
    np.testing.assert_array_equal(first["image"], ref[k]["image"])
    np.testing.assert_array_equal(first["label"], ref[k]["label"])
  other = next(ip.create_train_iter(cfg, seed=12, **kw))
  assert not np.array_equal(other["label"], ref[0]["label"])


def test_crop_flip_is_a_padded_crop_or_its_mirror(synth_dir):
  kw = dict(batch_size=64, seed=5, process_index=0, process_count=1)
  plain = next(ip.create_train_iter(config(synth_dir), **kw))
  aug = next(ip.create_train_iter(config(synth_dir, augment="crop_flip"), **kw))
  np.testing.assert_array_equal(plain["label"], aug["label"])  # augmentation leaves order alone
  src = np.pad(pixels(plain["image"])[..., 0], [(0, 0), (2, 2), (2, 2)])
  got = pixels(aug["image"])[..., 0]
  found = []
  for s, g in zip(src, got):
    crops = {(dy, dx): s[dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)}
    matches = [(dy, dx, flip) for (dy, dx), c in crops.items() for flip in (False, True)
               if np.array_equal(c[:, ::-1] if flip else c, g)]
    assert matches, "augmented image is not a crop/flip of its source"
    found.append(matches[0])
  assert len(set(found)) > 10  # offsets and flips vary across the batch
  assert any(f for _, _, f in found) and not all(f for _, _, f in found)


def test_train_shards_are_disjoint_and_cover_the_data(synth_dir):
  cfg = config(synth_dir)
  shards = []
  for p in range(2):
    it = ip.create_train_iter(cfg, batch_size=5000, seed=0, process_index=p, process_count=2)
    shards.append(np.concatenate([ids(b) for b in take(it, 6)]))  # one epoch of 30,000
  assert len(set(shards[0]) & set(shards[1])) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(60000))


def test_train_resizes_to_image_size(synth_dir):
  b = next(ip.create_train_iter(config(synth_dir, image_size=32, augment="crop_flip"),
                                batch_size=16, seed=0, process_index=0, process_count=1))
  assert b["image"].shape == (16, 32, 32, 1)


def test_train_rejects_batch_larger_than_shard(synth_dir):
  with pytest.raises(ValueError, match=r"batch_size=40000 exceeds the 30000 train examples"):
    ip.create_train_iter(config(synth_dir), batch_size=40000, seed=0, process_index=1,
                         process_count=2)


# ------------------------------------------------------------------ eval

def test_eval_pads_and_masks_every_example_once(synth_dir):
  cfg = config(synth_dir)
  seen, counts = [], []
  for p in range(3):  # 10,000 over 3 processes: 3,334 + 3,333 + 3,333
    batches = list(ip.create_eval_iter(cfg, batch_size=1000, process_index=p, process_count=3))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (1000, 28, 28, 1) and b["mask"].dtype == np.float32
      real = b["mask"] == 1.0
      assert set(np.unique(b["mask"])) <= {0.0, 1.0}
      np.testing.assert_array_equal(b["label"][real], (7 * ids(b)[real] + 1) % 10)
      assert not b["image"][~real].any() and not b["label"][~real].any()
      seen.append(ids(b)[real])
    assert sum(b["mask"].sum() for b in batches) == [3334, 3333, 3333][p]
  assert counts == [4, 4, 4]  # same number of eval steps on every process
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(10000))


def test_eval_split_slices_and_uneven_step_counts(synth_dir):
  # 2,001 examples over 2 processes at batch 1,000: process 0 has 1,001 and needs 2 batches, so
  # process 1 (1,000 examples) gets a second, all-padding batch.
  cfg = config(synth_dir, eval_split="train[:2001]")
  per = [list(ip.create_eval_iter(cfg, batch_size=1000, process_index=p, process_count=2))
         for p in range(2)]
  assert [len(b) for b in per] == [2, 2]
  assert [[int(b["mask"].sum()) for b in bs] for bs in per] == [[1000, 1], [1000, 0]]
  got = np.concatenate([ids(b)[b["mask"] == 1] for bs in per for b in bs])
  np.testing.assert_array_equal(np.sort(got), np.arange(2001))
  # The split argument overrides the config.
  b = next(ip.create_eval_iter(cfg, batch_size=10, split="test[-10:]", process_index=0,
                               process_count=1))
  np.testing.assert_array_equal(ids(b), np.arange(9990, 10000))


def test_process_defaults_come_from_jax_and_cli_prints_info(synth_dir, capsys):
  import jax
  cfg = config(synth_dir, eval_split="test[:30]")
  explicit = list(ip.create_eval_iter(cfg, batch_size=16, process_index=jax.process_index(),
                                      process_count=jax.process_count()))
  default = list(ip.create_eval_iter(cfg, batch_size=16))
  assert len(default) == len(explicit) == 2
  for a, b in zip(default, explicit):
    np.testing.assert_array_equal(a["image"], b["image"])
  ip.main(["--dataset", "fashion_mnist", "--manual_dir", synth_dir])
  assert "num_train=60000, num_eval=10000" in capsys.readouterr().out
