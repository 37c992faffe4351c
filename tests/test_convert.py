"""Converters: converted weights give the source framework's logits; bad inputs name the key.

PyTorch: `torch_bireal.py` rebuilds the authors' networks from the checkpoint layout, saves an
official-style `.pth.tar`, and its eval-mode logits are the reference. larq-zoo: `larq_peer.py`
runs in the separate larq venv (`make larq-env`) and writes random weights (.h5) and logits.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bireal_jax import convert, deploy

ROOT = pathlib.Path(__file__).resolve().parents[1]
LARQ_PYTHON = pathlib.Path(os.environ.get("BIREAL_LARQ_PYTHON", ROOT / ".venv-larq/bin/python"))
SIZE, CLASSES = 64, 10


def _logits(conv, x_nhwc, **more):
  return np.asarray(conv.model(**more).apply(conv.variables, jnp.asarray(x_nhwc)))


def _assert_close(out, ref):
  # Binary nets amplify float noise only if a sign flips; the inputs are far from that.
  scale = float(np.abs(ref).max())
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------

sys.path.insert(0, str(pathlib.Path(__file__).parent))
try:
  import torch
  import torch_bireal as tb
  torch.set_num_threads(1)  # the suite runs 2 workers on 2 shared cores
except ImportError:  # the larq and torch-free tests below still run
  torch = tb = None
needs_torch = pytest.mark.skipif(
    torch is None,
    reason="torch not installed: `make venv` installs torch==2.13.0 (CPU) into .venv")


@pytest.fixture(scope="module")
def torch_case(tmp_path_factory):
  """name -> (checkpoint path, checkpoint dict, NHWC input, reference logits)."""
  cache = {}

  def get(name):
    if name not in cache:
      net = tb.randomize_(tb.TorchBiRealNet(name, CLASSES), seed=1)
      ckpt = tb.official_checkpoint(net)
      path = tmp_path_factory.mktemp(name) / "model_best.pth.tar"
      torch.save(ckpt, path)
      x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
      with torch.no_grad():
        ref = net(x).numpy()
      cache[name] = (path, ckpt, x.numpy().transpose(0, 2, 3, 1), ref)
    return cache[name]

  return get


@needs_torch
@pytest.mark.parametrize("name", ["bireal18", "bireal34", "bireal50"])
def test_pytorch_checkpoint_gives_pytorch_logits(torch_case, name):
  path, _, x, ref = torch_case(name)
  conv = convert.load_pytorch(path)  # depth inferred from the keys
  assert conv.name == name and conv.overrides == {"num_classes": CLASSES}
  _assert_close(_logits(conv, x), ref)
  # Checked rather than inferred: same result.
  assert convert.n_params(convert.load_pytorch(path, name).variables) == \
      convert.n_params(conv.variables)


@needs_torch
def test_pytorch_param_count_matches_official_bireal18():
  conv = convert.from_pytorch(tb.randomize_(tb.TorchBiRealNet("bireal18", 1000)).state_dict())
  assert convert.n_params(conv.variables) == 11_689_512  # docs/reference.md


@needs_torch
def test_bare_state_dict_without_module_prefix(torch_case):
  _, ckpt, x, ref = torch_case("bireal18")
  bare = {k[len("module."):]: v.numpy() for k, v in ckpt["state_dict"].items()}
  _assert_close(_logits(convert.from_pytorch(bare, "bireal18"), x), ref)


@needs_torch
def test_bireal50_unused_down_conv_is_optional(torch_case):
  _, ckpt, x, ref = torch_case("bireal50")
  sd = dict(ckpt["state_dict"])
  del sd["module.layers.0.down_conv1x1.weight"]
  _assert_close(_logits(convert.from_pytorch(sd, "bireal50"), x), ref)


@needs_torch
def test_wrong_depth_names_the_keys(torch_case):
  _, ckpt, _, _ = torch_case("bireal34")
  with pytest.raises(convert.ConversionError) as e:
    convert.from_pytorch(ckpt, "bireal18")
  msg = str(e.value)
  assert "bireal18" in msg and "look like bireal34" in msg
  assert "'layer1.4.binary_conv.weights'" in msg


@needs_torch
def test_bottleneck_dict_for_basic_model(torch_case):
  _, ckpt, _, _ = torch_case("bireal50")
  with pytest.raises(convert.ConversionError, match=r"missing .*'layer1\.0\.binary_conv\.weights'"
                     r".*unexpected .*'layers\.0\.conv1\.weight'"):
    convert.from_pytorch(ckpt, "bireal18")


@needs_torch
def test_missing_key_is_named(torch_case):
  sd = dict(torch_case("bireal18")[1]["state_dict"])
  del sd["module.layer2.0.downsample.2.running_var"]
  with pytest.raises(convert.ConversionError,
                     match=r"missing 1 key\(s\): 'layer2\.0\.downsample\.2\.running_var'"):
    convert.from_pytorch(sd)


@needs_torch
def test_extra_key_is_named(torch_case):
  sd = dict(torch_case("bireal18")[1]["state_dict"])
  sd["module.layer1.0.binary_conv.bias"] = torch.zeros(64)
  with pytest.raises(convert.ConversionError,
                     match=r"unexpected 1 key\(s\): 'layer1\.0\.binary_conv\.bias'"):
    convert.from_pytorch(sd)


@needs_torch
@pytest.mark.parametrize("key,shape,expected", [
    ("layer3.1.binary_conv.weights", (100, 1), r"\(589824, 1\) \(flat\) or \(256, 256, 3, 3\)"),
    ("layer2.0.downsample.1.weight", (128, 64, 3, 3), r"\(128, 64, 1, 1\)"),
    ("layer4.3.bn1.running_mean", (256,), r"\(512,\)"),
    ("fc.weight", (10, 256), r"\(10, 512\)"),
])
def test_wrong_shape_names_key_and_shapes(torch_case, key, shape, expected):
  sd = dict(torch_case("bireal18")[1]["state_dict"])
  sd["module." + key] = torch.zeros(shape)
  with pytest.raises(convert.ConversionError) as e:
    convert.from_pytorch(sd, "bireal18")
  assert repr(key) in str(e.value) and f"{shape}" in str(e.value)
  assert e.match(expected)


@needs_torch
def test_flat_or_4d_binary_kernel_accepted(torch_case):
  _, ckpt, x, ref = torch_case("bireal18")
  sd = {k: (v.view(64, 64, 3, 3) if k == "module.layer1.2.binary_conv.weights" else v)
        for k, v in ckpt["state_dict"].items()}
  _assert_close(_logits(convert.from_pytorch(sd), x), ref)


@needs_torch
def test_zero_latent_weight_warns(torch_case):
  sd = dict(torch_case("bireal18")[1]["state_dict"])
  w = sd["module.layer1.1.binary_conv.weights"].clone()
  w[7] = 0.0
  sd["module.layer1.1.binary_conv.weights"] = w
  with pytest.warns(UserWarning, match=r"'layer1\.1\.binary_conv\.weights': 1\).*sign\(0\) = 0"):
    convert.from_pytorch(sd)


def test_unknown_layout_and_model_name():
  with pytest.raises(convert.ConversionError, match=r"blocks per stage \[2, 2, 2, 2\]"):
    convert.from_pytorch({f"layer{s}.{i}.bn1.weight": np.ones(1) for s in range(1, 5)
                          for i in range(2)})
  with pytest.raises(convert.ConversionError, match="unknown model 'bireal19'"):
    convert.from_pytorch({}, "bireal19")


@needs_torch
def test_cli_pytorch_roundtrip(torch_case, tmp_path, capsys):
  path, _, x, ref = torch_case("bireal18")
  assert convert.main(["--from", "pytorch", "--input", str(path), "--output",
                       str(tmp_path / "out")]) == 0
  assert "bireal18" in capsys.readouterr().out
  exported = deploy.load(tmp_path / "out")
  model, variables = exported.model, exported.variables
  _assert_close(np.asarray(model.apply(variables, jnp.asarray(x))), ref)
  # A checked depth that does not fit is an error exit naming the depth.
  assert convert.main(["--from", "pytorch", "--model", "bireal34", "--input", str(path),
                       "--output", str(tmp_path / "bad")]) == 1
  assert "does not fit bireal34" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


def test_import_pulls_in_neither_torch_nor_tensorflow():
  code = ("import sys, bireal_jax.convert; "
          "bad = [m for m in ('torch', 'tensorflow', 'h5py') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# larq-zoo
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def larq_case(tmp_path_factory):
  if not LARQ_PYTHON.exists():
    pytest.skip(f"larq venv missing ({LARQ_PYTHON}): create it with `make larq-env` "
                "(larq, larq-zoo, tensorflow-cpu<2.17, tf-keras; larq needs its own venv)")
  out = tmp_path_factory.mktemp("larq")
  env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
             CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1",
             TF_NUM_INTEROP_THREADS="1")
  r = subprocess.run([str(LARQ_PYTHON), str(ROOT / "tests/larq_peer.py"), str(out),
                      "--size", str(SIZE), "--classes", str(CLASSES)],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  meta = json.loads((out / "meta.json").read_text())
  return out, np.load(out / "x.npy"), np.load(out / "logits.npy"), meta


def test_larq_weights_give_larq_logits(larq_case):
  out, x, ref, meta = larq_case
  conv = convert.load_larq(out / "weights.h5")
  assert conv.name == "bireal18"
  # The BN constants the converter assumes are those of the Keras layers larq-zoo built.
  assert {(b["epsilon"], b["momentum"]) for b in meta["batch_norm"]} == \
      {(convert.LARQ_BN_EPSILON, convert.LARQ_BN_MOMENTUM)}
  assert conv.overrides == dict(num_classes=CLASSES, padding="same", bn_epsilon=1e-3,
                                bn_momentum=0.8)
  _assert_close(_logits(conv, x), ref)
  # The padding option is what makes them equal: official padding does not give larq's logits.
  assert np.abs(_logits(conv, x, padding="torch") - ref).max() > 1e-2 * np.abs(ref).max()


def test_larq_cli_roundtrip(larq_case, tmp_path):
  out, x, ref, _ = larq_case
  assert convert.main(["--from", "larq", "--model", "bireal18", "--input",
                       str(out / "weights.h5"), "--output", str(tmp_path / "o")]) == 0
  exported = deploy.load(tmp_path / "o")
  model, variables = exported.model, exported.variables
  assert model.padding == "same" and model.bn_epsilon == 1e-3
  _assert_close(np.asarray(model.apply(variables, jnp.asarray(x))), ref)


def test_larq_bad_inputs_name_the_layer(larq_case):
  layers = convert.read_keras_h5(larq_case[0] / "weights.h5")
  with pytest.raises(convert.ConversionError, match="larq-zoo has no bireal50"):
    convert.from_larq_layers(layers, "bireal50")
  with pytest.raises(convert.ConversionError, match=r"15 3×3 conv layers"):
    convert.from_larq_layers([l for l in layers if l[0] != "quant_conv2d_3"])
  with pytest.raises(convert.ConversionError,
                     match=r"has 41 layers with weights, bireal34 needs 73"):
    convert.from_larq_layers(layers, "bireal34")
  bad = [(n, dict(ws, gamma=ws["gamma"][:5]) if n == "batch_normalization_6" else ws)
         for n, ws in layers]
  with pytest.raises(convert.ConversionError,
                     match=r"'batch_normalization_6' \(for layer2_0/bn1\): 'gamma' has shape "
                           r"\(5,\), expected \(128,\)"):
    convert.from_larq_layers(bad)
  swapped = list(layers)
  swapped[1], swapped[2] = swapped[2], swapped[1]  # stem BN <-> first binary conv
  with pytest.raises(convert.ConversionError, match=r"'quant_conv2d' \(for bn1\) is a conv layer, "
                                                    r"expected bn"):
    convert.from_larq_layers(swapped)
  with pytest.raises(convert.ConversionError, match="include_top=True"):
    convert.from_larq_layers(layers[:-1])
