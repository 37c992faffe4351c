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

Odd files (`odd=`, see ODD_KINDS): the real archives are not all clean baseline JPEGs. The train
tar holds 22 CMYK JPEGs and one PNG named `.JPEG`; tfds' builder re-encodes those as RGB JPEGs,
but only when the file name is on its lists (CMYK_IMAGES, PNG_IMAGES in
tensorflow_datasets/datasets/imagenet2012/imagenet2012_dataset_builder.py). The fixture can write
such files under listed names ("*_listed") and under names tfds does not know (stored as they
are), plus damaged ones (a truncated JPEG, an HTML page named `.JPEG`). Decodable odd files are
one solid colour (`OddFile.rgb`, what they must decode to), so they survive any crop and stand out
from the ramped ones.
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

# Odd files: kind -> (split, what is written). Names of "*_listed" kinds are on tfds' lists.
ODD_KINDS = {
    "cmyk_listed": ("train", "CMYK JPEG named n01739381_1309.JPEG (tfds CMYK_IMAGES)"),
    "png_listed": ("train", "PNG named n02105855_2933.JPEG (tfds PNG_IMAGES)"),
    "cmyk": ("train", "CMYK JPEG under a name tfds does not list"),
    "png": ("train", "PNG under a .JPEG name tfds does not list"),
    "truncated": ("train", "JPEG cut to half its bytes"),
    "garbage": ("train", "an HTML page named .JPEG"),
    "truncated_listed": ("train", "JPEG cut to half, named n02077923_14822.JPEG (tfds "
                                  "CMYK_IMAGES): tfds' conversion of it fails while preparing"),
    "val_cmyk": ("validation", "CMYK JPEG"),
    "val_png": ("validation", "PNG under a .JPEG name"),
    "val_truncated": ("validation", "JPEG cut to half its bytes"),
}
ODD_DECODABLE = ("cmyk_listed", "png_listed", "cmyk", "png", "val_cmyk", "val_png")
ODD_CORRUPT = ("truncated", "garbage", "val_truncated")  # all prepare; none decodes
_LISTED_NAMES = {"cmyk_listed": "n01739381_1309.JPEG", "png_listed": "n02105855_2933.JPEG",
                 "truncated_listed": "n02077923_14822.JPEG"}
# Solid colours of the decodable odd files: CMYK (K = 0, so every CMYK -> RGB formula agrees on
# 255 - C, 255 - M, 255 - Y) or RGB.
_ODD_COLOURS = {"cmyk_listed": (215, 40, 128, 0), "png_listed": (30, 200, 90),
                "cmyk": (40, 200, 0, 0), "png": (200, 60, 150), "val_cmyk": (0, 128, 215, 0),
                "val_png": (90, 30, 220)}

# Distinct (G, B) colours, far apart so a JPEG-compressed, resized image still maps back.
_PALETTE = ((40, 40), (40, 215), (215, 40), (215, 215), (128, 128), (40, 128), (128, 40),
            (215, 128), (128, 215), (85, 170), (170, 85), (0, 255))


@dataclasses.dataclass(frozen=True)
class OddFile:
  """One odd file written by `write_imagenet_archives(odd=...)`."""
  kind: str                            # a key of ODD_KINDS
  split: str                           # "train" | "validation" (tfds split it lands in)
  member: str                          # path in the archives, e.g. "X.tar/n1.tar/n1_4.JPEG"
  label: int                           # tfds label index
  on_tfds_list: bool                   # tfds' builder re-encodes it as an RGB JPEG
  rgb: tuple[int, int, int] | None     # the solid colour it decodes to; None: it does not decode


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
  odd_files: dict[str, OddFile] = dataclasses.field(default_factory=dict)  # file name -> OddFile


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


def synthetic_photo(rng: np.random.Generator, color: tuple[int, int], height: int,
                    width: int) -> np.ndarray:
  """uint8 [height, width, 3]: a red ramp, green and blue from `color`, and noise."""
  ramp = np.linspace(0, 255, width)[None, :].repeat(height, 0)
  img = np.empty((height, width, 3), np.float64)
  img[..., 0] = ramp
  img[..., 1] = color[0]
  img[..., 2] = color[1]
  img += rng.uniform(-8, 8, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, grayscale: bool = False) -> bytes:
  """`img` encoded as a JPEG (quality 95), optionally as a one-channel grayscale JPEG."""
  # Through the pipeline module: it hides accelerators from TensorFlow before first use.
  from bireal_jax.data.tf_env import tf
  if grayscale:
    img = np.round(img @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
  return tf.io.encode_jpeg(img, quality=95).numpy()


def _odd_bytes(kind: str, shape: tuple[int, int], rng: np.random.Generator
               ) -> tuple[bytes, tuple[int, int, int] | None]:
  """(encoded file, RGB it decodes to or None) for an odd `kind`."""
  if kind in ("truncated", "truncated_listed", "val_truncated"):
    # noisy: the cut lands in entropy-coded data
    data = jpeg_bytes(synthetic_photo(rng, _PALETTE[0], *shape))
    return data[:len(data) // 2], None
  if kind == "garbage":
    return b"<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n", None
  colour = _ODD_COLOURS[kind]
  if len(colour) == 4:  # CMYK: only PIL writes it (TensorFlow encodes grayscale and RGB only)
    try:
      from PIL import Image
    except ImportError as e:
      raise ImportError(f"odd file kind {kind!r} needs pillow to write a CMYK JPEG") from e
    buf = io.BytesIO()
    Image.new("CMYK", shape[::-1], colour).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    # What it should decode to, by PIL's reading of the file (independent of TensorFlow).
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64).mean((0, 1))
    return data, tuple(int(round(v)) for v in rgb)
  from bireal_jax.data.tf_env import tf
  img = np.broadcast_to(np.array(colour, np.uint8), (*shape, 3))
  return tf.io.encode_png(img).numpy(), colour


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_imagenet_archives(manual_dir: str, *, num_val: int = 4, train_per_class: int = 3,
                            size: tuple[int, int] = (40, 48), seed: int = 0,
                            odd: tuple[str, ...] = ()) -> ImagenetFixture:
  """Writes the two tars into `manual_dir` (created if needed).

  Args:
    num_val: validation images; the classes are the distinct synsets among the first `num_val`
      lines of tfds' validation labels (at most len(_PALETTE) of them).
    train_per_class: train images per class.
    size: (height, width) of landscape images; every other image is written transposed
      (portrait), so both orientations go through the resize-shorter-side logic.
    odd: kinds of odd files to add (keys of ODD_KINDS, each at most once), on top of the regular
      images. Train ones join their synset's tar: the "*_listed" ones under their tfds-listed
      name (and synset), the others as `<synset>_<k>.JPEG` of the first class after its regular
      images. Validation ones follow the regular ones (ILSVRC2012_val_<num_val + 1>... in the
      order given) and get tfds' labels for those numbers.
  """
  if num_val < 1 or train_per_class < 1:
    raise ValueError(f"num_val={num_val} and train_per_class={train_per_class} must be >= 1")
  odd = tuple(odd)
  unknown = [k for k in odd if k not in ODD_KINDS]
  if unknown or len(set(odd)) != len(odd):
    raise ValueError(f"odd={odd}: expected distinct kinds from {sorted(ODD_KINDS)}")
  names = _read_lines(_tfds_imagenet_file("labels.txt"))
  index = {s: i for i, s in enumerate(names)}
  val_odd = [k for k in odd if ODD_KINDS[k][0] == "validation"]
  all_val_synsets = _read_lines(_tfds_imagenet_file("validation_labels.txt"))
  val_synsets = all_val_synsets[:num_val]
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
  train_files, gray, odd_files = {}, [], {}
  members: dict[str, list[tuple[str, bytes]]] = {}  # synset -> its tar's files, in order
  for c, s in enumerate(synsets):
    for k in range(train_per_class):
      fname = f"{s}_{k + 1}.JPEG"
      is_gray = c == 0 and k == 0
      members.setdefault(s, []).append(
          (fname, jpeg_bytes(synthetic_photo(rng, color[s], *shape(k)), grayscale=is_gray)))
      train_files[fname] = index[s]
      if is_gray:
        gray.append(fname)
  k = train_per_class
  for j, kind in enumerate(k for k in odd if ODD_KINDS[k][0] == "train"):
    if kind in _LISTED_NAMES:
      fname = _LISTED_NAMES[kind]
    else:
      k += 1
      fname = f"{synsets[0]}_{k}.JPEG"
    s = fname.split("_")[0]
    data, rgb = _odd_bytes(kind, shape(j), rng)
    members.setdefault(s, []).append((fname, data))
    train_files[fname] = index[s]
    odd_files[fname] = OddFile(kind=kind, split="train", member=f"{TRAIN_TAR}/{s}.tar/{fname}",
                               label=index[s], on_tfds_list=kind in _LISTED_NAMES, rgb=rgb)
  with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), "w") as outer:
    for s, files in members.items():
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for fname, data in files:
          _add(inner, fname, data)
      _add(outer, f"{s}.tar", inner_buf.getvalue())
  val_files, val_members = {}, []
  for k in reversed(range(num_val)):  # drawn last to first, as the fixture always has
    fname = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
    photo = synthetic_photo(rng, color[val_synsets[k]], *shape(k))
    val_members.insert(0, (fname, jpeg_bytes(photo)))
    val_files[fname] = index[val_synsets[k]]
  for j, kind in enumerate(val_odd):
    k = num_val + j
    fname = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
    data, rgb = _odd_bytes(kind, shape(k), rng)
    val_members.append((fname, data))
    val_files[fname] = index[all_val_synsets[k]]
    odd_files[fname] = OddFile(kind=kind, split="validation", member=f"{VAL_TAR}/{fname}",
                               label=val_files[fname], on_tfds_list=False, rgb=rgb)
  with tarfile.open(os.path.join(manual_dir, VAL_TAR), "w") as tar:
    # Written in reverse: the builder must pair labels by sorted name, not by archive order.
    for fname, data in reversed(val_members):
      _add(tar, fname, data)
  return ImagenetFixture(
      manual_dir=manual_dir, synsets=synsets, labels=tuple(index[s] for s in synsets),
      colors=tuple(color[s] for s in synsets), train_files=train_files,
      val_files=dict(sorted(val_files.items())), grayscale_files=tuple(gray),
      odd_files=odd_files)


def tiny_imagenet_dirs(folder: str, **kwargs) -> dict[str, str]:
  """Config overrides for a dry run: archives in `folder`/manual (written once), tfds data in
  `folder`/tfds. `kwargs` go to `write_imagenet_archives` on the first call."""
  manual_dir = os.path.join(folder, "manual")
  if not all(os.path.isfile(os.path.join(manual_dir, f)) for f in (TRAIN_TAR, VAL_TAR)):
    write_imagenet_archives(manual_dir, **kwargs)
  return {"manual_dir": manual_dir, "data_dir": os.path.join(folder, "tfds")}
