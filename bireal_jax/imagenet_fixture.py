"""Tiny ILSVRC-2012-format archives, accepted by tfds' real `imagenet2012` builder.

`write_imagenet_archives(folder)` writes the two files the builder reads from its manual_dir:
  * `ILSVRC2012_img_train.tar`: one `nXXXXXXXX.tar` per class, each holding `nXXXXXXXX_N.JPEG`;
  * `ILSVRC2012_img_val.tar`: flat `ILSVRC2012_val_XXXXXXXX.JPEG` files, numbered from 1.
Used by the tests and by a training dry run, so the real preparation and input code run end to end
on a few kilobytes instead of 150 GB.

Validation labels: the builder (tensorflow_datasets/datasets/imagenet2012/imagenet_common.py)
sorts the val tar's member names and pairs them with the first lines of its own
`validation_labels.txt`. Val image k (1-based) therefore gets line k, whatever its pixels; the
fixture reads that file and draws each val image, and the train classes, from those synsets.

Pixels encode what a test needs to check: channels G and B hold a per-class colour, channel R a
horizontal ramp (so a crop's position is visible) plus a little per-image noise.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import tarfile

import numpy as np

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"

# Distinct (G, B) colours, far apart so a JPEG-compressed, resized image still maps back.
_PALETTE = ((40, 40), (40, 215), (215, 40), (215, 215), (128, 128), (40, 128), (128, 40),
            (215, 128), (128, 215), (85, 170), (170, 85), (0, 255))


@dataclasses.dataclass(frozen=True)
class ImagenetFixture:
  """What `write_imagenet_archives` wrote (labels are tfds `imagenet2012` class indices)."""
  manual_dir: str
  synsets: tuple[str, ...]             # one per class, in the order colours were assigned
  labels: tuple[int, ...]              # tfds label index of each synset
  colors: tuple[tuple[int, int], ...]  # (G, B) of each class
  train_files: dict[str, int]          # file name -> label
  val_files: dict[str, int]            # file name -> label
  grayscale_files: tuple[str, ...]     # train JPEGs stored with one channel (as a few real ones)


def _tfds_imagenet_file(name: str) -> str:
  # Located without importing tensorflow_datasets (slow, and pulls TensorFlow in).
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("tensorflow_datasets is not installed; it is needed for the ImageNet fixture")
  path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "imagenet2012", name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: this tensorflow_datasets has no imagenet2012 "
                            f"{name}")
  return path


def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    return f.read().strip().splitlines()


def _image(rng: np.random.Generator, color: tuple[int, int], height: int, width: int) -> np.ndarray:
  ramp = np.linspace(0, 255, width)[None, :].repeat(height, 0)
  img = np.empty((height, width, 3), np.float64)
  img[..., 0] = ramp
  img[..., 1] = color[0]
  img[..., 2] = color[1]
  img += rng.uniform(-8, 8, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, grayscale: bool = False) -> bytes:
  # Through the pipeline module: it hides accelerators from TensorFlow before first use.
  from bireal_jax.input_pipeline import tf
  if grayscale:
    img = np.round(img @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
  return tf.io.encode_jpeg(img, quality=95).numpy()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_imagenet_archives(manual_dir: str, *, num_val: int = 4, train_per_class: int = 3,
                            size: tuple[int, int] = (40, 48), seed: int = 0) -> ImagenetFixture:
  """Writes the two tars into `manual_dir` (created if needed).

  Args:
    num_val: validation images; the classes are the distinct synsets among the first `num_val`
      lines of tfds' validation labels (at most len(_PALETTE) of them).
    train_per_class: train images per class.
    size: (height, width) of landscape images; every other image is written transposed
      (portrait), so both orientations go through the resize-shorter-side logic.
  """
  if num_val < 1 or train_per_class < 1:
    raise ValueError(f"num_val={num_val} and train_per_class={train_per_class} must be >= 1")
  names = _read_lines(_tfds_imagenet_file("labels.txt"))
  index = {s: i for i, s in enumerate(names)}
  val_synsets = _read_lines(_tfds_imagenet_file("validation_labels.txt"))[:num_val]
  synsets = tuple(dict.fromkeys(val_synsets))  # distinct, first-seen order
  if len(synsets) > len(_PALETTE):
    raise ValueError(f"num_val={num_val} spans {len(synsets)} classes; at most {len(_PALETTE)} "
                     "have distinct colours")
  color = {s: _PALETTE[i] for i, s in enumerate(synsets)}
  rng = np.random.default_rng(seed)
  h, w = size

  def shape(k):
    return (h, w) if k % 2 == 0 else (w, h)

  os.makedirs(manual_dir, exist_ok=True)
  train_files, gray = {}, []
  with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), "w") as outer:
    for c, s in enumerate(synsets):
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for k in range(train_per_class):
          fname = f"{s}_{k + 1}.JPEG"
          is_gray = c == 0 and k == 0
          _add(inner, fname, _jpeg(_image(rng, color[s], *shape(k)), grayscale=is_gray))
          train_files[fname] = index[s]
          if is_gray:
            gray.append(fname)
      _add(outer, f"{s}.tar", inner_buf.getvalue())
  val_files = {}
  with tarfile.open(os.path.join(manual_dir, VAL_TAR), "w") as tar:
    # Written in reverse: the builder must pair labels by sorted name, not by archive order.
    for k in reversed(range(num_val)):
      fname = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
      _add(tar, fname, _jpeg(_image(rng, color[val_synsets[k]], *shape(k))))
      val_files[fname] = index[val_synsets[k]]
  return ImagenetFixture(
      manual_dir=manual_dir, synsets=synsets, labels=tuple(index[s] for s in synsets),
      colors=tuple(color[s] for s in synsets), train_files=train_files,
      val_files=dict(sorted(val_files.items())), grayscale_files=tuple(gray))


def tiny_imagenet_dirs(folder: str, **kwargs) -> dict[str, str]:
  """Config overrides for a dry run: archives in `folder`/manual (written once), tfds data in
  `folder`/tfds. `kwargs` go to `write_imagenet_archives` on the first call."""
  manual_dir = os.path.join(folder, "manual")
  if not all(os.path.isfile(os.path.join(manual_dir, f)) for f in (TRAIN_TAR, VAL_TAR)):
    write_imagenet_archives(manual_dir, **kwargs)
  return {"manual_dir": manual_dir, "data_dir": os.path.join(folder, "tfds")}
