"""Training checkpoints with Orbax's `CheckpointManager`, and the workdir's config record.

Layout of a workdir (a local directory or an object-store URL such as gs://bucket/run; every
path goes through `bireal_jax.storage`):
  config.json           the run's config and its identity (model, image shape, classes, dataset)
  checkpoints/<step>/   `state` (TrainState as a PyTree) + `meta` (JSON: step, epoch, ...)
Saves are asynchronous and atomic: Orbax writes `<step>.orbax-checkpoint-tmp` and renames it
(locally), or marks a finished step with `commit_success.txt` (object storage), and lists only
finished steps. A step that Orbax reports damaged (truncated or corrupted files: tensorstore's
DATA_LOSS / NOT_FOUND, unparsable JSON) is skipped with a warning in favour of the previous one;
it is left where it is. A passing storage error (network, timeout, HTTP 429/5xx) is retried with
backoff and then stops the job naming the URL: it never makes a run skip a step or start over.
A save that fails (disk full, unwritable directory) raises `CheckpointError` naming the
directory; older steps are deleted only after a save succeeds, so the previous one stays.
Nothing here moves or deletes a checkpoint on its own beyond Orbax's keep-the-newest-K policy.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from bireal_jax import exit_noise, storage

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
IO_RETRIES = 3  # retries of a restore or listing that fails with a passing storage error
SAVE_TIMEOUT_S = 900.0  # the longest wait for a save in flight before the job gives it up

class CheckpointError(RuntimeError):
  """A checkpoint or workdir that cannot be used for this run."""


class SaveAbandoned(CheckpointError):
  """A save in flight did not finish in time (storage unreachable or too slow). Its writer
  threads may still be retrying: the process should exit without waiting for them (the
  unfinished step is no checkpoint: Orbax lists only finished steps)."""


def _manager(directory, *, keep: int = 3, every_steps: Optional[int] = None,
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
      storage.path(directory), options=options, item_names=("state", "meta"),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


_DAMAGE = re.compile(r"^\s*(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE)\b")


def _chain(e: BaseException | None):
  """`e` and the errors it was raised from or during, newest first."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _names_damage(e: BaseException) -> bool:
  """Whether an error in `e`'s chain is TensorStore's damaged-data error (DATA_LOSS, ...)."""
  return any(isinstance(x, ValueError) and _DAMAGE.match(str(x)) for x in _chain(e))


def is_damage(e: BaseException) -> bool:
  """Whether Orbax/TensorStore's error `e` says a stored step is incomplete or corrupted
  (tensorstore's DATA_LOSS / NOT_FOUND / OUT_OF_RANGE, a missing file, unparsable JSON), as
  opposed to a passing storage error or anything else (memory, a bug): only damage lets a
  restore fall back to an older step."""
  if storage.is_transient(e):
    return False
  return _names_damage(e) or any(
      isinstance(x, (json.JSONDecodeError, FileNotFoundError, EOFError)) for x in _chain(e))


class Checkpoints:
  """Periodic, asynchronous, keep-K checkpoints of one training run."""

  def __init__(self, directory, *, keep: int = 3, every_steps: int = 1000,
               async_save: bool = True, io_retries: int = IO_RETRIES,
               save_timeout_s: float = SAVE_TIMEOUT_S):
    self.directory = storage.join(directory)
    self.io_retries = io_retries
    self.save_timeout_s = save_timeout_s
    self.every_steps = every_steps
    try:
      self.manager = storage.retry(
          lambda: _manager(self.directory, keep=keep, every_steps=every_steps,
                           async_save=async_save),
          what="opening the checkpoints", where=self.directory, retries=io_retries, say=_warn)
    except storage.StorageUnavailable as e:
      raise CheckpointError(str(e)) from e
    except OSError as e:
      raise CheckpointError(f"cannot create the checkpoint directory {self.directory} "
                            f"({type(e).__name__}: {_short(e)}): expected a writable "
                            f"directory") from e
    self._in_flight = None  # the step of the async save not yet known to have finished
    self._failed = None  # the step whose save failed (reported once)
    self.damaged: list[int] = []  # steps found damaged by `restore` (left in place)
    self._last_good = self.manager.latest_step()  # the newest step known to be written
    self._gave_up = False  # a save in flight was abandoned (SaveAbandoned)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Start saving `state` (a PyTree of global arrays) at `step`; True if a save started."""
    # Orbax's should_save is False for a step already on disk: the interval decides here.
    if step in self.damaged and (force or step % self.every_steps == 0):
      _warn(f"checkpoint step {step} not saved: the damaged step {step} is still in "
            f"{self.directory} (move it aside to let this run save that step)")
      return False
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
    unreachable = storage.is_transient(e)
    good, size = self._last_good, 0
    if not unreachable:  # Orbax dropped the failed step from its list; re-read what is there
      try:
        self.manager.reload()
        good = self.manager.latest_step()
        size = storage.size_of(storage.join(self.directory, str(good))) if good else 0
      except Exception:  # noqa: BLE001 - the message below is what matters
        pass
    reach = "the storage could not be reached" if unreachable else _io_reason(e)
    fix = ("check the connection to the storage" if unreachable
           else "free space or fix the directory")
    return CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed: {reach} "
        f"({type(e).__name__}: {_short(e, 200)}): expected a writable directory with free "
        f"space for a checkpoint (the last one takes {size / 2**20:.2f} MiB). "
        + (f"The previous checkpoint (step {good}) is intact: {fix}, then run the same "
           f"command again to resume from it."
           if good is not None else
           f"No checkpoint was written yet: {fix}, then start again."))

  def restore(self, abstract_state) -> Optional[tuple[Any, dict, int]]:
    """Newest readable checkpoint as `(state, meta, step)`, or None when there is none.

    `abstract_state` is a PyTree of `jax.ShapeDtypeStruct` (with shardings) giving the
    structure to restore into. A step Orbax reports damaged (`is_damage`) is reported, left in
    place, and the one before it tried. A passing storage error is retried, then raises
    `CheckpointError`; any other error raises at once: neither skips a step.
    """
    steps = sorted(self._io(self.manager.all_steps, "listing the checkpoints"), reverse=True)
    if steps:
      # A damaged step's failed read leaves TensorStore callbacks aimed at Orbax's closed event
      # loop and sibling read tasks failing on the same files, each printing a traceback (~100
      # lines around the damage warning), some while the read is still failing: silenced first.
      exit_noise.drop_closed_loop_noise()
      exit_noise.drop_unretrieved_task_errors(_names_damage)
    for i, step in enumerate(steps):
      try:
        stored = _tree_of(self._io(lambda: self.manager.item_metadata(step)["state"],
                                   f"reading checkpoint step {step}"))
      except CheckpointError:
        raise
      except Exception as e:
        self._unreadable(step, e, steps[i + 1:])
        continue
      # A readable step of another shape is not damage: refuse rather than fall back.
      problems = compare_trees(abstract_state, stored)
      if problems:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} does not match this model/config; "
            f"differing paths:\n  " + "\n  ".join(problems[:20]))
      try:
        out = self._io(lambda: self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract_state,
                                         restore_args=_restore_args(abstract_state)),
            meta=ocp.args.JsonRestore())), f"restoring checkpoint step {step}")
      except CheckpointError:
        raise
      except Exception as e:
        self._unreadable(step, e, steps[i + 1:])
        continue
      self._last_good = step
      return out["state"], dict(out["meta"]), step
    if self.damaged:
      raise CheckpointError(
          f"every checkpoint in {self.directory} is damaged (steps {self.damaged}); nothing "
          f"was moved or deleted. Move them aside (or use a new --workdir) to start from "
          f"scratch, or restore a copy of the directory.")
    return None

  def _io(self, fn, what: str):
    """`fn()` with passing storage errors retried; exhausted retries -> CheckpointError."""
    try:
      return storage.retry(fn, what=what, where=self.directory, retries=self.io_retries,
                           say=_warn)
    except storage.StorageUnavailable as e:
      raise CheckpointError(f"{e} No checkpoint was skipped, moved or deleted.") from e

  def _unreadable(self, step: int, e: Exception, older: list[int]):
    """Skip a damaged step (warning, left in place); any other error stops the restore."""
    if not is_damage(e):
      raise CheckpointError(
          f"restoring checkpoint step {step} from {self.directory} failed "
          f"({type(e).__name__}: {_short(e)}); it is not recognised as damage, so no step was "
          f"skipped, moved or deleted: fix the cause (memory, permissions, versions), then run "
          f"the same command again.") from e
    self.damaged.append(step)
    where = storage.join(self.directory, str(step))
    _warn(f"checkpoint step {step} in {self.directory} is damaged "
          f"({type(e).__name__}: {_short(e)}); "
          + (f"falling back to step {older[0]}. Step {step} is left in place: move {where} "
             f"aside (or delete it) to let this run save that step again."
             if older else "no older checkpoint."))

  def wait(self):
    """Block until the async save in flight is written; `CheckpointError` if it failed,
    `SaveAbandoned` if it did not finish within `save_timeout_s` (TensorStore retries an
    unreachable bucket for many minutes)."""
    if self._in_flight is not None:
      deadline = time.time() + self.save_timeout_s
      while self.manager.is_saving_in_progress():
        if time.time() > deadline:
          step, self._failed, self._in_flight = self._in_flight, self._in_flight, None
          self._gave_up = True
          previous = (f"The previous checkpoint (step {self._last_good}) is intact"
                      if self._last_good is not None else "No checkpoint was written yet")
          raise SaveAbandoned(
              f"saving checkpoint step {step} to {self.directory} did not finish within "
              f"{self.save_timeout_s:g} s: the storage is unreachable or too slow. {previous}; "
              f"the unfinished step is not a checkpoint. Check the connection to the storage, "
              f"then run the same command again to resume.")
        time.sleep(0.1)
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      if self._in_flight is None:
        raise
      raise self._save_failed(self._in_flight, e) from e
    if self._in_flight is not None:
      self._last_good, self._in_flight = self._in_flight, None

  def close(self):
    """Wait for the save in flight and close; a failure already reported is not raised again
    (it would replace the error that ends the run)."""
    error = None
    if self._failed is None:
      try:
        self.wait()
      except CheckpointError as e:
        error = e
    if self._gave_up:
      if error is not None:
        raise error
      return  # closing would wait for the abandoned save's writers
    try:
      self.manager.close()
    except Exception:
      if self._failed is None and error is None:
        raise  # an Orbax error after a successful wait: not ours to hide
    if error is not None:
      raise error


def _warn(msg: str):
  if jax.process_index() == 0:  # one warning per job, not one per host
    log.warning(msg)


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


_short = storage.short


def _restore_args(abstract_tree):
  return jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
      if getattr(x, "sharding", None) is not None else ocp.RestoreArgs(restore_type=None),
      abstract_tree)


def find_checkpoint_dir(path: str) -> str:
  """`path/checkpoints` when `path` is a workdir, else `path` itself (local or a URL)."""
  sub = storage.join(path, CHECKPOINT_DIR)
  return sub if storage.isdir(sub) else storage.join(path)


def stored_tree(directory: str, step: Optional[int] = None) -> tuple[dict, int]:
  """Shapes/dtypes of the stored TrainState at `step` (default latest) without reading arrays."""
  mngr = _read(lambda: _manager(directory, read_only=True), directory)
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint found in {directory!r}: expected a workdir with "
                          f"{CHECKPOINT_DIR}/<step>/ or a checkpoint directory")
  step = max(steps) if step is None else step
  return _tree_of(_read(lambda: mngr.item_metadata(step)["state"], directory)), step


def _read(fn, directory):
  """A read of another run's checkpoint, with passing storage errors retried."""
  try:
    return storage.retry(fn, what=f"reading {directory}", where=directory, retries=IO_RETRIES,
                         say=_warn)
  except storage.StorageUnavailable as e:
    raise CheckpointError(str(e)) from e


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
  mngr = _read(lambda: _manager(directory, read_only=True), directory)
  out = _read(lambda: mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract),
                                   partial_restore=True))), directory)
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
  path = storage.join(workdir, CONFIG_FILE)
  if storage.exists(path):
    stored = json.loads(storage.read_text(path)).get("identity", {})
    diffs = _diff(stored, _jsonable(identity))
    if diffs:
      raise CheckpointError(
          f"workdir {workdir!r} holds a run of a different configuration, refusing to touch it "
          f"(use a new --workdir):\n  " + "\n  ".join(diffs))
    return
  if write:
    storage.write_text(path, json.dumps(
        {"identity": _jsonable(identity), "config": _jsonable(config_dict)}, indent=2,
        sort_keys=True))


def read_identity(workdir: str) -> Optional[dict]:
  """The identity recorded in `workdir`'s config.json (None when there is none)."""
  path = storage.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path)).get("identity", {})


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
