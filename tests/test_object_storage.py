"""The training job on a gs:// workdir, through the command line, against a real GCS emulator
(fake-gcs-server on 127.0.0.1, started by the `gcs` fixture in conftest.py).

Resume after SIGTERM, 2 processes × 4 devices against 1 × 8, the workdir lock (refused, stale
taken over, lost), eval mode, init_from, the export loaded in a fresh process, the converter's
--output, an outage mid-run and a restore that meets a network error. Runs are tiny (synthetic
data, 8 px images, width 4); `--config.storage_retries=0` and `--config.storage_timeout_s=20`
keep the outage cases short.
"""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from test_main import REPO, cmd, env_for

ARGS = ["--config=configs/fashion_mnist.py", "--config.dataset=synthetic",
        "--config.image_size=8", "--config.base_width=4", "--config.stage_sizes=(1,1)",
        "--config.batch_size=8", "--config.eval_batch_size=8", "--config.steps_per_eval=1",
        "--config.progress_bar=False", "--config.tensorboard=False",
        "--config.eval_every_epochs=100", "--config.log_every_steps=10",
        "--config.storage_retries=0", "--config.storage_timeout_s=20"]
FOREVER = "--config.num_train_steps=1000000"


@pytest.fixture(autouse=True)
def no_local_gs_folder():
  """A URL is never turned into a local path: no `gs:` folder appears where jobs run."""
  yield
  assert not os.path.exists(os.path.join(REPO, "gs:")), "a local folder 'gs:' was written"


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


def wait_for(predicate, proc, timeout=180, what="condition"):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.2)


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


def test_gs_workdir_resumes_after_sigterm_bit_identical_evals_exports_and_inits(gcs, tmp_path):
  gs = gcs.make_bucket("resume")
  common = ["--config.num_train_steps=300", "--config.checkpoint_every_steps=30",
            "--config.lr_schedule=cosine", "--config.tensorboard=True"]
  r = run_cli(gcs, *common, f"--workdir={gs}/ref")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Exported inference checkpoint to {gs}/ref/inference" in r.stdout

  with open(tmp_path / "a.txt", "w") as log:
    a = start_cli(gcs, *common, f"--workdir={gs}/run", log=log)
    wait_for(lambda: steps(gcs, "resume"), a, what="a first checkpoint")
    a.send_signal(signal.SIGTERM)
    assert a.wait(120) == 0, (tmp_path / "a.txt").read_text()[-3000:]
  out = (tmp_path / "a.txt").read_text()
  stopped = int(out.split("SIGTERM received: checkpoint saved at step ")[1].split()[0])
  assert stopped < 300 and stopped in steps(gcs, "resume")
  assert "workdir.lock" not in " ".join(gcs.objects("resume", "run/"))  # released

  r = run_cli(gcs, *common, f"--workdir={gs}/run")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resuming from checkpoint step {stopped} in {gs}/run/checkpoints" in r.stdout
  same_exports(gcs, f"{gs}/run/inference", f"{gs}/ref/inference")
  objects = gcs.objects("resume", "run/")
  assert "run/config.json" in objects
  assert any(n.startswith("run/metrics/") for n in objects), objects
  assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in objects), objects

  r = run_cli(gcs, *common, f"--workdir={gs}/run", "--mode=eval")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Evaluation of {gs}/run (step 300, bireal18)" in r.stdout
  records = json.loads(python(gcs, f"""
      import json
      from bireal_jax.train import read_metrics
      print(json.dumps(read_metrics({gs + '/run'!r})))
  """))
  splits = [x["split"] for x in records]
  assert "train" in splits and "eval" in splits and splits[-1] == "eval_only/test"
  assert [x["step"] for x in records if x["split"] == "train"] == sorted(
      x["step"] for x in records if x["split"] == "train")

  r = run_cli(gcs, "--config.num_train_steps=2", f"--config.init_from={gs}/run",
              f"--workdir={gs}/finetune")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Initialised params and batch_stats from {gs}/run" in r.stdout


def test_two_processes_on_one_gs_workdir_match_one_process(gcs, tmp_path):
  gs = gcs.make_bucket("multihost")
  args = ["--config.num_train_steps=6", "--config.checkpoint_every_steps=3",
          "--config.batch_size=16", "--config.eval_batch_size=16"]
  r = run_cli(gcs, *args, f"--workdir={gs}/one", devices=8)
  assert r.returncode == 0, r.stderr[-3000:]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    log = open(tmp_path / f"p{pid}.txt", "w")
    procs.append((start_cli(gcs, *args, f"--workdir={gs}/two", "--config.distributed=on",
                            f"--config.coordinator_address=127.0.0.1:{port}",
                            "--config.num_processes=2", f"--config.process_id={pid}",
                            devices=4, log=log), log))
  for pid, (p, log) in enumerate(procs):
    rc = p.wait(600)
    log.close()
    assert rc == 0, (tmp_path / f"p{pid}.txt").read_text()[-3000:]
  out0 = (tmp_path / "p0.txt").read_text()
  assert "8 device(s) in 2 process(es)" in out0
  assert steps(gcs, "multihost", "two") == [3, 6]
  out = python(gcs, f"""
      import jax, numpy as np
      from bireal_jax import deploy
      a, b = deploy.load({gs + '/one/inference'!r}), deploy.load({gs + '/two/inference'!r})
      print(max(float(np.abs(x - y).max()) for x, y in
                zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables))))
  """)
  assert float(out.split()[-1]) < 1e-4, out
  top1 = lambda text: text.split("Final evaluation")[1].split("top-1 ")[1].split("%")[0]
  assert top1(out0) == top1(r.stdout)


def test_gs_workdir_lock_refuses_a_second_job_takes_over_a_dead_one_and_stops_when_lost(
    gcs, tmp_path):
  gs = gcs.make_bucket("lock")
  url = f"{gs}/held/workdir.lock"
  with open(tmp_path / "a.txt", "w") as log:
    a = start_cli(gcs, f"--workdir={gs}/held", FOREVER, "--config.checkpoint_every_steps=20",
                  log=log)
    wait_for(lambda: steps(gcs, "lock", "held"), a, what="a first checkpoint")
    before = gcs.objects("lock", "held/")
    b = run_cli(gcs, f"--workdir={gs}/held", "--config.num_train_steps=5")
    assert a.poll() is None  # the holder is untouched and still training
    assert b.returncode == 1, b.stderr[-3000:]
    assert (f"workdir '{gs}/held' is in use by another job: its lock {url} is held by host "
            f"{socket.gethostname()!r}, pid {a.pid}, started ") in b.stderr
    assert "bireal_jax: train" not in b.stdout  # refused before data, model or compilation
    assert not set(gcs.objects("lock", "held/")) - set(before) - {
        n for n in gcs.objects("lock", "held/checkpoints/")}  # B wrote nothing
    holder = json.loads(gcs.read("lock", "held/workdir.lock"))
    assert holder["pid"] == a.pid

    # Another job takes the lock over (as after a long stall of A's heartbeats): A stops
    # through its training loop at its next heartbeat, with the new holder named.
    gcs.upload("lock", "held/workdir.lock",
               json.dumps({**holder, "host": "other-host", "pid": 7, "token": "successor"})
               .encode())
    assert a.wait(120) == 1
  out = (tmp_path / "a.txt").read_text()
  assert f"error: the workdir lock {url} is now held by host 'other-host', pid 7" in out
  assert json.loads(gcs.read("lock", "held/workdir.lock"))["token"] == "successor"

  # A dead job's lock (this host, its pid gone) is taken over.
  dead = subprocess.Popen(["true"])
  dead.wait()
  gcs.upload("lock", "held/workdir.lock", json.dumps({**holder, "pid": dead.pid}).encode())
  r = run_cli(gcs, f"--workdir={gs}/held", "--config.num_train_steps=45",
              "--config.checkpoint_every_steps=20")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"WARNING: took over the workdir lock {url} from a dead job" in r.stdout
  assert f"its process {dead.pid} on this host is gone" in r.stdout
  assert "held/workdir.lock" not in gcs.objects("lock", "held/")


def test_outage_mid_run_stops_clearly_restore_network_error_skips_nothing_then_resumes(
    gcs, tmp_path):
  gs = gcs.make_bucket("outage")
  args = [f"--workdir={gs}/run", "--config.checkpoint_every_steps=20"]
  with open(tmp_path / "a.txt", "w") as log:
    a = start_cli(gcs, *args, FOREVER, log=log)
    wait_for(lambda: len(steps(gcs, "outage")) >= 2, a, what="two checkpoints")
    gcs.stop()
    try:
      rc = a.wait(300)
    finally:
      gcs.start()
  out = (tmp_path / "a.txt").read_text()
  assert rc == 1, out[-3000:]
  assert "Traceback" not in out, out[-3000:]  # one-line records, one error
  error = [l for l in out.splitlines() if l.startswith("error: ")]
  assert error and f"{gs}/run" in error[-1], out[-3000:]
  kept = steps(gcs, "outage")
  assert len(kept) >= 2

  # A restore whose reads fail with a passing server error (HTTP 503 on the newest step's
  # metadata, from a proxy in front of the emulator) stops the job naming the URL and skips,
  # moves or deletes nothing.
  from conftest import FaultProxy
  newest = f"outage/o/run/checkpoints/{kept[-1]}/state/_METADATA"
  proxy = FaultProxy(gcs.url, lambda method, path: newest in path)
  try:
    r = run_cli(gcs, *args, "--config.num_train_steps=1000",
                extra_env={"STORAGE_EMULATOR_HOST": proxy.url})
  finally:
    proxy.close()
  assert proxy.failed, "the proxy saw no read of the newest step's metadata"
  assert r.returncode == 1, r.stderr[-3000:]
  assert f"reading checkpoint step {kept[-1]} failed: {gs}/run/checkpoints could not be " \
      f"reached" in r.stderr, r.stderr[-3000:]
  assert "No checkpoint was skipped, moved or deleted" in r.stderr
  assert "Resuming" not in r.stdout and "damaged" not in r.stdout
  assert steps(gcs, "outage") == kept

  last = kept[-1]
  r = run_cli(gcs, *args, f"--config.num_train_steps={last + 20}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resuming from checkpoint step {last} in {gs}/run/checkpoints" in r.stdout


def test_export_and_converter_output_on_gs_load_in_a_fresh_process(gcs, tmp_path):
  gs = gcs.make_bucket("exports")
  torch = pytest.importorskip("torch", reason="torch not installed: `make venv` installs it")
  import torch_bireal as tb
  net = tb.randomize_(tb.TorchBiRealNet("bireal18", 10), seed=1)
  torch.save(tb.official_checkpoint(net), tmp_path / "model.pth.tar")
  r = subprocess.run([sys.executable, "-m", "bireal_jax.convert", "--from", "pytorch",
                      "--input", str(tmp_path / "model.pth.tar"), "--output",
                      f"{gs}/converted"], cwd=REPO, env=env(gcs), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"wrote {gs}/converted" in r.stdout
  out = python(gcs, f"""
      import sys, numpy as np
      from bireal_jax import deploy
      m = deploy.load({gs + '/converted'!r})
      x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
      deploy.save({gs + '/packed'!r}, m.packed())
      p = deploy.load({gs + '/packed'!r})
      print(m.kind, p.kind, int((np.asarray(m(x)).argmax(-1) == np.asarray(p(x)).argmax(-1)).all()),
            deploy.directory_bytes({gs + '/packed'!r}) > 0,
            "tensorflow" in sys.modules, "torch" in sys.modules)
  """)
  assert out.split()[-6:] == ["float", "packed", "1", "True", "False", "False"], out


def test_missing_filesystem_package_is_named(tmp_path):
  if importlib.util.find_spec("s3fs") is not None:
    pytest.skip("s3fs is installed here: no missing package to name")
  r = subprocess.run(cmd(*ARGS, "--workdir=s3://bucket/run", "--config.num_train_steps=1"),
                     cwd=REPO, env={**env_for(1), "EPATH_USE_TF": "false"},
                     capture_output=True, text=True, timeout=300)
  if r.returncode == 0 or "s3fs" not in r.stderr:
    pytest.fail(f"expected an error naming s3fs, got rc {r.returncode}: {r.stderr[-2000:]}")
  assert r.returncode == 2
  assert "pip install 's3fs'" in r.stderr
  assert not os.path.exists(os.path.join(REPO, "s3:"))
