"""Fashion-MNIST recipe sweep through the real training loop, on any JAX backend, without TensorFlow.

  python experiments/fm_sweep.py --data /usr/share/datasets/fashion-mnist --out runs/sweep
  python experiments/fm_sweep.py --recipes tiny_twin,tiny_kd --parallel 2  # checks the script

Each recipe is a config file from `configs/` plus overrides, trained by
`bireal_jax.train.train_and_evaluate` (checkpoints, eval, metrics.jsonl as in `bireal_jax.main`).
Data come from `NumpyFashionMnist`: the four IDX .gz files read with numpy and preprocessed as
the tf.data pipeline does (pixels / 255, the same mean/std, zero-pad-2 random crop + flip for
`augment="crop_flip"`), so the sweep runs where TensorFlow is not installed (the lent GPU
machine). Random streams differ from the tf.data pipeline's, so a recipe's accuracy here and
through `bireal_jax.main` agree to seed noise, not bit for bit.

Recipes that start from another (two-step init, distillation teacher) name it as `{name}` in
their overrides and wait for it. `--parallel N` runs N recipes at once, each in its own process
(small models leave a GPU mostly idle, so several share it well). One JSON per finished recipe
lands in `--out`; the table at the end is read back from those files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = os.path.join(ROOT, "configs")
sys.path.insert(0, ROOT)
from bireal_jax.idx_files import (FMNIST_FILES, FMNIST_MEAN as MEAN, FMNIST_PAD as PAD,  # noqa: E402
                                  FMNIST_STD as STD, missing_fashion_mnist_files,
                                  read_fashion_mnist)

# name -> (config file, overrides). "{other}" in a value is the workdir of recipe `other`.
RECIPES = {
    # Real-valued clip twin at width 32 (step one of the paper's two-step recipe; KD teacher).
    "twin32": ("fashion_mnist_real.py", {"base_width": 32}),
    # The demo's binary recipe (Adam, linear decay, label smoothing 0.1, no augmentation) with
    # more width and epochs.
    "w32_e20": ("fashion_mnist.py", {"base_width": 32, "num_epochs": 20.0}),
    "w32_e20_aug": ("fashion_mnist.py", {"base_width": 32, "num_epochs": 20.0,
                                         "augment": "crop_flip"}),
    "w16_e30": ("fashion_mnist.py", {"num_epochs": 30.0}),
    # Step two: the binary net initialised from its twin, optionally distilled from it.
    "w32_2step": ("fashion_mnist.py", {"base_width": 32, "num_epochs": 20.0,
                                       "learning_rate": 1e-3, "init_from": "{twin32}"}),
    "w32_2step_e10": ("fashion_mnist.py", {"base_width": 32, "num_epochs": 10.0,
                                           "learning_rate": 1e-3, "init_from": "{twin32}"}),
    "w32_2step_kd": ("fashion_mnist.py", {"base_width": 32, "num_epochs": 20.0,
                                          "learning_rate": 1e-3, "init_from": "{twin32}",
                                          "distill_from": "{twin32}", "distill_weight": 0.5,
                                          "distill_temperature": 2.0}),
    "w32_e30": ("fashion_mnist.py", {"base_width": 32, "num_epochs": 30.0}),
    # The standard ResNet-18 width (stages 64..512): an upper reference, too slow for the CPU.
    "w64_e20": ("fashion_mnist.py", {"base_width": 64, "num_epochs": 20.0}),
    # Its real-valued clip twin, the same length (= configs/fashion_mnist_real.py at width 64).
    "twin64_e20": ("fashion_mnist_real.py", {"base_width": 64, "num_epochs": 20.0}),
    # Seconds-long pair for checking the script itself (--recipes tiny_twin,tiny_kd).
    "tiny_twin": ("fashion_mnist_real.py", {"base_width": 4, "num_epochs": 0.05}),
    "tiny_kd": ("fashion_mnist.py", {"base_width": 4, "num_epochs": 0.05,
                                     "init_from": "{tiny_twin}", "distill_from": "{tiny_twin}",
                                     "distill_weight": 0.5}),
}
DEFAULT = ",".join(r for r in RECIPES if not r.startswith("tiny"))


# ------------------------------------------------------------------------------------------------
# Data: the `bireal_jax.input_pipeline` interface over numpy arrays
# ------------------------------------------------------------------------------------------------

class NumpyFashionMnist:
  """Fashion-MNIST in memory, batches as `bireal_jax.input_pipeline` yields them (one process)."""

  def __init__(self, folder: str):
    missing = missing_fashion_mnist_files(folder)
    if missing:
      raise FileNotFoundError(f"Fashion-MNIST: {missing} not in {folder!r} (Debian's "
                              "dataset-fashion-mnist puts all four in /usr/share/datasets/fashion-mnist)")
    self.arrays = {split: read_fashion_mnist(folder, split) for split in FMNIST_FILES}

  @staticmethod
  def _check(config, process_count):
    if config.image_size != 28:
      raise ValueError(f"image_size={config.image_size}; this source serves 28x28 only")
    if (process_count or 1) != 1:
      raise ValueError(f"process_count={process_count}; this source serves one process")

  def dataset_info(self, config):
    self._check(config, None)
    return SimpleNamespace(num_classes=10, image_shape=(28, 28, 1), num_train=60_000,
                           num_eval=len(self.arrays[config.eval_split][1]),
                           eval_split=config.eval_split)

  @staticmethod
  def _preprocess(images, rng=None):
    x = images.astype(np.float32) / 255.0
    if rng is not None:  # zero-pad 2, random 28x28 crop, horizontal flip with p = 1/2
      n = len(x)
      padded = np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
      dy, dx = rng.integers(0, 2 * PAD + 1, (2, n))
      rows = dy[:, None] + np.arange(28)
      cols = dx[:, None] + np.arange(28)
      x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
      flip = rng.random(n) < 0.5
      x[flip] = x[flip, :, ::-1]
    return (x - MEAN) / STD

  def create_train_iter(self, config, *, batch_size, seed, start_step=0, process_index=None,
                        process_count=None):
    self._check(config, process_count)
    images, labels = self.arrays["train"]
    steps = len(labels) // batch_size
    augment = config.augment == "crop_flip"
    epoch, skip = divmod(int(start_step), steps)
    while True:  # a fixed permutation per (seed, epoch): a resumed run sees the same batches
      order = np.random.default_rng([seed, epoch]).permutation(len(labels))
      for k in range(skip, steps):
        idx = order[k * batch_size:(k + 1) * batch_size]
        rng = np.random.default_rng([seed, epoch, k, 1]) if augment else None
        yield {"image": self._preprocess(images[idx], rng), "label": labels[idx]}
      epoch, skip = epoch + 1, 0

  def create_eval_iter(self, config, *, batch_size, split=None, process_index=None,
                       process_count=None):
    self._check(config, process_count)
    images, labels = self.arrays[split or config.eval_split]
    n = len(labels)
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)
      mask = (idx < n).astype(np.float32)
      idx = np.minimum(idx, n - 1)
      yield {"image": self._preprocess(images[idx]) * mask[:, None, None, None],
             "label": np.where(mask > 0, labels[idx], 0), "mask": mask}


# ------------------------------------------------------------------------------------------------
# One recipe (in its own process) and the scheduler
# ------------------------------------------------------------------------------------------------


def recipe_config(name: str, out: str, epochs: float | None):
  from bireal_jax import config as config_lib
  file, overrides = RECIPES[name]
  c = config_lib.from_file(os.path.join(CONFIGS, file))
  for k, v in overrides.items():
    setattr(c, k, v.format(**{r: os.path.join(out, r) for r in RECIPES}) if isinstance(v, str) else v)
  if epochs is not None:
    c.num_epochs = float(epochs)
  c.keep_checkpoints = 1  # a sweep keeps only the last state (an init/teacher for others)
  c.checkpoint_every_steps = 2000
  c.tensorboard = False  # TensorBoard's writer is TensorFlow's; metrics.jsonl has every scalar
  c.eval_every_epochs = min(c.eval_every_epochs, c.num_epochs)
  return c


def run_one(a) -> None:
  import jax
  from bireal_jax import train
  c = recipe_config(a.only, a.out, a.epochs)
  t = time.time()
  result = train.train_and_evaluate(c, os.path.join(a.out, a.only), data=NumpyFashionMnist(a.data))
  seconds = time.time() - t
  record = {"recipe": a.only, "config_file": RECIPES[a.only][0], "overrides": RECIPES[a.only][1],
            "epochs": c.num_epochs, "seconds": seconds, "device": str(jax.devices()[0]),
            "jax": jax.__version__,
            **{k: float(v) for k, v in result.items() if isinstance(v, (int, float))}}
  with open(os.path.join(a.out, f"{a.only}.json"), "w") as f:
    json.dump(record, f, indent=1)
  print(json.dumps(record), flush=True)


def deps(name: str) -> set:
  return {r for v in RECIPES[name][1].values() if isinstance(v, str)
          for r in RECIPES if "{" + r + "}" in v}


def finished(out: str) -> set:
  """Recipes whose result JSON is in `out`."""
  return {r for r in RECIPES if os.path.exists(os.path.join(out, f"{r}.json"))}


def schedule(a, names: list) -> None:
  os.makedirs(a.out, exist_ok=True)
  done = finished(a.out)
  todo = [n for n in names if n not in done]
  for n in todo:
    missing = deps(n) - set(names) - done
    if missing:
      raise SystemExit(f"recipe {n} needs {sorted(missing)}: add them to --recipes")
  env = dict(os.environ)
  if a.parallel > 1:  # share the accelerator's memory instead of the first process taking 75 %
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / a.parallel:.2f}")
  running, failed = {}, []
  t0 = time.time()
  while todo or running:
    done = finished(a.out)
    for n in list(todo):
      if len(running) < a.parallel and deps(n) <= done:
        cmd = [sys.executable, os.path.abspath(__file__), "--only", n, "--out", a.out,
               "--data", a.data] + (["--epochs", str(a.epochs)] if a.epochs is not None else [])
        log = open(os.path.join(a.out, f"{n}.log"), "w")
        running[n] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        todo.remove(n)
        print(f"[{time.time() - t0:6.0f} s] start {n}", flush=True)
    for n, (p, log) in list(running.items()):
      if p.poll() is not None:
        log.close()
        del running[n]
        ok = p.returncode == 0 and n in finished(a.out)
        print(f"[{time.time() - t0:6.0f} s] {'done' if ok else 'FAILED'} {n} "
              f"(exit {p.returncode}; log {log.name})", flush=True)
        if not ok:
          failed.append(n)
          todo = [m for m in todo if n not in deps(m)]  # its dependants cannot run
    if not running:
      break  # nothing left that can start (dependencies failed)
    time.sleep(2)
  table(a.out, names)
  if failed:
    raise SystemExit(f"failed: {failed}")


def _last_eval(workdir: str):
  """(epoch, top-1, top-5) of the last eval in a run's metrics.jsonl, or None."""
  last = None
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        r = json.loads(line)
        if r.get("split") == "eval":
          last = (r["epoch"], r["top1"], r["top5"])
  except (OSError, ValueError):
    pass
  return last


def table(out: str, names: list) -> None:
  print("\n| recipe | config + overrides | epochs | test top-1 | top-5 | minutes | device |")
  print("|---|---|---|---|---|---|---|")
  for n in names:
    path = os.path.join(out, f"{n}.json")
    if not os.path.exists(path):
      last = _last_eval(os.path.join(out, n))
      seen = (f"unfinished; last eval at epoch {last[0]:.1f}: {100 * last[1]:.2f} | "
              f"{100 * last[2]:.2f}" if last else "not run | ")
      print(f"| {n} | {RECIPES[n][0]} {RECIPES[n][1]} | {seen} | | |")
      continue
    with open(path) as f:
      r = json.load(f)
    print(f"| {n} | {r['config_file']} {r['overrides']} | {r['epochs']:g} | "
          f"{100 * r['top1']:.2f} | {100 * r['top5']:.2f} | {r['seconds'] / 60:.1f} | "
          f"{r['device']} (jax {r['jax']}) |")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--recipes", default=DEFAULT, help=f"comma-separated subset of {DEFAULT}")
  ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist",
                  help="folder with the four Fashion-MNIST IDX .gz files")
  ap.add_argument("--out", default=os.path.join(ROOT, "runs", "sweep"),
                  help="workdirs, logs and one JSON per recipe (finished recipes are skipped)")
  ap.add_argument("--parallel", type=int, default=1, help="recipes trained at once")
  ap.add_argument("--epochs", type=float, default=None, help="override every recipe's epochs")
  ap.add_argument("--table", action="store_true", help="only print the table of --out")
  ap.add_argument("--only", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  a.out = os.path.abspath(a.out)
  if a.only:
    return run_one(a)
  names = [n.strip() for n in a.recipes.split(",") if n.strip()]
  unknown = [n for n in names if n not in RECIPES]
  if unknown or not names:
    ap.error(f"unknown recipes {unknown or names}; expected a subset of {DEFAULT}")
  if a.table:
    return table(a.out, names)
  if a.parallel < 1:
    ap.error(f"--parallel must be >= 1, got {a.parallel}")
  if a.epochs is not None and a.epochs <= 0:
    ap.error(f"--epochs must be > 0, got {a.epochs}")
  schedule(a, names)


if __name__ == "__main__":
  main()
