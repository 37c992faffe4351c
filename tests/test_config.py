"""bireal_jax.config: `validate` refuses an impossible value with a message that names the key,
the value and what was expected; the device checks; `model_overrides`; `from_file` beside
another file; every model field a config key; the shipped recipes. (The command line's config
handling: test_main.py.)"""
import math
import os

import pytest

from bireal_jax import config as config_lib
from bireal_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refused(message, device_count=None, process_count=None, **values):
  """`validate` of the default config with `values` set raises ConfigError saying `message`."""
  c = config_lib.get_default_config()
  for key, value in values.items():
    c[key] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, device_count=device_count, process_count=process_count)
  assert message in str(e.value), str(e.value)
  return str(e.value)


@pytest.mark.parametrize("values,message", [
    (dict(prefetch=-2), "config.prefetch=-2 is invalid: expected an integer >= -1"),
    (dict(batch_size=True), "config.batch_size=True is invalid: expected a positive integer"),
    (dict(learning_rate=math.nan), "config.learning_rate=nan is invalid: expected a positive "
     "number"),
    (dict(learning_rate=0.0), "config.learning_rate=0.0 is invalid: expected a positive number"),
    (dict(weight_decay=-1e-4), "config.weight_decay=-0.0001 is invalid: expected a non-negative "
     "number"),
    (dict(bn_momentum=1.0), "config.bn_momentum=1.0 is invalid: expected a decay in [0, 1)"),
    (dict(momentum=-0.1), "config.momentum=-0.1 is invalid: expected a value in [0, 1)"),
    (dict(lr_schedule="piecewise", lr_boundaries=(15.0, 10.0)),
     "config.lr_boundaries=(15.0, 10.0) is invalid: expected increasing positive epochs"),
    (dict(num_train_steps=0, num_epochs=0.0),
     "config.num_epochs=0.0 is invalid: expected a positive number"),
    (dict(num_processes=2, process_id=2),
     "config.process_id=2 is invalid: expected an integer in [0, 2)"),
    (dict(storage_retries=-1), "config.storage_retries=-1 is invalid: expected an integer >= 0"),
    (dict(storage_timeout_s=0.0), "config.storage_timeout_s=0.0 is invalid: expected a positive "
     "number of seconds"),
    (dict(dataset="fashion_mnist", augment="mixup"),
     "config.augment='mixup' is invalid: expected one of ['none', 'crop_flip']"),
    (dict(distill_from="runs/t", distill_weight=2.0),
     "config.distill_weight=2.0 is invalid: expected a weight in [0, 1]"),
])
def test_validate_names_the_key_the_value_and_what_was_expected(values, message):
  _refused(message, **values)


@pytest.mark.parametrize("key,value", [("distill_weight", 1.5), ("distill_weight", -0.1),
                                       ("distill_temperature", 0.0)])
def test_bad_distillation_values_are_rejected(key, value):
  c = config_lib.get_default_config()
  c.distill_from = "runs/teacher"
  c[key] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}={value!r}"):
    config_lib.validate(c)


def test_validate_checks_the_ops_setting_with_the_ops_message():
  text = _refused("config.ops='fastest': unknown ops implementation 'fastest'", ops="fastest")
  assert "native" in text  # the presets are listed
  c = config_lib.get_default_config()
  for good in ("", "reference", "auto", "max_pool=sliced,conv2d=reference"):
    c.ops = good
    config_lib.validate(c)


def test_device_and_process_checks_need_the_counts():
  c = config_lib.get_default_config()
  c.eval_batch_size = 100
  config_lib.validate(c)  # without device_count: nothing about devices is checked
  config_lib.validate(c, device_count=4)
  with pytest.raises(config_lib.ConfigError, match=r"config.eval_batch_size=100 is invalid: "
                     r"expected a multiple of device_count=8"):
    config_lib.validate(c, device_count=8)
  c.batch_size = 6
  config_lib.validate(c, process_count=3)
  with pytest.raises(config_lib.ConfigError, match=r"config.batch_size=6 is invalid: expected "
                     r"a multiple of process_count=4"):
    config_lib.validate(c, process_count=4)


def test_model_overrides_are_the_set_model_keys_with_none_meaning_real():
  c = config_lib.get_default_config()
  kw = config_lib.model_overrides(c)
  # Keys left at None (the named model's own value) are not passed on.
  assert "stage_sizes" not in kw and "activation" not in kw and "kernel_quantizer" not in kw
  c.stage_sizes, c.activation, c.kernel_quantizer = [1, 1], "none", "none"
  kw = config_lib.model_overrides(c)
  assert kw["stage_sizes"] == (1, 1) and kw["activation"] is None
  assert kw["kernel_quantizer"] is None
  model = models.get(c.model, num_classes=10, **kw)  # a real-valued model: what "none" means
  assert model.activation is None and model.kernel_quantizer is None
  assert model.stage_sizes == (1, 1)


def test_from_file_resolves_a_path_beside_another_file():
  beside = os.path.join(REPO, "configs", "imagenet_bireal18.py")
  a = config_lib.from_file("fashion_mnist.py", relative_to=beside)
  b = config_lib.from_file(os.path.join(REPO, "configs", "fashion_mnist.py"))
  assert a.to_dict() == b.to_dict() and a.dataset == "fashion_mnist"
  with pytest.raises(config_lib.ConfigError, match="nope.py.*not found: expected a Python "
                     "file with get_config"):
    config_lib.from_file("nope.py", relative_to=beside)


def test_every_model_field_is_a_config_key_that_reaches_the_model():
  """The model keys are BiRealNet's fields: each one set in the config arrives in the model."""
  import dataclasses
  from bireal_jax import train
  from bireal_jax.models.bireal import BiRealNet
  c = config_lib.get_default_config()
  fields = {f.name for f in dataclasses.fields(BiRealNet)} - {
      "num_classes", "axis_name", "param_dtype", "parent", "name", "block"}
  assert fields <= set(c.keys())
  with c.unlocked():
    c.padding, c.stem, c.base_width, c.stage_sizes = "same", "small", 8, (1, 1)
    c.kernel_quantizer, c.bn_epsilon = "none", 1e-3
  config_lib.validate(c)
  model = train.create_model(c, num_classes=10)
  assert (model.padding, model.stem, model.base_width, model.stage_sizes) == (
      "same", "small", 8, (1, 1))
  assert model.kernel_quantizer is None and model.bn_epsilon == 1e-3
  with c.unlocked():
    c.padding = "valid"
  with pytest.raises(config_lib.ConfigError, match=r"config.padding='valid' is invalid"):
    config_lib.validate(c)


def test_validate_names_key_value_and_expectation():
  cases = [("batch_size", 0, "config.batch_size=0 is invalid: expected a positive integer"),
           ("model", "bireal19", "config.model='bireal19' is invalid: expected one of"),
           ("optimizer", "adamax", "expected one of ['adam', 'adamw', 'sgd']"),
           ("kernel_quantizer", "ternary", "config.kernel_quantizer='ternary'"),
           ("activation", "tanh", "config.activation='tanh'"),
           ("mapping", "xmap", "expected one of ['pmap', 'shard_map']"),
           ("dtype", "float16", "expected one of ['float32', 'bfloat16']"),
           ("lr_schedule", "step", "config.lr_schedule='step'"),
           ("label_smoothing", 1.5, "a value in [0, 1)"),
           ("grad_accum_steps", 3, "config.batch_size=512 is invalid: expected a multiple of "
            "grad_accum_steps=3"),
           ("dataset", "cifar10", "config.dataset='cifar10'"),
           ("stage_sizes", (4, 0), "config.stage_sizes=(4, 0)"),
           ("bad_images", "ignore",
            "config.bad_images='ignore' is invalid: expected one of ['skip', 'error']")]
  for key, value, expected in cases:
    c = config_lib.get_default_config()
    c[key] = value
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(c)
    assert expected in str(e.value), (key, str(e.value))
  c = config_lib.get_default_config()
  config_lib.validate(c, device_count=8)  # the default recipe itself is valid
  with pytest.raises(config_lib.ConfigError, match="device_count × grad_accum_steps = 8 × 3"):
    c.batch_size, c.grad_accum_steps = 36, 3
    config_lib.validate(c, device_count=8)
  with pytest.raises(AttributeError):  # locked like the CLI's config: no new keys
    c.lock()
    c.learning_rate_typo = 1.0


def load_config_file(name):
  return config_lib.from_file(os.path.join(REPO, "configs", name + ".py"))


def test_config_files_validate_and_match_the_published_recipes():
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
  assert {"fashion_mnist", "fashion_mnist_real", "fashion_mnist_long", "fashion_mnist_kd",
          "imagenet_bireal18",
          "imagenet_bireal34", "imagenet_bireal50", "imagenet_bireal18_real_clip",
          "imagenet_bireal18_twostep"} <= set(names)
  configs = {n: load_config_file(n) for n in names}
  for c in configs.values():
    config_lib.validate(c, device_count=8)
  official = dict(optimizer="adam", lr_schedule="linear_epoch", num_epochs=256.0,
                  weight_decay=0.0, label_smoothing=0.1, image_size=224)
  for name, model, lr, batch in [("imagenet_bireal18", "bireal18", 1e-3, 512),
                                 ("imagenet_bireal34", "bireal34", 1e-3, 512),
                                 ("imagenet_bireal50", "bireal50", 5e-4, 256)]:
    c = configs[name]
    assert (c.model, c.learning_rate, c.batch_size) == (model, lr, batch)
    assert {k: c[k] for k in official} == official
  two = configs["imagenet_bireal18_twostep"]
  assert (two.optimizer, two.momentum, two.learning_rate, two.batch_size, two.num_epochs,
          tuple(two.lr_boundaries), two.lr_decay_factor, two.weight_decay) == \
      ("sgd", 0.9, 0.01, 128, 20.0, (10.0, 15.0), 0.1, 0.0)
  assert two.bn_reestimate_steps > 0 and configs["imagenet_bireal18_real_clip"].model == \
      "bireal18_real"
  demo, real = configs["fashion_mnist"], configs["fashion_mnist_real"]
  assert real.model == "bireal18_real" and demo.model == "bireal18"
  assert {k: v for k, v in real.items() if k != "model"} == \
      {k: v for k, v in demo.items() if k != "model"}  # twins: same tree, same recipe
  kd = configs["fashion_mnist_kd"]  # the demo student, initialised and taught by the twin
  taught = ("init_from", "distill_from", "distill_weight", "distill_temperature")
  assert kd.init_from == kd.distill_from == "runs/fm_real" and kd.distill_weight > 0
  assert {k: v for k, v in kd.items() if k not in taught} == \
      {k: v for k, v in demo.items() if k not in taught}


def test_config_from_file_names_a_missing_file(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="nope.py.*get_config"):
    config_lib.from_file(str(tmp_path / "nope.py"))
