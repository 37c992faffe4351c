"""Quieting what Orbax, TensorStore and gcsfs print around a storage failure.

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


def drop_unretrieved_task_errors(matches) -> None:
  """Drop asyncio's 'Task (or Future) exception was never retrieved' records whose exception
  `matches` (the sibling reads of a failed restore, which the caller has already reported)."""
  log = logging.getLogger("asyncio")
  if any(getattr(f, "_bireal_jax", False) for f in log.filters):
    return

  def keep(record):
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and record.getMessage().split("\n", 1)[0] in (
        "Task exception was never retrieved", "Future exception was never retrieved")
        and matches(exc))

  keep._bireal_jax = True
  log.addFilter(keep)


def after_reported_failure() -> None:
  """The run ends with an error already reported: silence the leftover threads' records."""
  drop_closed_loop_noise()
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "exception was never retrieved"
  logging.getLogger("absl").setLevel(logging.CRITICAL)  # Orbax's writer threads' tracebacks


def one_line_records() -> None:
  """On object storage a network error is logged by gcsfs at each retry and by Orbax's writer
  threads, each with a traceback of its connection stack; the job's own error names the URL and
  what to do. Keep those records as one line each (their message), without the tracebacks."""
  def drop_traceback(record):
    record.exc_info, record.exc_text = None, None
    return True

  for name in ("gcsfs", "absl"):  # Orbax logs through absl
    logging.getLogger(name).addFilter(drop_traceback)
