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
docs/reliability.md). `--mode=eval` only reads checkpoints and takes no lock. Start-up (checks,
several hosts, the lock, the dry run) and error reporting: `bireal_jax.train.launch`.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bireal_jax import config as config_lib
from bireal_jax import workdir_lock
from bireal_jax.train import launch

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: expected only flags")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax/JAX INFO lines would bury the progress bar
  config = _CONFIG.value
  with config.unlocked():
    config.mode = FLAGS.mode or config.mode
    config.eval_split = FLAGS.eval_split or config.eval_split
  result = launch.run(config, FLAGS.workdir, dry_run=FLAGS.dry_run,
                      lock_stale_after_s=FLAGS.lock_stale_after_s,
                      lock_heartbeat_s=FLAGS.lock_heartbeat_s)
  logging.info("result: %s", result)


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
