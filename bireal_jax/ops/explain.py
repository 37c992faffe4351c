"""`ops.explain(...)`: which implementation each op of a model (or any function) runs under the
current setting, and why, without building, timing or running anything.

    from bireal_jax import models, ops
    print(ops.explain(models.get("bireal18"), jnp.zeros((1, 224, 224, 3))))
    with ops.implementation("auto"):
      print(ops.explain(models.get("bireal18"), jnp.zeros((8, 224, 224, 3)), train=True))

The function is traced abstractly (`jax.eval_shape`) with every op recorded and computed by its
`lax` reference, so nothing is compiled, timed or written to disk.
"""
from __future__ import annotations

import inspect
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp

_LOCAL = threading.local()


def recording() -> list | None:
  """The list the ops append their calls to while `explain` traces; None otherwise."""
  return getattr(_LOCAL, "calls", None)


def _shape(a) -> str:
  return "x".join(map(str, a.shape)) + f" {jnp.dtype(a.dtype).name}"


def _decide(op: str, arrays, statics, setting) -> str:
  from bireal_jax import ops
  from bireal_jax.ops import autotune
  if jax.default_backend() != "cpu":
    return f"reference ({jax.default_backend()}: GPUs and TPUs always run lax)"
  choice = setting[op]
  applies = [n for n, c in ops.CANDIDATES[op].items() if c.applies(*arrays, **statics)]
  if choice == "auto":
    applies = autotune.offered(op, applies)
    cached = autotune.lookup(op, arrays, statics)
    if cached is not None:
      return f"{cached} (auto: picked earlier on this CPU)"
    if len(applies) == 1:
      return f"{applies[0]} (auto: the only candidate)"
    if autotune.work(op, arrays, statics) < autotune.min_work():
      return "reference (auto: too little work to time)"
    return f"auto: times {', '.join(applies)} on first use (those built here)"
  named = [n for n in choice if n in applies]
  if not named:
    return f"reference (setting {'/'.join(choice)}: none applies to these operands)"
  if named[0] == "reference":
    return "reference (setting)"
  return f"{named[0]} (setting; reference if it cannot be built here)"


def explain(fn: Any, *args, train: bool = False) -> str:
  """A table of the op calls that tracing `fn(*args)` makes: op, operands, what runs and why.

  `fn` is a function of arrays, or a Linen module (then `args` are its inputs: it is
  initialised abstractly and applied, with `train` if its `__call__` takes one). Uses the
  current `ops.implementation`.
  """
  from bireal_jax import ops
  setting = ops.current_setting()
  try:
    if hasattr(fn, "init") and hasattr(fn, "apply"):  # a Linen module: abstract variables first
      module = fn
      _LOCAL.calls = []  # init's op calls are not the model's: recorded only to run nothing
      variables = jax.eval_shape(module.init, jax.random.key(0), *args)
      kw = {}
      if "train" in inspect.signature(module.__call__).parameters:
        kw = {"train": True, "mutable": ["batch_stats"]} if train else {"train": False}

      fn, args = (lambda v, *xs: module.apply(v, *xs, **kw)), (variables, *args)
    _LOCAL.calls = []
    jax.eval_shape(fn, *args)
    calls = _LOCAL.calls
  finally:
    _LOCAL.calls = None
  rows, seen = [], {}
  for op, arrays, statics in calls:
    key = (op, tuple(_shape(a) for a in arrays), tuple(sorted(statics.items())))
    if key in seen:
      seen[key][1] += 1
      continue
    row = [f"{op} {' · '.join(key[1])} {statics}", 1, _decide(op, arrays, statics, setting)]
    seen[key] = row
    rows.append(row)
  head = ("setting: " + ", ".join(f"{op}={'auto' if v == 'auto' else '/'.join(v)}"
                                  for op, v in setting.items()))
  width = max((len(r[0]) for r in rows), default=0)
  lines = [head] + [f"{r[0]:<{width}}  ×{r[1]:<3} {r[2]}" for r in rows]
  return "\n".join(lines)


def record_and_run_reference(op: str, arrays, statics, calls: list) -> Callable:
  calls.append((op, arrays, statics))
  from bireal_jax import ops
  return ops.CANDIDATES[op]["reference"].fn(*arrays, **statics)
