"""ImageNet pipeline end to end: tiny ILSVRC archives -> tfds' real imagenet2012 builder -> batches.

The archives (4 classes, 12 train + 4 val JPEGs of 40x48 / 48x40 px) are written by
bireal_jax.imagenet_fixture into a tmp folder, and tfds prepares them into a tmp data_dir.
"""
import collections
import os
import tarfile

import ml_collections
import numpy as np
import pytest

from bireal_jax import imagenet_fixture as fx
from bireal_jax import input_pipeline as ip

SIZE = 32  # eval resizes the shorter side to round(256 * 32 / 224) = 37
MEAN, STD = np.array(ip.IMAGENET_MEAN), np.array(ip.IMAGENET_STD)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  fixture = fx.write_imagenet_archives(str(root / "manual"))
  cfg = ml_collections.ConfigDict(dict(
      dataset="imagenet2012", data_dir=str(root / "tfds"), manual_dir=fixture.manual_dir,
      image_size=SIZE, shuffle_buffer_size=16))
  ip.dataset_info(cfg)  # prepares the tfds dataset once
  return fixture, cfg


def take(it, k):
  return [next(it) for _ in range(k)]


def nearest_class(image, fixture):
  """Label whose (G, B) colour is closest to the image's mean G and B."""
  gb = (image[..., 1:].mean((0, 1)) * STD[1:] + MEAN[1:]) * 255
  dist = [np.abs(gb - np.array(c)).sum() for c in fixture.colors]
  return fixture.labels[int(np.argmin(dist))]


def test_tfds_builds_the_fixture_with_the_intended_labels(tiny):
  fixture, cfg = tiny
  builder = ip.imagenet_builder(cfg)
  assert builder.data_dir.startswith(cfg.data_dir)  # never the user's ~/tensorflow_datasets
  for split, expected in (("train", fixture.train_files), ("validation", fixture.val_files)):
    got = {ex["file_name"].decode(): int(ex["label"])
           for ex in builder.as_dataset(split=split).as_numpy_iterator()}
    assert got == expected
  assert ip.dataset_info(cfg) == ip.DatasetInfo(
      num_classes=1000, image_shape=(SIZE, SIZE, 3), num_train=12, num_eval=4,
      eval_split="validation")


def test_train_batches(tiny):
  fixture, cfg = tiny
  epoch = take(ip.create_train_iter(cfg, batch_size=4, seed=0, process_index=0, process_count=1),
               3)
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  for b in epoch:
    assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert (b["image"] >= lo - 1e-5).all() and (b["image"] <= hi + 1e-5).all()
    assert np.isfinite(b["image"]).all() and b["image"].std() > 0.1
  # One epoch (12 // 4 = 3 steps) holds every train example once.
  labels = collections.Counter(int(y) for b in epoch for y in b["label"])
  assert labels == collections.Counter(fixture.train_files.values())


def test_train_is_deterministic_and_resumes_exactly(tiny):
  _, cfg = tiny
  kw = dict(batch_size=4, process_index=0, process_count=1)
  ref = take(ip.create_train_iter(cfg, seed=7, **kw), 7)  # 3 steps per epoch: crosses two epochs
  for k in (1, 3, 5):
    got = take(ip.create_train_iter(cfg, seed=7, start_step=k, **kw), 2)
    for a, b in zip(got, ref[k:k + 2]):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  # A new epoch reshuffles and draws new crops.
  order = [np.concatenate([b["label"] for b in ref[e * 3:e * 3 + 3]]) for e in (0, 1)]
  assert sorted(order[0]) == sorted(order[1]) and not np.array_equal(order[0], order[1])
  assert not np.array_equal(ref[0]["image"], ref[3]["image"])
  other = next(ip.create_train_iter(cfg, seed=8, **kw))
  assert not np.array_equal(other["image"], ref[0]["image"])


def test_train_cache_gives_the_same_stream(tiny):
  _, cfg = tiny
  cached = ml_collections.ConfigDict(dict(cfg.to_dict(), cache=True))
  kw = dict(batch_size=4, seed=3, process_index=0, process_count=1)
  # The tiny dataset is one tfrecord file, so the (skipped) file shuffle cannot change the order.
  for a, b in zip(take(ip.create_train_iter(cfg, **kw), 4),
                  take(ip.create_train_iter(cached, **kw), 4)):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_train_shards_split_the_examples(tiny):
  fixture, cfg = tiny
  labels = collections.Counter()
  for p in range(2):
    it = ip.create_train_iter(cfg, batch_size=3, seed=0, process_index=p, process_count=2)
    labels.update(int(y) for b in take(it, 2) for y in b["label"])  # one epoch of 6 each
  assert labels == collections.Counter(fixture.train_files.values())


def test_eval_pads_masks_and_keeps_labels_with_images(tiny):
  fixture, cfg = tiny
  batches = list(ip.create_eval_iter(cfg, batch_size=3, process_index=0, process_count=1))
  assert [b["mask"].tolist() for b in batches] == [[1, 1, 1], [1, 0, 0]]
  real = [(x, int(y)) for b in batches for x, y, m in zip(b["image"], b["label"], b["mask"]) if m]
  assert sorted(y for _, y in real) == sorted(fixture.val_files.values())
  for x, y in real:
    assert nearest_class(x, fixture) == y
  assert not batches[1]["image"][1:].any()
  again = list(ip.create_eval_iter(cfg, batch_size=3, process_index=0, process_count=1))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  # Three processes: shards of 2, 1, 1, one batch each.
  per = [list(ip.create_eval_iter(cfg, batch_size=3, process_index=p, process_count=3))
         for p in range(3)]
  assert [[b["mask"].sum() for b in bs] for bs in per] == [[2], [1], [1]]
  labels = [int(y) for bs in per for b in bs for y, m in zip(b["label"], b["mask"]) if m]
  assert sorted(labels) == sorted(fixture.val_files.values())


def test_eval_resize_and_centre_crop_match_torchvision_semantics(tiny):
  Image = pytest.importorskip("PIL.Image", reason="pillow is the reference implementation")
  fixture, cfg = tiny
  got = {int(y): x for b in ip.create_eval_iter(cfg, batch_size=4, process_index=0,
                                                 process_count=1)
         for x, y in zip(b["image"], b["label"])}
  short = round(256 * SIZE / 224)
  with tarfile.open(os.path.join(fixture.manual_dir, fx.VAL_TAR)) as tar:
    for member in tar.getmembers():
      im = Image.open(tar.extractfile(member)).convert("RGB")
      w, h = im.size
      # torchvision Resize(short): shorter side to `short`, longer truncated; CenterCrop rounds.
      nw, nh = (short, int(short * h / w)) if w < h else (int(short * w / h), short)
      resized = im.resize((nw, nh), Image.BILINEAR)
      top, left = int(round((nh - SIZE) / 2)), int(round((nw - SIZE) / 2))
      x = got[fixture.val_files[member.name]]
      errors = []
      for shift in (0, 1):  # the right window, and one pixel to the right
        crop = resized.crop((left + shift, top, left + shift + SIZE, top + SIZE))
        ref = (np.asarray(crop, np.float64) / 255 - MEAN) / STD
        errors.append(np.abs(x - ref).mean())
      # JPEG decoders and resize kernels differ slightly; a one-pixel shift of the R ramp does not.
      assert errors[0] < 0.035 < errors[1], (member.name, errors)


def test_random_resized_crop_window():
  import tensorflow as tf
  for shape in ((40, 48), (480, 640), (300, 200)):
    fractions, ratios = [], []
    for s in range(100):
      y, x, h, w = ip.random_resized_crop_window(tf.constant(shape), tf.constant([s, 1])).numpy()
      assert 0 <= y and y + h <= shape[0] and 0 <= x and x + w <= shape[1] and h > 0 and w > 0
      fractions.append(h * w / (shape[0] * shape[1]))
      ratios.append(w / h)
    if shape != (40, 48):  # large enough for rounding not to matter
      assert 0.075 < min(fractions) < 0.2 and max(fractions) > 0.8
      assert min(ratios) > 0.74 and max(ratios) < 1.34
    assert len(set(fractions)) > 30
  # Too elongated for any attempt: centre crop with the aspect clamped to 4/3 (or 3/4).
  wide = ip.random_resized_crop_window(tf.constant([10, 200]), tf.constant([0, 0])).numpy()
  tall = ip.random_resized_crop_window(tf.constant([200, 10]), tf.constant([0, 0])).numpy()
  assert wide.tolist() == [0, (200 - 13) // 2, 10, 13]
  assert tall.tolist() == [(200 - 13) // 2, 0, 13, 10]


def test_grayscale_jpegs_become_rgb(tiny):
  fixture, cfg = tiny
  assert fixture.grayscale_files  # the fixture stores one train JPEG with a single channel
  it = ip.create_train_iter(cfg, batch_size=12, seed=0, process_index=0, process_count=1)
  assert next(it)["image"].shape == (12, SIZE, SIZE, 3)


def test_missing_archives_error_lists_files_and_folder(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / fx.VAL_TAR).write_bytes(b"")
  cfg = ml_collections.ConfigDict(dict(dataset="imagenet2012", data_dir=str(tmp_path / "tfds"),
                                       manual_dir=str(manual)))
  with pytest.raises(FileNotFoundError) as e:
    ip.dataset_info(cfg)
  msg = str(e.value)
  assert f"manual_dir='{manual}'" in msg
  assert "ILSVRC2012_img_train.tar (MISSING)" in msg and "ILSVRC2012_img_val.tar (found)" in msg
  # Without manual_dir, tfds' default folder under data_dir is searched and named.
  cfg.manual_dir = None
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_val.tar \\(MISSING\\)") as e:
    ip.create_train_iter(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
  assert os.path.join(str(tmp_path / "tfds"), "downloads", "manual") in str(e.value)


def test_tiny_imagenet_dirs_for_a_dry_run(tmp_path):
  dirs = fx.tiny_imagenet_dirs(str(tmp_path), num_val=2, train_per_class=1)
  assert dirs == {"manual_dir": str(tmp_path / "manual"), "data_dir": str(tmp_path / "tfds")}
  train = tmp_path / "manual" / fx.TRAIN_TAR
  with tarfile.open(train) as tar:
    assert len(tar.getnames()) == 2  # one per-synset tar per class
  stamp = train.stat().st_mtime_ns
  assert fx.tiny_imagenet_dirs(str(tmp_path)) == dirs and train.stat().st_mtime_ns == stamp
