"""The command line, end to end, in subprocesses: validation, bad input, preemption and crash
recovery on Fashion-MNIST (multi-host: test_main_multihost.py).

Tests named `test_slow_*` start several training processes (tens of seconds each on 2 cores);
they still run in CI (deselect locally with `-k "not slow"`). Training runs are tiny: 8 px images, width 4, one block in each of 2 stages.
"""
import os
import signal

import pytest

from bireal_jax import config as config_lib
from cli import REPO, TINY, exported, run_cli, saved_steps, start_cli, wait_for  # tests/cli.py
from numerics import assert_trees  # tests/numerics.py

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
needs_fmnist = pytest.mark.skipif(not os.path.exists(FMNIST),
                                  reason=f"Fashion-MNIST IDX files not installed ({FMNIST}); "
                                  "`make data` installs them")


# ---------------------------------------------------------------------------------------------
# Validation before any work
# ---------------------------------------------------------------------------------------------


def test_every_model_field_is_a_config_key_that_reaches_the_model():
  """The model keys are BiRealNet's fields: each one set in the config arrives in the model."""
  import dataclasses
  from bireal_jax import train
  from bireal_jax.models.bireal import BiRealNet
  c = config_lib.get_default_config()
  fields = {f.name for f in dataclasses.fields(BiRealNet)} - {
      "num_classes", "axis_name", "param_dtype", "parent", "name", "block"}
  assert fields <= set(c.keys())
  with c.unlocked():
    c.padding, c.stem, c.base_width, c.stage_sizes = "same", "small", 8, (1, 1)
    c.kernel_quantizer, c.bn_epsilon = "none", 1e-3
  config_lib.validate(c)
  model = train.create_model(c, num_classes=10)
  assert (model.padding, model.stem, model.base_width, model.stage_sizes) == (
      "same", "small", 8, (1, 1))
  assert model.kernel_quantizer is None and model.bn_epsilon == 1e-3
  with c.unlocked():
    c.padding = "valid"
  with pytest.raises(config_lib.ConfigError, match=r"config.padding='valid' is invalid"):
    config_lib.validate(c)


def test_validate_names_key_value_and_expectation():
  cases = [("batch_size", 0, "config.batch_size=0 is invalid: expected a positive integer"),
           ("model", "bireal19", "config.model='bireal19' is invalid: expected one of"),
           ("optimizer", "adamax", "expected one of ['adam', 'adamw', 'sgd']"),
           ("kernel_quantizer", "ternary", "config.kernel_quantizer='ternary'"),
           ("activation", "tanh", "config.activation='tanh'"),
           ("mapping", "xmap", "expected one of ['pmap', 'shard_map']"),
           ("dtype", "float16", "expected one of ['float32', 'bfloat16']"),
           ("lr_schedule", "step", "config.lr_schedule='step'"),
           ("label_smoothing", 1.5, "a value in [0, 1)"),
           ("grad_accum_steps", 3, "config.batch_size=512 is invalid: expected a multiple of "
            "grad_accum_steps=3"),
           ("dataset", "cifar10", "config.dataset='cifar10'"),
           ("stage_sizes", (4, 0), "config.stage_sizes=(4, 0)"),
           ("bad_images", "ignore",
            "config.bad_images='ignore' is invalid: expected one of ['skip', 'error']")]
  for key, value, expected in cases:
    c = config_lib.get_default_config()
    c[key] = value
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(c)
    assert expected in str(e.value), (key, str(e.value))
  c = config_lib.get_default_config()
  config_lib.validate(c, device_count=8)  # the default recipe itself is valid
  with pytest.raises(config_lib.ConfigError, match="device_count × grad_accum_steps = 8 × 3"):
    c.batch_size, c.grad_accum_steps = 36, 3
    config_lib.validate(c, device_count=8)
  with pytest.raises(AttributeError):  # locked like the CLI's config: no new keys
    c.lock()
    c.learning_rate_typo = 1.0


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


def load_config_file(name):
  return config_lib.from_file(os.path.join(REPO, "configs", name + ".py"))


def test_config_files_validate_and_match_the_published_recipes():
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
  assert {"fashion_mnist", "fashion_mnist_real", "fashion_mnist_long", "fashion_mnist_kd",
          "imagenet_bireal18",
          "imagenet_bireal34", "imagenet_bireal50", "imagenet_bireal18_real_clip",
          "imagenet_bireal18_twostep"} <= set(names)
  configs = {n: load_config_file(n) for n in names}
  for c in configs.values():
    config_lib.validate(c, device_count=8)
  official = dict(optimizer="adam", lr_schedule="linear_epoch", num_epochs=256.0,
                  weight_decay=0.0, label_smoothing=0.1, image_size=224)
  for name, model, lr, batch in [("imagenet_bireal18", "bireal18", 1e-3, 512),
                                 ("imagenet_bireal34", "bireal34", 1e-3, 512),
                                 ("imagenet_bireal50", "bireal50", 5e-4, 256)]:
    c = configs[name]
    assert (c.model, c.learning_rate, c.batch_size) == (model, lr, batch)
    assert {k: c[k] for k in official} == official
  two = configs["imagenet_bireal18_twostep"]
  assert (two.optimizer, two.momentum, two.learning_rate, two.batch_size, two.num_epochs,
          tuple(two.lr_boundaries), two.lr_decay_factor, two.weight_decay) == \
      ("sgd", 0.9, 0.01, 128, 20.0, (10.0, 15.0), 0.1, 0.0)
  assert two.bn_reestimate_steps > 0 and configs["imagenet_bireal18_real_clip"].model == \
      "bireal18_real"
  demo, real = configs["fashion_mnist"], configs["fashion_mnist_real"]
  assert real.model == "bireal18_real" and demo.model == "bireal18"
  assert {k: v for k, v in real.items() if k != "model"} == \
      {k: v for k, v in demo.items() if k != "model"}  # twins: same tree, same recipe
  kd = configs["fashion_mnist_kd"]  # the demo student, initialised and taught by the twin
  taught = ("init_from", "distill_from", "distill_weight", "distill_temperature")
  assert kd.init_from == kd.distill_from == "runs/fm_real" and kd.distill_weight > 0
  assert {k: v for k, v in kd.items() if k not in taught} == \
      {k: v for k, v in demo.items() if k not in taught}


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


def test_config_from_file_names_a_missing_file(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="nope.py.*get_config"):
    config_lib.from_file(str(tmp_path / "nope.py"))
