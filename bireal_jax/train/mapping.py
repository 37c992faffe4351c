"""Mapping a per-device step over devices: `jax.pmap` or `jax.shard_map` over a 1-D mesh, the
host <-> device layouts of state and batches, and prefetching batches to the devices."""
from __future__ import annotations

import collections
import itertools
from typing import Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bireal_jax.train.steps import AXIS


class Mapping:
  """Runs per-device functions on all devices with `jax.pmap` or `jax.shard_map`.

  Host-side layout is the same for both: a replicated PyTree (state) and a per-process batch
  whose leading axis is split over this process's devices. `global_state`/`from_global`
  convert between the mapped state and fully replicated global arrays (what checkpoints hold).
  """

  def __init__(self, kind: str, devices=None):
    if kind not in ("pmap", "shard_map"):
      raise ValueError(f"config.mapping={kind!r}: expected 'pmap' or 'shard_map'")
    self.kind = kind
    devices = list(jax.devices() if devices is None else devices)
    self.devices = devices
    self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(AXIS))
    self._local_mesh = Mesh(np.array(self.local_devices), (AXIS,))

  def map(self, fn: Callable, batched: tuple[bool, ...], donate: tuple[int, ...] = (),
          compiler_options: Optional[dict] = None):
    """Map `fn`; `batched[i]` says whether argument i is split over devices or replicated.

    Outputs are replicated (every per-device function here ends in a collective).
    `compiler_options` are XLA options for this function only (e.g.
    `ops.compiler_options()` for the train step).
    """
    if self.kind == "pmap":
      # All devices of all processes: pmap's collectives then span every host.
      mapped = jax.pmap(fn, axis_name=AXIS, donate_argnums=donate, devices=self.devices)
      # AOT lowering of a multi-process pmap takes global shapes while calls pass local ones,
      # so there the options are skipped (set them through XLA_FLAGS instead).
      if compiler_options and jax.process_count() == 1:
        return _CompiledWith(mapped, compiler_options)
      return mapped
    in_specs = tuple(P(AXIS) if b else P() for b in batched)
    # check_vma=False gives pmap's semantics: a gradient w.r.t. replicated params stays
    # per-device (with the checker on, JAX would psum it implicitly and the step's own pmean
    # would then average a sum), so the one step function means the same under both mappings.
    return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=P(),
                                 check_vma=False), donate_argnums=donate,
                   compiler_options=compiler_options or None)

  def put_replicated(self, tree):
    """Host (or global replicated) values → the mapped functions' replicated layout."""
    tree = jax.tree.map(local_value, tree)
    if self.kind == "pmap":
      # Same mesh axis name as pmap's own outputs: a different sharding on the first call
      # would make pmap compile the step a second time.
      return flax.jax_utils.replicate(tree, self.local_devices, axis_name=AXIS)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, x), tree)

  def put_batch(self, batch, micro_batches: int = 1):
    """This process's batch → split over its devices (and, for shard_map, the global array).

    With `micro_batches` k > 1 the examples are reordered so that micro-batch j of every device
    holds its share of the j-th contiguous chunk of the process batch: accumulation then sees
    the same micro-batches whatever the number of local devices.
    """
    n = len(self.local_devices)
    if micro_batches > 1:
      batch = jax.tree.map(lambda x: np.reshape(np.swapaxes(
          np.reshape(x, (micro_batches, n, -1, *np.shape(x)[1:])), 0, 1), np.shape(x)), batch)
    if self.kind == "pmap":
      sharding = NamedSharding(self._local_mesh, P(AXIS))
      return jax.tree.map(
          lambda x: jax.device_put(np.reshape(x, (n, -1, *np.shape(x)[1:])), sharding), batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, x),
                        batch)

  def to_host(self, tree):
    """Replicated outputs → numpy values (one replica)."""
    if self.kind == "pmap":
      return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)
    return jax.tree.map(local_value, tree)

  def global_state(self, tree):
    """Mapped state → fully replicated global arrays for checkpointing."""
    if self.kind == "shard_map":
      return tree
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.replicated, x),
                        self.to_host(tree))

  def abstract(self, tree):
    """ShapeDtypeStructs (replicated on the global mesh) describing `tree`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                       sharding=self.replicated), tree)


class _CompiledWith:
  """A pmapped function compiled ahead of time with XLA `options` (`jax.pmap` takes none).

  One executable per distinct argument signature (tree structure, shapes, dtypes), as jit's
  own cache would keep.
  """

  def __init__(self, mapped: Callable, options: dict):
    self._mapped, self._options, self._cache = mapped, dict(options), {}

  def __call__(self, *args):
    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
    if key not in self._cache:
      self._cache[key] = self._mapped.lower(*args).compile(compiler_options=self._options)
    return self._cache[key](*args)

  def cache_size(self) -> int:
    """How many executables were compiled so far: one per distinct argument signature."""
    return len(self._cache)


def local_value(x):
  """`x` as a numpy value: this process's first shard of an array that spans several processes
  (a replicated global array holds the whole value there), else the whole array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def prefetch(iterator: Iterator, put: Callable, size: int) -> Iterator:
  """Keep `size` batches already transferred to the devices (flax's prefetch_to_device idea)."""
  queue = collections.deque()
  for item in itertools.islice(iterator, max(size, 1)):
    queue.append(put(item))
  while queue:
    yield queue.popleft()
    for item in itertools.islice(iterator, 1):
      queue.append(put(item))
