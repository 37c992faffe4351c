"""Training configuration: every option of `bireal_jax.main`, its default, and its validation.

Config files under `configs/` start from `get_default_config()` and change what their recipe
needs (plain Python, like flax/examples/imagenet). `validate()` runs on the command-line result
before any work: an unknown key is refused by the locked `ConfigDict`, an impossible value by
`ConfigError`, which names the key, the value and what was expected.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import ml_collections
from ml_collections import config_dict

import dataclasses

from bireal_jax import idx_files, layers, models, quantizers
from bireal_jax.models import bireal

MODES = ("train", "eval")
DATASETS = ("fashion_mnist", "imagenet2012", "synthetic")  # synthetic: no files, for smoke tests
AUGMENTS = ("none", "crop_flip")
BAD_IMAGES = ("skip", "error")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("linear_epoch", "linear", "cosine", "piecewise", "constant")
MAPPINGS = ("pmap", "shard_map")
DTYPES = ("float32", "bfloat16")
DISTRIBUTED = ("auto", "on", "off")
WEIGHT_DECAY_ON = ("kernels", "all")
STEMS = bireal.STEMS
SHORTCUTS = bireal.SHORTCUTS
PADDINGS = bireal.PADDINGS
KERNEL_INITS = tuple(layers.KERNEL_INITS)

# The model keys are `BiRealNet`'s own fields, with its defaults: a field added to the model is
# a config key (and a command-line flag) without being listed here. None = the named model's
# own value (bireal18 and bireal18_real differ in activation and kernel quantizer).
_MODEL_FIELDS_SET_ELSEWHERE = ("num_classes", "axis_name", "param_dtype", "parent", "name",
                               "block")  # from the data, the mapping, or the model's name
_MODEL_NONE_DEFAULT = ("stage_sizes", "activation", "kernel_quantizer")


def _model_fields() -> dict:
  """{field: default} of the `BiRealNet` fields a config sets."""
  out = {}
  for f in dataclasses.fields(bireal.BiRealNet):
    if f.name in _MODEL_FIELDS_SET_ELSEWHERE:
      continue
    if f.name in _MODEL_NONE_DEFAULT or f.default is dataclasses.MISSING:
      out[f.name] = None
    elif f.name == "dtype":
      out[f.name] = "float32"  # a name on the command line; parameters stay float32
    else:
      out[f.name] = f.default
  return out


class ConfigError(ValueError):
  """An impossible configuration value."""


def get_default_config() -> ml_collections.ConfigDict:
  """All keys with their defaults (the official ImageNet Bi-Real-18 recipe where one exists)."""
  c = ml_collections.ConfigDict()
  c.mode = "train"  # "train" (with periodic eval) | "eval" (top-1/top-5 of the workdir checkpoint)
  c.seed = 0

  # Data: read by bireal_jax.data through data_option() (its per-dataset defaults are below).
  c.dataset = "imagenet2012"
  c.data_dir = config_dict.placeholder(str)  # None: the tfds default
  c.manual_dir = config_dict.placeholder(str)  # where ILSVRC2012_img_{train,val}.tar live
  c.image_size = 224
  c.eval_split = "validation"
  c.cache = False
  c.shuffle_buffer_size = 16_384
  c.augment = "crop_flip"
  c.prefetch = 2  # batches tf.data prepares ahead (-1: AUTOTUNE), and kept ahead on devices
  # imagenet2012: images that do not decode are "skip"ped (named in the log, left out of the
  # splits) or an "error" before the first batch (docs/reliability.md).
  c.bad_images = "skip"

  # Model: bireal_jax.models.get(model, **overrides), the overrides being every `BiRealNet` field
  # (`_model_fields`): stage_sizes (None: the model's own), base_width (stem width; stages double
  # it), stem ("imagenet" | "small"), activation / kernel_quantizer (None: the model's own; e.g.
  # "approx_sign", "hardtanh", "magnitude_aware", "official", "none"), binary_kernel_init,
  # shortcut ("bireal" | "resnet" | "none"), bn_momentum, bn_epsilon, padding ("torch" | "same"),
  # dtype (compute dtype; parameters and optimizer state stay float32).
  c.model = "bireal18"
  for key, default in _model_fields().items():
    c[key] = (config_dict.placeholder(tuple if key == "stage_sizes" else str)
              if default is None else default)

  # Optimisation. `step` counts optimizer updates of `batch_size` images.
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.momentum = 0.9  # sgd
  c.nesterov = False
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.weight_decay = 0.0
  c.weight_decay_on = "kernels"  # "kernels": conv/dense kernels only (no BN, no bias) | "all"
  c.lr_schedule = "linear_epoch"  # lr * (1 - epoch / num_epochs), stepped once per epoch
  c.lr_boundaries = (10.0, 15.0)  # epochs, for "piecewise"
  c.lr_decay_factor = 0.1  # for "piecewise"
  c.warmup_epochs = 0.0
  c.label_smoothing = 0.1  # train loss only
  c.latent_weight_clip = 0.0  # > 0: clip binary latent kernels to [-c, c] after each update
  c.batch_size = 512  # global, over all devices and processes
  c.eval_batch_size = 512  # global
  c.grad_accum_steps = 1  # micro-batches of batch_size / grad_accum_steps per update
  c.num_epochs = 256.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.eval_every_epochs = 1.0
  c.steps_per_eval = -1  # -1: the whole eval split

  # Devices and hosts.
  c.mapping = "pmap"  # "pmap" | "shard_map": the same per-device step, mapped two ways
  c.distributed = "auto"  # "auto": jax.distributed.initialize when a coordinator is named
  c.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0
  c.num_processes = config_dict.placeholder(int)
  c.process_id = config_dict.placeholder(int)

  # Two-step training (paper §3.4): start the binary net from a real-valued clip checkpoint.
  c.init_from = config_dict.placeholder(str)  # workdir (or checkpoint dir) of the clip run
  c.bn_reestimate_steps = 0  # train-mode passes with ±1 weights updating only BN statistics

  # Knowledge distillation (bireal_jax/train/distill.py: distillation_loss): a trained teacher run's
  # soft labels. Loss = (1 - w)·CE(smoothed labels) + w·T²·KL(teacher_T ‖ student_T).
  c.distill_from = config_dict.placeholder(str)  # teacher workdir (e.g. the real clip twin)
  c.distill_weight = 1.0  # w in [0, 1]; 1: soft labels only (ReActNet's distributional loss)
  c.distill_temperature = 1.0  # T > 0

  # Checkpoints and logging.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # Retries (backoff 5, 10, 20, ... s) of listing/restoring checkpoints after a passing storage
  # error (network, timeout, HTTP 429/5xx); then the job stops, its checkpoints untouched.
  c.storage_retries = 3
  # The longest wait for an asynchronous checkpoint save before the job gives it up and stops
  # (an unreachable bucket keeps TensorStore retrying for many minutes).
  c.storage_timeout_s = 900.0
  c.log_every_steps = 50
  c.progress_bar = True
  c.tensorboard = True
  c.export_inference = True  # write workdir/inference (float params + BN stats + model JSON)

  # CPU backend: glibc malloc keeps freed memory, so XLA's per-step buffers are reused instead of
  # page-faulted in again each step (bireal_jax/ops/cpu/host_malloc.py).
  c.keep_freed_host_memory = True
  # Which implementation of each op runs (`bireal_jax.ops.implementation`): "auto" (the fastest
  # here, timed per shape on first use), "reference", "native", "jax", or "op=name,...".
  # "" = the BIREAL_OPS environment variable, else "auto": the training job opts in to CPU
  # tuning (the library alone runs "reference" unless asked). GPUs and TPUs run the reference.
  c.ops = ""
  return c


# The defaults that depend on the dataset, for the data keys a config leaves at None (or leaves
# out: tools and tests hand the input pipeline bare ConfigDicts holding only what they change).
# Every other data key defaults as in get_default_config().
DATA_KEYS = ("data_dir", "manual_dir", "image_size", "eval_split", "cache",
              "shuffle_buffer_size", "augment", "prefetch", "bad_images")
_DATASET_DEFAULTS = {
    "fashion_mnist": dict(image_size=28, eval_split="test", manual_dir=idx_files.FMNIST_DIR,
                          augment="none"),
    "imagenet2012": dict(image_size=224, eval_split="validation", manual_dir=None),
    "synthetic": dict(),
}


def data_option(config, key: str):
  """`config.<key>` for a data key, or its default for `config.dataset` when None or absent.

  The one place the input pipeline reads its options from (their defaults live here)."""
  if key not in DATA_KEYS:
    raise KeyError(f"data option {key!r} unknown; expected one of {list(DATA_KEYS)}")
  value = config.get(key, None)
  if value is not None:
    return value
  dataset = config.get("dataset")
  if dataset not in _DATASET_DEFAULTS:
    _fail("dataset", dataset, f"one of {list(DATASETS)}")
  if key in _DATASET_DEFAULTS[dataset]:
    return _DATASET_DEFAULTS[dataset][key]
  return _GENERIC_DATA_DEFAULTS[key]


def from_file(path: str, relative_to: Optional[str] = None) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (recipes that build on another recipe's file).

  Config files are plain Python outside the package, so they load each other by path;
  `relative_to` resolves `path` beside another file: `from_file("fashion_mnist.py", __file__)`.
  """
  import importlib.util
  if relative_to is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  name = "bireal_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found: expected a Python file with get_config()")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


_GENERIC_DATA_DEFAULTS = {k: get_default_config()[k] for k in DATA_KEYS}


def _fail(key: str, value, expected: str):
  raise ConfigError(f"config.{key}={value!r} is invalid: expected {expected}")


def _choice(c, key, choices):
  if c[key] not in choices:
    _fail(key, c[key], f"one of {list(choices)}")


def _positive(c, key, kind=int, allow_zero=False):
  v = c[key]
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (
      v >= 0 if allow_zero else v > 0)
  if kind is int:
    ok = ok and float(v).is_integer()
  if not ok or (isinstance(v, float) and not math.isfinite(v)):
    _fail(key, v, f"a {'non-negative' if allow_zero else 'positive'} "
          f"{'integer' if kind is int else 'number'}")


def validate(config: ml_collections.ConfigDict, *, device_count: Optional[int] = None,
             process_count: Optional[int] = None) -> None:
  """Raise `ConfigError` for the first impossible value. Device checks need `device_count`."""
  c = config
  _choice(c, "mode", MODES)
  _choice(c, "dataset", DATASETS)
  if c.dataset == "fashion_mnist":
    _choice(c, "augment", AUGMENTS)
  _choice(c, "bad_images", BAD_IMAGES)
  _positive(c, "image_size")
  _positive(c, "shuffle_buffer_size")
  if not isinstance(c.prefetch, int) or c.prefetch < -1:
    _fail("prefetch", c.prefetch, "an integer >= -1 (-1: tf.data AUTOTUNE)")
  if c.model not in models.names():
    _fail("model", c.model, f"one of {models.names()}")
  if c.stage_sizes is not None and (
      len(c.stage_sizes) < 1 or any(not isinstance(n, int) or n < 1 for n in c.stage_sizes)):
    _fail("stage_sizes", c.stage_sizes, "None or a tuple of positive ints, e.g. (4, 4, 4, 4)")
  _positive(c, "base_width")
  _choice(c, "stem", STEMS)
  _choice(c, "shortcut", SHORTCUTS)
  _choice(c, "binary_kernel_init", KERNEL_INITS)
  _choice(c, "padding", PADDINGS)
  valid_q = quantizers.names() + ["none"]
  for key in ("activation", "kernel_quantizer"):
    if c[key] is not None and c[key] not in valid_q:
      _fail(key, c[key], f"None (the model's default) or one of {valid_q}")
  if not 0.0 <= c.bn_momentum < 1.0:
    _fail("bn_momentum", c.bn_momentum, "a decay in [0, 1)")
  _positive(c, "bn_epsilon", float)
  _choice(c, "dtype", DTYPES)
  if c.get("ops"):
    from bireal_jax import ops
    try:
      ops.parse(c.ops)
    except ValueError as e:
      raise ConfigError(f"config.ops={c.ops!r}: {e}") from None

  _choice(c, "optimizer", OPTIMIZERS)
  _positive(c, "learning_rate", float)
  if not 0.0 <= c.momentum < 1.0:
    _fail("momentum", c.momentum, "a value in [0, 1)")
  _positive(c, "weight_decay", float, allow_zero=True)
  _choice(c, "weight_decay_on", WEIGHT_DECAY_ON)
  _choice(c, "lr_schedule", SCHEDULES)
  if c.lr_schedule == "piecewise":
    b = list(c.lr_boundaries)
    if not b or any(x <= 0 for x in b) or b != sorted(b):
      _fail("lr_boundaries", c.lr_boundaries, "increasing positive epochs")
    _positive(c, "lr_decay_factor", float)
  _positive(c, "warmup_epochs", float, allow_zero=True)
  if not 0.0 <= c.label_smoothing < 1.0:
    _fail("label_smoothing", c.label_smoothing, "a value in [0, 1)")
  _positive(c, "latent_weight_clip", float, allow_zero=True)
  _positive(c, "batch_size")
  _positive(c, "eval_batch_size")
  _positive(c, "grad_accum_steps")
  if c.batch_size % c.grad_accum_steps:
    _fail("batch_size", c.batch_size,
          f"a multiple of grad_accum_steps={c.grad_accum_steps}")
  if c.num_train_steps <= 0:
    _positive(c, "num_epochs", float)
  _positive(c, "eval_every_epochs", float)
  if c.steps_per_eval != -1:
    _positive(c, "steps_per_eval")

  _choice(c, "mapping", MAPPINGS)
  _choice(c, "distributed", DISTRIBUTED)
  if c.distributed == "on" and c.coordinator_address is not None:
    if c.num_processes is None or c.process_id is None:
      _fail("num_processes", c.num_processes,
            "num_processes and process_id set whenever coordinator_address is set")
  if c.num_processes is not None:
    _positive(c, "num_processes")
    if c.process_id is None or not 0 <= c.process_id < c.num_processes:
      _fail("process_id", c.process_id, f"an integer in [0, {c.num_processes})")
  _positive(c, "bn_reestimate_steps", allow_zero=True)
  if c.distill_from is not None:
    if not isinstance(c.distill_from, str) or not c.distill_from:
      _fail("distill_from", c.distill_from, "None or the workdir of a finished teacher run")
    if not 0.0 <= c.distill_weight <= 1.0:
      _fail("distill_weight", c.distill_weight, "a weight in [0, 1]")
    _positive(c, "distill_temperature", float)
  _positive(c, "checkpoint_every_steps")
  _positive(c, "keep_checkpoints")
  if not isinstance(c.storage_retries, int) or c.storage_retries < 0:
    _fail("storage_retries", c.storage_retries, "an integer >= 0")
  if not c.storage_timeout_s > 0:
    _fail("storage_timeout_s", c.storage_timeout_s, "a positive number of seconds")
  _positive(c, "log_every_steps")

  if device_count is not None:
    per_update = device_count * c.grad_accum_steps
    if c.batch_size % per_update:
      _fail("batch_size", c.batch_size,
            f"a multiple of device_count × grad_accum_steps = {device_count} × "
            f"{c.grad_accum_steps} = {per_update}")
    if c.eval_batch_size % device_count:
      _fail("eval_batch_size", c.eval_batch_size, f"a multiple of device_count={device_count}")
  if process_count is not None and c.batch_size % process_count:
    _fail("batch_size", c.batch_size, f"a multiple of process_count={process_count}")


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """Keyword arguments for `models.get(config.model, ...)` (num_classes added by the caller):
  every model key that is not None; "none" as a quantizer means real-valued (None)."""
  kw = {}
  for key in _model_fields():
    value = config[key]
    if value is None:
      continue
    if key == "stage_sizes":
      value = tuple(value)
    elif key in ("activation", "kernel_quantizer") and value == "none":
      value = None
    kw[key] = value
  return kw
