"""The training job and the library on gs:// paths, through the command line, against a real GCS
emulator (fake-gcs-server on 127.0.0.1, the `gcs` fixture in conftest.py): resume after SIGTERM
bit-identical to an uninterrupted run, eval mode, init_from, metrics and TensorBoard on the
bucket, 2 processes × 4 devices against 1 × 8, the export and the converter's output loaded in a
fresh process, a missing filesystem package named. Faults: test_object_storage_faults.py.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

from storage_cli import (ARGS, REPO, cmd, env, env_for,  # noqa: F401
                         python, run_cli, same_exports, start_cli, steps, wait_for)
from cli import run_two_processes  # tests/cli.py

pytestmark = pytest.mark.usefixtures("no_local_gs_folder")  # conftest.py


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
  out0 = run_two_processes(lambda *a, **kw: start_cli(gcs, *a, **kw),
                           [*args, f"--workdir={gs}/two"], tmp_path)
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
