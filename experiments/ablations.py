"""Bi-Real Net's ablations at CPU scale on Fashion-MNIST (paper §4.2 / Table 1, IJCV §5).

One command per study; every arm gets the same budget (model width, epochs, batch, optimiser),
at least three seeds, and its result is saved as JSON and reused when present:

  python experiments/ablations.py --study capacity      # Bi-Real vs 1-bit ResNet vs no shortcut
  python experiments/ablations.py --study act_grad      # ApproxSign vs clipped STE vs identity STE
  python experiments/ablations.py --study weight_grad   # magnitude-aware vs official vs sign (no α)
  python experiments/ablations.py --study init          # clip-pretrained vs ReLU-pretrained vs scratch
  python experiments/ablations.py --study recipe        # real twin (upper bound), full recipe, KD
  python experiments/ablations.py --study all           # everything, then the plots

Arms that are the same run (e.g. the from-scratch Bi-Real baseline appears in four studies) are
trained once: results are keyed by their configuration, not by study. `--plot` only redraws
plots and `experiments/results/ablations/summary.json` from saved results. Several processes
may run at once (e.g. one with `--reverse`): each run is claimed with a file lock, and a
process that finds a run done by another reads its result instead of training it again.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "experiments", "results", "ablations")

# Real-valued twins used to initialise binary arms (same parameter tree, paper §3.4).
CLIP_TWIN = dict(activation="hardtanh", kernel_quantizer="none")
RELU_TWIN = dict(activation="relu", kernel_quantizer="none")
BASE = dict(activation="approx_sign", kernel_quantizer="magnitude_aware", shortcut="bireal")

# study -> [(arm label, overrides, init twin label or None[, distillation teacher twin label])]
STUDIES = {
    "capacity": [
        ("Bi-Real shortcut (every conv)", dict(BASE), None),
        ("1-bit ResNet shortcut (every 2 convs)", dict(BASE, shortcut="resnet"), None),
        ("no shortcut", dict(BASE, shortcut="none"), None),
    ],
    "act_grad": [
        ("ApproxSign", dict(BASE), None),
        ("clipped STE", dict(BASE, activation="ste_sign"), None),
        ("identity STE (no clip)", dict(BASE, activation="identity_sign"), None),
    ],
    "weight_grad": [
        ("magnitude-aware (paper/larq)", dict(BASE), None),
        ("official PyTorch (no α in grad)", dict(BASE, kernel_quantizer="official"), None),
        ("sign(W), no α", dict(BASE, kernel_quantizer="sign"), None),
    ],
    "init": [
        ("clip-pretrained twin", dict(BASE), "real clip twin"),
        ("ReLU-pretrained twin", dict(BASE), "real ReLU twin"),
        ("from scratch", dict(BASE), None),
    ],
    "recipe": [
        ("real clip twin", dict(CLIP_TWIN), None),
        ("Bi-Real full recipe (clip init)", dict(BASE), "real clip twin"),
        # + knowledge distillation: the clip twin's soft labels (configs/fashion_mnist_kd.py).
        ("full recipe + KD from clip twin",
         dict(BASE, distill_weight=1.0, distill_temperature=1.0), "real clip twin",
         "real clip twin"),
    ],
}
TWINS = {"real clip twin": dict(CLIP_TWIN), "real ReLU twin": dict(RELU_TWIN)}


def set_out(path: str):
  global OUT
  OUT = os.path.abspath(path)


def budget_config(args, overrides: dict, seed: int):
  """The shared budget: configs/fashion_mnist.py scaled by the command-line budget flags."""
  from bireal_jax import config as config_lib
  c = config_lib.from_file(os.path.join(ROOT, "configs", "fashion_mnist.py"))
  c.base_width = args.width
  c.num_epochs = args.epochs
  c.batch_size = args.batch_size
  c.learning_rate = args.lr
  c.seed = seed
  c.eval_every_epochs = args.epochs / 4
  c.checkpoint_every_steps = 10**9  # one final checkpoint: arms are short
  c.progress_bar = False
  c.tensorboard = False
  c.export_inference = False
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def run_key(overrides: dict, init: str | None, seed: int, args, teacher: str | None = None) -> str:
  what = dict(overrides=overrides, init=init, seed=seed, width=args.width, epochs=args.epochs,
              batch=args.batch_size, lr=args.lr)
  if teacher is not None:
    what["teacher"] = teacher
  blob = json.dumps(what, sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def claimed(key: str):
  """Exclusive lock on one run, so that concurrent ablation processes never train it twice."""
  os.makedirs(os.path.join(OUT, "runs"), exist_ok=True)
  with open(os.path.join(OUT, "runs", f"{key}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_arm(args, label: str, overrides: dict, init: str | None, seed: int,
            teacher: str | None = None) -> dict:
  """Train one arm/seed (or reuse its saved JSON); returns the result record."""
  key = run_key(overrides, init, seed, args, teacher)
  path = os.path.join(OUT, "runs", f"{key}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  # The twins this arm starts from / learns from, trained first (same seed).
  init_dir = run_arm(args, init, TWINS[init], None, seed)["workdir"] if init else None
  teacher_dir = run_arm(args, teacher, TWINS[teacher], None, seed)["workdir"] if teacher else None
  with claimed(key):
    if os.path.exists(path):  # another process finished it while we waited
      with open(path) as f:
        return json.load(f)
    return _train_arm(args, label, overrides, init, seed, teacher, key, path, init_dir,
                      teacher_dir)


def _train_arm(args, label, overrides, init, seed, teacher, key, path, init_dir, teacher_dir):
  from bireal_jax import train
  c = budget_config(args, overrides, seed)
  if init_dir is not None:
    c.init_from = init_dir
  if teacher_dir is not None:
    c.distill_from = teacher_dir
  workdir = os.path.join(OUT, "workdirs", key)
  print(f"=== {label} (seed {seed}) -> {workdir}", flush=True)
  t0 = time.time()
  ev = train.train_and_evaluate(c, workdir)
  rec = dict(label=label, overrides=overrides, init=init, teacher=teacher, seed=seed, key=key,
             workdir=workdir,
             top1=float(ev["top1"]), top5=float(ev["top5"]), loss=float(ev["loss"]),
             steps=int(ev["step"]), seconds=time.time() - t0,
             budget=dict(width=args.width, epochs=args.epochs, batch=args.batch_size, lr=args.lr),
             curves=dict(zip(("steps", "loss", "eval_steps", "top1"), curves(workdir))))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(rec, f, indent=1)
  print(f"    top-1 {100 * rec['top1']:.2f}%  ({rec['seconds']:.0f} s)", flush=True)
  return rec


def curves(workdir: str):
  steps, loss, evs, top1 = [], [], [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r["split"] == "train":
        steps.append(r["step"]); loss.append(r["loss"])
      elif r["split"] == "eval":
        evs.append(r["step"]); top1.append(r["top1"])
  return steps, loss, evs, top1


def summarize(results: dict[str, list[dict]]) -> dict:
  table = {}
  for study, arms in results.items():
    table[study] = []
    for label, recs in arms:
      accs = [100 * r["top1"] for r in recs]
      table[study].append(dict(arm=label, mean=statistics.mean(accs),
                               std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                               seeds=len(accs), top1=accs,
                               minutes=statistics.mean(r["seconds"] for r in recs) / 60))
  return table


def plot(results: dict[str, list[dict]], table: dict):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  for study, arms in results.items():
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, recs in arms:
      # Curves are stored in the run's JSON (the workdirs are not committed).
      s, l, e, t = (recs[0]["curves"][k] for k in ("steps", "loss", "eval_steps", "top1"))
      ax1.plot(s, l, label=label)
      ax2.plot(e, [100 * v if v <= 1 else v for v in t], marker="o", label=label)
    ax1.set(xlabel="step", ylabel="train loss", title=f"{study}: training loss (seed 0)")
    ax2.set(xlabel="step", ylabel="test top-1 (%)", title=f"{study}: test top-1 (seed 0)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"curves_{study}.png"), dpi=90)
    plt.close(fig)
  rows = [(study, r) for study, rs in table.items() for r in rs]
  fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5))
  ax.barh(range(len(rows)), [r["mean"] for _, r in rows], xerr=[r["std"] for _, r in rows],
          color=[f"C{list(table).index(s)}" for s, _ in rows], capsize=3)
  ax.set_yticks(range(len(rows)), [f"{s}: {r['arm']}" for s, r in rows], fontsize=8)
  lo = min(r["mean"] - r["std"] for _, r in rows)
  ax.set_xlim(max(0, lo - 2), 100)
  ax.invert_yaxis()
  ax.set_xlabel("Fashion-MNIST test top-1 (%), mean ± std over seeds")
  fig.tight_layout()
  fig.savefig(os.path.join(OUT, "final_accuracy.png"), dpi=90)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--study", default="all", choices=["all", *STUDIES])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--width", type=int, default=8, help="base width of every arm")
  p.add_argument("--epochs", type=float, default=1.0, help="epochs of every arm (and twin)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--plot", action="store_true", help="only redraw from saved results")
  p.add_argument("--out", default=OUT, help="results folder (JSON, workdirs, plots)")
  p.add_argument("--reverse", action="store_true",
                 help="take the runs in reverse order (for a second concurrent process)")
  args = p.parse_args(argv)
  set_out(args.out)
  if args.seeds < 1:
    p.error(f"--seeds must be ≥ 1, got {args.seeds}")
  studies = list(STUDIES) if args.study == "all" else [args.study]
  jobs = [(study, arm, seed) for study in studies for arm in STUDIES[study]
          for seed in range(args.seeds)]
  done = {}
  for study, arm, seed in (reversed(jobs) if args.reverse else jobs):
    label, overrides, init, teacher = (*arm, None)[:4]
    if args.plot:
      path = os.path.join(OUT, "runs", f"{run_key(overrides, init, seed, args, teacher)}.json")
      if os.path.exists(path):
        with open(path) as f:
          done[study, label, seed] = json.load(f)
    else:
      done[study, label, seed] = run_arm(args, label, overrides, init, seed, teacher)
  results = {}
  for study in studies:
    results[study] = []
    for arm in STUDIES[study]:
      recs = [done[study, arm[0], seed] for seed in range(args.seeds)
              if (study, arm[0], seed) in done]
      if recs:
        results[study].append((arm[0], recs))
  table = summarize(results)
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, f"summary_{args.study}.json"), "w") as f:
    json.dump(table, f, indent=1)
  plot(results, table)
  print(f"\nFashion-MNIST test top-1, {args.seeds} seeds, width {args.width}, "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}")
  for study, rows in table.items():
    print(f"\n[{study}]")
    for r in rows:
      print(f"  {r['arm']:<40s} {r['mean']:6.2f} ± {r['std']:.2f}  "
            f"(n={r['seeds']}, {r['minutes']:.1f} min/run)")


if __name__ == "__main__":
  main()
