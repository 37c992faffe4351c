"""Test helper: comparing trees of float results that differ only by the rounding of reordered
sums (the CPU candidates against the reference)."""
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
