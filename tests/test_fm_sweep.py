"""experiments/fm_sweep.py: its TensorFlow-free Fashion-MNIST source serves what the tf.data
pipeline serves (same eval batches, same normalisation, real crop+flip), and its recipe
scheduler refuses recipes whose init/teacher is missing."""
import importlib.util
import os

import ml_collections
import numpy as np
import pytest

from bireal_jax import input_pipeline as ip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("fm_sweep",
                                               os.path.join(ROOT, "experiments", "fm_sweep.py"))
fm_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fm_sweep)


def cfg(folder, augment="none"):
  return ml_collections.ConfigDict(dict(dataset="fashion_mnist", manual_dir=folder, image_size=28,
                                        eval_split="test", augment=augment))


def index_of(image):
  """The example index that synthetic_split wrote into pixels (0,0) and (0,1)."""
  px = np.rint(image[..., 0] * ip.FMNIST_STD * 255 + ip.FMNIST_MEAN * 255).astype(int)
  return px[0, 0] + 256 * px[0, 1]


def test_eval_batches_equal_the_tf_pipeline(synth_dir):
  src = fm_sweep.NumpyFashionMnist(synth_dir)
  ours = list(src.create_eval_iter(cfg(synth_dir), batch_size=3000))
  theirs = list(ip.create_eval_iter(cfg(synth_dir), batch_size=3000, process_index=0,
                                    process_count=1))
  assert len(ours) == len(theirs) == 4  # 10,000 examples: the last batch padded and masked
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
  info = src.dataset_info(cfg(synth_dir))
  assert (info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
      10, (28, 28, 1), 60000, 10000)


def test_train_batches_cover_an_epoch_once_and_resume(synth_dir):
  src = fm_sweep.NumpyFashionMnist(synth_dir)
  it = src.create_train_iter(cfg(synth_dir), batch_size=1000, seed=3)
  epoch = [next(it) for _ in range(60)]
  seen = np.concatenate([[index_of(x) for x in b["image"]] for b in epoch])
  assert sorted(seen) == list(range(60000))  # a permutation of the train set
  labels = np.concatenate([b["label"] for b in epoch])
  np.testing.assert_array_equal(labels, (7 * seen) % 10)  # each label belongs to its image
  resumed = next(src.create_train_iter(cfg(synth_dir), batch_size=1000, seed=3, start_step=61))
  np.testing.assert_array_equal(resumed["image"], (next(it), next(it))[1]["image"])
  other = next(src.create_train_iter(cfg(synth_dir), batch_size=1000, seed=4))
  assert not np.array_equal(other["label"], epoch[0]["label"])


def test_crop_flip_is_a_shifted_possibly_mirrored_crop(synth_dir):
  src = fm_sweep.NumpyFashionMnist(synth_dir)
  images, _ = src.arrays["train"]
  batch = next(src.create_train_iter(cfg(synth_dir, "crop_flip"), batch_size=64, seed=0))
  plain = next(src.create_train_iter(cfg(synth_dir), batch_size=64, seed=0))  # same order
  shifts = set()
  for aug, ref in zip(batch["image"], plain["image"]):
    i = index_of(ref)
    padded = np.pad((images[i].astype(np.float32) / 255 - ip.FMNIST_MEAN) / ip.FMNIST_STD,
                    ((2, 2), (2, 2), (0, 0)), constant_values=-ip.FMNIST_MEAN / ip.FMNIST_STD)
    found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
             if np.allclose(aug, (lambda c: c[:, ::-1] if f else c)(
                 padded[dy:dy + 28, dx:dx + 28]), atol=1e-5)]
    assert found, f"augmented image of example {i} is no crop/flip of it"
    shifts.update(found)
  assert len(shifts) > 10  # offsets and flips actually vary


def test_bad_input_errors(synth_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
    fm_sweep.NumpyFashionMnist(str(tmp_path))
  src = fm_sweep.NumpyFashionMnist(synth_dir)
  bad = cfg(synth_dir)
  bad.image_size = 32
  with pytest.raises(ValueError, match="image_size=32"):
    src.dataset_info(bad)
  with pytest.raises(SystemExit, match=r"w32_2step needs \['twin32'\]"):
    fm_sweep.main(["--recipes", "w32_2step", "--out", str(tmp_path / "sweep")])
  with pytest.raises(SystemExit):
    fm_sweep.main(["--recipes", "nope", "--out", str(tmp_path / "sweep")])


def test_recipe_config_resolves_dependencies(tmp_path):
  c = fm_sweep.recipe_config("w32_2step_kd", str(tmp_path), None)
  assert c.init_from == c.distill_from == os.path.join(str(tmp_path), "twin32")
  assert (c.base_width, c.num_epochs, c.model, c.tensorboard) == (32, 20.0, "bireal18", False)
  assert fm_sweep.deps("w32_2step_kd") == {"twin32"} and fm_sweep.deps("w32_e20") == set()
