"""Faults around the workdir, through the command line (subprocesses): two jobs on one workdir,
a dead job's lock, a lost host's lock, an unwritable workdir, a full disk during a checkpoint
save (a small tmpfs where mounting is permitted, else RLIMIT_FSIZE), SIGKILL during an
asynchronous save. docs/reliability.md lists them with their behaviour.

Runs are tiny (1 CPU device, synthetic data, 8 px images, width 4): a few seconds each.
"""
import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time


from bireal_jax import workdir_lock
from cli import cmd, env_for, saved_steps, truncate_step, wait_for  # tests/cli.py

LOCK = workdir_lock.LOCK_FILE
ARGS = ["--config=configs/fashion_mnist.py", "--config.dataset=synthetic",
        "--config.image_size=8", "--config.base_width=4", "--config.stage_sizes=(1,1)",
        "--config.batch_size=8", "--config.eval_batch_size=8", "--config.steps_per_eval=1",
        "--config.progress_bar=False", "--config.tensorboard=False",
        "--config.eval_every_epochs=100", "--config.log_every_steps=1000",
        "--config.export_inference=False", "--config.checkpoint_every_steps=10"]
FOREVER = "--config.num_train_steps=1000000"  # runs until the test stops it
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def run_cli(*args, timeout=300, **kw):
  return subprocess.run(cmd(*ARGS, *args), cwd=REPO, env=env_for(1), capture_output=True,
                        text=True, timeout=timeout, **kw)


def start_cli(*args, log):
  return subprocess.Popen(cmd(*ARGS, *args), cwd=REPO, env=env_for(1), stdout=log,
                          stderr=subprocess.STDOUT, text=True)


def tmp_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return [int(m.group(1)) for n in os.listdir(d) if (m := TMP_STEP.match(n))] \
      if os.path.isdir(d) else []


def fake_lock(workdir, age_s=0.0, **holder):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  record = {"host": "lost-host-7", "pid": 4242, "start": time.time() - 3600,
            "job": "10.0.0.1:1234, 2 process(es)", "token": "theirs", **holder}
  with open(path, "w") as f:
    json.dump(record, f)
  t = time.time() - age_s
  os.utime(path, (t, t))
  return path


# ---------------------------------------------------------------------------------------------
# One writer per workdir
# ---------------------------------------------------------------------------------------------


def test_second_job_on_a_held_workdir_is_refused_before_any_work(tmp_path):
  wd = str(tmp_path / "wd")
  with open(tmp_path / "a.txt", "w") as log:
    a = start_cli(f"--workdir={wd}", FOREVER, log=log)
    wait_for(lambda: saved_steps(wd), a, timeout=120, what="a first checkpoint")
    files_before = sorted(os.listdir(wd))
    config_mtime = os.path.getmtime(os.path.join(wd, "config.json"))
    t0 = time.time()
    b = run_cli(f"--workdir={wd}", "--config.num_train_steps=20")
    took = time.time() - t0
    assert a.poll() is None  # the holder is untouched and still training
    assert b.returncode == 1, b.stderr[-3000:]
    lock = os.path.join(wd, LOCK)
    assert f"workdir {wd!r} is in use by another job: its lock {lock} is held by host " \
        f"{socket.gethostname()!r}, pid {a.pid}, started " in b.stderr
    assert "Expected no live holder" in b.stderr
    assert "bireal_jax: train" not in b.stdout  # stopped before data, model or compilation
    assert sorted(os.listdir(wd)) == files_before
    assert os.path.getmtime(os.path.join(wd, "config.json")) == config_mtime
    assert took < 60
    a.send_signal(signal.SIGTERM)  # a clean stop releases the lock
    assert a.wait(120) == 0
  assert "SIGTERM received: checkpoint saved" in (tmp_path / "a.txt").read_text()
  assert not os.path.exists(lock)


def test_lock_of_a_lost_host_refused_while_fresh_taken_over_when_stale_eval_takes_none(tmp_path):
  wd = str(tmp_path / "wd")
  lock = fake_lock(wd)  # another host, heartbeat now: possibly alive
  r = run_cli(f"--workdir={wd}", "--config.num_train_steps=10")
  assert r.returncode == 1, r.stderr[-3000:]
  assert f"its lock {lock} is held by host 'lost-host-7', pid 4242" in r.stderr
  assert "job '10.0.0.1:1234, 2 process(es)'" in r.stderr
  assert not os.path.exists(os.path.join(wd, "checkpoints"))

  r = run_cli(f"--workdir={wd}", "--lock_stale_after_s=10")  # < 2 heartbeats: live looks dead
  assert r.returncode == 2 and "--lock_stale_after_s=10 is invalid" in r.stderr, r.stderr[-3000:]
  assert json.load(open(lock))["token"] == "theirs"

  fake_lock(wd, age_s=120)  # its heartbeat stopped 120 s ago: older than the timeout given
  r = run_cli(f"--workdir={wd}", "--config.num_train_steps=10", "--lock_stale_after_s=60")
  assert r.returncode == 0, r.stderr[-3000:]
  # a warning through logging (absl's format on stderr)
  assert f"] took over the workdir lock {lock} from a dead job (host 'lost-host-7'" in r.stderr
  age = re.search(r"its heartbeat is (\d+) s old, more than 60 s", r.stderr)
  assert age and 120 <= int(age.group(1)) < 120 + 60, r.stderr[-3000:]  # + the child's start
  assert saved_steps(wd) == [10] and not os.path.exists(lock)

  fake_lock(wd)  # eval only reads: it runs beside a live training job
  record = open(lock).read()
  r = run_cli(f"--workdir={wd}", "--mode=eval", "--eval_split=test")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Evaluation of {wd} (step 10, bireal18)" in r.stdout
  assert open(lock).read() == record


def test_multihost_job_refused_on_every_process(tmp_path):
  wd = str(tmp_path / "wd")
  lock = fake_lock(wd)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      cmd(*ARGS, f"--workdir={wd}", "--config.num_train_steps=10", "--config.distributed=on",
          f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2",
          f"--config.process_id={i}"),
      cwd=REPO, env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):  # process 1 stops on process 0's verdict
    assert p.returncode == 1, err[-3000:]
    assert f"its lock {lock} is held by host 'lost-host-7'" in err
    assert "bireal_jax: train" not in out
  assert json.load(open(lock))["token"] == "theirs"


def test_unwritable_workdir_is_refused_before_any_work(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  r = run_cli(f"--workdir={not_a_dir}", "--config.num_train_steps=10")
  assert r.returncode == 1
  assert f"error: cannot create workdir {str(not_a_dir)!r}" in r.stderr
  assert "expected a writable directory" in r.stderr
  # No room for a single byte (RLIMIT_FSIZE=0: every write fails with EFBIG).
  wd = str(tmp_path / "wd")
  r = run_cli(f"--workdir={wd}", "--config.num_train_steps=10",
              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
  assert r.returncode == 1
  assert f"error: cannot write the workdir lock {os.path.join(wd, LOCK)} (File too large)" \
      in r.stderr
  assert os.listdir(wd) == []


# ---------------------------------------------------------------------------------------------
# Checkpoint saves that fail or are cut short
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path, size="16m"):
  """A tmpfs of `size` at `path` (yields True), or a plain directory (yields False) where this
  process may not mount (not root, or no CAP_SYS_ADMIN as in most CI containers, or
  BIREAL_TEST_NO_MOUNT=1 to try the fallback)."""
  os.makedirs(path)
  mounted = (os.geteuid() == 0 and shutil.which("mount") is not None
             and not os.environ.get("BIREAL_TEST_NO_MOUNT") and subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
      capture_output=True).returncode == 0)
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(["umount", "-l", path], check=True)


def fill_up(directory):
  """Write `directory/filler` until the file system refuses (ENOSPC); returns its path."""
  path = os.path.join(directory, "filler")
  fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    for chunk in (1 << 20, 1 << 12, 1):
      try:
        while True:
          os.write(fd, b"\0" * chunk)
      except OSError as e:
        assert e.errno == errno.ENOSPC, e
  finally:
    os.close(fd)
  return path


def test_disk_full_during_checkpoint_save_names_the_path_and_keeps_the_previous_one(tmp_path):
  """A real full disk (a 16 MiB tmpfs filled up after the first checkpoint) where mounting is
  permitted; elsewhere a file-size limit on the job (RLIMIT_FSIZE 4 KiB: every larger write
  fails with EFBIG, as a full disk fails with ENOSPC)."""
  with small_filesystem(str(tmp_path / "disk")) as tmpfs:
    wd = str(tmp_path / "disk" / "wd")
    ckdir = os.path.join(wd, "checkpoints")
    # Pipes, not a log file: under the size limit the child could not write a log file.
    p = subprocess.Popen(cmd(*ARGS, f"--workdir={wd}", "--config.num_train_steps=300"),
                         cwd=REPO, env=env_for(1), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out = {}
    reader = threading.Thread(target=lambda: out.update(zip("oe", p.communicate())))
    reader.start()
    wait_for(lambda: saved_steps(wd), p, timeout=120, what="a first checkpoint")
    if tmpfs:
      filler = fill_up(str(tmp_path / "disk"))
    else:  # Orbax's _sharding and _METADATA files (8+ KiB) no longer fit
      resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    assert p.wait(180) == 1
    reader.join()
    err = out["e"]
    reason = "No space left on device (errno 28)" if tmpfs else "File too large (errno 27)"
    m = re.search(r"error: saving checkpoint step (\d+) to (\S+) failed: (.*?)( writing "
                  r'"([^"]+)")? \(\w+: .*\): expected a writable directory with free space', err)
    assert m, err[-3000:]
    failed, where = int(m.group(1)), m.group(2)
    assert where == ckdir and m.group(3) == reason, m.group(0)
    if m.group(5):  # the file, when the error that Orbax re-raises names one
      assert m.group(5).startswith(os.path.join(ckdir, f"{failed}.orbax-checkpoint-tmp"))
    good = max(saved_steps(wd))
    assert good < failed
    assert f"The previous checkpoint (step {good}) is intact" in err
    assert err.rstrip().splitlines()[-1].startswith("error: saving checkpoint step"), err[-4000:]  # last word
    assert not os.path.exists(os.path.join(wd, LOCK))  # released on the error exit too

    if tmpfs:
      os.unlink(filler)  # space freed: the same command resumes
    r = run_cli(f"--workdir={wd}", f"--config.num_train_steps={good + 10}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from checkpoint step {good} in {ckdir}" in r.stdout
    assert f"Final evaluation (bireal18, step {good + 10}" in r.stdout
    assert tmp_steps(wd) == [] and good + 10 in saved_steps(wd)
  print("full tmpfs" if tmpfs else "RLIMIT_FSIZE (no mount permitted)")


def test_sigkill_during_async_save_resumes_from_the_last_complete_checkpoint(tmp_path):
  wd = str(tmp_path / "wd")
  lock = os.path.join(wd, LOCK)
  # Kill the job as soon as a save's temporary directory appears. The rename that completes a
  # save can beat the signal; then the next job (which resumes) is killed the same way.
  for attempt in range(4):
    with open(tmp_path / "a.txt", "w") as log:
      a = start_cli(f"--workdir={wd}", FOREVER, log=log)
      before = saved_steps(wd)
      wait_for(lambda: saved_steps(wd) != before, a, timeout=120, what="a new checkpoint")
      while not tmp_steps(wd):  # the next save has started
        assert a.poll() is None, (tmp_path / "a.txt").read_text()[-3000:]
        time.sleep(0.001)
      a.send_signal(signal.SIGKILL)
      assert a.wait(60) == -signal.SIGKILL
    assert json.load(open(lock))["pid"] == a.pid  # the dead job's lock is left behind
    partial, complete = tmp_steps(wd), saved_steps(wd)
    if partial:
      break
  assert partial, "the kill never landed inside a save"
  last = max(complete)
  assert partial[0] > last  # the save in flight was the newest step

  r = run_cli(f"--workdir={wd}", f"--config.num_train_steps={last + 10}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"] took over the workdir lock {lock} from a dead job" in r.stderr
  assert f"its process {a.pid} on this host is gone" in r.stderr
  assert f"Resuming from checkpoint step {last} in" in r.stdout
  assert f"Final evaluation (bireal18, step {last + 10}" in r.stdout
  assert tmp_steps(wd) == []  # Orbax deleted the partial save when the run opened the directory
  assert saved_steps(wd)[-1] == last + 10 and not os.path.exists(lock)
  print(f"killed while saving step {partial[0]} (attempt {attempt + 1}); resumed from {last}")


def test_resume_past_a_damaged_step_prints_the_warning_and_no_tracebacks(tmp_path):
  """A truncated newest step is reported in one warning and skipped; the failed read's leftover
  TensorStore callbacks and sibling tasks print nothing (they printed ~100 traceback lines)."""
  wd = str(tmp_path / "wd")
  r = run_cli(f"--workdir={wd}", "--config.num_train_steps=20")
  assert r.returncode == 0, r.stderr[-3000:]
  truncate_step(wd, 20)
  r = run_cli(f"--workdir={wd}", "--config.num_train_steps=30")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "checkpoint step 20 in" in r.stderr and "is damaged" in r.stderr
  assert "Resuming from checkpoint step 10 in" in r.stdout
  for noise in ("Traceback", "Event loop is closed", "never retrieved"):
    assert noise not in r.stderr, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# The lock's rules, in-process (no JAX)
# ---------------------------------------------------------------------------------------------


def _own_record(**kw):
  return {**workdir_lock.holder_record(), **kw}


def test_stale_rules_dead_pid_reused_pid_and_old_heartbeat():
  now = time.time()
  live = _own_record()
  assert workdir_lock.stale_reason(live, now - 10_000, 300) is None  # alive: age irrelevant
  reused = _own_record(pid_start=live["pid_start"] - 1)
  assert "now belongs to another process" in workdir_lock.stale_reason(reused, now, 300)
  p = subprocess.Popen(["true"])
  p.wait()
  dead = _own_record(pid=p.pid)
  assert f"its process {p.pid} on this host is gone" in workdir_lock.stale_reason(dead, now, 300)
  other = {"host": "elsewhere", "pid": os.getpid()}  # a pid on another host says nothing
  assert workdir_lock.stale_reason(other, now - 299, 300) is None
  assert "301 s old" in workdir_lock.stale_reason(other, now - 301, 300)
  assert "s old" in workdir_lock.stale_reason({}, now - 301, 300)  # unreadable record


def test_simultaneous_takeovers_of_a_stale_lock_have_one_winner(tmp_path):
  wd = str(tmp_path)
  fake_lock(wd, age_s=1000)
  barrier, results = threading.Barrier(6), []

  def take():
    barrier.wait()
    try:
      results.append(workdir_lock.acquire(wd, heartbeat_s=3600, say=lambda m: None))
    except workdir_lock.WorkdirLockError as e:
      results.append(e)

  threads = [threading.Thread(target=take) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  won = [r for r in results if isinstance(r, workdir_lock.WorkdirLock)]
  assert len(won) == 1, results
  assert all("is in use by another job" in str(r) for r in results if r not in won)
  won[0].release()
  assert os.listdir(wd) == []


def test_a_job_whose_lock_was_taken_over_is_told_and_leaves_the_new_lock(tmp_path):
  lost = []
  held = workdir_lock.acquire(str(tmp_path), heartbeat_s=0.05, on_lost=lost.append)
  path = os.path.join(str(tmp_path), LOCK)
  fake_lock(str(tmp_path), token="successor")  # as a takeover by another host would leave it
  t0 = time.time()
  while not lost and time.time() - t0 < 10:
    time.sleep(0.02)
  assert lost and f"the workdir lock {path} is now held by host 'lost-host-7'" in lost[0]
  held.release()
  assert json.load(open(path))["token"] == "successor"  # not ours to delete
