"""Start-up and ending of a job: everything between a parsed config and `train_and_evaluate`.

`run(config, workdir, ...)` is what `python -m bireal_jax.main` calls. In order, before any
work: the config's values (`config.validate`), the lock timing, the storage packages a URL
needs; then host-memory tuning (CPU runs), `jax.distributed.initialize` (when the config or
the environment asks for several hosts), the device-dependent checks, the dry-run rewrite, and
the workdir lock (one writer per workdir, `bireal_jax.workdir_lock`, taken by process 0 and
announced to all). It then trains or evaluates.

Errors an operator can act on (a bad value, a full disk, a lost lock, unreachable storage) end
the process with one line `error: ...` on stderr: exit status 2 before any work, 1 after.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
from typing import Optional

from absl import logging

from bireal_jax import config as config_lib
from bireal_jax import exit_noise, storage, workdir_lock
from bireal_jax.ops.cpu import host_malloc

# OSErrors that are the machine's state, not the code's: reported as one line.
OPERATOR_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM,
                             errno.EROFS, errno.EIO, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                             errno.ENAMETOOLONG, errno.ESTALE})


def is_operator_error(e: BaseException) -> bool:
  """True for errors the job reports as one line (an operator can act on them); False for bugs,
  which keep their traceback."""
  from bireal_jax import checkpoint, train
  if isinstance(e, (config_lib.ConfigError, checkpoint.CheckpointError, train.TrainingDiverged,
                    workdir_lock.WorkdirLockLost, storage.StorageUnavailable,
                    storage.MissingBackend)):
    return True
  # The types too: filesystem libraries (gcsfs) raise them without an errno.
  return isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError)) or (isinstance(e, OSError)
                                                 and e.errno in OPERATOR_ERRNOS)


def _fail(message: str, status: int):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def check_lock_timing(stale_after_s: float, heartbeat_s: float) -> None:
  """`ConfigError` unless the heartbeat is positive and a stale lock is at least two heartbeats
  old (else a live job on another host would look dead)."""
  if heartbeat_s <= 0:
    raise config_lib.ConfigError(f"--lock_heartbeat_s={heartbeat_s:g} is invalid: expected a "
                                 f"positive number of seconds")
  least = 2 * max(heartbeat_s, workdir_lock.HEARTBEAT_S)
  if stale_after_s < least:
    raise config_lib.ConfigError(
        f"--lock_stale_after_s={stale_after_s:g} is invalid: expected at least twice the "
        f"lock's heartbeat interval ({least:g} s), or a live job on another host would look "
        f"dead")


def wants_distributed(config) -> bool:
  """Several hosts: `config.distributed == "on"`, or "auto" and a coordinator (config or
  JAX_COORDINATOR_ADDRESS) or a multi-task SLURM / Open MPI launch."""
  if config.distributed == "off":
    return False
  if config.distributed == "on":
    return True
  env = os.environ
  return bool(config.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize_distributed(config) -> None:
  """`jax.distributed.initialize` when the config or the environment asks for several hosts."""
  if not wants_distributed(config):
    return
  import jax
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes,
                             process_id=config.process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def take_workdir_lock(config, workdir: str, *, stale_after_s: float, heartbeat_s: float):
  """Process 0 takes the workdir lock; every process of the job gets its verdict.

  Only process 0 reads or writes the lock, so the job's own other processes are never refused;
  they wait for process 0's answer so that a refused job stops everywhere at once (rather than
  leaving processes that wait for a process 0 that has gone).
  """
  import jax
  lock, error = None, ""
  if jax.process_index() == 0:
    job = (f"{config.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or 'local'}"
           f", {jax.process_count()} process(es)"
           + (f", SLURM job {os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else ""))
    try:
      lock = workdir_lock.acquire(workdir, job=job, stale_after_s=stale_after_s,
                                  heartbeat_s=heartbeat_s)
    except workdir_lock.WorkdirLockError as e:
      error = str(e)
    except OSError as e:  # e.g. an unreadable lock file: still an answer for every process
      error = f"cannot use the workdir lock in {workdir!r}: {e}"
  if jax.process_count() > 1:
    error = from_process_0("bireal_jax_workdir_lock", error)
  if error:
    _fail(error, 1)
  return lock


def from_process_0(key: str, value: str) -> str:
  """`value` of process 0, on every process, through jax.distributed's key-value store (no
  device computation: nothing gets compiled before the lock is settled)."""
  import jax
  from bireal_jax import compat
  client = compat.distributed_kv_client()
  if jax.process_index() == 0:
    client.key_value_set(key, "v" + value)  # "v": the store refuses an empty value
    return value
  return client.blocking_key_value_get(key, 600_000)[1:]  # process 0 may wait on a takeover


def apply_dry_run(config, workdir: str, device_count: int) -> str:
  """Shrink `config` to a few-step check of the same model and code path; returns its workdir."""
  dry_workdir = storage.join(workdir, "dry_run")
  with config.unlocked():
    if config.dataset == "imagenet2012":  # real archives not needed: tiny ones in the real format
      from bireal_jax import imagenet_fixture
      # tfds prepares from local archives; a bucket workdir keeps its fixture on this host
      data = (os.path.join(tempfile.gettempdir(), f"bireal_jax_{os.getuid()}", "dry_run_data")
              if storage.is_url(workdir) else os.path.join(dry_workdir, "data"))
      dirs = imagenet_fixture.tiny_imagenet_dirs(data)
      config.manual_dir, config.data_dir = dirs["manual_dir"], dirs["data_dir"]
      config.eval_split = "validation"
      config.shuffle_buffer_size = 64
    config.batch_size = config.eval_batch_size = 2 * device_count
    config.grad_accum_steps = 1
    config.num_train_steps = 3
    config.steps_per_eval = 1
    config.checkpoint_every_steps = 2
    config.bn_reestimate_steps = min(config.bn_reestimate_steps, 1)
    config.init_from = None  # the two-step config's clip checkpoint does not exist yet
  return dry_workdir


def _check_before_work(config, workdir: str, stale_after_s: float, heartbeat_s: float):
  """Everything that needs neither devices nor the workdir: exit status 2 on a bad value."""
  try:
    config_lib.validate(config)
    check_lock_timing(stale_after_s, heartbeat_s)
    storage.require_backend(workdir)  # a URL whose package is missing: name it, before any work
    for key in ("init_from", "distill_from"):
      if config.get(key):
        storage.require_backend(config[key])
  except (config_lib.ConfigError, storage.MissingBackend) as e:
    _fail(str(e), 2)


def run(config, workdir: str, *, dry_run: bool = False,
        lock_stale_after_s: float = workdir_lock.STALE_AFTER_S,
        lock_heartbeat_s: float = workdir_lock.HEARTBEAT_S) -> Optional[dict]:
  """Train (`config.mode == "train"`, with the workdir lock) or evaluate a checkpoint.

  Returns the job's result. Ends the process (`sys.exit`) on an operator's error, after one
  line on stderr; other exceptions propagate with their traceback.
  """
  _check_before_work(config, workdir, lock_stale_after_s, lock_heartbeat_s)
  if storage.is_url(workdir):
    exit_noise.one_line_records()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # tf.data's C++ INFO lines, not warnings
  if config.keep_freed_host_memory and host_malloc.cpu_only():  # before JAX's threads allocate
    host_malloc.keep_freed_memory()
  initialize_distributed(config)
  import jax
  try:  # the device-dependent checks (batch divisibility), still before the workdir exists
    config_lib.validate(config, device_count=jax.device_count(),
                        process_count=jax.process_count())
  except config_lib.ConfigError as e:
    _fail(str(e), 2)
  if dry_run:
    workdir = apply_dry_run(config, workdir, jax.device_count())
  # One writer per workdir, settled before data or compilation. Eval only reads checkpoints
  # (and appends one line to metrics.jsonl), so it may run beside the training job.
  lock = (take_workdir_lock(config, workdir, stale_after_s=lock_stale_after_s,
                            heartbeat_s=lock_heartbeat_s) if config.mode == "train" else None)
  try:
    from bireal_jax import checkpoint, train  # imports Orbax (and TensorFlow for real data)
    if jax.process_index() == 0:
      print(f"bireal_jax: {config.mode} {config.model} on {config.dataset}, "
            f"{jax.device_count()} device(s) in {jax.process_count()} process(es), "
            f"workdir {workdir}{' (dry run)' if dry_run else ''}", flush=True)
    try:
      if config.mode == "train":
        return train.train_and_evaluate(config, workdir, lock=lock)
      return train.evaluate_checkpoint(config, workdir)
    except Exception as e:
      if is_operator_error(e):
        exit_noise.after_reported_failure()
        where = (f" (writing under workdir {workdir})"
                 if isinstance(e, OSError) and not e.filename else "")
        if isinstance(e, checkpoint.CheckpointError):
          # Orbax's writer threads may still be failing (and printing tracebacks) or, for a
          # save given up on, retrying for minutes: release the lock first, then report, then
          # end without waiting on them, so that the error is the last line.
          if lock is not None:
            lock, held = None, lock
            held.release()
          print(f"error: {e}{where}", file=sys.stderr, flush=True)
          sys.stdout.flush()
          os._exit(1)
        _fail(f"{e}{where}", 1)
      if not storage.is_transient(e):
        raise  # a bug: keep its traceback
      exit_noise.after_reported_failure()
      _fail(f"the storage under workdir {workdir} could not be reached "
            f"({type(e).__name__}: {storage.short(e)}); checkpoints already written are kept: "
            f"run the same command again once it is reachable", 1)
  finally:  # normal end, SIGTERM's clean stop, sys.exit and exceptions alike
    if lock is not None:
      lock.release()
