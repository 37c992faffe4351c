"""Models: exact parameter counts, real twins, stems, dtypes, shortcut modes, input errors;
a tiny net's gradients on the CPU fast paths against the reference paths."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_paths import both, conv_branch, cpu_only, loss_and_grads, traced  # tests/fast_paths.py
from numerics import assert_close  # tests/numerics.py

from bireal_jax import models
from bireal_jax.layers import BinaryConv

# Tiny but complete: every stage, a stride-2 block with its downsample shortcut in stages 2–4.
TINY = dict(num_classes=5, base_width=4, stem="small", stage_sizes=(1, 1, 1, 1))


def _key(seed):
  # rbg keys: jitted init compiles in ~1 s instead of ~15 s with threefry on this CPU.
  return jax.random.key(seed, impl="rbg")


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _shapes(name, size=224, **kw):
  """Parameter shapes of a registered model, traced without allocating anything."""
  model = models.get(name, **kw)
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,expected", [("bireal18", 11_689_512), ("bireal34", 21_797_672),
                                           ("bireal18_real", 11_689_512),
                                           ("bireal34_real", 21_797_672)])
def test_parameter_counts_match_the_official_models(name, expected):
  variables = _shapes(name)
  assert _count(variables["params"]) == expected
  assert set(variables) == {"params", "batch_stats"}


def _bottleneck_count(stages, classes=1000):
  """Independent count from the architecture description (docs/reference.md, official BiReal_50)."""
  n = 7 * 7 * 3 * 64 + 2 * 64 + 2048 * classes + classes  # stem conv + BN, fc
  c_in, m_prev, first = 64, None, True
  for s, blocks in enumerate(stages):
    m = 64 * 2**s
    w = 4 * m
    for i in range(blocks):
      n += c_in * m + 2 * m + 9 * m * m + 2 * m + m * w + 2 * w  # three convs + their BNs
      if i == 0:
        n += c_in * w + 2 * w  # outer downsample: real 1×1 conv + BN
        if not first:
          n += m_prev * m  # mid-stream real 1×1 conv (no BN)
      first = False
      c_in, m_prev = w, m
  return n


@pytest.mark.parametrize("name,stages", [("bireal50", (3, 4, 6, 3)), ("bireal152", (3, 8, 36, 3))])
def test_bottleneck_models_build_with_the_expected_parameter_count(name, stages):
  variables = _shapes(name)
  assert _count(variables["params"]) == _bottleneck_count(stages)
  out = jax.eval_shape(lambda v, x: models.get(name).apply(v, x), variables,
                       jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert out.shape == (2, 1000) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", ["bireal18", "bireal50"])
def test_real_twin_has_the_identical_parameter_tree(name):
  binary = _shapes(name)
  for twin in (_shapes(f"{name}_real"),
               _shapes(name, activation="hardtanh", kernel_quantizer=None)):
    assert jax.tree.structure(twin) == jax.tree.structure(binary)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), twin) == jax.tree.map(
        lambda a: (a.shape, a.dtype), binary)


def test_real_twin_checkpoint_runs_in_the_binary_model():
  x = _x(2, 16, 16, 3)
  real = models.get("bireal18_real", **TINY)
  binary = models.get("bireal18", **TINY)
  variables = jax.jit(real.init)(_key(1), x)
  y_real = jax.jit(real.apply)(variables, x)
  y_bin = jax.jit(binary.apply)(variables, x)
  assert y_bin.shape == y_real.shape == (2, 5)
  assert np.all(np.isfinite(y_bin)) and not np.allclose(y_bin, y_real)


def test_full_bireal18_small_stem_on_28x28_grey_images_trains_and_evaluates():
  model = models.get("bireal18", num_classes=10, base_width=4, stem="small")
  x = _x(2, 28, 28, 1)
  variables = jax.jit(model.init)(_key(1), x)
  assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 1, 4)

  @jax.jit
  def run(variables, x):
    train_out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return train_out, upd, model.apply(variables, x)

  train_out, upd, eval_out = run(variables, x)
  assert train_out.shape == eval_out.shape == (2, 10)
  assert np.all(np.isfinite(train_out)) and np.all(np.isfinite(eval_out))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), variables["batch_stats"],
                         upd["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_eval_mode_is_per_example():
  # Running averages, not batch statistics: an example's logits do not depend on its batch.
  model = models.get("bireal18", **TINY)
  x = _x(3, 12, 12, 3)
  variables = jax.jit(model.init)(_key(1), x)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(variables, x)[:1], apply(variables, x[:1]), rtol=1e-5,
                             atol=1e-5)


def test_bfloat16_compute_with_float32_params():
  model = models.get("bireal18", dtype="bfloat16", **TINY)
  x = _x(2, 12, 12, 3)
  variables = jax.jit(model.init)(_key(1), x)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, state = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=lambda m, _: isinstance(m, BinaryConv),
      mutable=["intermediates"]))(variables, x)
  assert logits.dtype == jnp.float32
  inter = state["intermediates"]
  conv_outs = jax.tree.leaves(inter)
  assert len(conv_outs) == 4  # one binary conv per block
  assert {a.dtype for a in conv_outs} == {jnp.dtype(jnp.bfloat16)}
  ref = models.get("bireal18", **TINY)
  np.testing.assert_allclose(logits, jax.jit(ref.apply)(variables, x), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("shortcut", ["resnet", "none"])
def test_shortcut_ablations_run(shortcut):
  kw = dict(TINY, stage_sizes=(2, 2, 2, 2))
  x = _x(2, 12, 12, 3)
  model = models.get("bireal18", shortcut=shortcut, **kw)
  variables = jax.jit(model.init)(_key(1), x)
  y = jax.jit(model.apply)(variables, x)
  assert y.shape == (2, 5) and np.all(np.isfinite(y))
  params = variables["params"]
  # Same binary convs as Bi-Real; the 1-bit ResNet has one shortcut per pair, "none" has none.
  assert {f"layer{s}_{i}" for s in range(1, 5) for i in range(2)} <= set(params)
  downsamples = sorted(k for k in params if "downsample" in k)
  if shortcut == "resnet":
    assert downsamples == ["layer2_0_downsample", "layer3_0_downsample", "layer4_0_downsample"]
  else:
    assert downsamples == [] and not any("downsample" in params[k] for k in params)


def test_to_config_round_trip_is_json():
  model = models.get("bireal34", num_classes=7, dtype="bfloat16", stem="small")
  cfg = json.loads(json.dumps(models.to_config(model)))
  assert cfg["stage_sizes"] == [6, 8, 12, 6] and cfg["dtype"] == "bfloat16"
  assert models.from_config(cfg) == model


# ---------------------------------------------------------------------------------------------
# Errors name the bad value and what was expected
# ---------------------------------------------------------------------------------------------


def test_unknown_model_name():
  with pytest.raises(ValueError) as e:
    models.get("bireal19")
  msg = str(e.value)
  assert "'bireal19'" in msg and all(n in msg for n in ["bireal18", "bireal34", "bireal50"])


def test_unknown_model_option():
  with pytest.raises(ValueError) as e:
    models.get("bireal18", widht=8)
  assert "widht" in str(e.value) and "base_width" in str(e.value)


def test_wrong_input_rank():
  model = models.get("bireal18", **TINY)
  with pytest.raises(ValueError, match=r"NHWC images of rank 4, got shape \(12, 12, 3\)"):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((12, 12, 3), jnp.float32))


def test_wrong_channel_count_for_initialised_params():
  model = models.get("bireal18", **TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 12, 12, 3), jnp.float32))
  with pytest.raises(ValueError) as e:
    jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 12, 12, 1), jnp.float32))
  assert "input has 1 channels" in str(e.value) and "expect 3" in str(e.value)


@pytest.mark.parametrize("field", ["activation", "kernel_quantizer"])
def test_unknown_quantizer_name_in_a_model(field):
  model = models.get("bireal18", **{field: "approx_sgn"}, **TINY)
  with pytest.raises(ValueError) as e:
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
  assert "'approx_sgn'" in str(e.value) and "approx_sign" in str(e.value)


@pytest.mark.parametrize("override,pattern", [
    (dict(stem="cifar"), r"stem must be 'imagenet' or 'small', got 'cifar'"),
    (dict(block="wide"), r"block must be 'basic' or 'bottleneck', got 'wide'"),
    (dict(shortcut="dense"), r"shortcut must be one of .*got 'dense'"),
])
def test_bad_architecture_options(override, pattern):
  with pytest.raises(ValueError, match=pattern):  # when the model is made, before any tracing
    models.get("bireal18", **dict(TINY, **override))


@pytest.mark.parametrize("kw,message", [
    (dict(num_classes=-3), "num_classes=-3 is invalid: expected a positive integer"),
    (dict(num_classes=2.5), "num_classes=2.5 is invalid: expected a positive integer"),
    (dict(base_width=0), "base_width=0 is invalid: expected a positive integer"),
    (dict(stage_sizes=(2, 0)), "stage_sizes=(2, 0) is invalid: expected a non-empty sequence"),
    (dict(bn_epsilon=0.0), "bn_epsilon=0.0 is invalid: expected a positive number"),
    (dict(bn_momentum=1.5), "bn_momentum=1.5 is invalid: expected a decay in [0, 1]"),
])
def test_impossible_options_are_refused_when_the_model_is_made(kw, message):
  """Named with its value at `models.get` (Linen) and at construction (NNX), not deep in XLA."""
  import re
  import bireal_jax.nnx as bnnx
  with pytest.raises(ValueError, match=re.escape(message)):
    models.get("bireal18", **kw)
  with pytest.raises(ValueError, match=re.escape(message)):
    bnnx.get("bireal18", **kw)


# ---------------------------------------------------------------------------------------------
# On the CPU fast paths: gradients of a tiny net, native vs reference paths
# ---------------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize("stem,size", [("imagenet", 64), ("small", 14)])
def test_tiny_bireal18_gradients_match_the_reference_paths(stem, size):
  model = models.get("bireal18", num_classes=7, base_width=8, stem=stem,
                     binary_kernel_init="lecun_normal")
  images = _x(3, size, size, 3, seed=4)
  labels = jnp.asarray([0, 3, 6])
  variables = jax.jit(model.init)(_key(5), images[:1])
  fn = functools.partial(loss_and_grads, model)
  assert conv_branch(traced(fn, variables, images, labels, fast=True)) == "xor"
  fast, ref = both(fn, variables, images, labels)
  assert_close(fast[0], ref[0], rtol=1e-5)
  assert_close(fast[1], ref[1], rtol=1e-4)  # 11 binary layers deep: reordered f32 sums compound
  assert_close(fast[2], ref[2], rtol=1e-5)
