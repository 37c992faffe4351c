"""Test helpers: the training job's command line in subprocesses (tests/test_main.py,
test_main_multihost.py, test_reliability.py and, through storage_cli.py, the gs:// tests).

Each process gets `env_for(devices)`: that many virtual CPU devices, a persistent XLA cache shared
by the suite (the same tiny programs compile once), and BIREAL_OPS=reference unless set
(conftest.py says why). `TINY` makes a training run small enough for 2 cores: 8 px images,
width 4, one block in each of 2 stages.
"""
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), f"bireal_jax_test_xla_cache_{os.getuid()}")

TINY = ["--config.image_size=8", "--config.base_width=4", "--config.stage_sizes=(1,1)",
        "--config.batch_size=32", "--config.eval_batch_size=64", "--config.steps_per_eval=2",
        "--config.progress_bar=False", "--config.tensorboard=False",
        "--config.eval_every_epochs=100"]


def env_for(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_COMPILATION_CACHE_DIR"] = CACHE  # the same tiny programs compile once per suite
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("BIREAL_OPS", "reference")  # see conftest.py: the same picks in every process
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def cmd(*args):
  return [sys.executable, "-m", "bireal_jax.main", *args]


def run_cli(*args, devices=8, timeout=600):
  return subprocess.run(cmd(*args), cwd=REPO, env=env_for(devices), capture_output=True,
                        text=True, timeout=timeout)


def start_cli(*args, devices=8, log=None):
  return subprocess.Popen(cmd(*args), cwd=REPO, env=env_for(devices), stdout=log,
                          stderr=subprocess.STDOUT, text=True)


def run_two_processes(start, args, tmp_path) -> str:
  """Run `start(*args, <2-process flags>, devices=4, log=f)` as processes 0 and 1 of one job (a
  coordinator on a free local port); asserts both exit 0; returns process 0's output."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    log = open(tmp_path / f"p{pid}.txt", "w")
    procs.append((start(*args, "--config.distributed=on",
                        f"--config.coordinator_address=127.0.0.1:{port}",
                        "--config.num_processes=2", f"--config.process_id={pid}",
                        devices=4, log=log), log))
  for pid, (p, log) in enumerate(procs):
    rc = p.wait(600)
    log.close()
    assert rc == 0, (tmp_path / f"p{pid}.txt").read_text()[-3000:]
  return (tmp_path / "p0.txt").read_text()


def saved_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def truncate_step(workdir, step):
  """Cut every data file of checkpoint `step` to a third, as a crash of the storage would (its
  metadata files stay whole, so the step is listed and fails only when read)."""
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  for root, _, files in os.walk(state):
    for f in files:
      if f not in ("_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"):
        p = os.path.join(root, f)
        os.truncate(p, os.path.getsize(p) // 3)


def wait_for(predicate, proc, timeout=300, what="condition"):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def exported(workdir):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "inference", "variables"))
