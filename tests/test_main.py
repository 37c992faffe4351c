"""The command line, end to end, in subprocesses: validation, bad input, preemption and crash
recovery on Fashion-MNIST (multi-host: test_main_multihost.py).

Tests named `test_slow_*` start several training processes (tens of seconds each on 2 cores);
they still run in CI (deselect locally with `-k "not slow"`). Training runs are tiny: 8 px images, width 4, one block in each of 2 stages.
"""
import os
import signal

import pytest

from bireal_jax import config as config_lib
from cli import TINY, exported, run_cli, saved_steps, start_cli, wait_for  # tests/cli.py
from numerics import assert_trees  # tests/numerics.py

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
needs_fmnist = pytest.mark.skipif(not os.path.exists(FMNIST),
                                  reason=f"Fashion-MNIST IDX files not installed ({FMNIST}); "
                                  "`make data` installs them")


# ---------------------------------------------------------------------------------------------
# Validation before any work
# ---------------------------------------------------------------------------------------------


def test_every_data_option_is_a_config_key_settable_from_the_command_line(tmp_path):
  flags = ["--config=configs/imagenet_bireal18.py", f"--workdir={tmp_path / 'run'}",
           "--config.bad_images=error", "--config.cache=True", "--config.prefetch=4",
           "--config.shuffle_buffer_size=1000", "--config.data_dir=/d", "--config.manual_dir=/m",
           "--config.augment=none"]
  # Every flag is a known key: the run stops at validation, on the one invalid value.
  r = run_cli(*flags, "--config.batch_size=0", timeout=300)
  assert r.returncode != 0 and "config.batch_size=0 is invalid" in r.stderr, r.stderr[-2000:]
  r = run_cli(*flags, "--config.bad_images=ignore", timeout=300)
  assert r.returncode != 0, r.stderr[-2000:]
  assert "config.bad_images='ignore' is invalid: expected one of ['skip', 'error']" in r.stderr
  c = config_lib.get_default_config()
  for key in config_lib.DATA_KEYS:  # the pipeline reads each through data_option
    assert key in c, key
  # Defaults that depend on the dataset, for keys left at None or out.
  bare = {"dataset": "fashion_mnist"}
  assert config_lib.data_option(bare, "eval_split") == "test"
  assert config_lib.data_option(bare, "image_size") == 28
  assert config_lib.data_option({"dataset": "imagenet2012"}, "bad_images") == "skip"
  with pytest.raises(KeyError, match="data option 'shuffle' unknown"):
    config_lib.data_option(bare, "shuffle")


def test_cli_refuses_bad_config_before_any_work(tmp_path):
  wd = str(tmp_path / "wd")
  r = run_cli("--config=configs/fashion_mnist.py", f"--workdir={wd}", "--config.lerning_rate=1")
  assert r.returncode == 2
  assert "unknown config key --config.lerning_rate" in r.stderr and "learning_rate" in r.stderr
  r = run_cli("--config=configs/fashion_mnist.py", f"--workdir={wd}", "--config.batch_size=36")
  assert r.returncode == 2
  assert ("config.batch_size=36 is invalid: expected a multiple of device_count × "
          "grad_accum_steps = 8 × 1 = 8") in r.stderr
  assert not os.path.exists(wd)  # nothing was created


def test_cli_reports_missing_imagenet_archives(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  r = run_cli("--config=configs/imagenet_bireal18.py", f"--workdir={tmp_path / 'wd'}",
              f"--config.data_dir={tmp_path / 'tfds'}", f"--config.manual_dir={manual}")
  assert r.returncode == 1, r.stderr[-2000:]
  assert "ILSVRC2012_img_train.tar" in r.stderr and "MISSING" in r.stderr
  assert str(manual) in r.stderr


# ---------------------------------------------------------------------------------------------
# Preemption and crashes (Fashion-MNIST through the real input pipeline)
# ---------------------------------------------------------------------------------------------


@needs_fmnist
def test_slow_sigkill_then_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
  steps = 400
  args = ["--config=configs/fashion_mnist.py", *TINY, f"--config.num_train_steps={steps}",
          "--config.checkpoint_every_steps=20", "--config.log_every_steps=20",
          "--config.lr_schedule=cosine"]
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  r = run_cli(*args, f"--workdir={ref}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Final evaluation" in r.stdout

  with open(tmp_path / "log1.txt", "w") as log:  # 1. SIGKILL mid-run
    p = start_cli(*args, f"--workdir={run}", log=log)
    wait_for(lambda: any(s >= 60 for s in saved_steps(run)), p, what="checkpoint 60")
    p.send_signal(signal.SIGKILL)
    assert p.wait(60) == -signal.SIGKILL
  killed_at = max(saved_steps(run))
  assert killed_at < steps

  with open(tmp_path / "log2.txt", "w") as log:  # 2. resume, then SIGTERM mid-run
    p = start_cli(*args, f"--workdir={run}", log=log)
    wait_for(lambda: max(saved_steps(run)) > killed_at + 40, p, what="a newer checkpoint")
    p.send_signal(signal.SIGTERM)
    assert p.wait(120) == 0
  out = (tmp_path / "log2.txt").read_text()
  assert f"Resuming from checkpoint step {killed_at}" in out
  assert "SIGTERM received: checkpoint saved at step" in out
  term_step = int(out.split("SIGTERM received: checkpoint saved at step ")[1].split()[0])
  assert term_step in saved_steps(run) and term_step < steps

  r = run_cli(*args, f"--workdir={run}")  # 3. resume to the end
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resuming from checkpoint step {term_step}" in r.stdout
  assert_trees(exported(run), exported(ref), exact=True)

  # Eval-only mode on the finished run prints top-1/top-5 of its last checkpoint.
  r = run_cli("--config=configs/fashion_mnist.py", *TINY, "--config.steps_per_eval=-1",
              f"--workdir={run}", "--mode=eval", "--eval_split=test[:256]")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"(step {steps}, bireal18) on test[:256], 256 images: top-1" in r.stdout

  # The same workdir with another image size is refused, its checkpoints untouched.
  before = saved_steps(run)
  r = run_cli("--config=configs/fashion_mnist.py", *TINY, "--config.image_size=12",
              f"--workdir={run}")
  assert r.returncode == 1
  assert "image_shape: workdir has [8, 8, 1], config has [12, 12, 1]" in r.stderr
  assert saved_steps(run) == before
