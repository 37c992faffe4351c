"""The one on-disk format (`deploy.save` / `deploy.load`): float and packed exports, the
version-1 layouts (training export, converter output, packed export), and its errors."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from bireal_jax import deploy, models, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_and_variables():
  model = models.get("bireal18", stage_sizes=(1, 1), base_width=4, stem="small",
                     num_classes=10, axis_name="batch")
  variables = train.initialized(train.init_key(0), (8, 8, 1), model)
  # Non-trivial BN statistics, so that a lost or swapped batch_stats entry changes the logits.
  rng = np.random.default_rng(0)
  stats = jax.tree.map(lambda x: np.asarray(x) + rng.uniform(0.1, 0.5, x.shape).astype(x.dtype),
                       variables["batch_stats"])
  return model, {"params": variables["params"], "batch_stats": stats}


def test_export_loads_in_a_separate_process_with_models_and_orbax_only(tmp_path):
  model, variables = _model_and_variables()
  path = deploy.save(tmp_path / "inference", model, variables, source={"kind": "test"})
  x = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  expected = np.asarray(model.clone(axis_name=None).apply(variables, x, train=False))
  script = textwrap.dedent(f"""
      import json, sys
      import numpy as np
      import orbax.checkpoint as ocp
      from bireal_jax import models
      meta = json.load(open({os.path.join(path, 'model.json')!r}))
      model = models.from_config(meta["model"])
      variables = ocp.StandardCheckpointer().restore({os.path.join(path, 'variables')!r})
      x = np.load({str(tmp_path / 'x.npy')!r})
      np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(model.apply(variables, x)))
      heavy = sorted(m for m in ("tensorflow", "optax", "bireal_jax.train",
                                 "bireal_jax.deploy") if m in sys.modules)
      print(json.dumps(heavy))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []  # nothing but models + Orbax
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-6, atol=1e-6)

  # The library's loader gives the same model and variables.
  exported = deploy.load(path)
  assert exported.kind == "float" and exported.source == {"kind": "test"}
  loaded_model, loaded = exported.model, exported.variables
  assert loaded_model.axis_name is None and loaded_model.stage_sizes == (1, 1)
  np.testing.assert_allclose(np.asarray(loaded_model.apply(loaded, x)), expected,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(exported(x)), expected, rtol=1e-6, atol=1e-6)


def test_export_errors_name_the_problem(tmp_path):
  model, variables = _model_and_variables()
  with pytest.raises(ValueError, match="lack \\['batch_stats'\\]"):
    deploy.save(tmp_path / "a", model, {"params": variables["params"]})
  with pytest.raises(FileNotFoundError, match="not a bireal_jax export: expected model.json"):
    deploy.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Format version 1: the three layouts earlier releases wrote still load
# ---------------------------------------------------------------------------------------------


def _x(seed=1):
  return np.random.default_rng(seed).normal(size=(3, 8, 8, 1)).astype(np.float32)


def _orbax_save(directory, tree):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, jax.tree.map(np.asarray, tree))
    ckptr.wait_until_finished()


def _float_logits(model, variables, x):
  return np.asarray(model.clone(axis_name=None).apply(variables, x, train=False))


def test_v1_training_export_loads_and_rewrites_as_v2(tmp_path):
  model, variables = _model_and_variables()
  old = tmp_path / "old"
  _orbax_save(str(old / "variables"), variables)
  (old / "model.json").write_text(json.dumps(
      {"format": "bireal_jax.inference/1",
       "model": models.to_config(model.clone(axis_name=None))}))
  x = _x()
  exported = deploy.load(old)
  assert (exported.kind, exported.format_version) == ("float", 1)
  np.testing.assert_allclose(np.asarray(exported(x)), _float_logits(model, variables, x),
                             rtol=1e-6, atol=1e-6)
  new = exported.save(tmp_path / "new")
  with open(os.path.join(new, "model.json")) as f:
    meta = json.load(f)
  assert (meta["format"], meta["format_version"], meta["kind"]) == ("bireal_jax.model", 2,
                                                                     "float")
  np.testing.assert_allclose(np.asarray(deploy.load(new)(x)), np.asarray(exported(x)),
                             rtol=0, atol=0)


def test_v1_converter_output_loads(tmp_path):
  from flax import serialization
  model, variables = _model_and_variables()
  old = tmp_path / "converted"
  old.mkdir()
  (old / "variables.msgpack").write_bytes(serialization.msgpack_serialize(
      jax.tree.map(np.asarray, variables)))
  (old / "model.json").write_text(json.dumps(
      {"name": "bireal18", "overrides": {"num_classes": 10}, "source": "pytorch",
       "model": models.to_config(model.clone(axis_name=None))}))
  exported = deploy.load(old)
  assert exported.kind == "float" and exported.source["from"] == "pytorch"
  x = _x(2)
  np.testing.assert_allclose(np.asarray(exported(x)), _float_logits(model, variables, x),
                             rtol=1e-6, atol=1e-6)


def test_v1_packed_export_loads(tmp_path):
  model, variables = _model_and_variables()
  pm = deploy.pack(model, variables)
  old = tmp_path / "packed_v1"
  _orbax_save(str(old / "params"), pm.params)
  (old / "config.json").write_text(json.dumps(pm.config))
  (old / "packed.json").write_text(json.dumps(
      {"format": "bireal_jax.packed", "version": 1, "word_bits": 32}))
  exported = deploy.load(old)
  assert (exported.kind, exported.format_version) == ("packed", 1)
  x = _x(3)
  np.testing.assert_array_equal(np.asarray(exported(x)), np.asarray(pm(x)))


def test_a_float_export_packs_on_load(tmp_path):
  model, variables = _model_and_variables()
  exported = deploy.load(deploy.save(tmp_path / "f", model, variables))
  x = _x(4)
  np.testing.assert_array_equal(np.asarray(exported.packed()(x)),
                                np.asarray(deploy.pack(model, variables)(x)))


def test_format_errors_say_what_was_expected(tmp_path):
  model, variables = _model_and_variables()
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="not a bireal_jax export.*found \\[\\]"):
    deploy.load(empty)
  other = tmp_path / "other"
  other.mkdir()
  (other / "model.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(ValueError, match="format 'other' is not one bireal_jax writes"):
    deploy.load(other)
  (other / "model.json").write_text(json.dumps({"format": "bireal_jax.model",
                                                "format_version": 3}))
  with pytest.raises(ValueError, match="format_version 3 is newer.*upgrade bireal_jax"):
    deploy.load(other)
  old_packed = tmp_path / "old_packed"
  old_packed.mkdir()
  (old_packed / "packed.json").write_text(json.dumps({"format": "other", "version": 1}))
  with pytest.raises(ValueError, match="format 'other'"):
    deploy.load(old_packed)
  with pytest.raises(ValueError, match="kind must be one of \\('float', 'packed'\\), got 'int4'"):
    deploy.save(tmp_path / "k", model, variables, kind="int4")
  with pytest.raises(ValueError, match="a PackedModel is saved as kind='packed'"):
    deploy.save(tmp_path / "p", deploy.pack(model, variables), kind="float")
  with pytest.raises(TypeError):  # a source that is not JSON-able fails before writing
    deploy.save(tmp_path / "s", model, variables, source={"step": object()})
  assert not (tmp_path / "s").exists()


def test_load_of_a_broken_export_is_one_clear_error_without_noise_at_exit(tmp_path):
  """model.json that is not JSON, and an export whose weight data is gone: one error naming the
  file and what was expected, and no 'Event loop is closed' tracebacks when the process ends."""
  model, variables = _model_and_variables()
  for name in ("bad_json", "no_data"):
    deploy.save(tmp_path / name, model, variables)
  (tmp_path / "bad_json" / "model.json").write_text("{not json")
  variables_dir = tmp_path / "no_data" / "variables"
  for p in variables_dir.rglob("*"):
    if p.is_file() and (p.name == "manifest.ocdbt" or p.parent.name == "d"):
      p.unlink()
  code = textwrap.dedent(f"""
      from bireal_jax import deploy
      for p in ({str(tmp_path / 'bad_json')!r}, {str(tmp_path / 'no_data')!r}):
        try:
          deploy.load(p)
        except (ValueError, FileNotFoundError) as e:
          print(type(e).__name__, str(e).replace("\\n", " "))
  """)
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith(f"ValueError {tmp_path / 'bad_json' / 'model.json'} is not valid "
                             f"JSON"), lines
  assert "expected the model.json written by bireal_jax.deploy.save" in lines[0]
  assert lines[1].startswith(f"FileNotFoundError {variables_dir}: the weights are missing or "
                             f"damaged"), lines
  assert "expected the Orbax checkpoint written by bireal_jax.deploy.save" in r.stdout
  assert "Event loop is closed" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
