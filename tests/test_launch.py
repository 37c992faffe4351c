"""bireal_jax.train.launch: what the job reports as one line, and what keeps its traceback."""
import errno

import pytest

from bireal_jax import checkpoint, config as config_lib, storage, workdir_lock
from bireal_jax.train import launch


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl"),
    OSError(errno.EFBIG, "File too large"),
    OSError(errno.EACCES, "Permission denied", "/w"),
    PermissionError("Forbidden"),  # gcsfs raises these without an errno
    FileNotFoundError("gs://b/run/config.json"),
    config_lib.ConfigError("config.batch_size=3 is invalid"),
    checkpoint.CheckpointError("step 8 damaged"),
    workdir_lock.WorkdirLockLost("taken over"),
    storage.StorageUnavailable("unreachable"),
])
def test_operator_errors_are_one_line(error):
  assert launch.is_operator_error(error)


@pytest.mark.parametrize("error", [
    TypeError("unsupported operand"), KeyError("params"), ValueError("shapes differ"),
    OSError(errno.EBADF, "Bad file descriptor"),  # our code closed it: a bug
    OSError("no errno"), AttributeError("x"),
])
def test_bugs_keep_their_traceback(error):
  assert not launch.is_operator_error(error)


def test_lock_timing_is_checked_with_the_values_named():
  launch.check_lock_timing(60.0, 5.0)
  with pytest.raises(config_lib.ConfigError, match=r"--lock_heartbeat_s=0 is invalid: expected "
                     r"a positive number"):
    launch.check_lock_timing(60.0, 0.0)
  least = 2 * max(20.0, workdir_lock.HEARTBEAT_S)
  with pytest.raises(config_lib.ConfigError, match=rf"--lock_stale_after_s=30 is invalid: "
                     rf"expected at least twice .* \({least:g} s\)"):
    launch.check_lock_timing(30.0, 20.0)


def test_wants_distributed_follows_the_config_and_the_environment(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  c = config_lib.get_default_config()
  assert not launch.wants_distributed(c)
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert launch.wants_distributed(c)
  with c.unlocked():
    c.distributed = "off"
  assert not launch.wants_distributed(c)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  with c.unlocked():
    c.distributed, c.coordinator_address = "auto", "10.0.0.1:1234"
  assert launch.wants_distributed(c)


def test_dry_run_shrinks_the_job_in_a_sub_workdir(tmp_path):
  c = config_lib.get_default_config()
  with c.unlocked():
    c.num_train_steps, c.batch_size, c.grad_accum_steps = 1000, 256, 4
  wd = launch.apply_dry_run(c, str(tmp_path / "run"), device_count=8)
  assert wd == str(tmp_path / "run" / "dry_run")
  assert (c.batch_size, c.eval_batch_size, c.grad_accum_steps, c.num_train_steps) == \
      (16, 16, 1, 3)
  assert c.init_from is None
