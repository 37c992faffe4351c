"""Logging: metrics.jsonl and TensorBoard scalars in the workdir."""
from __future__ import annotations

import json
import os
import time


class MetricLog:
  """metrics.jsonl + TensorBoard scalars in the workdir (process 0 only).

  TensorBoard event files are written by tensorboardX (no TensorFlow needed to train)."""

  def __init__(self, workdir: str, enabled: bool, tensorboard: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: dict):
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time(),
              **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        if k != "epoch":
          self.tb.add_scalar(f"{split}/{k}", float(v), int(step))
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()
