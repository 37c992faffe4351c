"""`auto`: time an op's candidates on this CPU, once per shape, and run the fastest.

On first use of an (op, operand shapes and dtypes, static options, train|eval), each candidate
that applies (`ops.applicable`) is compiled on random operands of those shapes (±1 and α·sign for
the binary convolution) and run in interleaved rounds; the one with the smallest time wins (the
minimum over rounds: the machine may be shared, and noise only ever adds time). Training picks
by forward + backward time, compiled with the training step's compiler options; inference by
the forward. The picks are kept in memory and in a JSON file under `$BIREAL_JAX_CACHE/autotune/`
keyed by the CPU (model, flags, ISA cap), thread count, jax version, XLA flags and the C++
sources, so a later process on the same machine does not time again.

Knobs (environment): `BIREAL_AUTOTUNE_MIN_WORK` (default 2e6): operations with less work
(multiply-adds, or elements × taps) than this run the reference without timing — too small for
the choice to matter, and tiny test models stay fast to trace; `BIREAL_AUTOTUNE_ROUNDS` (default
5); `BIREAL_AUTOTUNE_CACHE=0` turns the disk cache off.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bireal_jax import cache
from bireal_jax import ops as _ops
from bireal_jax.ops import geometry

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_MEMO: dict[str, str] = {}
_DISK: dict[str, dict] = {}


def min_work() -> float:
  """Below this work (`work`), auto runs the reference untimed (BIREAL_AUTOTUNE_MIN_WORK)."""
  return float(os.environ.get("BIREAL_AUTOTUNE_MIN_WORK", "2e6"))


def _rounds() -> int:
  return max(1, int(os.environ.get("BIREAL_AUTOTUNE_ROUNDS", "5")))


def work(op: str, arrays, statics) -> float:
  """Multiply-adds of a convolution; elements × taps of a pool; 4 × elements of a BatchNorm."""
  x = arrays[0]
  if op in ("conv2d", "binary_conv2d"):
    w = arrays[1]
    oh, ow = geometry.out_hw(x.shape, w.shape, statics["strides"], statics["pads"])
    return float(x.shape[0] * oh * ow * np.prod(w.shape))
  if op == "packed_conv2d":  # multiply-adds of the ±1 conv: 32 per kernel word
    s, p = statics["stride"], statics["pad"]
    oh, ow = geometry.out_hw(x.shape, arrays[1].shape, (s, s), ((p, p), (p, p)))
    return float(x.shape[0] * oh * ow * np.prod(arrays[1].shape) * 32)
  if op == "max_pool":
    return float(np.prod(x.shape) * np.prod(statics["window"]))
  return 4.0 * float(np.prod(x.shape))


def _key(op, arrays, statics, train) -> str:
  shapes = [[list(a.shape), str(a.dtype)] for a in arrays]
  stat = {k: v for k, v in statics.items() if k != "axis_name"}  # timed without replicas
  return json.dumps([op, shapes, stat, "train" if train else "eval"], sort_keys=True)


@functools.lru_cache(maxsize=None)
def _machine() -> str:
  """Everything a pick depends on besides the op: CPU, threads, ISA cap, versions, sources
  (read once per process: these do not change while it runs)."""
  from bireal_jax.ops.cpu import build
  sources = b"".join(p.read_bytes() for p in sorted(build.CSRC.glob("*.cc")) + build.headers())
  here = Path(__file__).parent
  py = b"".join(p.read_bytes() for p in sorted(here.glob("**/*.py")))
  try:
    threads = len(os.sched_getaffinity(0))
  except AttributeError:
    threads = os.cpu_count() or 1
  return hashlib.sha256(b"\n".join([
      cache.cpu_id().encode(), str(threads).encode(), str(build.isa_cap()).encode(),
      str(build.has_amx()).encode(),  # BIREAL_AMX may change what auto times
      jax.__version__.encode(), os.environ.get("XLA_FLAGS", "").encode(),
      os.environ.get("BIREAL_ONEDNN", "").encode(), sources, py])).hexdigest()[:16]


def _cache_file() -> Path | None:
  if os.environ.get("BIREAL_AUTOTUNE_CACHE", "1") == "0":
    return None
  return cache.cache_dir() / "autotune" / f"{_machine()}.json"


def _disk_get(key: str):
  path = _cache_file()
  if path is None:
    return None
  if str(path) not in _DISK:
    try:
      _DISK[str(path)] = json.loads(path.read_text())
    except (OSError, ValueError):
      _DISK[str(path)] = {}
  return _DISK[str(path)].get(key)


def _disk_put(key: str, entry: dict) -> None:
  path = _cache_file()
  if path is None:
    return
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # merge with what other processes wrote meanwhile
      table = json.loads(path.read_text())
    except (OSError, ValueError):
      table = {}
    table.update(_DISK.get(str(path), {}))
    table[key] = entry
    _DISK[str(path)] = table
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
      json.dump(table, f, indent=0, sort_keys=True)
    os.replace(f.name, path)
  except OSError as e:  # a read-only home: the pick still holds for this process
    log.warning("bireal_jax: could not write the autotune cache %s (%s)", path, e)


def _operands(op, arrays, statics):
  """Random concrete operands of the traced operands' shapes and dtypes."""
  rng = np.random.default_rng(0)
  if op == "binary_conv2d":
    xq, wq = arrays
    x = np.where(rng.standard_normal(xq.shape) >= 0, 1.0, -1.0).astype(xq.dtype)
    alpha = rng.uniform(1e-3, 1e-2, wq.shape[-1])
    w = (np.where(rng.standard_normal(wq.shape) >= 0, 1.0, -1.0) * alpha).astype(wq.dtype)
    return [x, w]
  out = [rng.standard_normal(a.shape).astype(a.dtype) for a in arrays]
  if op == "packed_conv2d":
    out[1] = rng.integers(0, 2**32, arrays[1].shape, dtype=np.uint64).astype(arrays[1].dtype)
  if op == "batch_norm_train":
    out[1] = np.abs(out[1]) + 0.5
  return out


def _program(op, name, statics, train: bool) -> Callable:
  fn = _ops.CANDIDATES[op][name].fn
  statics = dict(statics, **({"axis_name": None} if op == "batch_norm_train" else {}))
  f = lambda *a: fn(*a, **statics)  # noqa: E731
  if not train:
    return f

  def fwd_bwd(*a):
    out, vjp = jax.vjp(f, *a)
    if not isinstance(out, tuple):
      return out, vjp(jnp.ones_like(out))
    # BatchNorm's (y, mean, var): only y gets a gradient in training (the statistics are stopped).
    return out[0], vjp((jnp.ones_like(out[0]), *map(jnp.zeros_like, out[1:])))
  return fwd_bwd


def measure(op: str, names, arrays, statics, train: bool) -> dict:
  """Seconds per call of each candidate `names` of `op` on these operands (what `auto` picks
  from): min over interleaved rounds of the mean of a few runs, each compiled alone."""
  with jax.ensure_compile_time_eval():
    args = [jax.device_put(a) for a in _operands(op, arrays, statics)]
    opts = _ops.compiler_options(train)
    runs, reps = {}, {}
    for n in names:
      compiled = jax.jit(_program(op, n, statics, train)).lower(*args).compile(
          compiler_options=opts)
      jax.block_until_ready(compiled(*args))  # warm-up: first-touch of buffers, thread pools
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      one = time.perf_counter() - t0
      runs[n], reps[n] = compiled, max(1, min(10, int(0.02 / max(one, 1e-6))))
    best = {n: float("inf") for n in names}
    for _ in range(_rounds()):
      for n in names:
        t0 = time.perf_counter()
        for _ in range(reps[n]):
          out = runs[n](*args)
        jax.block_until_ready(out)
        best[n] = min(best[n], (time.perf_counter() - t0) / reps[n])
  return best


def _untimed(op, arrays, statics, names) -> str | None:
  """The pick when nothing needs timing: the only candidate, or the reference below the work
  threshold; None otherwise."""
  if len(names) == 1:
    return names[0]
  if work(op, arrays, statics) < min_work():
    return "reference"
  return None


def offered(op, names) -> list:
  """`names` less the candidates `auto` does not consider on this machine (e.g. the bf16
  oneDNN binary convs without AMX: `Candidate.offered`)."""
  return [n for n in names if _ops.CANDIDATES[op][n].offered()]


def timed_candidates(op: str, names, train: bool) -> list:
  """Those of the candidates `names` that `auto` times in training (forward + backward) or in
  inference (forward) on this machine: e.g. the conv2d input-gradient forms are timed in
  training only, the bf16 oneDNN binary convs only with AMX."""
  mode = "train" if train else "eval"
  return [n for n in offered(op, names) if mode in _ops.CANDIDATES[op][n].timed]


def _pick(op, arrays, statics, train: bool) -> str:
  names = timed_candidates(op, _ops.applicable(op, arrays, statics), train)
  untimed = _untimed(op, arrays, statics, names)
  if untimed is not None:
    return untimed
  key = _key(op, arrays, statics, train)
  with _LOCK:
    if key in _MEMO:
      return _MEMO[key]
    entry = _disk_get(key)
    if entry is None or entry.get("pick") not in names:
      times = measure(op, names, arrays, statics, train)
      pick = min(times, key=times.get)
      entry = {"pick": pick, "ms": {n: round(t * 1e3, 4) for n, t in times.items()}}
      _disk_put(key, entry)
      log.info("bireal_jax.ops auto: %s %s -> %s (%s)", op, key, pick,
                   ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items()))
    _MEMO[key] = entry["pick"]
    return entry["pick"]


def lookup(op: str, arrays, statics):
  """The pick made earlier for these operands (in this process or in the disk cache), without
  timing anything: 'name', 'eval name / train name' when they differ, or None."""
  picks = {}
  for train in ((False,) if op in ("binary_conv2d", "packed_conv2d") else (False, True)):
    key = _key(op, arrays, statics, train)
    name = _MEMO.get(key) or (_disk_get(key) or {}).get("pick")
    if name:
      picks["train" if train else "eval"] = name
  if not picks:
    return None
  if len(set(picks.values())) == 1:
    return next(iter(picks.values()))
  return " / ".join(f"{mode} {name}" for mode, name in picks.items())


def pick(op: str, arrays, statics) -> str:
  """What `auto` runs for this call: a candidate name, or 'auto:' when the forward and the
  forward + backward picks may differ (resolved in `auto_call`'s custom VJP)."""
  if op in ("binary_conv2d", "packed_conv2d"):
    # binary_conv2d: one forward for training and inference (backward via conv2d);
    # packed_conv2d: inference only.
    return _pick(op, arrays, statics, train=False)
  return _untimed(op, arrays, statics, offered(op, _ops.applicable(op, arrays, statics))) or \
      "auto:"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def auto_call(op, statics, *arrays):
  statics = dict(statics)
  return _ops.CANDIDATES[op][_pick(op, arrays, statics, train=False)].fn(*arrays, **statics)


def _auto_fwd(op, statics, *arrays):
  statics = dict(statics)
  fn = _ops.CANDIDATES[op][_pick(op, arrays, statics, train=True)].fn
  out, vjp = jax.vjp(lambda *a: fn(*a, **statics), *arrays)
  return out, vjp


def _auto_bwd(op, statics, vjp, cts):
  return vjp(cts)


auto_call.defvjp(_auto_fwd, _auto_bwd)


def choices() -> dict:
  """{op: {shapes/options key: pick}} of the picks made (or read from disk) in this process."""
  out: dict = {}
  for key, name in sorted(_MEMO.items()):
    op, shapes, stat, mode = json.loads(key)
    out.setdefault(op, {})[f"{mode} {' '.join('x'.join(map(str, s)) for s, _ in shapes)} "
                           f"{stat}"] = name
  return out


def cached_picks() -> dict:
  """{key: pick} of the picks made (or read from the disk cache) in this process, keyed as in the
  disk cache's JSON file: `json.dumps([op, [[shape, dtype], ...], statics, "train"|"eval"])`."""
  with _LOCK:
    return dict(_MEMO)


def stored_timings(op: str, arrays, statics, train: bool = False) -> dict | None:
  """The autotune cache file's entry for these operands, read from disk now: {'pick': name,
  'ms': {candidate: milliseconds}}; None when there is none or the cache is off."""
  path = _cache_file()
  if path is None:
    return None
  try:
    table = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return table.get(_key(op, arrays, statics, train))


def clear_cache() -> None:
  """Forget this process's picks and the disk cache tables read so far (the files stay): the next
  `auto` call reads the disk cache again, or times."""
  with _LOCK:
    _MEMO.clear()
    _DISK.clear()


def summary() -> dict:
  """{op: {pick: count}} over `choices()`: one line per op for benchmark headers."""
  out: dict = {}
  for op, picks in choices().items():
    for name in picks.values():
      out.setdefault(op, {}).setdefault(name, 0)
      out[op][name] += 1
  return out
