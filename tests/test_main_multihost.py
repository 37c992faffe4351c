"""Several hosts through `jax.distributed`: 2 processes × 4 CPU devices on localhost (a
coordinator on a free port) against 1 process × 8 devices, for pmap and shard_map. Slow
(three training processes per case); a file of its own so that pytest-xdist runs it beside
test_main.py.
"""
import pytest

from cli import (TINY, exported, run_cli, run_two_processes, saved_steps,  # tests/cli.py
                 start_cli)
from numerics import assert_trees  # tests/numerics.py


@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
def test_slow_two_processes_match_one_process(tmp_path, mapping):
  # Synthetic data: its global batch is the same for any process count (Fashion-MNIST shards
  # per process, so 2 processes see other batches than 1 by design).
  args = ["--config=configs/fashion_mnist.py", *TINY, "--config.dataset=synthetic",
          "--config.num_train_steps=6", "--config.checkpoint_every_steps=3",
          f"--config.mapping={mapping}"]
  one = str(tmp_path / "one")
  r = run_cli(*args, f"--workdir={one}", devices=8)
  assert r.returncode == 0, r.stderr[-3000:]
  two = str(tmp_path / "two")
  out0 = run_two_processes(start_cli, [*args, f"--workdir={two}"], tmp_path)
  assert "8 device(s) in 2 process(es)" in out0
  assert saved_steps(two) == [3, 6]
  assert_trees(exported(two), exported(one), exact=False)
  top1 = lambda text: text.split("Final evaluation")[1].split("top-1 ")[1].split("%")[0]
  assert top1(out0) == top1(r.stdout)
