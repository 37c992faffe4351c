"""Preemption: SIGTERM stops the run cleanly at a step boundary."""
from __future__ import annotations

import signal


class Preemption:
  """SIGTERM → finish the current step, checkpoint, exit 0.

  One process: a Python handler sets a flag read at each step boundary. Several processes:
  JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM and
  `reached_preemption_sync_point` makes every process stop at the same step, so no Python
  handler is installed (it would replace the service's).
  """

  def __init__(self, single_process: bool):
    self.requested = False
    self._single = single_process
    self._previous = None

  def __enter__(self):
    if self._single:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
