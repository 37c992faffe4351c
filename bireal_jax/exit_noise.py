"""Quieting what Orbax's leftover threads print after a failed save or restore.

When a checkpoint write or read fails, Orbax's other writer threads fail after it, each logging
its own traceback, and TensorStore's pending callbacks reach a closed asyncio loop, each printed
as an 'Event loop is closed' traceback at exit. The caller has already said what failed and
what to do; these keep that message from being the last thing a user reads.
"""
from __future__ import annotations

import logging
import sys


def drop_closed_loop_noise() -> None:
  """Drop the 'Event loop is closed' unraisable exceptions (chaining every other one to the
  previous `sys.unraisablehook`)."""
  previous = sys.unraisablehook
  if getattr(previous, "_bireal_jax", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook._bireal_jax = True
  sys.unraisablehook = hook


def after_reported_failure() -> None:
  """The run ends with an error already reported: silence the leftover threads' records."""
  drop_closed_loop_noise()
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "exception was never retrieved"
  logging.getLogger("absl").setLevel(logging.CRITICAL)  # Orbax's writer threads' tracebacks
