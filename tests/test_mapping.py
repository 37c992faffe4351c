"""bireal_jax.train.mapping on 8 virtual CPU devices (XLA_FLAGS set by `make test`): `Mapping`
with `jax.pmap` and with `jax.shard_map` — the replicated state and the split batch on the
devices and back, micro-batch order, a collective over the mapped axis, global (checkpoint)
arrays, compiled with XLA options; `local_value`; `prefetch`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_trees_close  # tests/numerics.py
from tiny_training import (lr_fn_of, needs_8, new_state, run_steps,  # tests/tiny_training.py
                           synthetic_batches, tiny_config)

from bireal_jax import train
from bireal_jax.train import mapping as mapping_lib

KINDS = ["pmap", "shard_map"]


def _state():
  return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(7)}


def _batch(n=32):
  return {"image": np.arange(n * 2, dtype=np.float32).reshape(n, 2), "label": np.arange(n)}


def _per_device(x):
  """The rows each device holds, in device order."""
  assert not x.sharding.is_fully_replicated, f"not split over devices: {x.sharding}"
  return [np.asarray(s.data) for s in sorted(x.addressable_shards, key=lambda s: s.device.id)]


def test_an_unknown_kind_is_named():
  with pytest.raises(ValueError, match=r"config.mapping='xmap': expected 'pmap' or 'shard_map'"):
    train.Mapping("xmap")


@needs_8
@pytest.mark.parametrize("kind", KINDS)
def test_replicated_state_is_on_every_device_and_comes_back_unchanged(kind):
  m = train.Mapping(kind)
  state = _state()
  put = m.put_replicated(state)
  w = put["w"]
  assert len(w.addressable_shards) == 8 and {s.device for s in w.addressable_shards} == set(
      jax.devices())
  for shard in w.addressable_shards:  # each device holds the whole value
    np.testing.assert_array_equal(np.asarray(shard.data).reshape(2, 3), state["w"])
  back = m.to_host(put)
  np.testing.assert_array_equal(back["w"], state["w"])
  assert back["step"] == 7 and back["w"].dtype == np.float32
  # Checkpoints hold fully replicated global arrays on the mapping's mesh, same values.
  g = m.global_state(put)
  assert g["w"].sharding.is_fully_replicated and g["w"].shape == (2, 3)
  np.testing.assert_array_equal(mapping_lib.local_value(g["w"]), state["w"])
  # The abstract tree (what a restore is told to produce) has the shapes and dtypes.
  abstract = m.abstract(state)
  assert (abstract["w"].shape, abstract["w"].dtype) == ((2, 3), jnp.float32)
  assert abstract["w"].sharding == m.replicated


@needs_8
@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_is_split_over_the_devices_in_order(kind):
  m = train.Mapping(kind)
  batch = _batch()
  put = m.put_batch(batch)
  rows = _per_device(put["label"])
  assert len(rows) == 8
  for d, r in enumerate(rows):  # device d holds rows 4d .. 4d+3
    np.testing.assert_array_equal(r.reshape(-1), np.arange(4 * d, 4 * d + 4))
  images = _per_device(put["image"])
  np.testing.assert_array_equal(np.concatenate([i.reshape(-1, 2) for i in images]),
                                batch["image"])


@needs_8
@pytest.mark.parametrize("kind", KINDS)
def test_micro_batch_j_of_each_device_is_its_share_of_the_jth_chunk(kind):
  """With 2 micro-batches, device d holds 2 rows of the first half of the batch, then 2 rows of
  the second half: accumulation sees the same micro-batches whatever the device count."""
  m = train.Mapping(kind)
  rows = _per_device(m.put_batch(_batch(), micro_batches=2)["label"])
  for d, r in enumerate(rows):
    np.testing.assert_array_equal(r.reshape(-1), [2 * d, 2 * d + 1, 16 + 2 * d, 17 + 2 * d])


@needs_8
@pytest.mark.parametrize("kind", KINDS)
def test_a_mapped_collective_sees_the_whole_batch(kind):
  m = train.Mapping(kind)
  batch = _batch()

  def fn(state, b):  # one device's share: a sum over the devices is the whole batch's
    total = jax.lax.psum(jnp.sum(b["label"]), train.AXIS)
    return {"total": total + state["step"], "count": jax.lax.psum(b["label"].shape[0],
                                                                   train.AXIS)}

  out = m.to_host(m.map(fn, batched=(False, True))(m.put_replicated(_state()), m.put_batch(batch)))
  assert int(out["total"]) == int(batch["label"].sum()) + 7
  assert int(out["count"]) == 32


def test_local_value_is_the_whole_value_of_an_addressable_array():
  x = jnp.arange(12.0).reshape(3, 4)
  v = mapping_lib.local_value(x)
  assert isinstance(v, np.ndarray)
  np.testing.assert_array_equal(v, np.arange(12.0).reshape(3, 4))
  assert mapping_lib.local_value(3) == 3 and isinstance(mapping_lib.local_value(3), np.ndarray)


def test_prefetch_keeps_size_items_ahead_in_order():
  puts = []

  def put(x):
    puts.append(x)
    return x * 10

  it = train.prefetch(iter(range(6)), put, size=2)
  assert puts == []  # nothing is transferred before the first batch is asked for
  assert next(it) == 0 and puts == [0, 1]
  assert next(it) == 10 and puts == [0, 1, 2]
  assert list(it) == [20, 30, 40, 50] and puts == list(range(6))
  assert list(train.prefetch(iter([]), put, size=3)) == []


@needs_8
@pytest.mark.parametrize("kind", ["pmap", "shard_map"])
def test_train_step_with_cpu_compiler_options_matches_and_keeps_one_executable(kind):
  """The loop compiles its train step with `ops.compiler_options()` (AOT for pmap)."""
  from bireal_jax import ops
  config = tiny_config()
  batches = synthetic_batches(config, 3)
  mapping = train.Mapping(kind)
  step = mapping.map(functools.partial(train.train_step, learning_rate_fn=lr_fn_of(config),
                                       label_smoothing=config.label_smoothing,
                                       grad_accum_steps=1),
                     batched=(False, True), donate=(0,),
                     compiler_options=ops.compiler_options())
  pstate = mapping.put_replicated(new_state(config))
  losses = []
  for b in batches:
    pstate, m = step(pstate, mapping.put_batch(b))
    losses.append(float(mapping.to_host(m)["loss"]))
  if kind == "pmap":
    assert step.cache_size() == 1  # the step's outputs feed the next call without recompiling
  ref, ref_losses = run_steps(config, train.Mapping(kind), batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  assert_trees_close(mapping.to_host(pstate).params, ref.params)
