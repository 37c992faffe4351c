"""Training step and loop tests (in-process, 8 virtual CPU devices): 8 devices against 1, gradient
accumulation, BN re-estimation, the loop on synthetic data, bfloat16 compute. (The optimizer and
schedules: test_optim.py; the device mapping itself: test_mapping.py.)

Models are Bi-Real-18 blocks with one block in each of two stages, width 4, on 8 px images:
the real code path, compiled in seconds. Compiled programs go to a persistent XLA cache so
tests (and test processes) that run the same program compile it once.
"""
import json
import math

import jax
import numpy as np
import pytest

from bireal_jax import train
from numerics import assert_trees_close  # tests/numerics.py
from tiny_training import (needs_8, new_state, run_steps,  # tests/tiny_training.py
                           synthetic_batches, tiny_config)

# ---------------------------------------------------------------------------------------------
# (a) 8 devices vs 1 device on the same global batch
# ---------------------------------------------------------------------------------------------

_ONE_DEVICE = {}


def one_device_run(accum):
  """Reference: the same 3 steps with pmap on a single device (computed once per module)."""
  if accum not in _ONE_DEVICE:
    config = tiny_config(grad_accum_steps=accum)
    _ONE_DEVICE[accum] = run_steps(config, train.Mapping("pmap", devices=jax.devices()[:1]),
                                   synthetic_batches(config, 3))
  return _ONE_DEVICE[accum]


def test_scanned_micro_batches_match_the_unrolled_loop():
  """Off the CPU the micro-batches run in a lax.scan (one body, flat compile time): same
  update as the unrolled loop the CPU uses."""
  config = tiny_config(grad_accum_steps=2)
  batches = synthetic_batches(config, 2)
  one = train.Mapping("pmap", devices=jax.devices()[:1])
  s_scan, l_scan = run_steps(config, one, batches, scan_micro_batches=True)
  s_loop, l_loop = run_steps(config, one, batches, scan_micro_batches=False)
  np.testing.assert_allclose(l_scan, l_loop, rtol=1e-5)
  assert_trees_close(s_scan.params, s_loop.params)
  assert_trees_close(s_scan.batch_stats, s_loop.batch_stats)


@needs_8
@pytest.mark.parametrize("kind,accum", [("pmap", 1), ("shard_map", 1), ("pmap", 2)])
def test_eight_devices_match_one_device(kind, accum):
  config = tiny_config(mapping=kind, grad_accum_steps=accum)
  s8, l8 = run_steps(config, train.Mapping(kind), synthetic_batches(config, 3))
  s1, l1 = one_device_run(accum)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert int(s8.step) == int(s1.step) == 3
  assert_trees_close(s8.params, s1.params)
  assert_trees_close(s8.batch_stats, s1.batch_stats)
  assert_trees_close(s8.opt_state, s1.opt_state)
  # Training moved the state: the comparison is not between two untouched initialisations.
  init = new_state(config)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       s8.batch_stats, init.batch_stats)
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_gradient_accumulation_averages_micro_batch_gradients():
  """SGD(lr=1, no momentum): the k=2 update is the mean of the two micro-batches' updates."""
  kw = dict(optimizer="sgd", momentum=0.0, learning_rate=1.0, lr_schedule="constant",
            model="bireal18_real", label_smoothing=0.0)
  c2 = tiny_config(grad_accum_steps=2, **kw)
  c1 = tiny_config(batch_size=16, **kw)
  one = train.Mapping("pmap", devices=jax.devices()[:1])
  full = synthetic_batches(c2, 1)[0]
  halves = [jax.tree.map(lambda x: x[:16], full), jax.tree.map(lambda x: x[16:], full)]
  init = new_state(c1)
  s2, l2 = run_steps(c2, one, [full], state=init)
  sa, la = run_steps(c1, one, halves[:1], state=init)
  sb, lb = run_steps(c1, one, halves[1:], state=init)
  expected = jax.tree.map(lambda p, a, b: p + ((a - p) + (b - p)) / 2,
                          init.params, sa.params, sb.params)
  assert_trees_close(s2.params, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(l2[0], (la[0] + lb[0]) / 2, rtol=1e-5)
  # BN running statistics see the micro-batches one after the other.
  assert_trees_close(s2.batch_stats["bn1"], jax.tree.map(
      lambda p, b: 0.9 * p + 0.1 * b, sa.batch_stats["bn1"],
      jax.tree.map(lambda i, x: (x - 0.9 * i) / 0.1, init.batch_stats["bn1"],
                   sb.batch_stats["bn1"])), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# BN re-estimation and the loop on synthetic data
# ---------------------------------------------------------------------------------------------


def test_bn_reestimation_gives_mean_batch_statistics(tmp_path):
  c = tiny_config(bn_reestimate_steps=3, num_train_steps=1)
  s = train.Setup(c, str(tmp_path), None)
  state = s.new_state()
  pstate = s.mapping.put_replicated(state)
  new = s.mapping.to_host(train.reestimate_batch_stats(s, pstate, 3, start_step=5))
  # Reference for the stem BN: per-batch channel mean/variance of conv1's output, averaged.
  it = train.SyntheticData.create_train_iter(c, batch_size=32, seed=c.seed + 1, start_step=5,
                                             process_index=0, process_count=1)
  k = np.asarray(state.params["conv1"]["kernel"])
  means, variances = [], []
  for _ in range(3):
    x = next(it)["image"]
    y = np.asarray(jax.lax.conv_general_dilated(x, k, (1, 1), [(1, 1), (1, 1)],
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")))
    means.append(y.mean(axis=(0, 1, 2)))
    variances.append(y.var(axis=(0, 1, 2)))
  np.testing.assert_allclose(new.batch_stats["bn1"]["mean"], np.mean(means, 0), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(new.batch_stats["bn1"]["var"], np.mean(variances, 0), rtol=1e-4)
  # Parameters are untouched.
  assert_trees_close(new.params, state.params, rtol=0, atol=0)


def test_train_and_evaluate_learns_and_logs(tmp_path):
  c = tiny_config(checkpoint_every_steps=10, log_every_steps=5, eval_every_epochs=0.25,
                  tensorboard=True, export_inference=True)
  result = train.train_and_evaluate(c, str(tmp_path))
  assert result["step"] == 24 and result["count"] == train.SyntheticData.NUM_EVAL
  assert result["top1"] > 0.25  # 10 synthetic classes: chance is 0.1 (sd 0.02 on 200)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if l["split"] == "train"]
  assert {"loss", "top1", "top5", "learning_rate", "images_per_sec"} <= set(train_lines[0])
  assert train_lines[0]["loss"] > train_lines[-1]["loss"]
  assert [l["step"] for l in lines if l["split"] == "eval"] == [16, 24]
  import tensorflow as tf  # already loaded by the loop's TensorBoard writer
  tags = {v.tag for f in (tmp_path / "tensorboard").iterdir()
          for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value}
  assert {"train/loss", "train/top1", "train/learning_rate", "train/images_per_sec",
          "eval/top1", "eval/top5"} <= tags
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [10, 20, 24]
  from bireal_jax import deploy
  exported = deploy.load(tmp_path / "inference")
  assert exported.kind == "float" and exported.source["step"] == 24
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert recorded["identity"]["image_shape"] == [8, 8, 3]
  # A second call finds the finished run and only evaluates it again.
  again = train.train_and_evaluate(c, str(tmp_path))
  assert again["step"] == 24 and math.isclose(again["top1"], result["top1"])


def test_bfloat16_compute_trains_with_float32_parameters():
  c = tiny_config(dtype="bfloat16")
  state, losses = run_steps(c, train.Mapping("pmap", devices=jax.devices()[:1]),
                            synthetic_batches(c, 2))
  assert all(np.isfinite(losses))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
  f32, l32 = run_steps(tiny_config(), train.Mapping("pmap", devices=jax.devices()[:1]),
                       synthetic_batches(c, 1))
  assert abs(losses[0] - l32[0]) < 0.05  # same model and data, bf16 rounding only
