"""`--dry_run`: the launch check on tiny generated ImageNet-format data, through the real CLI."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_of_the_imagenet_config_trains_evaluates_and_checkpoints(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(
      [sys.executable, "-m", "bireal_jax.main", f"--config={ROOT}/configs/imagenet_bireal18.py",
       f"--workdir={tmp_path}", "--dry_run", "--config.image_size=32", "--config.base_width=8",
       "--config.progress_bar=False"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "(dry run)" in out.stdout and "2 device(s)" in out.stdout
  assert "Final evaluation (bireal18, step 3, validation" in out.stdout
  dry = tmp_path / "dry_run"
  records = [json.loads(line) for line in (dry / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records if r["split"] == "train") == 3
  assert os.listdir(dry / "checkpoints")
  saved = json.loads((dry / "config.json").read_text())["config"]
  assert saved["batch_size"] == 4 and saved["model"] == "bireal18"  # 2 images per device
  assert not (tmp_path / "config.json").exists()  # the real run's workdir stays untouched
