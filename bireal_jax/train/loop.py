"""The job: `train_and_evaluate(config, workdir)` resumes or initialises (optionally from a
real-valued clip run), trains with periodic evaluation and asynchronous checkpoints, stops
cleanly on SIGTERM, refuses non-finite losses, re-estimates BN statistics, evaluates, exports;
`evaluate_checkpoint` is the eval-only mode.
"""
from __future__ import annotations

import collections
import functools
import itertools
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bireal_jax import checkpoint, ops, storage
from bireal_jax.train.distill import load_teacher
from bireal_jax.train.mapping import Mapping, local_value, prefetch
from bireal_jax.train.metrics import MetricLog
from bireal_jax.train.preemption import Preemption
from bireal_jax.train.setup import Setup
from bireal_jax.train.steps import eval_step, train_step
from bireal_jax.train.two_step import init_from_checkpoint, reestimate_batch_stats


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data=None,
                       lock=None) -> dict:
  """Train (resuming from `workdir` if it holds checkpoints); returns the final eval metrics.

  `workdir` is a local path or a URL (gs://...). `lock` (from `workdir_lock.acquire`) is
  checked at every step: once another job holds the workdir, `WorkdirLockLost` stops the run.
  Returns {"preempted": True, "step": n} instead when SIGTERM stopped the run.
  """
  s = Setup(config, workdir, data)
  checkpoint.check_workdir(workdir, s.identity, config.to_dict(), write=s.is_chief)
  ckpts = checkpoint.Checkpoints(storage.join(workdir, checkpoint.CHECKPOINT_DIR),
                                 keep=config.keep_checkpoints,
                                 every_steps=config.checkpoint_every_steps,
                                 async_save=config.async_checkpointing,
                                 io_retries=config.storage_retries,
                                 save_timeout_s=config.storage_timeout_s)
  mlog = MetricLog(workdir, s.is_chief, config.tensorboard)
  s.check_lock = lock.check if lock is not None else (lambda: None)
  unreachable = False  # the storage stopped answering: do not wait on it once more at the end
  try:
    with _ops_setting(config):
      return _train(s, ckpts, mlog)
  except (checkpoint.SaveAbandoned, storage.StorageUnavailable):
    unreachable = True
    raise
  finally:
    try:
      ckpts.close()
    finally:
      mlog.close(flush=not unreachable)


def _ops_setting(config):
  """The training job opts in to CPU tuning: `config.ops`, else BIREAL_OPS, else "auto" (the
  library itself runs `ops.DEFAULT` unless asked)."""
  return ops.implementation(config.get("ops") or os.environ.get("BIREAL_OPS") or "auto")


def _train(s: Setup, ckpts: checkpoint.Checkpoints, mlog: MetricLog) -> dict:
  config, mapping = s.config, s.mapping
  state = s.new_state()
  meta = {}
  restored = ckpts.restore(mapping.abstract(state))
  if restored is not None:
    state, meta, ckpt_step = restored
    _say(f"Resuming from checkpoint step {ckpt_step} in {ckpts.directory}")
  elif config.init_from:
    state = init_from_checkpoint(state, config.init_from, mapping)
    _say(f"Initialised params and batch_stats from {config.init_from}")
  step = int(meta["step"]) if restored is not None else int(local_value(state.step))
  pstate = mapping.put_replicated(state)
  del state

  step_fn = functools.partial(train_step, learning_rate_fn=s.lr_fn,
                              label_smoothing=config.label_smoothing,
                              grad_accum_steps=config.grad_accum_steps)
  teacher = None
  if config.distill_from:
    teacher_model, teacher_vars = load_teacher(config.distill_from, s.identity)
    teacher = mapping.put_replicated(teacher_vars)
    step_fn = functools.partial(step_fn, teacher_apply=teacher_model.apply,
                                distill_weight=config.distill_weight,
                                distill_temperature=config.distill_temperature)
    _say(f"Distilling from {config.distill_from} ({teacher_model.activation} / "
         f"{teacher_model.kernel_quantizer} teacher), weight {config.distill_weight}, "
         f"temperature {config.distill_temperature}")
  # XLA options that speed up the float-emulated backward pass (CPU only; {} elsewhere).
  p_train_step = mapping.map(step_fn, batched=(False, True, False), donate=(0,),
                             compiler_options=ops.compiler_options())
  p_eval_step = mapping.map(eval_step, batched=(False, True))

  pc, pi = jax.process_count(), jax.process_index()
  local_batch = config.batch_size // pc
  spe = s.steps_per_epoch
  eval_every = max(1, int(round(config.eval_every_epochs * spe)))
  last_saved = ckpts.latest_step()

  def save(step, pstate, force=False, **extra):
    nonlocal last_saved
    s.check_lock()  # never write a workdir another job holds
    m = {"step": step, "epoch": step / spe, **extra}
    if ckpts.save(step, mapping.global_state(pstate), m, force=force):
      last_saved = step

  bar = None
  if config.progress_bar and s.is_chief and step < s.total_steps:
    from tqdm import tqdm
    bar = tqdm(total=s.total_steps * config.batch_size, initial=step * config.batch_size,
               unit="img", unit_scale=True, dynamic_ncols=True, file=sys.stdout,
               desc=f"train {config.model}")

  pending = []  # (step, device metrics) not yet fetched: fetching every step would stall
  unbarred = collections.deque()  # device metrics of steps the progress bar has not counted

  def advance_bar(block: bool = False):
    """Counts the steps whose metrics are computed: the bar's rate is of finished work (the
    loop dispatches ahead of the devices)."""
    while unbarred and (block or all(x.is_ready() for x in jax.tree.leaves(unbarred[0]))):
      unbarred.popleft()
      bar.update(config.batch_size)

  def flush(now_step):
    """Fetch pending metrics; stop on a non-finite loss before anything gets saved."""
    nonlocal pending, t_last, n_last
    if not pending:
      return
    values = [(st, mapping.to_host(m)) for st, m in pending]
    pending = []
    if bar is not None:
      advance_bar(block=True)  # all fetched: all finished
    for st, v in values:
      if not np.isfinite(v["loss"]):
        if bar is not None:
          bar.close()
        good = f"step {last_saved}" if last_saved is not None else "none written yet"
        raise TrainingDiverged(
            f"non-finite training loss ({v['loss']}) at step {st}: stopping. The last good "
            f"checkpoint ({good}) in {ckpts.directory} is kept; lower config.learning_rate "
            f"(now {config.learning_rate}) or check the input data.")
    mean = {k: float(np.mean([v[k] for _, v in values])) for k in values[0][1]}
    dt = time.time() - t_last
    mean["images_per_sec"] = (now_step - n_last) * config.batch_size / max(dt, 1e-9)
    mean["epoch"] = now_step / spe
    t_last, n_last = time.time(), now_step
    mlog.write(now_step, "train", mean)
    if bar is not None:
      bar.set_postfix(loss=f"{mean['loss']:.3f}", top1=f"{mean['top1']:.3f}",
                      lr=f"{mean['learning_rate']:.2e}", refresh=False)

  t_last, n_last = time.time(), step
  preempted = False
  if step < s.total_steps:
    train_iter = s.data.create_train_iter(config, batch_size=local_batch, seed=config.seed,
                                          start_step=step, process_index=pi,
                                          process_count=pc)
    put = functools.partial(mapping.put_batch, micro_batches=config.grad_accum_steps)
    train_iter = prefetch(train_iter, put, config.prefetch)
    with Preemption(single_process=pc == 1) as preemption:
      while step < s.total_steps:
        s.check_lock()
        batch = next(train_iter)
        pstate, metrics = p_train_step(pstate, batch, teacher)
        step += 1
        pending.append((step, metrics))
        if bar is not None:
          unbarred.append(metrics)
          advance_bar()
        stop = preemption.requested if pc == 1 else ckpts.manager.reached_preemption(step)
        save_now = (step % config.checkpoint_every_steps == 0 and step < s.total_steps)
        if step % config.log_every_steps == 0 or save_now or stop or step % eval_every == 0:
          flush(step)
        if step % eval_every == 0 and step < s.total_steps:
          ev = evaluate(config, s.data, mapping, p_eval_step, pstate, config.eval_split)
          mlog.write(step, "eval", {**_pct(ev), "epoch": step / spe})
          _say(f"\n[step {step}, epoch {step / spe:.2f}] eval {config.eval_split}: "
               f"top-1 {100 * ev['top1']:.2f}%, top-5 {100 * ev['top5']:.2f}%, "
               f"loss {ev['loss']:.4f}")
        if save_now:
          save(step, pstate)
        if stop:
          save(step, pstate, force=True)
          ckpts.wait()
          preempted = True
          break
    flush(step)
  if bar is not None:
    bar.close()
  if preempted:
    _say(f"SIGTERM received: checkpoint saved at step {step} in {ckpts.directory}; exiting "
         f"cleanly. Run the same command again to resume.")
    return {"preempted": True, "step": step}

  if config.bn_reestimate_steps > 0 and not meta.get("bn_reestimated", False):
    pstate = reestimate_batch_stats(s, pstate, config.bn_reestimate_steps, start_step=step)
    _say(f"Re-estimated BN statistics over {config.bn_reestimate_steps} batches")
  save(step, pstate, force=True, bn_reestimated=config.bn_reestimate_steps > 0)

  ev = evaluate(config, s.data, mapping, p_eval_step, pstate, config.eval_split)
  mlog.write(step, "eval", {**_pct(ev), "epoch": step / spe})
  _say(f"Final evaluation ({config.model}, step {step}, {config.eval_split}, "
       f"{int(ev['count'])} images): top-1 {100 * ev['top1']:.2f}%, "
       f"top-5 {100 * ev['top5']:.2f}%, loss {ev['loss']:.4f}")
  if config.export_inference:
    from bireal_jax import deploy
    ckpts.wait()
    s.check_lock()
    host = mapping.to_host(pstate)
    export = storage.join(s.workdir, "inference")
    deploy.save(export, s.model, {"params": host.params, "batch_stats": host.batch_stats},
                source={"kind": "training", "workdir": s.workdir, "step": step,
                        "config": config.model}, overwrite=True)
    _say(f"Exported inference checkpoint to {export}")
  return {**ev, "step": step}


def _pct(ev: dict) -> dict:
  return {k: ev[k] for k in ("loss", "top1", "top5")}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(config, data, mapping: Mapping, p_eval_step, pstate, split: str) -> dict:
  """Top-1/top-5 and loss of the mapped state on `split` (one pass, padding masked out)."""
  local_batch = config.eval_batch_size // jax.process_count()
  it = data.create_eval_iter(config, batch_size=local_batch, split=split,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  if config.steps_per_eval > 0:
    it = itertools.islice(it, config.steps_per_eval)
  totals = None
  for batch in prefetch(it, mapping.put_batch, config.prefetch):
    sums = p_eval_step(pstate, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f"eval split {split!r} produced no batches")
  t = {k: float(v) for k, v in mapping.to_host(totals).items()}
  n = max(t["count"], 1.0)
  return {"loss": t["loss"] / n, "top1": t["top1"] / n, "top5": t["top5"] / n,
          "count": t["count"]}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, data=None,
                        split: Optional[str] = None) -> dict:
  """Eval-only mode: top-1/top-5 of the newest checkpoint in `workdir` on `split`."""
  with _ops_setting(config):
    return _evaluate_checkpoint(config, workdir, data, split)


def _evaluate_checkpoint(config, workdir, data, split):
  s = Setup(config, workdir, data)
  checkpoint.check_workdir(workdir, s.identity, config.to_dict(), write=False)
  split = split or config.eval_split
  state = s.new_state()
  directory = storage.join(workdir, checkpoint.CHECKPOINT_DIR)
  if not storage.isdir(directory):
    raise checkpoint.CheckpointError(f"no checkpoint in workdir {workdir!r}: expected "
                                     f"{directory}/<step>/ from a training run")
  variables, step = checkpoint.restore_subtrees(
      directory, s.mapping.abstract({"params": state.params, "batch_stats": state.batch_stats}))
  state = state.replace(**variables)
  p_eval_step = s.mapping.map(eval_step, batched=(False, True))
  ev = evaluate(config, s.data, s.mapping, p_eval_step, s.mapping.put_replicated(state), split)
  with MetricLog(workdir, s.is_chief, False) as mlog:
    mlog.write(step, f"eval_only/{split}", _pct(ev))
  _say(f"Evaluation of {workdir} (step {step}, {config.model}) on {split}, "
       f"{int(ev['count'])} images: top-1 {100 * ev['top1']:.2f}%, "
       f"top-5 {100 * ev['top5']:.2f}%, loss {ev['loss']:.4f}")
  return {**ev, "step": step}


def _say(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)
