"""Model summary: the paper's cost figures from the traced model, the CLI, and import hygiene."""
import configparser
import importlib
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bireal_jax import models, summary
from bireal_jax.layers import BinaryConv

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s18():
  return summary.summarize_model("bireal18")


def test_bireal18_matches_the_paper_and_the_official_count(s18):
  assert s18.bops == 1_676_279_808
  assert s18.flops == 137_793_536
  assert s18.ops == pytest.approx(1.640e8, rel=1e-3)
  assert s18.memory_mbit == pytest.approx(33.51, abs=0.005)
  assert s18.params == 11_689_512
  assert s18.binary_params == 10_985_472  # the 16 binary 3×3 kernels
  assert s18.memory_bits == s18.binary_params + 32 * s18.real_params
  # Paper: 11.14× smaller than ResNet-18 (its ResNet-18 differs slightly from this twin).
  assert s18.float_memory_mbit / s18.memory_mbit == pytest.approx(11.14, rel=0.01)


def test_bireal34_matches_the_paper():
  s = summary.summarize_model("bireal34")
  assert s.bops == 3_525_967_872
  assert s.flops == 137_793_536  # same real layers as Bi-Real-18
  assert s.ops == pytest.approx(1.93e8, rel=0.005)
  assert s.memory_mbit == pytest.approx(43.7, abs=0.2)
  assert s.params == 21_797_672


@pytest.mark.parametrize("name", ["bireal50", "bireal152"])
def test_bottleneck_models_have_sensible_costs(name, s18):
  s = summary.summarize_model(name)
  variables = jax.eval_shape(models.get(name).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert s.params == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  assert not any(r.path == "<unattributed>" for r in s.rows)
  assert s.bops > s18.bops and s.flops > s18.flops and s.memory_mbit > s18.memory_mbit
  # The first block's conv1 is real (Leakyclip input, real kernel): FLOPs, not BOPs.
  first = next(r for r in s.rows if r.path == "layers_0/conv1")
  assert not first.binary and first.flops == 56 * 56 * 64 * 64 and first.binary_params == 0
  # Every other bottleneck conv is binary.
  convs = [r for r in s.rows if r.kind == "BinaryConv"]
  assert sum(not r.binary for r in convs) == 1


def test_rows_are_per_layer_and_sum_to_the_totals(s18):
  convs = [r for r in s18.rows if r.kind == "BinaryConv"]
  assert len(convs) == 16 and all(r.binary for r in convs)
  stem = next(r for r in s18.rows if r.path == "conv1")
  assert stem.kernel_shape == (7, 7, 3, 64) and stem.output_shape == (1, 112, 112, 64)
  assert stem.flops == 112 * 112 * 64 * 7 * 7 * 3 and stem.bops == 0
  fc = next(r for r in s18.rows if r.path == "fc")
  assert fc.flops == 512 * 1000 and fc.real_params == 513_000
  bn = next(r for r in s18.rows if r.path == "bn1")
  assert bn.kind == "BatchNorm" and bn.real_params == 128 and bn.flops == bn.bops == 0
  assert sum(r.bops for r in s18.rows) == s18.bops
  assert s18.totals()["ops"] == s18.ops


def test_real_twin_has_no_binary_cost():
  s = summary.summarize_model("bireal18_real")
  assert s.bops == 0 and s.binary_params == 0
  assert s.flops == 1_676_279_808 + 137_793_536  # every MAC is now a FLOP
  assert s.memory_bits == 32 * 11_689_512


def test_counts_scale_with_image_size_and_follow_the_stem():
  s = summary.summarize_model("bireal18", image_size=32, num_classes=10, stem="small",
                              base_width=8)
  # Small stem: 3×3/1 conv on 32² (no pooling), so stage 1 runs at 32² with width 8.
  stem = next(r for r in s.rows if r.path == "conv1")
  assert stem.flops == 32 * 32 * 8 * 3 * 3 * 3
  first = next(r for r in s.rows if r.path == "layer1_0/binary_conv")
  assert first.bops == 32 * 32 * 8 * 3 * 3 * 8


def test_summary_of_a_user_module_with_mixed_layers():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3))(x)
      x = BinaryConv(8, (3, 3), input_quantizer="approx_sign",
                     kernel_quantizer="magnitude_aware")(x)
      # Binary kernel on a real input: 1-bit memory, but its MACs are FLOPs.
      x = BinaryConv(8, (1, 1), input_quantizer="hardtanh", kernel_quantizer="sign")(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  s = summary.summarize(Net(), (1, 6, 6, 2))
  kinds = [(r.path, r.binary) for r in s.rows]
  assert kinds == [("Conv_0", False), ("BinaryConv_0", True), ("BinaryConv_1", False),
                   ("Dense_0", False)]
  assert s.bops == 36 * 8 * 9 * 4
  assert s.flops == 36 * 4 * (9 * 2) + 36 * 8 * 8 + 288 * 3  # real conv, 1×1 conv, dense
  assert s.binary_params == 9 * 4 * 8 + 8 * 8
  assert s.real_params == (9 * 2 * 4 + 4) + (288 * 3 + 3)


def test_table_prints_rows_and_totals(s18):
  text = s18.table()
  for needle in ["layer4_3/binary_conv", "1,676,279,808", "137,793,536", "1.6399e+08",
                 "33.51 Mbit", "11,689,512"]:
    assert needle in text, needle
  short = s18.table(layers=False)
  assert "layer4_3" not in short and "33.51 Mbit" in short


def test_cli_main_prints_the_table(capsys):
  assert summary.main(["--model", "bireal34", "--totals-only"]) == 0
  out = capsys.readouterr().out
  assert "3,525,967,872" in out and "bireal34" in out


def test_cli_rejects_an_unknown_model_naming_it_and_the_choices(capsys):
  with pytest.raises(SystemExit) as e:
    summary.main(["--model", "bireal20"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "'bireal20'" in err and "bireal18" in err and "bireal152_real" in err


def test_cli_rejects_a_bad_image_size(capsys):
  with pytest.raises(SystemExit):
    summary.main(["--image-size", "0"])
  assert "--image-size must be >= 1, got 0" in capsys.readouterr().err


def test_console_script_entry_point_resolves():
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  scripts = dict(line.split(" = ") for line in
                 cfg["options.entry_points"]["console_scripts"].strip().splitlines())
  module, func = scripts["bireal-jax-summary"].split(":")
  assert callable(getattr(importlib.import_module(module), func))


def test_module_runs_and_imports_no_tensorflow():
  # One interpreter: `python -m bireal_jax.summary`, then check what got imported.
  code = ("import runpy, sys; sys.argv = ['x', '--model', 'bireal18', '--totals-only'];\n"
          "try:\n  runpy.run_module('bireal_jax.summary', run_name='__main__')\n"
          "except SystemExit as e:\n  assert e.code in (0, None), e.code\n"
          "import bireal_jax, bireal_jax.layers, bireal_jax.models, bireal_jax.quantizers\n"
          "import bireal_jax.nnx_bridge\n"
          "bad = sorted(m for m in sys.modules if m.startswith('tensorflow'))\n"
          "assert not bad, bad[:5]\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "1,676,279,808" in r.stdout and "33.51 Mbit" in r.stdout
