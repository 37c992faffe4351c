"""CPU time per image of each stage of the ImageNet preprocessing, on the bench_input files.

Runs each function below over the same encoded train JPEGs (held in memory) through a tf.data
parallel map with the pipeline's thread options (private pool of all cores, one thread per op),
and prints img/s and CPU ms per image (user + sys of the process) per function and round:
  plain        tf.io.decode_jpeg, full size (the bench's ceiling)
  crop_decode  decode_and_crop_jpeg of a fixed 328x328 window (eval's region of a 375x500 image)
  window       the RandomResizedCrop window alone (header read + draws)
  train        imagenet_train_image (window, crop decode, resize, flip)
  eval         imagenet_eval_image
  sat_<n>      ScaleAndTranslate (tf.image.resize antialias=True's kernel) of a random n x n
               uint8 image to 224x224, float32, rounded to uint8
  bilinear_<n> ResizeBilinear (half-pixel centres, no antialiasing) of the same
  op_<n>       the compiled resize op (bireal_jax/data/resize_op.py) of the same, uint8 out
               (what sat_<n> gives); absent where it cannot be built. train and eval use it
               unless BIREAL_RESIZE=tf.

Needs the archives bench_input.py prepared (--workdir).

  python experiments/input_stages.py [--sizes 375x500_400] [--rounds 3]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

import numpy as np  # noqa: E402

from bireal_jax import input_pipeline as ip  # noqa: E402
from bireal_jax.data import augment, resize_op  # noqa: E402
from bireal_jax.data.imagenet import pipeline_options  # noqa: E402

tf = ip.tf


def _last(x):
  return tf.cast(x[-1, -1, 0], tf.int32)  # depends on every decoded pixel's computation


def _resize(kind, side):
  def fn(image):
    if kind == "op":
      return _last(resize_op.resize_region_op()(image, tf.constant([0.0, 0.0, side, side]),
                                                tf.constant([224, 224])))
    if kind == "sat":
      x = tf.raw_ops.ScaleAndTranslate(
          images=tf.cast(image, tf.float32)[None], size=[224, 224],
          scale=tf.constant([224 / side] * 2), translation=tf.zeros(2), kernel_type="triangle",
          antialias=True)[0]
    else:
      x = tf.raw_ops.ResizeBilinear(images=image[None], size=[224, 224],
                                    half_pixel_centers=True)[0]
    return _last(tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8))
  return fn


def _rate(elements, fn, repeat: int):
  ds = tf.data.Dataset.from_tensor_slices(elements).enumerate().repeat(repeat)
  ds = ds.map(lambda i, e: fn(e, i), num_parallel_calls=tf.data.AUTOTUNE).batch(64).prefetch(2)
  it = iter(ds.with_options(pipeline_options()))
  next(it)
  n, t, c = 0, time.perf_counter(), machine.cpu_seconds()
  for b in it:
    n += len(b)
  return n / (time.perf_counter() - t), 1000 * (machine.cpu_seconds() - c) / n


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="375x500_400", help="bench_input dataset folders")
  p.add_argument("--workdir", default="/tmp/bireal_bench_input")
  p.add_argument("--images", type=int, default=200, help="files per dataset")
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args(argv)
  print(f"CPU: {machine.cpu_model()}, {machine.cores()} cores; load {machine.loadavg()}")
  files = []
  for d in args.sizes.split(","):
    b = ip.tfds.builder("imagenet2012", data_dir=os.path.join(args.workdir, d, "tfds"))
    ds = b.as_dataset(split="train", decoders={"image": ip.tfds.decode.SkipDecoding()})
    files += [ex["image"] for ex in ds.take(args.images).as_numpy_iterator()]
  enc = tf.constant(files)
  key0 = tf.constant([0, 0], tf.int64)
  jpeg = {
      "plain": lambda e, i: _last(tf.io.decode_jpeg(e, channels=3)),
      "crop_decode": lambda e, i: _last(tf.image.decode_and_crop_jpeg(
          e, tf.constant([20, 40, 328, 328]), channels=3)),
      "window": lambda e, i: augment.random_resized_crop_window(
          augment.encoded_image_hw(e), augment.fold_key(key0, i))[0],
      "train": lambda e, i: _last(augment.imagenet_train_image(e, 224, augment.fold_key(key0, i))),
      "eval": lambda e, i: _last(augment.imagenet_eval_image(e, 224)),
  }
  rng = np.random.default_rng(0)
  arrays = {n: tf.constant(rng.integers(0, 256, (32, n, n, 3), dtype=np.uint8))
            for n in (150, 300)}
  print(f"{len(files)} files from {args.sizes}; CPU ms per image (img/s on all cores); train "
        f"and eval resize with "
        f"{'the compiled op' if resize_op.resize_region_op() else 'ScaleAndTranslate'}")
  for r in range(args.rounds):
    row = []
    for name, fn in jpeg.items():
      rate, ms = _rate(enc, fn, 2)
      row.append(f"{name} {ms:.2f} ({rate:.0f})")
    for kind in ("sat", "bilinear") + (("op",) if resize_op.resize_region_op() else ()):
      for n, a in arrays.items():
        f = _resize(kind, n)
        rate, ms = _rate(a, lambda e, i, f=f: f(e), 20)
        row.append(f"{kind}_{n} {ms:.2f} ({rate:.0f})")
    print(f"round {r}: " + ", ".join(row) + f"; load {machine.loadavg()}", flush=True)


if __name__ == "__main__":
  main()
