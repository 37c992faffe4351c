"""Logging: metrics.jsonl and TensorBoard scalars in the workdir.

A local workdir gets one `metrics.jsonl`, a line appended per record. Object storage cannot
append, and rewriting a growing object at every step costs a whole upload per step, so a URL
workdir gets `metrics/<first step>-<time>-<pid>.jsonl`, one object per flush: records are
buffered and written every `FLUSH_EVERY_S` seconds, at each eval record and at the end (as
MaxText does); TensorBoard's event file is flushed at the same times. `read_metrics(workdir)`
reads either layout, in order.
"""
from __future__ import annotations

import json
import logging
import os
import time

from bireal_jax import storage

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
METRICS_DIR = "metrics"  # object storage: one object per flush
FLUSH_EVERY_S = 60.0


class MetricLog:
  """metrics.jsonl (or metrics/ on object storage) + TensorBoard scalars (process 0 only).

  TensorBoard event files are written by tensorboardX (no TensorFlow needed to train)."""

  def __init__(self, workdir: str, enabled: bool, tensorboard: bool):
    self.enabled = enabled
    self.workdir = workdir
    self.buffered = storage.is_url(workdir)
    self.path = storage.join(workdir, METRICS_DIR if self.buffered else METRICS_FILE)
    self._buffer: list[dict] = []
    self._last_flush = time.time()
    if enabled and not self.buffered:  # once, not at every record
      storage.makedirs(workdir)
    self.tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(storage.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: dict):
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time(),
              **{k: float(v) for k, v in values.items()}}
    if self.buffered:
      self._buffer.append(record)
      if split != "train" or time.time() - self._last_flush >= FLUSH_EVERY_S:
        self.flush()
    else:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        if k != "epoch":
          self.tb.add_scalar(f"{split}/{k}", float(v), int(step))
      if not self.buffered:
        self.tb.flush()

  def flush(self):
    """Object storage: write the buffered records as one new object, and the TensorBoard
    events (tensorboardX uploads its event file whole: at this cadence, not every write)."""
    self._last_flush = time.time()
    if self.tb is not None:
      self.tb.flush()
    if not self._buffer:
      return
    first = self._buffer[0]
    name = storage.join(self.path, f"{first['step']:012d}-{int(first['time'] * 1000):015d}-"
                                   f"{os.getpid()}.jsonl")
    try:
      storage.write_text(name, "".join(json.dumps(r) + "\n" for r in self._buffer))
    except Exception as e:  # noqa: BLE001 - the records stay buffered for the next flush
      if storage.is_transient(e):
        raise storage.StorageUnavailable(
            f"writing metrics to {name} failed: the storage could not be reached "
            f"({type(e).__name__}: {storage.short(e, 200)})") from e
      raise
    self._buffer = []

  def close(self, flush: bool = True):
    """Flush and close. Records that cannot be written at the end (storage unreachable, or
    `flush=False` when the job already knows it is) are printed, so that the job's log keeps
    them, instead of hiding the error that ends the run."""
    try:
      if self.buffered and self.enabled:
        if flush:
          self.flush()
        elif self._buffer:
          self._print_unwritten("the storage did not answer earlier in this run")
    except Exception as e:  # noqa: BLE001 - reported, and the records kept in the log
      self._print_unwritten(f"{type(e).__name__}: {storage.short(e, 200)}")
    finally:
      if self.tb is not None and flush:  # tensorboardX uploads its event file on close
        self.tb.close()

  def _print_unwritten(self, reason: str):
    log.warning("could not write %d metric record(s) to %s (%s); they follow on stdout",
                len(self._buffer), self.path, reason)
    for r in self._buffer:
      print(json.dumps(r), flush=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  """Every record a run logged in `workdir` (local metrics.jsonl or the objects of metrics/),
  in the order written."""
  records = []
  local = storage.join(workdir, METRICS_FILE)
  if storage.exists(local):
    records += [json.loads(l) for l in storage.read_text(local).splitlines() if l.strip()]
  folder = storage.join(workdir, METRICS_DIR)
  for name in storage.listdir(folder):
    text = storage.read_text(storage.join(folder, name))
    records += [json.loads(l) for l in text.splitlines() if l.strip()]
  records.sort(key=lambda r: r["time"])
  return records
