"""Faults of gs:// workdirs, through the command line, against a real GCS emulator (the `gcs`
fixture in conftest.py): the workdir lock (a second job refused, a lost lock stops the loop, a
dead job's lock taken over), the emulator stopped mid-run, a restore meeting HTTP 503.
"""
import json
import socket
import subprocess

import pytest

from storage_cli import (ARGS, FOREVER, run_cli, start_cli,  # noqa: F401
                         steps, wait_for)

pytestmark = pytest.mark.usefixtures("no_local_gs_folder")  # conftest.py


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
    # B wrote nothing (A's checkpoints come and go meanwhile: Orbax deletes old steps)
    assert not {n for n in gcs.objects("lock", "held/")
                if not n.startswith("held/checkpoints/")} - set(before)
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
  assert f"] took over the workdir lock {url} from a dead job" in r.stderr
  assert f"its process {dead.pid} on this host is gone" in r.stderr
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
