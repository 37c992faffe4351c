"""ImageNet input pipeline throughput against the plain JPEG decode rate of the same files.

Writes ILSVRC-format archives of ImageNet-sized JPEGs (several sizes; the fixture writes every
other image transposed, so landscape and portrait), prepares each with tfds' real imagenet2012
builder, then times, interleaved in rounds (plain, train, eval, plain, train, eval, ...):
  plain  tf.io.decode_jpeg(channels=3) of every train file at full size through tf.data
         (parallel map, all cores, repeated), batched: the ceiling the issue measures against;
  train  create_train_iter (RandomResizedCrop + flip, what the train step receives).
         Both keep one iterator per dataset across rounds, as in training, and each round
         takes from each first DRAIN batches untimed (what its prefetch and parallel map
         prepared while it sat idle during the other variants: timing them would count work
         done on another variant's clock), then --train_epochs epochs' worth timed (train:
         epoch boundaries included): the steady rates a train loop sees. Each variant's turn
         starts once the process is idle, so the kept iterators' refill of their buffers
         after their turn is timed on no other variant's clock;
  eval   create_eval_iter over the same train files (resize shorter side + centre crop), a
         new iterator per pass as in training's periodic evaluation.
Prints img/s (all cores and per core) and the train/plain and eval/plain ratios of each
round, then their medians, with the CPU; and images per CPU-second of this process (user + sys,
all threads), which a busy shared machine disturbs far less than wall-clock rates. The archives and tfds data stay in --workdir and are
reused by later runs.

  python experiments/bench_input.py [--sizes 375x500,333x500,500x500,281x500]
      [--per_size 400] [--batch_size 64] [--rounds 5] [--train_epochs 2]
      [--workdir /tmp/bireal_bench_input]
"""
import argparse
import functools
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


def _plain_iter(cfg, batch_size: int):
  """Every train image decoded at full size, repeated without end, in batches of shapes."""
  builder = ip.imagenet_builder(cfg)
  ds = builder.as_dataset(split="train", decoders={"image": ip.tfds.decode.SkipDecoding()})
  ds = ds.repeat().map(lambda ex: tf.shape(tf.io.decode_jpeg(ex["image"], channels=3)),
                       num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size).prefetch(2).as_numpy_iterator()


_ITERS = {}


DRAIN = 4  # batches taken untimed at each turn: > prefetch (2) + the map's batch in flight


def steady_pass(kind: str, cfg, batch_size: int, epochs: int, timer) -> int:
  """`epochs` epochs' worth of batches from this dataset's long-lived `kind` iterator (made once
  and kept, as in training: its start-up is not timed, epoch boundaries are), after DRAIN
  untimed batches. `timer(running)` starts and stops the clock."""
  key = (kind, cfg.data_dir)
  if key not in _ITERS:
    if kind == "train":
      it = ip.create_train_iter(cfg, batch_size=batch_size, seed=0, process_index=0,
                                process_count=1)
    else:
      it = _plain_iter(cfg, batch_size)
    next(it)
    _ITERS[key] = it
  steps = ip.dataset_info(cfg).num_train // batch_size
  for _ in range(DRAIN):
    next(_ITERS[key])
  timer(True)
  for _ in range(epochs * steps):
    next(_ITERS[key])
  timer(False)
  return epochs * steps * batch_size


WARM_SKIP = 2  # batches of each eval pass left out of its warm rate


def eval_pass(cfg, batch_size: int, warm=None) -> int:
  """One pass of a new eval iterator; `warm`, a Clock, also times the pass from its
  (WARM_SKIP + 1)-th batch on (start-up excluded), counting those images in warm.images."""
  n, started = 0, False
  for i, b in enumerate(ip.create_eval_iter(cfg, batch_size=batch_size, split="train",
                                            process_index=0, process_count=1)):
    n += int(b["mask"].sum())
    if warm is not None and i >= WARM_SKIP:
      warm.images += int(b["mask"].sum())
    if warm is not None and i + 1 == WARM_SKIP:
      warm(True)
      started = True
  if started:
    warm(False)
  return n


def settle(timeout_s: float = 20.0) -> None:
  """Waits until this process is idle (under 5 % of a core over 0.2 s): the kept iterators
  refill their prefetch buffers after each timed stretch, and that work must not land on the
  next variant's clock."""
  end = time.perf_counter() + timeout_s
  while time.perf_counter() < end:
    c = machine.cpu_seconds()
    time.sleep(0.2)
    if machine.cpu_seconds() - c < 0.01:
      return


class Clock:
  """Wall and CPU seconds summed over the stretches between clock(True) and clock(False)."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.wall = self.cpu = 0.0
    self.images = 0

  def __call__(self, running: bool):
    now = (time.perf_counter(), machine.cpu_seconds())
    if running:
      self._t0 = now
    else:
      self.wall += now[0] - self._t0[0]
      self.cpu += now[1] - self._t0[1]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="375x500,333x500,500x500,281x500,600x800",
                 help="HxW of the landscape images, comma separated (ImageNet's common ones)")
  p.add_argument("--per_size", type=int, default=400, help="train images per size")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--train_epochs", type=int, default=2,
                 help="epochs of each dataset timed per round (train)")
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
  clock = Clock()
  # Warm-up: builds, traces and caches whatever each variant needs once.
  for cfg in cfgs:
    for kind in ("plain", "train"):
      steady_pass(kind, cfg, args.batch_size, 1, clock)
    eval_pass(cfg, args.batch_size)
  variants = {k: functools.partial(steady_pass, k, batch_size=args.batch_size,
                                   epochs=args.train_epochs, timer=clock)
              for k in ("plain", "train")}
  warm = Clock()
  warm_rates = []
  variants["eval"] = lambda c: eval_pass(c, args.batch_size, warm)
  print(f"plain, train: per round, each dataset's iterator gives {DRAIN} untimed batches, then "
        f"{args.train_epochs} timed epochs' worth (train: epoch boundaries included); "
        "eval: a new iterator per pass, timed whole; each variant starts once the process is "
        "idle (the kept iterators' refill after a timed stretch is on no clock)")
  rates = {k: [] for k in variants}
  per_cpu_s = {k: [] for k in variants}
  print(f"{'round':>5} " + " ".join(f"{k + ' img/s':>12}" for k in variants) +
        f" {'train/plain':>11} {'eval/plain':>10}  load")
  for r in range(args.rounds):
    for name, fn in variants.items():
      settle()
      clock.reset()
      warm.reset()
      n = 0
      for cfg in cfgs:
        if name == "eval":
          clock(True)
        n += fn(cfg)
        if name == "eval":
          clock(False)
      if name == "eval":
        warm_rates.append(warm.images / warm.wall)
        warm.reset()
      rates[name].append(n / clock.wall)
      per_cpu_s[name].append(n / clock.cpu)
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
  print(f"eval without each pass's start-up (from its batch {WARM_SKIP + 1} on), per round: " +
        " ".join(f"{v:.0f}" for v in warm_rates) +
        f" img/s; median {statistics.median(warm_rates):.0f}, ratio to plain "
        f"{statistics.median(w / p for w, p in zip(warm_rates, rates['plain'])):.2f}")
  cpu = {k: statistics.median(v) for k, v in per_cpu_s.items()}
  print("median img per CPU-second: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) +
        f"; ratios train/plain {cpu['train'] / cpu['plain']:.2f}, "
        f"eval/plain {cpu['eval'] / cpu['plain']:.2f}")


if __name__ == "__main__":
  main()
