"""Knowledge distillation (config.distill_from): the loss, the mapped step with a teacher, errors.

Tiny synthetic runs (tests/tiny_training.py) (8 virtual CPU devices under `make test`).
"""
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bireal_jax import checkpoint, train

from numerics import assert_trees_close  # tests/numerics.py
from tiny_training import (lr_fn_of, needs_8, new_state,  # tests/tiny_training.py
                           synthetic_batches, tiny_config)


def test_distillation_loss_is_scaled_kl_with_the_closed_form_gradient():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(6, 10)).astype(np.float32)
  t = 3 * rng.normal(size=(6, 10)).astype(np.float32)
  for temp in (1.0, 4.0):
    p_t = np.exp(t / temp) / np.exp(t / temp).sum(-1, keepdims=True)
    log_p_s = s / temp - np.log(np.exp(s / temp).sum(-1, keepdims=True))
    want = temp ** 2 * (p_t * (np.log(p_t) - log_p_s)).sum(-1)
    got = train.distillation_loss(jnp.asarray(s), jnp.asarray(t), temp)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # d/ds T²·KL = T·(softmax(s/T) - softmax(t/T)); no gradient reaches the teacher.
    gs, gt = jax.grad(lambda a, b: train.distillation_loss(a, b, temp).sum(), (0, 1))(s, t)
    np.testing.assert_allclose(gs, temp * (np.exp(log_p_s) - p_t), rtol=1e-4, atol=1e-6)
    assert not np.any(gt)
  np.testing.assert_allclose(train.distillation_loss(s, s, 2.0), 0.0, atol=1e-6)


@pytest.fixture(scope="module")
def teacher_dir():
  """A finished real-valued clip twin run (the teacher) in a workdir."""
  wd = tempfile.mkdtemp(prefix="bireal_teacher_")
  train.train_and_evaluate(tiny_config(model="bireal18_real", num_train_steps=4), wd)
  return wd


def run_distilled(config, mapping, batches, teacher_dir, weight, temperature=2.0):
  teacher_model, teacher_vars = train.load_teacher(
      teacher_dir, train.identity(config, train.create_model(config, 10),
                                   train.SyntheticData.dataset_info(config)))
  step = mapping.map(functools.partial(
      train.train_step, learning_rate_fn=lr_fn_of(config),
      label_smoothing=config.label_smoothing, grad_accum_steps=config.grad_accum_steps,
      teacher_apply=teacher_model.apply, distill_weight=weight,
      distill_temperature=temperature), batched=(False, True, False), donate=(0,))
  pstate, teacher = mapping.put_replicated(new_state(config)), mapping.put_replicated(teacher_vars)
  losses = []
  for b in batches:
    pstate, m = step(pstate, mapping.put_batch(b), teacher)
    losses.append(float(mapping.to_host(m)["loss"]))
  return mapping.to_host(pstate), losses


def test_weight_zero_is_the_plain_step_and_weight_one_ignores_labels(teacher_dir):
  config = tiny_config()
  one = train.Mapping("pmap", devices=jax.devices()[:1])
  batches = synthetic_batches(config, 2)
  plain = train.Mapping("pmap", devices=jax.devices()[:1])
  step = plain.map(functools.partial(train.train_step, learning_rate_fn=lr_fn_of(config),
                                     label_smoothing=config.label_smoothing,
                                     grad_accum_steps=1), batched=(False, True), donate=(0,))
  ps = plain.put_replicated(new_state(config))
  for b in batches:
    ps, _ = step(ps, plain.put_batch(b))
  w0, _ = run_distilled(config, one, batches, teacher_dir, weight=0.0)
  assert_trees_close(w0.params, plain.to_host(ps).params, rtol=1e-6, atol=1e-7)

  w1, l1 = run_distilled(config, one, batches, teacher_dir, weight=1.0)
  shuffled = [dict(b, label=np.roll(b["label"], 3)) for b in batches]
  w1s, l1s = run_distilled(config, one, shuffled, teacher_dir, weight=1.0)
  assert_trees_close(w1.params, w1s.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(l1, l1s, rtol=1e-6)
  # ... while the teacher does change the update.
  assert not np.allclose(jax.tree.leaves(w1.params)[0], jax.tree.leaves(w0.params)[0])


@needs_8
@pytest.mark.parametrize("kind", ["pmap", "shard_map"])
def test_distilled_step_on_8_devices_equals_1_device(teacher_dir, kind):
  config = tiny_config()
  batches = synthetic_batches(config, 2)
  s1, l1 = run_distilled(config, train.Mapping("pmap", devices=jax.devices()[:1]), batches,
                         teacher_dir, weight=0.5)
  s8, l8 = run_distilled(config, train.Mapping(kind), batches, teacher_dir, weight=0.5)
  np.testing.assert_allclose(l8, l1, rtol=2e-4)
  assert_trees_close(s8.params, s1.params)
  assert_trees_close(s8.batch_stats, s1.batch_stats)


def test_train_and_evaluate_with_a_teacher(teacher_dir, tmp_path, capsys):
  config = tiny_config(num_train_steps=4, distill_from=teacher_dir, distill_weight=0.7,
                       distill_temperature=2.0)
  ev = train.train_and_evaluate(config, str(tmp_path / "student"))
  assert ev["step"] == 4 and np.isfinite(ev["loss"])
  assert f"Distilling from {teacher_dir}" in capsys.readouterr().out


def test_bad_teacher_is_a_clear_error(teacher_dir, tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(checkpoint.CheckpointError, match="distill_from=.*nowhere.*config.json"):
    train.train_and_evaluate(tiny_config(num_train_steps=2, distill_from=missing),
                             str(tmp_path / "a"))
  # The teacher saw 8 px images; a 12 px student cannot use it.
  with pytest.raises(checkpoint.CheckpointError, match=r"image_shape=\[8, 8, 3\]"):
    train.train_and_evaluate(tiny_config(num_train_steps=2, image_size=12,
                                         distill_from=teacher_dir), str(tmp_path / "b"))
