"""Training checkpoints with Orbax's `CheckpointManager`, and the workdir's config record.

Layout of a workdir:
  config.json           the run's config and its identity (model, image shape, classes, dataset)
  checkpoints/<step>/   `state` (TrainState as a PyTree) + `meta` (JSON: step, epoch, ...)
Saves are asynchronous and atomic (Orbax writes `<step>.orbax-checkpoint-tmp` and renames it),
so a crash never leaves a half-written step behind: Orbax lists only renamed steps and deletes
the temporary directories when the next run opens the directory. A step that is unreadable
anyway (truncated or corrupted on disk) is skipped with a warning in favour of the previous one.
A save that fails (disk full, unwritable directory) raises `CheckpointError` naming the
directory; older steps are deleted only after a save succeeds, so the previous one stays.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """A checkpoint or workdir that cannot be used for this run."""


def _manager(directory: str, *, keep: int = 3, every_steps: Optional[int] = None,
             async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  policy = (ocp.checkpoint_managers.FixedIntervalPolicy(every_steps)
            if every_steps else None)
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policy,
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,  # leftovers of a save killed mid-way
      read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_names=("state", "meta"),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


class Checkpoints:
  """Periodic, asynchronous, keep-K checkpoints of one training run."""

  def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    try:
      self.manager = _manager(directory, keep=keep, every_steps=every_steps,
                              async_save=async_save)
    except OSError as e:
      raise CheckpointError(f"cannot create the checkpoint directory {self.directory} "
                            f"({type(e).__name__}: {_short(e)}): expected a writable "
                            f"directory") from e
    self._in_flight = None  # the step of the async save not yet known to have finished
    self._failed = None  # the step whose save failed (reported once)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Start saving `state` (a PyTree of global arrays) at `step`; True if a save started."""
    if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
      return False
    # Orbax waits for the previous save inside `save` too; waiting here first tells whose
    # error it is (the previous step's, not this one's).
    self.wait()
    try:
      started = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # OSError from Python writes, ValueError from TensorStore's
      raise self._save_failed(step, e) from e
    if started:
      self._in_flight = step
    return started

  def _save_failed(self, step: int, e: Exception) -> CheckpointError:
    self._failed, self._in_flight = step, None
    try:  # Orbax dropped the failed step from its list; re-read what is on disk
      self.manager.reload()
      good = self.manager.latest_step()
    except Exception:
      good = None
    size = _dir_size(os.path.join(self.directory, str(good))) if good is not None else 0
    return CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed: {_io_reason(e)} "
        f"({type(e).__name__}: {_short(e, 200)}): expected a writable directory with free "
        f"space for a checkpoint (the last one takes {size / 2**20:.2f} MiB). "
        + (f"The previous checkpoint (step {good}) is intact: free space or fix the "
           f"directory, then run the same command again to resume from it."
           if good is not None else
           "No checkpoint was written yet: free space or fix the directory, then start "
           "again."))

  def restore(self, abstract_state) -> Optional[tuple[Any, dict, int]]:
    """Newest readable checkpoint as `(state, meta, step)`, or None when there is none.

    `abstract_state` is a PyTree of `jax.ShapeDtypeStruct` (with shardings) giving the
    structure to restore into. An unreadable step is reported and the one before it tried.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        stored = _tree_of(self.manager.item_metadata(step)["state"])
      except Exception as e:  # unreadable metadata: a damaged step
        self._report_unreadable(step, e, steps[i + 1:])
        continue
      # A readable step of another shape is not damage: refuse rather than fall back.
      problems = compare_trees(abstract_state, stored)
      if problems:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} does not match this model/config; "
            f"differing paths:\n  " + "\n  ".join(problems[:20]))
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract_state,
                                         restore_args=_restore_args(abstract_state)),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # Orbax/TensorStore raise many types for damaged files
        self._report_unreadable(step, e, steps[i + 1:])
        continue
      self._quarantine(steps[:i])
      return out["state"], dict(out["meta"]), step
    self._quarantine(steps)
    return None

  def _report_unreadable(self, step, e, older):
    msg = (f"WARNING: checkpoint step {step} in {self.directory} is unreadable "
           f"({type(e).__name__}: {_short(e)}); "
           + (f"falling back to step {older[0]}" if older else
              "no older checkpoint: starting from scratch"))
    if jax.process_index() == 0:
      print(msg, flush=True)

  def _quarantine(self, steps):
    """Move unreadable steps to `<dir>_unreadable/` (kept for inspection, out of the way of
    the steps this run will save again)."""
    if not steps:
      return
    if jax.process_index() == 0:
      target = self.directory.rstrip("/") + "_unreadable"
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dest = os.path.join(target, f"{step}_{int(time.time())}")
        os.replace(os.path.join(self.directory, str(step)), dest)
        print(f"WARNING: moved unreadable checkpoint step {step} to {dest}", flush=True)
    _sync("bireal_jax_quarantine")
    self.manager.reload()

  def wait(self):
    """Block until the async save in flight is written; `CheckpointError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      if self._in_flight is None:
        raise
      raise self._save_failed(self._in_flight, e) from e
    self._in_flight = None

  def close(self):
    """Wait for the save in flight and close; a failure already reported is not raised again
    (it would replace the error that ends the run)."""
    error = None
    if self._failed is None:
      try:
        self.wait()
      except CheckpointError as e:
        error = e
    try:
      self.manager.close()
    except Exception:
      if self._failed is None and error is None:
        raise  # an Orbax error after a successful wait: not ours to hide
    if error is not None:
      raise error


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _dir_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def _io_reason(e: BaseException) -> str:
  """The operating system's reason for a failed write, e.g. 'No space left on device (errno
  28) writing "<file>"', from the exception's chain: OSErrors and TensorStore's messages
  (`... local file "<file>" ... [os_error_code='28']`); 'unknown reason' when it has none."""
  reason = path = None
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    if isinstance(e, OSError) and e.errno:
      reason = reason or f"{os.strerror(e.errno)} (errno {e.errno})"
      path = path or e.filename
    elif code:
      reason = reason or f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
      name = re.search(r'local file "([^"]+)"', text)
      path = path or (name.group(1) if name else None)
    e = e.__cause__ or e.__context__
  return (reason or "unknown reason") + (f' writing "{path}"' if path else "")


def _short(e: Exception, n: int = 300) -> str:
  s = str(e).replace("\n", " ")
  return s if len(s) <= n else s[:n] + "..."


def _restore_args(abstract_tree):
  return jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
      if getattr(x, "sharding", None) is not None else ocp.RestoreArgs(restore_type=None),
      abstract_tree)


def find_checkpoint_dir(path: str) -> str:
  """`path/checkpoints` when `path` is a workdir, else `path` itself."""
  sub = os.path.join(path, CHECKPOINT_DIR)
  return sub if os.path.isdir(sub) else path


def stored_tree(directory: str, step: Optional[int] = None) -> tuple[dict, int]:
  """Shapes/dtypes of the stored TrainState at `step` (default latest) without reading arrays."""
  mngr = _manager(directory, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint found in {directory!r}: expected a workdir with "
                          f"{CHECKPOINT_DIR}/<step>/ or a checkpoint directory")
  step = max(steps) if step is None else step
  return _tree_of(mngr.item_metadata(step)["state"]), step


def restore_subtrees(directory: str, abstract: dict, step: Optional[int] = None) -> tuple[dict, int]:
  """Restore only the top-level entries of `abstract` (e.g. params, batch_stats) from a run.

  Before reading, every path and shape is compared with the stored tree; a mismatch raises
  `CheckpointError` naming the differing paths.
  """
  stored, step = stored_tree(directory, step)
  missing = [f"{k}: missing in the checkpoint (it has {sorted(stored)})"
             for k in abstract if k not in stored]
  problems = missing or compare_trees(abstract, {k: stored[k] for k in abstract})
  if problems:
    head = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointError(f"checkpoint {directory!r} (step {step}) does not match the model; "
                          f"differing paths:\n  {head}{more}")
  mngr = _manager(directory, read_only=True)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract),
                                   partial_restore=True)))
  return out["state"], step


def compare_trees(abstract, stored) -> list[str]:
  """Differences in paths, shapes and dtypes between a target tree and a stored one."""
  problems = []
  # Compare in the stored form (namedtuples as dicts, tuples as lists), as Orbax writes it.
  want, have = _flat_shapes(ocp.tree.serialize_tree(abstract)), _flat_shapes(stored)
  for p in sorted(set(want) | set(have)):
    if p not in have:
      problems.append(f"{p}: only in this model {want[p]}")
    elif p not in want:
      problems.append(f"{p}: only in the checkpoint {have[p]}")
    elif want[p] != have[p]:
      problems.append(f"{p}: model {want[p]} vs checkpoint {have[p]}")
  return problems


def _tree_of(metadata):
  return metadata.tree if hasattr(metadata, "tree") else metadata


def _flat_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in flat:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    out[name] = (tuple(leaf.shape), str(leaf.dtype))
  return out


# ---------------------------------------------------------------------------------------------
# The workdir's config record: a workdir belongs to one model/data configuration.
# ---------------------------------------------------------------------------------------------


def check_workdir(workdir: str, identity: dict, config_dict: dict, *, write: bool) -> None:
  """Refuse a workdir recorded for another model/data identity; record it when new.

  `identity` holds what a checkpoint depends on (model config, image shape, classes, dataset);
  other keys (learning rate, epochs, ...) may change between runs of one workdir.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f).get("identity", {})
    diffs = _diff(stored, _jsonable(identity))
    if diffs:
      raise CheckpointError(
          f"workdir {workdir!r} holds a run of a different configuration, refusing to touch it "
          f"(use a new --workdir):\n  " + "\n  ".join(diffs))
    return
  if write:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"identity": _jsonable(identity), "config": _jsonable(config_dict)}, f,
                indent=2, sort_keys=True)
    os.replace(tmp, path)


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _diff(stored, current, prefix="") -> list[str]:
  out = []
  if isinstance(stored, dict) and isinstance(current, dict):
    for k in sorted(set(stored) | set(current)):
      p = f"{prefix}{k}"
      if k not in stored:
        out.append(f"{p}: not recorded in the workdir, config has {current[k]!r}")
      elif k not in current:
        out.append(f"{p}: workdir has {stored[k]!r}, config lacks it")
      else:
        out.extend(_diff(stored[k], current[k], p + "."))
  elif stored != current:
    out.append(f"{prefix.rstrip('.')}: workdir has {stored!r}, config has {current!r}")
  return out
