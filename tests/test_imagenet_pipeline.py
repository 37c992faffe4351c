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
from bireal_jax import pixels
from bireal_jax.data import decode_check

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


def normalised(images):
  """uint8 RGB batches (as the pipeline sends them) -> what the model sees (the train steps
  normalise them on the device)."""
  assert np.asarray(images).dtype == np.uint8
  return pixels.normalise_uint8(images, np)


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
    assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    x = normalised(b["image"])
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
    assert np.isfinite(x).all() and x.std() > 0.1
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
  real = [(x, int(y)) for b in batches
          for x, y, m in zip(normalised(b["image"]), b["label"], b["mask"]) if m]
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


def test_eval_passes_are_whole_after_an_unfinished_one_and_side_by_side(tiny):
  """Each evaluation is the whole split from its first batch, whether the previous one stopped
  early or another runs beside it (no iterator state leaks from one evaluation to another)."""
  _, cfg = tiny
  ip.clear_caches()
  one = lambda: ip.create_eval_iter(cfg, batch_size=3, process_index=0, process_count=1)  # noqa: E731
  first = list(one())
  early = one()
  next(early)  # left after one batch
  outer = one()
  a = [next(outer)]
  inner = list(one())  # a whole evaluation while `outer` is open
  a += list(outer)
  for got in (list(one()), inner, a, list(one())):
    assert len(got) == len(first)
    for x, y in zip(first, got):
      for k in ("image", "label", "mask"):
        np.testing.assert_array_equal(x[k], y[k])


def test_later_evaluations_reuse_the_traced_eval_pipeline(tiny, monkeypatch):
  """The eval map function is traced once per (data, split, size): a retrace costs each pass
  ~0.25 s, as long as a 400-image pass on two cores."""
  from bireal_jax.data import imagenet
  _, cfg = tiny
  traced = []
  real = imagenet.imagenet_eval_image
  monkeypatch.setattr(imagenet, "imagenet_eval_image",
                      lambda *a, **k: traced.append(1) or real(*a, **k))
  runs = [list(ip.create_eval_iter(cfg, batch_size=2, split="train[2:7]", process_index=0,
                                   process_count=1)) for _ in range(3)]
  assert len(traced) == 1
  for got in runs[1:]:
    for x, y in zip(runs[0], got):
      np.testing.assert_array_equal(x["image"], y["image"])


def test_eval_resize_and_centre_crop_match_torchvision_semantics(tiny):
  Image = pytest.importorskip("PIL.Image", reason="pillow is the reference implementation")
  fixture, cfg = tiny
  got = {int(y): x for b in ip.create_eval_iter(cfg, batch_size=4, process_index=0,
                                                 process_count=1)
         for x, y in zip(normalised(b["image"]), b["label"])}
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


def test_no_traceback_when_the_process_exits_holding_iterators(tiny):
  import subprocess
  import sys
  _, cfg = tiny
  code = ("import sys, ml_collections; from bireal_jax import input_pipeline as ip; "
          f"cfg = ml_collections.ConfigDict({cfg.to_dict()!r}); "
          "kw = dict(batch_size=4, process_index=0, process_count=1); "
          "t = ip.create_train_iter(cfg, seed=0, **kw); next(t); "
          "e = ip.create_eval_iter(cfg, **kw); next(e); print('held')")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
  assert r.returncode == 0 and "held" in r.stdout, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-2000:]


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


# --------------------------------------------------------------------------- odd and damaged files

ODD_KINDS = fx.ODD_DECODABLE + fx.ODD_CORRUPT


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
  """The tiny archives plus CMYK / PNG files (on tfds' lists and not) and damaged ones."""
  pytest.importorskip("PIL.Image", reason="pillow writes the CMYK JPEGs")
  root = tmp_path_factory.mktemp("imagenet_odd")
  fixture = fx.write_imagenet_archives(str(root / "manual"), odd=ODD_KINDS)
  cfg = ml_collections.ConfigDict(dict(
      dataset="imagenet2012", data_dir=str(root / "tfds"), manual_dir=fixture.manual_dir,
      image_size=SIZE, shuffle_buffer_size=32))
  ip.imagenet_builder(cfg)  # prepared; the decode check runs on first use of a split
  return fixture, cfg


def odd_of(fixture, split, decodable):
  return {n: o for n, o in fixture.odd_files.items()
          if o.split == split and (o.rgb is not None) == decodable}


def solid_colours(images):
  """[(index, mean RGB in 0..255)] of the images that are one flat colour."""
  rgb = np.asarray(images, np.float64)  # uint8 RGB as the pipeline sends it
  return [(i, x.mean((0, 1))) for i, x in enumerate(rgb) if x.std((0, 1)).max() < 2.5]


def test_tfds_reencodes_only_the_odd_files_on_its_lists(odd):
  import tensorflow as tf
  fixture, cfg = odd
  builder = ip.imagenet_builder(cfg)
  stored = {}
  for split in ("train", "validation"):
    ds = builder.as_dataset(split=split, decoders={"image": ip.tfds.decode.SkipDecoding()})
    stored.update({ex["file_name"].decode(): (ex["image"], int(ex["label"]))
                   for ex in ds.as_numpy_iterator()})
  assert {n: y for n, (_, y) in stored.items()} == {**fixture.train_files, **fixture.val_files}
  for name, o in fixture.odd_files.items():
    data = stored[name][0]
    if o.kind in ("cmyk_listed", "png_listed"):  # converted by the builder: RGB baseline JPEG
      assert data[:3] == b"\xff\xd8\xff" and tf.image.extract_jpeg_shape(data)[2] == 3, name
    elif o.kind in ("cmyk", "val_cmyk"):  # not on tfds' list: still CMYK (4 components)
      assert data[:3] == b"\xff\xd8\xff" and tf.image.extract_jpeg_shape(data)[2] == 4, name
    elif o.kind in ("png", "val_png"):  # not on tfds' list: still a PNG, named .JPEG
      assert data[:8] == b"\x89PNG\r\n\x1a\n", name
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_in
  listed = set(tfds_in.CMYK_IMAGES) | set(tfds_in.PNG_IMAGES)
  assert {n: n in listed for n in fixture.odd_files} == {
      n: o.on_tfds_list for n, o in fixture.odd_files.items()}
  assert "n02105855_2933.JPEG" in tfds_in.PNG_IMAGES


def test_odd_files_decode_to_rgb_through_train_and_eval(odd):
  fixture, cfg = odd
  # One train epoch in one batch: the 16 images that decode (18 minus the 2 damaged ones).
  batch = next(ip.create_train_iter(cfg, batch_size=16, seed=0, process_index=0,
                                    process_count=1))
  evals = list(ip.create_eval_iter(cfg, batch_size=8, process_index=0, process_count=1))
  assert batch["image"].shape == (16, SIZE, SIZE, 3) and evals[0]["image"].shape[-1] == 3
  real = evals[0]["mask"] == 1  # 6 images that decode, then padding
  assert len(evals) == 1 and real.sum() == 6
  for split, images, labels in (("train", batch["image"], batch["label"]),
                                ("validation", evals[0]["image"][real], evals[0]["label"][real])):
    expected = odd_of(fixture, split, decodable=True)
    solid = solid_colours(images)
    # Only the odd files are flat (the regular ones carry a ramp), and each is found once, in
    # its own colour (within JPEG tolerance) and with its label.
    assert len(solid) == len(expected), (split, len(solid))
    for name, o in expected.items():
      hits = [i for i, c in solid if np.abs(c - o.rgb).max() < 4]
      assert len(hits) == 1, (name, o.rgb, [c.round() for _, c in solid])
      assert labels[hits[0]] == o.label, name


def test_damaged_images_are_named_counted_and_skipped_before_training(odd, caplog,
                                                                      monkeypatch):
  fixture, cfg = odd
  ip.clear_caches()  # the warnings come once per process; show them again here
  with caplog.at_level("WARNING"):
    info = ip.dataset_info(cfg)
  damaged = {s: odd_of(fixture, s, decodable=False) for s in ("train", "validation")}
  assert (info.num_train, info.num_eval) == (
      len(fixture.train_files) - len(damaged["train"]),
      len(fixture.val_files) - len(damaged["validation"]))
  for split, files in damaged.items():
    bad = ip.imagenet_bad_images(cfg, split)
    assert {b.file_name: b.path for b in bad} == {n: o.member for n, o in files.items()}
    assert all(b.error for b in bad)
    for o in files.values():
      assert f"skipping {o.member}" in caplog.text
  assert "2 of 18 images do not decode" in caplog.text and "1 of 7" in caplog.text
  # Recorded next to the dataset: a new process reads the record instead of decoding again.
  ip.clear_caches()
  monkeypatch.setattr(decode_check, "_scan_split", lambda *a: pytest.fail("checked again"))
  assert len(ip.imagenet_bad_images(cfg, "train")) == 2
  # Epochs, shards and eval never meet a damaged image: every good one appears once.
  good_train = collections.Counter(
      y for n, y in fixture.train_files.items() if n not in damaged["train"])
  kw = dict(batch_size=4, seed=1)
  labels = collections.Counter()
  for p in range(2):
    it = ip.create_train_iter(cfg, process_index=p, process_count=2, **kw)
    labels.update(int(y) for b in take(it, 2) for y in b["label"])  # one epoch of 8 each
  assert labels == good_train
  ref = take(ip.create_train_iter(cfg, process_index=0, process_count=1, **kw), 6)
  resumed = take(ip.create_train_iter(cfg, start_step=5, process_index=0, process_count=1, **kw),
                 1)
  np.testing.assert_array_equal(resumed[0]["image"], ref[5]["image"])
  per = [list(ip.create_eval_iter(cfg, batch_size=4, process_index=p, process_count=2))
         for p in range(2)]
  got = sorted(int(y) for bs in per for b in bs for y, m in zip(b["label"], b["mask"]) if m)
  assert got == sorted(y for n, y in fixture.val_files.items() if n not in damaged["validation"])
  assert [len(bs) for bs in per] == [1, 1]


def test_bad_images_error_names_every_damaged_file(odd):
  fixture, cfg = odd
  strict = ml_collections.ConfigDict(dict(cfg.to_dict(), bad_images="error"))
  with pytest.raises(ValueError, match="2 of 18 images do not decode"):
    ip.dataset_info(strict)
  with pytest.raises(ValueError, match="bad_images='error'") as train_error:
    ip.create_train_iter(strict, batch_size=4, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="1 of 7 images do not decode") as eval_error:
    ip.create_eval_iter(strict, batch_size=4, process_index=0, process_count=1)
  for split, e in (("train", train_error), ("validation", eval_error)):
    for o in odd_of(fixture, split, decodable=False).values():
      assert o.member in str(e.value)
  # A slice without the damaged image is fine.
  (bad,) = ip.imagenet_bad_images(cfg, "validation")
  j = 0 if bad.index else 1
  batches = list(ip.create_eval_iter(strict, batch_size=2, split=f"validation[{j}:{j + 1}]",
                                     process_index=0, process_count=1))
  assert [b["mask"].tolist() for b in batches] == [[1, 0]]
  with pytest.raises(ValueError, match="bad_images='ignore'"):
    ip.dataset_info(ml_collections.ConfigDict(dict(cfg.to_dict(), bad_images="ignore")))


def test_decode_error_the_check_missed_says_where_and_what_to_do(odd, monkeypatch):
  _, cfg = odd
  # As if the record had passed every image (dataset files rewritten after the check).
  monkeypatch.setattr(decode_check, "_bad_images_cached", lambda builder, split: ())
  with pytest.raises(RuntimeError, match="eval of validation: an image failed to decode") as e:
    list(ip.create_eval_iter(cfg, batch_size=8, process_index=0, process_count=1))
  assert "bireal_jax_decode_check.validation.json" in str(e.value)


def test_damaged_file_tfds_converts_fails_preparation_with_its_name(tmp_path):
  pytest.importorskip("PIL.Image", reason="the fixture's odd files need pillow")
  fixture = fx.write_imagenet_archives(str(tmp_path / "manual"), num_val=1, train_per_class=1,
                                       odd=("truncated_listed",))
  cfg = ml_collections.ConfigDict(dict(dataset="imagenet2012", data_dir=str(tmp_path / "tfds"),
                                       manual_dir=fixture.manual_dir))
  (member,) = [o.member for o in fixture.odd_files.values()]
  assert member == f"{fx.TRAIN_TAR}/n02077923.tar/n02077923_14822.JPEG"  # on tfds' CMYK list
  with pytest.raises(ValueError, match="could not re-encode") as e:
    ip.dataset_info(cfg)
  assert member in str(e.value) and "download it again" in str(e.value)


def test_good_ranges_leave_out_the_bad_indices():
  assert ip.good_ranges(0, 10, (), 2, 7) == [(2, 7)]
  assert ip.good_ranges(5, 15, (), 0, 10) == [(5, 15)]
  # Good images of [0, 10) without 3 and 4: 0 1 2 5 6 7 8 9; the 2nd to 5th are 2 5 6 7.
  assert ip.good_ranges(0, 10, (3, 4), 2, 6) == [(2, 3), (5, 8)]
  assert ip.good_ranges(0, 10, (0, 9), 0, 8) == [(1, 9)]
  assert ip.good_ranges(2, 6, (0, 3, 8), 0, 3) == [(2, 3), (4, 6)]
  assert ip.good_ranges(0, 4, (1,), 3, 3) == []
  assert ip.split_of("train", [(2, 3), (5, 8)], 0) == "train[2:3]+train[5:8]"
  assert ip.split_of("validation", [], 4) == "validation[4:4]"


# ------------------------------------------------------------------ pixels against the float path

def _float_train_image(encoded, size, key):
  """The train preprocessing before issue 22 (float32, 0..255, not normalised): decode the
  crop window at full scale, tf.image.resize(antialias=True), flip."""
  import tensorflow as tf

  def jpeg():
    window = ip.random_resized_crop_window(tf.image.extract_jpeg_shape(encoded)[:2], key)
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    x = ip.decode_rgb(encoded)
    y0, x0, h, w = tf.unstack(ip.random_resized_crop_window(tf.shape(x)[:2], key))
    return x[y0:y0 + h, x0:x0 + w]

  x = tf.image.resize(tf.cond(ip.is_jpeg(encoded), jpeg, other), [size, size],
                      method="bilinear", antialias=True)
  flip = tf.random.stateless_uniform([], seed=ip.fold_key(key, 1)) < 0.5
  return tf.where(flip, tf.reverse(x, [1]), x)


def _float_eval_image(encoded, size):
  """The eval preprocessing before issue 22: resize the whole image, then the centre crop."""
  import tensorflow as tf
  x = ip.decode_rgb(encoded)
  h, w = tf.unstack(tf.cast(tf.shape(x)[:2], tf.float64))
  short = float(round(256 * size / 224))
  new_hw = tf.cast(tf.where(h <= w, tf.stack([short, tf.floor(w * short / h)]),
                            tf.stack([tf.floor(h * short / w), short])), tf.int32)
  x = tf.image.resize(x, new_hw, method="bilinear", antialias=True)
  top = tf.cast(tf.round(tf.cast(new_hw[0] - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_hw[1] - size, tf.float32) / 2), tf.int32)
  return tf.slice(x, [top, left, 0], [size, size, 3])


# The stated tolerance, in 0..255 levels. Without DCT scaling the uint8 pipeline is the float
# one rounded (|d| <= 0.5). A window at least twice the output decodes at 1/2 or 1/4 scale
# (the decoder's box average stands in for part of the antialiasing filter): measured on the
# noisy fixture images mean |d| ~0.9 and max ~3.5; on a natural photo (600x512) train crops
# mean 0.4-1.2 and up to ~45 at sharp edges, and an eval image whose short side is exactly 2x
# the resize target mean 2.6, up to 71 (docs/speed.md). The bounds are for the fixture images.
EXACT_MAX = 0.5 + 1e-3
SCALED_MEAN, SCALED_P99 = 1.5, 6.0


@pytest.mark.parametrize("hw,size,scaled", [((375, 500), 224, False),  # no window >= 448 px
                                            ((90, 120), 224, False),   # upsampled
                                            ((375, 500), 32, True),    # DCT 1/2, 1/4
                                            ((1200, 1600), 224, True)])
def test_uint8_pixels_match_the_float_pipeline(hw, size, scaled):
  import tensorflow as tf
  rng = np.random.default_rng(1)
  encoded = [fx.jpeg_bytes(fx.synthetic_photo(rng, (40, 215), *hw)),
             fx.jpeg_bytes(fx.synthetic_photo(rng, (215, 40), *hw[::-1]))]
  if not scaled:
    encoded.append(tf.io.encode_png(fx.synthetic_photo(rng, (128, 40), *hw)).numpy())
  train, evals = [], []
  for e in encoded:
    for s in range(12):
      key = tf.constant([s, 9], tf.int64)
      got = ip.imagenet_train_image(tf.constant(e), size, key).numpy()
      assert got.dtype == np.uint8 and got.shape == (size, size, 3)
      train.append(np.abs(got - _float_train_image(tf.constant(e), size, key).numpy()))
    got = ip.imagenet_eval_image(tf.constant(e), size).numpy()
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    evals.append(np.abs(got - _float_eval_image(tf.constant(e), size).numpy()))
  for d in (np.stack(train), np.stack(evals)):
    if scaled:
      assert d.mean() < SCALED_MEAN and np.percentile(d, 99) < SCALED_P99, (
          d.mean(), np.percentile(d, 99), d.max())
    else:
      assert d.max() <= EXACT_MAX, d.max()


# ------------------------------------------------------------------ the compiled resize op

def _resize_both(monkeypatch, cases):
  """`augment._resize_region` of each (image, region, out_hw) with the compiled op, then with
  ScaleAndTranslate (BIREAL_RESIZE=tf)."""
  import tensorflow as tf
  from bireal_jax.data import augment, resize_op

  def run():
    resize_op.reset()
    return [augment._resize_region(tf.constant(image), *[tf.constant(v, tf.float32) for v in r],
                                   hw).numpy() for image, r, hw in cases]

  monkeypatch.delenv("BIREAL_RESIZE", raising=False)
  if resize_op.resize_region_op() is None:
    pytest.skip("the resize op could not be built here (see the log)")
  got = run()
  monkeypatch.setenv("BIREAL_RESIZE", "tf")
  want = run()
  monkeypatch.delenv("BIREAL_RESIZE")
  resize_op.reset()
  return got, want


def test_resize_op_equals_scale_and_translate(monkeypatch):
  """Within 1 level everywhere and equal on >= 99.9 % of values (the float sums may round
  differently), over random images, regions (whole, inner with margins, fractional, smaller
  and larger than the output, 1-pixel images) and output sizes (square or not)."""
  rng = np.random.default_rng(22)
  cases = []
  for i in range(48):
    ih, iw = rng.integers(1, 400, 2) if i % 8 else (1, rng.integers(1, 50))
    image = rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)
    if i % 2:  # smooth content: values between the extremes, where rounding is tested
      image = np.clip(np.cumsum(image.astype(np.int32) - 127, axis=1) // 6 + 128, 0,
                      255).astype(np.uint8)
    out_hw = tuple(int(v) for v in rng.integers(1, 260, 2)) if i % 3 else (224, 224)
    kind = i % 4
    if kind == 0:  # the whole image
      region = (0.0, 0.0, float(ih), float(iw))
    elif kind == 1:  # an integer window inside, the rest a margin
      h, w = rng.integers(1, ih + 1), rng.integers(1, iw + 1)
      region = (float(rng.integers(0, ih - h + 1)), float(rng.integers(0, iw - w + 1)),
                float(h), float(w))
    else:  # fractional, as eval's centre crop in the decoded window's pixels
      h, w = rng.uniform(0.5, ih), rng.uniform(0.5, iw)
      region = (rng.uniform(0, ih - h), rng.uniform(0, iw - w), h, w)
    cases.append((image, region, out_hw))
  got, want = _resize_both(monkeypatch, cases)
  exact = total = 0
  for g, w, (image, region, out_hw) in zip(got, want, cases):
    assert g.dtype == np.uint8 and g.shape == w.shape == (*out_hw, 3), (g.shape, region)
    d = np.abs(g.astype(np.int32) - w)
    assert d.max() <= 1, (image.shape, region, out_hw, d.max())
    exact += int((d == 0).sum())
    total += d.size
  assert exact >= 0.999 * total, exact / total


def test_resize_op_fallback_when_forced_or_the_build_fails(monkeypatch, tmp_path, caplog):
  import tensorflow as tf
  from bireal_jax.data import augment, resize_op

  def op_types():
    fn = tf.function(lambda x: augment._resize_region(x, 1.0, 2.0, 30.0, 40.0, (16, 24)))
    graph = fn.get_concrete_function(tf.TensorSpec([50, 60, 3], tf.uint8)).graph
    types = {op.type for op in graph.get_operations()}
    for f in graph.as_graph_def().library.function:  # the cond's branches
      types |= {n.op for n in f.node_def}
    return types

  monkeypatch.setenv("BIREAL_RESIZE", "tf")
  resize_op.reset()
  assert resize_op.resize_region_op() is None
  assert "ScaleAndTranslate" in op_types() and "BirealResizeRegion" not in op_types()
  # A build that fails (here a compiler that always fails, into an empty cache) falls back too,
  # saying why.
  monkeypatch.delenv("BIREAL_RESIZE")
  monkeypatch.setenv("BIREAL_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")
  resize_op.reset()
  with caplog.at_level("WARNING"):
    assert resize_op.resize_region_op() is None
  assert any("resize op not used" in r.getMessage() and "failed" in r.getMessage()
             for r in caplog.records)
  assert "ScaleAndTranslate" in op_types()
  image = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
  got = augment._resize_region(tf.constant(image), 1.0, 2.0, 30.0, 40.0, (16, 24)).numpy()
  assert got.dtype == np.uint8 and got.shape == (16, 24, 3)
  resize_op.reset()
