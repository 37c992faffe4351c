"""Command line: train or evaluate a Bi-Real Net.

    python -m bireal_jax.main --config=configs/fashion_mnist.py --workdir=runs/demo
    python -m bireal_jax.main --config=configs/fashion_mnist.py --workdir=runs/demo --mode=eval
    bireal-jax --config=configs/imagenet_bireal18.py --workdir=runs/r18 \\
        --config.manual_dir=/data/imagenet --config.grad_accum_steps=4

Any config key can be overridden with `--config.<key>=<value>`; the config is locked, so an
unknown key is an error, and `bireal_jax.config.validate` rejects impossible values before
any work starts. Several hosts: give every process the same command plus
`--config.coordinator_address=HOST:PORT --config.num_processes=N --config.process_id=I`
(or run under SLURM / Open MPI, which JAX detects).

A training run holds WORKDIR/workdir.lock while it runs: a second job on the same workdir is
refused before any work, and a dead job's lock is taken over (`bireal_jax.workdir_lock`,
docs/reliability.md). `--mode=eval` only reads checkpoints and takes no lock.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bireal_jax import config as config_lib
from bireal_jax import exit_noise, storage, workdir_lock
from bireal_jax.ops.cpu import host_malloc

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the export: a "
                    "local path or an object-store URL (gs://bucket/run).")
flags.DEFINE_enum("mode", None, list(config_lib.MODES),
                  "Overrides config.mode: 'train' (with periodic eval) or 'eval' (checkpoint "
                  "in --workdir, on config.eval_split).")
flags.DEFINE_string("eval_split", None, "Overrides config.eval_split (e.g. 'test', 'train').")
flags.DEFINE_bool("dry_run", False,
                  "Check a launch before paying for accelerators: build the input pipeline (on "
                  "tiny generated ImageNet-format archives for imagenet2012), compile the step "
                  "and run 3 steps at 2 images per device plus one eval batch, in "
                  "WORKDIR/dry_run. Model, image size, optimizer and mapping are the config's.")
flags.DEFINE_float("lock_stale_after_s", workdir_lock.STALE_AFTER_S,
                   "A workdir lock held from another host counts as a dead job's (and is taken "
                   "over) when its heartbeat is older than this many seconds.")
flags.DEFINE_float("lock_heartbeat_s", workdir_lock.HEARTBEAT_S,
                   "How often the training job refreshes its workdir lock (and finds out that "
                   "another job took it over); at most half of --lock_stale_after_s.")


def _wants_distributed(config) -> bool:
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
  if not _wants_distributed(config):
    return
  import jax
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes,
                             process_id=config.process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def take_workdir_lock(config, workdir: str):
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
      lock = workdir_lock.acquire(workdir, job=job, stale_after_s=FLAGS.lock_stale_after_s,
                                  heartbeat_s=FLAGS.lock_heartbeat_s)
    except workdir_lock.WorkdirLockError as e:
      error = str(e)
    except OSError as e:  # e.g. an unreadable lock file: still an answer for every process
      error = f"cannot use the workdir lock in {workdir!r}: {e}"
  if jax.process_count() > 1:
    error = _from_process_0("bireal_jax_workdir_lock", error)
  if error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)
  return lock


def _from_process_0(key: str, value: str) -> str:
  """`value` of process 0, on every process, through jax.distributed's key-value store (no
  device computation: nothing gets compiled before the lock is settled)."""
  import jax
  from jax._src import distributed
  client = distributed.global_state.client
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
      data = (os.path.join(_local_scratch(), "dry_run_data") if storage.is_url(workdir)
              else os.path.join(dry_workdir, "data"))
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


def _local_scratch() -> str:
  import tempfile
  return os.path.join(tempfile.gettempdir(), f"bireal_jax_{os.getuid()}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: expected only flags")
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax/JAX INFO lines would bury the progress bar
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=<file.py> is required")
  with config.unlocked():
    if FLAGS.mode:
      config.mode = FLAGS.mode
    if FLAGS.eval_split:
      config.eval_split = FLAGS.eval_split
  try:
    config_lib.validate(config)  # before touching devices, data or the workdir
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)

  if FLAGS.lock_heartbeat_s <= 0:
    print(f"error: --lock_heartbeat_s={FLAGS.lock_heartbeat_s:g} is invalid: expected a "
          f"positive number of seconds", file=sys.stderr, flush=True)
    sys.exit(2)
  if FLAGS.lock_stale_after_s < 2 * max(FLAGS.lock_heartbeat_s, workdir_lock.HEARTBEAT_S):
    print(f"error: --lock_stale_after_s={FLAGS.lock_stale_after_s:g} is invalid: expected at "
          f"least twice the lock's heartbeat interval "
          f"({2 * max(FLAGS.lock_heartbeat_s, workdir_lock.HEARTBEAT_S):g} s), or a live job "
          f"on another host would look dead", file=sys.stderr, flush=True)
    sys.exit(2)

  try:  # a URL whose filesystem package is missing: say which to install, before any work
    storage.require_backend(FLAGS.workdir)
    for key in ("init_from", "distill_from"):
      if config.get(key):
        storage.require_backend(config[key])
  except storage.MissingBackend as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)

  if storage.is_url(FLAGS.workdir):
    exit_noise.one_line_records()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # tf.data's C++ INFO lines, not warnings
  if config.keep_freed_host_memory and host_malloc.cpu_only():  # before JAX's threads allocate
    host_malloc.keep_freed_memory()
  initialize_distributed(config)
  import jax
  try:  # the device-dependent checks (batch divisibility), still before any work
    config_lib.validate(config, device_count=jax.device_count(),
                        process_count=jax.process_count())
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  workdir = FLAGS.workdir
  if FLAGS.dry_run:
    workdir = apply_dry_run(config, workdir, jax.device_count())
  # One writer per workdir, settled before data or compilation. Eval only reads checkpoints
  # (and appends one line to metrics.jsonl), so it may run beside the training job.
  lock = take_workdir_lock(config, workdir) if config.mode == "train" else None
  # A checkpoint error was reported: Orbax's writer threads may still be failing (and printing
  # after the error line) or, for a save given up on, retrying for many minutes.
  leftover_writers = False
  try:
    from bireal_jax import checkpoint, train  # imports Orbax (and TensorFlow for real data)
    if jax.process_index() == 0:
      print(f"bireal_jax: {config.mode} {config.model} on {config.dataset}, "
            f"{jax.device_count()} device(s) in {jax.process_count()} process(es), "
            f"workdir {workdir}{' (dry run)' if FLAGS.dry_run else ''}", flush=True)
    try:
      if config.mode == "train":
        result = train.train_and_evaluate(config, workdir, lock=lock)
      else:
        result = train.evaluate_checkpoint(config, workdir)
    except (config_lib.ConfigError, checkpoint.CheckpointError, train.TrainingDiverged,
            workdir_lock.WorkdirLockLost, storage.StorageUnavailable, storage.MissingBackend,
            OSError) as e:  # OSError: e.g. a full disk under metrics.jsonl
      exit_noise.after_reported_failure()
      leftover_writers = isinstance(e, checkpoint.CheckpointError)
      where = (f" (writing under workdir {workdir})"
               if isinstance(e, OSError) and not e.filename else "")
      print(f"error: {e}{where}", file=sys.stderr, flush=True)
      sys.exit(1)
    except Exception as e:
      if not storage.is_transient(e):
        raise  # a bug: keep its traceback
      exit_noise.after_reported_failure()
      print(f"error: the storage under workdir {workdir} could not be reached "
            f"({type(e).__name__}: {storage.short(e)}); checkpoints already written are kept: "
            f"run the same command again once it is reachable", file=sys.stderr, flush=True)
      sys.exit(1)
    logging.info("result: %s", result)
  finally:  # normal end, SIGTERM's clean stop, sys.exit and exceptions alike
    if lock is not None:
      lock.release()
    if leftover_writers:  # the error stays the last line; nothing waits on those threads
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)


def _parse_flags(argv):
  """absl flag parsing, with a readable error for `--config.<key>` naming no config key.

  (`config_flags` surfaces that case as a bare AttributeError/KeyError traceback.)
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:  # e.g. --config.batch_size=abc
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    known = sorted(config_lib.get_default_config().keys())
    unknown = [o for o in overrides if o[len("--config."):].split(".")[0] not in known]
    print(f"error: unknown config key {', '.join(unknown) or overrides} "
          f"({str(e).strip(chr(34))}); the config is locked, expected one of: "
          f"{', '.join(known)}", file=sys.stderr, flush=True)
    sys.exit(2)


def run():
  """Console-script entry point (`bireal-jax`)."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
