"""The one place bireal_jax uses another library's private API, each use checked.

Our dependencies are pinned from below only, so a private API is what an upgrade breaks
silently. Each function here looks up exactly what it needs, checks its shape, and otherwise
fails with the installed version and what was expected; tests/test_compat.py runs each one on
the installed versions, so an upgrade that breaks one fails there first.
"""
from __future__ import annotations

from typing import Any


class CompatError(RuntimeError):
  """An installed library no longer has the private API bireal_jax relies on."""


def distributed_kv_client() -> Any:
  """The client of `jax.distributed`'s key-value store, after `jax.distributed.initialize`.

  Private in JAX (`jax._src.distributed.global_state.client`; jax 0.10.2 has no public
  equivalent): the one way to pass a string between a job's processes without a device
  computation, which the workdir lock needs (its verdict is settled before anything compiles).
  The client has `key_value_set(key, value)` and `blocking_key_value_get(key, timeout_ms)`.
  """
  import jax
  try:
    from jax._src import distributed
    state = distributed.global_state
  except (ImportError, AttributeError) as e:
    raise CompatError(f"jax {jax.__version__} has no jax._src.distributed.global_state "
                      f"({e}); expected it as in jax 0.10.x: bireal_jax needs an update for "
                      f"this jax version") from e
  client = getattr(state, "client", None)
  if client is None:
    raise CompatError("jax.distributed has no client: expected jax.distributed.initialize() "
                      "to have run in this process")
  missing = [m for m in ("key_value_set", "blocking_key_value_get") if not hasattr(client, m)]
  if missing:
    raise CompatError(f"jax {jax.__version__}'s distributed client lacks {missing}; expected "
                      f"the key-value methods of jax 0.10.x: bireal_jax needs an update")
  return client
