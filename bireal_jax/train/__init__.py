"""Training and evaluation of Bi-Real Nets (in the style of flax/examples/imagenet).

The per-device steps (`train_step`, `eval_step`, `bn_stats_step`) are written once, for one
device's share of the global batch, with collectives over the axis named `AXIS`. `Mapping`
runs them on every device, either with `jax.pmap` (default) or with `jax.shard_map` over a 1-D
mesh; on several hosts each process feeds its own devices (`jax.distributed`).

`train_and_evaluate(config, workdir)` is the whole job: resume or initialise (optionally from
a real-valued clip run), train with periodic evaluation and asynchronous checkpoints, stop
cleanly on SIGTERM, refuse non-finite losses, re-estimate BN statistics, evaluate, export.

One file per job:
  * `steps.py`      — the model, `TrainState`, and the per-device `train_step` (gradient
                      accumulation, label smoothing, distillation term) and `eval_step`;
  * `mapping.py`    — `Mapping` (pmap / shard_map), host <-> device layouts, `prefetch`;
  * `setup.py`      — `Setup` (data info, model, schedule, mapping) and the workdir `identity`;
  * `loop.py`       — the job: `train_and_evaluate` (resume, the loop, periodic eval,
                      checkpoints, non-finite losses, export) and `evaluate_checkpoint`;
  * `two_step.py`   — two-step training (`init_from_checkpoint`) and BN re-estimation
                      (`bn_stats_step`, `reestimate_batch_stats`);
  * `distill.py`    — knowledge distillation: `distillation_loss`, `load_teacher`;
  * `data.py`       — `SyntheticData`, and `get_data` (the real pipeline, imported lazily);
  * `metrics.py`    — `MetricLog`: metrics.jsonl and TensorBoard scalars;
  * `preemption.py` — SIGTERM / the multi-host preemption sync point;
  * `launch.py`     — the command line's job: checks before any work, several hosts, the
                      workdir lock, the dry run, and which errors are one line (`run`).
"""
from bireal_jax.train.data import SyntheticData, get_data
from bireal_jax.train.distill import distillation_loss, load_teacher
from bireal_jax.train.setup import Setup, identity
from bireal_jax.train.loop import (TrainingDiverged, evaluate,
                                   evaluate_checkpoint, train_and_evaluate)
from bireal_jax.train.mapping import Mapping, prefetch
from bireal_jax.train.metrics import MetricLog, read_metrics
from bireal_jax.train.steps import (AXIS, TrainState, create_model, create_train_state,
                                    eval_step, init_key, initialized, metric_sums, train_step)
from bireal_jax.train.two_step import (bn_stats_step, init_from_checkpoint,
                                       reestimate_batch_stats)

__all__ = ["AXIS", "TrainState", "TrainingDiverged", "create_model", "initialized", "init_key",
           "create_train_state", "metric_sums", "train_step", "eval_step", "bn_stats_step",
           "Mapping", "prefetch", "SyntheticData", "get_data", "MetricLog", "read_metrics",
           "init_from_checkpoint", "reestimate_batch_stats", "distillation_loss",
           "load_teacher", "train_and_evaluate", "evaluate", "evaluate_checkpoint", "Setup",
           "identity"]
