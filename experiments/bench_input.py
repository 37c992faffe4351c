"""ImageNet input pipeline throughput against the plain JPEG decode rate of the same files.

Writes ILSVRC-format archives of ImageNet-sized JPEGs (several sizes; the fixture writes every
other image transposed, so landscape and portrait), prepares each with tfds' real imagenet2012
builder, then times, interleaved in rounds (plain, train, eval, plain, train, eval, ...):
  plain  tf.io.decode_jpeg(channels=3) of every train file at full size through tf.data
         (parallel map, all cores): the ceiling the issue measures against;
  train  create_train_iter (RandomResizedCrop + flip, what the train step receives), one
         iterator per dataset kept across rounds, each round one epoch of it;
  eval   create_eval_iter over the same train files (resize shorter side + centre crop), a
         new iterator per pass as in training's periodic evaluation.
Prints img/s (all cores and per core) and the train/plain and eval/plain ratios of each
round, then their medians, with the CPU; and images per CPU-second of this process (user + sys,
all threads), which a busy shared machine disturbs far less than wall-clock rates. The archives and tfds data stay in --workdir and are
reused by later runs.

  python experiments/bench_input.py [--sizes 375x500,333x500,500x500,281x500]
      [--per_size 400] [--batch_size 64] [--rounds 5] [--workdir /tmp/bireal_bench_input]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

import ml_collections  # noqa: E402

from bireal_jax import imagenet_fixture as fx  # noqa: E402
from bireal_jax import input_pipeline as ip  # noqa: E402

tf = ip.tf


def prepare(workdir: str, size: tuple[int, int], per_size: int) -> ml_collections.ConfigDict:
  """Archives of `per_size` train JPEGs of `size` (4 classes), prepared by tfds (once)."""
  root = os.path.join(workdir, f"{size[0]}x{size[1]}_{per_size}")
  manual = os.path.join(root, "manual")
  if not all(os.path.isfile(os.path.join(manual, f)) for f in (fx.TRAIN_TAR, fx.VAL_TAR)):
    fx.write_imagenet_archives(manual, num_val=4, train_per_class=max(1, per_size // 4),
                               size=size)
  cfg = ml_collections.ConfigDict(dict(
      dataset="imagenet2012", data_dir=os.path.join(root, "tfds"), manual_dir=manual,
      image_size=224, shuffle_buffer_size=16384))
  ip.dataset_info(cfg)  # prepares and runs the decode check once
  return cfg


def plain_decode(cfg) -> int:
  """Decodes every train image at full size; returns the count."""
  builder = ip.imagenet_builder(cfg)
  ds = builder.as_dataset(split="train", decoders={"image": ip.tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: tf.shape(tf.io.decode_jpeg(ex["image"], channels=3))[0],
              num_parallel_calls=tf.data.AUTOTUNE)
  n = 0
  for _ in ds.as_numpy_iterator():
    n += 1
  return n


_TRAIN_ITERS = {}


def train_pass(cfg, batch_size: int) -> int:
  """One epoch of batches from this dataset's train iterator, made once and kept (as in
  training: its start-up is not timed, epoch boundaries are)."""
  key = cfg.data_dir
  if key not in _TRAIN_ITERS:
    it = ip.create_train_iter(cfg, batch_size=batch_size, seed=0, process_index=0,
                              process_count=1)
    next(it)
    _TRAIN_ITERS[key] = it
  steps = ip.dataset_info(cfg).num_train // batch_size
  for _ in range(steps):
    next(_TRAIN_ITERS[key])
  return steps * batch_size


def eval_pass(cfg, batch_size: int) -> int:
  n = 0
  for b in ip.create_eval_iter(cfg, batch_size=batch_size, split="train", process_index=0,
                               process_count=1):
    n += int(b["mask"].sum())
  return n


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="375x500,333x500,500x500,281x500,600x800",
                 help="HxW of the landscape images, comma separated (ImageNet's common ones)")
  p.add_argument("--per_size", type=int, default=400, help="train images per size")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--workdir", default="/tmp/bireal_bench_input")
  args = p.parse_args(argv)
  sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
  cores = machine.cores()
  print(f"CPU: {machine.cpu_model()}, {cores} cores; load {machine.loadavg()}")
  print(f"tensorflow {tf.__version__}, tfds {ip.tfds.__version__}")
  cfgs = [prepare(args.workdir, s, args.per_size) for s in sizes]
  total_bytes = 0
  for cfg in cfgs:
    ds = ip.imagenet_builder(cfg).as_dataset(
        split="train", decoders={"image": ip.tfds.decode.SkipDecoding()})
    total_bytes += sum(len(ex["image"]) for ex in ds.as_numpy_iterator())
  num = sum(ip.dataset_info(c).num_train for c in cfgs)
  print(f"{num} train JPEGs, sizes {args.sizes} (each landscape and portrait), "
        f"mean {total_bytes / num / 1024:.0f} KiB; batch {args.batch_size}")
  # Warm-up: builds, traces and caches whatever each variant needs once.
  for cfg in cfgs:
    plain_decode(cfg), train_pass(cfg, args.batch_size), eval_pass(cfg, args.batch_size)
  variants = {"plain": plain_decode,
              "train": lambda c: train_pass(c, args.batch_size),
              "eval": lambda c: eval_pass(c, args.batch_size)}
  rates = {k: [] for k in variants}
  per_cpu_s = {k: [] for k in variants}
  print(f"{'round':>5} " + " ".join(f"{k + ' img/s':>12}" for k in variants) +
        f" {'train/plain':>11} {'eval/plain':>10}  load")
  for r in range(args.rounds):
    for name, fn in variants.items():
      t0, c0, n = time.perf_counter(), machine.cpu_seconds(), 0
      for cfg in cfgs:
        n += fn(cfg)
      rates[name].append(n / (time.perf_counter() - t0))
      per_cpu_s[name].append(n / (machine.cpu_seconds() - c0))
    row = {k: v[-1] for k, v in rates.items()}
    print(f"{r:>5} " + " ".join(f"{row[k]:>12.0f}" for k in variants) +
          f" {row['train'] / row['plain']:>11.2f} {row['eval'] / row['plain']:>10.2f}"
          f"  {machine.loadavg()}")
  med = {k: statistics.median(v) for k, v in rates.items()}
  ratio_t = statistics.median(t / p for t, p in zip(rates["train"], rates["plain"]))
  ratio_e = statistics.median(e / p for e, p in zip(rates["eval"], rates["plain"]))
  print(f"median of {args.rounds} rounds ({cores} cores): " + ", ".join(
      f"{k} {v:.0f} img/s ({v / cores:.0f} per core)" for k, v in med.items()))
  print(f"median ratios: train/plain {ratio_t:.2f}, eval/plain {ratio_e:.2f}")
  cpu = {k: statistics.median(v) for k, v in per_cpu_s.items()}
  print("median img per CPU-second: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) +
        f"; ratios train/plain {cpu['train'] / cpu['plain']:.2f}, "
        f"eval/plain {cpu['eval'] / cpu['plain']:.2f}")


if __name__ == "__main__":
  main()
