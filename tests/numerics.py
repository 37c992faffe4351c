"""Test helpers: comparing trees of results — float results that differ only by the rounding of
reordered sums (the CPU candidates against the reference), and trained states or exports leaf by
leaf, named by their tree path."""
import jax
import numpy as np


def assert_close(a, b, rtol=2e-5):
  """Leafwise close relative to each leaf's scale. Leaves that are zero up to cancellation noise
  (e.g. a BN bias whose gradient cancels) are compared relative to 1e-2 of the largest leaf
  instead of their own noise."""
  pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  assert len(pairs) == len(jax.tree.leaves(b)) and pairs
  floor = 1e-2 * max(np.abs(y).max() for _, y in pairs)
  for x, y in pairs:
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), floor, 1e-30))


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
  """Same tree structure, every leaf within `rtol`/`atol` (the failing leaf's path is named)."""
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def assert_trees(a, b, exact=True):
  """Same tree structure, every leaf equal (`exact`) or within rtol 1e-4, atol 1e-5."""
  if not exact:
    return assert_trees_close(a, b, rtol=1e-4, atol=1e-5)
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), jax.tree_util.keystr(path))
