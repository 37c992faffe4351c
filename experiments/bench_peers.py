"""Bi-Real-18 speed against its peers on this CPU, measured in one invocation, interleaved.

  .venv/bin/python experiments/bench_peers.py                     # all systems, ~10 min
  .venv/bin/python experiments/bench_peers.py --skip-larq --skip-lce --repeats 5
  python experiments/bench_peers.py --device gpu --batch-size 256 --calls 10 --gap 0  # jax, torch

Systems (each in its own worker process, `--threads` intra-op threads each):
  jax    this library's float path as shipped (`ops` setting `auto`, or BIREAL_OPS through
         `--jax-env`): Adam train step compiled with `ops.compiler_options()`, eval forward and
         batch-1 forward with XLA's defaults. Its info line names the CPU's ISA and what `auto`
         picked per op.
  torch  the official layout (`tests/torch_bireal.py`) trained as the authors' code does: the
         ApproxSign and clamp-STE weight gradients written with the same detach() identities,
         α detached; Adam; eval under `torch.inference_mode()`.
  larq   larq-zoo `BiRealNet` (TF/Keras 2, `.venv-larq`), a `tf.function` Adam step with larq's
         quantizers and weight clip, eval `model(x, training=False)`.
  lce    the larq-zoo model converted by Larq Compute Engine, run by its interpreter (batch 1).

`--device gpu` runs jax and torch on the first GPU (`--dtype bfloat16`: the library's bf16
compute against torch.autocast bf16; the latent weights and optimizer stay float32 in both).
Each timed call then runs `--calls` steps and waits for the device at its end.

All workers start first (compile, warm up); then every timed call is issued round-robin across
systems (train for all, eval for all, batch-1 for all, next round, ...) so that load from other
processes hits them alike. Medians over `--repeats` rounds; ratios are jax / peer speed.
Weights are random (speed does not depend on them); inputs are NHWC/NCHW float32 noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from machine import cores, cpu_model, cpu_seconds, loadavg  # experiments/machine.py

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYSTEMS = ("jax", "torch", "larq", "lce")
OPS = ("train", "eval", "lat1")


# ------------------------------------------------------------------------------------------------
# Workers: each builds its programs, warms them up, then answers one timed call per stdin line.
# Framework imports stay inside the builders: this file also runs under .venv-larq (no JAX there).
# ------------------------------------------------------------------------------------------------


def _build_jax(a):
  sys.path.insert(0, ROOT)
  sys.path.insert(0, HERE)
  import jax
  import jaxlib
  import flax
  import bench_model
  progs = bench_model.Programs("bireal18", a.batch_size, a.image_size, a.num_classes,
                               dtype=a.dtype)
  train_options = "cpu" if a.device == "cpu" else "default"  # the CPU options are CPU-only
  how = {"train": ("train", "lib", train_options), "eval": ("eval", "lib", "default"),
         "lat1": ("latency", "lib", "default")}
  fns = {op: progs.compile(*how[op]) for op in a.ops}
  state = {k: v[1] for k, v in fns.items()}

  def call(op):
    compiled, _, _, step = fns[op]
    state[op] = jax.block_until_ready(step(compiled, state[op]))

  from bireal_jax.ops import autotune
  from bireal_jax.ops.cpu import build
  picks = "; ".join(f"{op}: " + ", ".join(f"{n} x{c}" for n, c in p.items())
                    for op, p in autotune.summary().items())
  return call, (f"jax {jax.__version__} jaxlib {jaxlib.__version__} flax {flax.__version__} "
                f"{a.dtype} on {jax.devices()[0].device_kind}"
                + (f", host malloc {bench_model.MALLOC}, ISA {build.isa()}, ops "
                   f"{os.environ.get('BIREAL_OPS', 'auto')}"
                   + (f" (auto picked {picks})" if picks else "") if a.device == "cpu" else ""))


def _official_training_semantics(net, torch):
  """Rebinds the forward passes of `tests/torch_bireal.py`'s modules to the authors' training
  formulation (the authors' training code, docs/reference.md): forward values unchanged, gradients by detach()."""
  from torch_bireal import Basic, FlatBinaryConv
  import torch.nn.functional as F

  def approx_sign(x):
    # Piecewise polynomial F(x) (−1; 2x+x²; 2x−x²; 1); value sign(x), gradient dF/dx.
    poly = torch.where(x < -1, -torch.ones_like(x),
                       torch.where(x < 0, x * x + 2 * x,
                                   torch.where(x < 1, 2 * x - x * x, torch.ones_like(x))))
    return torch.sign(x).detach() - poly.detach() + poly

  def conv_forward(self, x):
    w = self.weights.view(self.shape)
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    clipped = torch.clamp(w, -1.0, 1.0)
    wb = (alpha * torch.sign(w)).detach() - clipped.detach() + clipped
    return F.conv2d(x, wb, stride=self.stride, padding=1)

  def basic_forward(self, x):
    y = self.bn1(self.binary_conv(approx_sign(x)))
    return y + (x if self.downsample is None else self.downsample(x))

  for m in net.modules():
    if isinstance(m, FlatBinaryConv):
      m.forward = conv_forward.__get__(m)
    elif isinstance(m, Basic):
      m.forward = basic_forward.__get__(m)
  return net


def _build_torch(a):
  import torch
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from torch_bireal import TorchBiRealNet
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  from torch_bireal import FlatBinaryConv
  net = _official_training_semantics(TorchBiRealNet("bireal18", a.num_classes), torch)
  for m in net.modules():  # `weights` is torch.empty: give latent weights of both signs
    if isinstance(m, FlatBinaryConv):
      torch.nn.init.normal_(m.weights, 0.0, 0.05)
  dev = torch.device("cuda" if a.device == "gpu" else "cpu")
  if a.device == "gpu":
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
  net = net.to(dev)
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  loss_fn = torch.nn.CrossEntropyLoss()
  g = torch.Generator().manual_seed(0)
  x = torch.randn(a.batch_size, 3, a.image_size, a.image_size, generator=g).to(dev)
  y = torch.randint(0, a.num_classes, (a.batch_size,), generator=g).to(dev)
  amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")
  fwd = torch.compile(net) if a.torch_compile else net  # graphs built in the warm-up calls

  def call(op):
    if op == "train":
      net.train()
      opt.zero_grad(set_to_none=True)
      with amp:
        loss = loss_fn(fwd(x), y)
      loss.backward()
      opt.step()
    else:
      net.eval()
      with torch.inference_mode(), amp:
        fwd(x if op == "eval" else x[:1])
    if a.device == "gpu":
      torch.cuda.synchronize()

  where = torch.cuda.get_device_name(0) if a.device == "gpu" else f"threads {torch.get_num_threads()}"
  how = "torch.compile" if a.torch_compile else "eager"
  return call, f"torch {torch.__version__} {how} {a.dtype} ({where})"


def _build_larq(a):
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import numpy as np
  import tensorflow as tf
  tf.config.threading.set_intra_op_parallelism_threads(a.threads)
  tf.config.threading.set_inter_op_parallelism_threads(a.threads)
  import larq
  import larq_zoo
  tf.keras.utils.set_random_seed(0)
  model = larq_zoo.literature.BiRealNet(weights=None, input_shape=(a.image_size, a.image_size, 3),
                                        num_classes=a.num_classes)
  opt = tf.keras.optimizers.Adam(1e-3)
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal((a.batch_size, a.image_size, a.image_size, 3), np.float32))
  y = tf.constant(rng.integers(0, a.num_classes, a.batch_size))
  x1 = x[:1]

  @tf.function
  def train():
    with tf.GradientTape() as tape:
      probs = model(x, training=True)  # larq-zoo ends in softmax
      loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, probs))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))  # applies larq's weight_clip
    return loss

  @tf.function
  def infer(v):
    return model(v, training=False)

  def call(op):
    if op == "train":
      train().numpy()
    else:
      infer(x if op == "eval" else x1).numpy()

  return call, (f"tensorflow {tf.__version__} larq {larq.__version__} larq-zoo "
                f"{getattr(larq_zoo, '__version__', '?')} (threads {a.threads})")


def _build_lce(a):
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import numpy as np
  import tensorflow as tf
  import larq_zoo
  import larq_compute_engine as lce
  from larq_compute_engine.tflite.python.interpreter import Interpreter
  tf.keras.utils.set_random_seed(0)
  model = larq_zoo.literature.BiRealNet(weights=None, input_shape=(a.image_size, a.image_size, 3),
                                        num_classes=a.num_classes)
  interp = Interpreter(lce.convert_keras_model(model), num_threads=a.threads)
  x1 = np.random.default_rng(0).standard_normal((1, a.image_size, a.image_size, 3)).astype(
      np.float32)

  def call(op):
    interp.predict(x1)

  return call, f"larq-compute-engine {getattr(lce, '__version__', '?')} (threads {a.threads})"


BUILDERS = {"jax": _build_jax, "torch": _build_torch, "larq": _build_larq, "lce": _build_lce}
SUPPORTED = {"jax": OPS, "torch": OPS, "larq": OPS, "lce": ("lat1",)}


def worker(a) -> None:
  # The protocol gets a private copy of fd 1; fd 1 itself (Python and C printing) goes to stderr,
  # so no framework chatter can corrupt it.
  out = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  t = time.perf_counter()
  call, info = BUILDERS[a.worker](a)
  ops = [op for op in a.ops if op in SUPPORTED[a.worker]]
  for op in ops:
    for _ in range(a.warmup + 1):  # +1: the first call compiles / builds graphs
      call(op)
  out.write(json.dumps({"ready": True, "info": info, "setup_s": time.perf_counter() - t}) + "\n")
  out.flush()
  for line in sys.stdin:
    op = line.strip()
    if op == "quit":
      break
    t, c = time.perf_counter(), cpu_seconds()
    for _ in range(a.calls):
      call(op)
    out.write(json.dumps({"op": op, "s": time.perf_counter() - t, "cpu": cpu_seconds() - c}) + "\n")
    out.flush()


# ------------------------------------------------------------------------------------------------
# Controller
# ------------------------------------------------------------------------------------------------


class Worker:
  """One system in its own process. `label` names the row; `extra_env` is added to its env."""

  def __init__(self, name, a, label=None, extra_env=None):
    py = a.larq_python if name in ("larq", "lce") else sys.executable
    if not os.path.exists(py):
      raise FileNotFoundError(f"{name}: interpreter {py} not found (make larq-env, or --skip-{name})")
    cmd = [py, os.path.abspath(__file__), "--worker", name, "--threads", str(a.threads),
           "--batch-size", str(a.batch_size), "--image-size", str(a.image_size),
           "--num-classes", str(a.num_classes), "--warmup", str(a.warmup),
           "--ops", ",".join(a.ops), "--device", a.device, "--dtype", a.dtype,
           "--calls", str(a.calls)] + (["--torch-compile"] if a.torch_compile else [])
    env = dict(os.environ, **(extra_env or {}))
    if a.device == "gpu" and name == "jax":  # leave torch room on the same GPU
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    if name in ("larq", "lce"):
      env["TF_USE_LEGACY_KERAS"] = "1"
    self.name = label or name
    self.log = open(os.path.join(a.log_dir, f"bench_peers_{len(extra_env or {})}_{name}.log"), "w")
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, env=env, cwd=ROOT)
    self.ops = [op for op in a.ops if op in SUPPORTED[name]]

  def wait_ready(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"{self.name} worker died during setup; see {self.log.name}")
    msg = json.loads(line)
    self.info, self.setup_s = msg["info"], msg["setup_s"]

  def time(self, op):
    """(wall seconds, CPU seconds of the worker) of one call."""
    self.proc.stdin.write(op + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"{self.name} worker died during {op}; see {self.log.name}")
    msg = json.loads(line)
    return msg["s"], msg["cpu"]

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)
    self.log.close()


def _isa() -> str:
  """AVX-512 / VPOPCNTDQ / AVX2 from /proc/cpuinfo (this file also runs where JAX is absent)."""
  try:
    flags = set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split())
  except (OSError, StopIteration):
    return "unknown"
  have = [f for f in ("avx512f", "avx512_vpopcntdq", "avx2") if f in flags]
  return "+".join(have) or "no AVX2"


def controller(a) -> None:
  names = [s for s in SYSTEMS if not getattr(a, f"skip_{s}")]
  if a.device == "gpu":  # larq-zoo and LCE are CPU peers (TF/TFLite) here
    names = [s for s in names if s in ("jax", "torch")]
  if not names:
    raise SystemExit("every system skipped")
  print(f"python {platform.python_version()}  cpu {cpu_model()}  ISA {_isa()}  cores "
        f"{cores()}"
        f"  threads per system {a.threads}")
  os.makedirs(a.log_dir, exist_ok=True)
  print(f"Bi-Real-18  image {a.image_size}x{a.image_size}  batch {a.batch_size} (batch 1 for "
        f"latency)  {a.num_classes} classes  median of {a.repeats} interleaved rounds after "
        f"{a.warmup} warm-up calls; {a.calls} steps per timed call; {a.device} {a.dtype}")
  print(f"load average before setup: {loadavg()}", flush=True)
  workers = []
  try:
    specs = [(n, None, None) for n in names]
    if a.jax_env:
      extra = dict(kv.split("=", 1) for kv in a.jax_env)
      specs.insert(1, ("jax", "jax " + " ".join(a.jax_env), extra))
    for n, label, extra in specs:  # one at a time: parallel compiles would slow every setup
      w = Worker(n, a, label, extra)
      w.wait_ready()
      workers.append(w)
      print(f"  {w.name:6s} ready in {w.setup_s:5.1f} s: {w.info}", flush=True)
    print(f"load average before timing: {loadavg()}", flush=True)
    times = {(w.name, op): [] for w in workers for op in w.ops}
    cpus = {k: [] for k in times}
    for r in range(a.repeats):
      order = workers[r % len(workers):] + workers[:r % len(workers)]  # rotate who goes first
      for op in a.ops:
        for w in order:
          if op in w.ops:
            # Idle gap first: thread pools (OpenMP, Eigen) spin for a while after a call and
            # would otherwise steal the next system's cores.
            time.sleep(a.gap)
            wall, cpu = w.time(op)
            times[(w.name, op)].append(wall)
            cpus[(w.name, op)].append(cpu)
      print(f"  round {r + 1}/{a.repeats} done, load {loadavg()}", flush=True)
    load_after = loadavg()
  finally:
    for w in workers:
      w.close()

  med = {k: statistics.median(v) for k, v in times.items()}
  cmed = {k: statistics.median(v) for k, v in cpus.items()}

  def cell(name, op, m):
    if (name, op) not in m:
      return "–"
    per_step = m[(name, op)] / a.calls
    value = f"{1e3 * per_step:.2f} ms" if op == "lat1" else f"{a.batch_size / per_step:.1f}"
    if name != "jax" and ("jax", op) in m:
      value += f" ({m[(name, op)] / m[('jax', op)]:.2f}x)"
    return value

  print(f"load average after timing: {load_after}")
  for title, m, unit in (("wall clock", med, "img/s"), ("per CPU-second of the worker", cmed,
                                                         "img per CPU-s")):
    print()
    print(f"{title}: train / eval in {unit}, batch-1 latency in ms{' (CPU ms)' if m is cmed else ''}")
    print()
    print("| system | train | eval | batch-1 latency |")
    print("|---|---|---|---|")
    for w in workers:
      print(f"| {w.name}: {w.info} | " + " | ".join(cell(w.name, op, m) for op in OPS) + " |")
  print()
  print("(x): jax speed / peer speed (>1: jax faster). Wall on a shared machine favours thread pools")
  print("that spin (they keep their cores); CPU seconds favour those that sleep. Raw per call:")
  for k, v in times.items():
    print(f"  {k[0]:6s} {k[1]:6s} wall " + " ".join(f"{x:.3f}" for x in v) + "  cpu " +
          " ".join(f"{x:.3f}" for x in cpus[k]))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every system")
  ap.add_argument("--repeats", type=int, default=7, help="timed rounds (medians reported)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed calls per op after the first")
  ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
  ap.add_argument("--larq-python", default=os.path.join(ROOT, ".venv-larq", "bin", "python"),
                  help="interpreter with larq, larq-zoo, TF < 2.17 (and larq-compute-engine)")
  ap.add_argument("--gap", type=float, default=0.5,
                  help="idle seconds before each timed call (lets other pools stop spinning)")
  ap.add_argument("--log-dir", default="/tmp", help="where workers' stderr goes")
  ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                  help="gpu: jax and torch on the first GPU (larq and lce are skipped)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="compute dtype of jax and torch (bfloat16: torch.autocast)")
  ap.add_argument("--calls", type=int, default=1, help="steps per timed call")
  ap.add_argument("--torch-compile", action="store_true",
                  help="torch: run the network through torch.compile (default: eager, as the authors)")
  for s in SYSTEMS:
    ap.add_argument(f"--skip-{s}", action="store_true")
  ap.add_argument("--jax-env", action="append", default=[], metavar="KEY=VALUE",
                  help="also run a second jax worker with this environment variable (repeatable),"
                       "\ne.g. BIREAL_MALLOC=system")
  ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  a.ops = [op.strip() for op in a.ops.split(",") if op.strip()]
  if any("=" not in kv for kv in a.jax_env):
    ap.error("--jax-env takes KEY=VALUE")
  bad = [op for op in a.ops if op not in OPS]
  if bad or not a.ops:
    ap.error(f"--ops must be a subset of {OPS}, got {bad or a.ops}")
  for flag in ("batch_size", "image_size", "num_classes", "threads", "repeats", "calls"):
    if getattr(a, flag) < 1:
      ap.error(f"--{flag.replace('_', '-')} must be >= 1")
  if a.worker:
    worker(a)
  else:
    controller(a)


if __name__ == "__main__":
  main()
