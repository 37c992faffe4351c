"""Helpers of the gs:// command-line tests (test_object_storage*.py): tiny runs of the training
job against the `gcs` emulator fixture (conftest.py). Runs are tiny (synthetic data, 8 px images,
width 4); `--config.storage_retries=0` and a short `--config.storage_timeout_s` keep the outage
cases short.
"""
import re
import subprocess
import sys
import textwrap

from cli import REPO, cmd, env_for, wait_for  # noqa: F401 (re-exported; tests/cli.py)

ARGS = ["--config=configs/fashion_mnist.py", "--config.dataset=synthetic",
        "--config.image_size=8", "--config.base_width=4", "--config.stage_sizes=(1,1)",
        "--config.batch_size=8", "--config.eval_batch_size=8", "--config.steps_per_eval=1",
        "--config.progress_bar=False", "--config.tensorboard=False",
        "--config.eval_every_epochs=100", "--config.log_every_steps=10",
        "--config.storage_retries=0", "--config.storage_timeout_s=8"]
FOREVER = "--config.num_train_steps=1000000"


def env(gcs, devices=1, **extra):
  return {**env_for(devices), **gcs.env, **extra}


def run_cli(gcs, *args, devices=1, timeout=600, extra_env=None):
  return subprocess.run(cmd(*ARGS, *args), cwd=REPO, env=env(gcs, devices, **(extra_env or {})),
                        capture_output=True, text=True, timeout=timeout)


def start_cli(gcs, *args, log, devices=1):
  return subprocess.Popen(cmd(*ARGS, *args), cwd=REPO, env=env(gcs, devices), stdout=log,
                          stderr=subprocess.STDOUT, text=True)


def python(gcs, code: str, timeout=300):
  """Run `code` in a fresh interpreter that reaches the emulator; returns its stdout."""
  r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env(gcs),
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def steps(gcs, bucket, run="run"):
  """Finished checkpoint steps (Orbax marks them with commit_success.txt on object storage)."""
  out = set()
  for name in gcs.objects(bucket, f"{run}/checkpoints/"):
    m = re.fullmatch(rf"{run}/checkpoints/(\d+)/commit_success\.txt", name)
    if m:
      out.add(int(m.group(1)))
  return sorted(out)


def same_exports(gcs, a: str, b: str):
  """The two exports' variables, read in a fresh process with deploy.load, are bit-identical."""
  out = python(gcs, f"""
      import jax, numpy as np
      from bireal_jax import deploy
      a, b = deploy.load({a!r}), deploy.load({b!r})
      la, lb = jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)
      print(len(la), all(np.array_equal(x, y) for x, y in zip(la, lb)))
  """)
  n, equal = out.split()[-2:]
  assert int(n) > 0 and equal == "True", out
