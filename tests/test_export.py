"""Float inference export: saved here, loaded in a fresh Python with only models + Orbax."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bireal_jax import export, models, train

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
  path = export.save_inference(str(tmp_path / "inference"), model, variables)
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
                                 "bireal_jax.export") if m in sys.modules)
      print(json.dumps(heavy))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []  # nothing but models + Orbax
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-6, atol=1e-6)

  # The library's loader gives the same model and variables.
  loaded_model, loaded = export.load_inference(path)
  assert loaded_model.axis_name is None and loaded_model.stage_sizes == (1, 1)
  np.testing.assert_allclose(np.asarray(loaded_model.apply(loaded, x)), expected,
                             rtol=1e-6, atol=1e-6)


def test_export_errors_name_the_problem(tmp_path):
  model, variables = _model_and_variables()
  with pytest.raises(ValueError, match="lack \\['batch_stats'\\]"):
    export.save_inference(str(tmp_path / "a"), model, {"params": variables["params"]})
  with pytest.raises(FileNotFoundError, match="model.json not found"):
    export.load_inference(str(tmp_path / "nothing"))
