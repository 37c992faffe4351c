"""Training and evaluation of Bi-Real Nets (in the style of flax/examples/imagenet).

The per-device steps (`train_step`, `eval_step`, `bn_stats_step`) are written once, for one
device's share of the global batch, with collectives over the axis named `AXIS`. `Mapping`
runs them on every device, either with `jax.pmap` (default) or with `jax.shard_map` over a 1-D
mesh; on several hosts each process feeds its own devices (`jax.distributed`).

`train_and_evaluate(config, workdir)` is the whole job: resume or initialise (optionally from
a real-valued clip run), train with periodic evaluation and asynchronous checkpoints, stop
cleanly on SIGTERM, refuse non-finite losses, re-estimate BN statistics, evaluate, export.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bireal_jax import checkpoint, models, ops, optim
from bireal_jax import config as config_lib

AXIS = "batch"


class TrainState(train_state.TrainState):
  batch_stats: Any


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Model and state
# ---------------------------------------------------------------------------------------------


def create_model(config, num_classes: int, axis_name: Optional[str] = AXIS):
  return models.get(config.model, num_classes=num_classes, axis_name=axis_name,
                    **config_lib.model_overrides(config))


def initialized(key, image_shape, model):
  """Variables {'params', 'batch_stats'} of `model` for images of `image_shape` (H, W, C)."""
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape), jnp.float32), train=False))
  return init(key)


def init_key(seed: int):
  """Key for parameter init. "rbg" (XLA's RngBitGenerator) because the jitted init then
  compiles several times faster on CPU than with threefry; it is just as deterministic."""
  return jax.random.key(seed, impl="rbg")


def create_train_state(config, model, image_shape, learning_rate_fn) -> TrainState:
  variables = initialized(init_key(config.seed), image_shape, model)
  tx = optim.create_optimizer(config, learning_rate_fn, model, variables["params"], image_shape)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables["batch_stats"])
  # Every leaf an array (TrainState.create leaves `step` a Python int) so it checkpoints as one.
  return jax.tree.map(jnp.asarray, state)


# ---------------------------------------------------------------------------------------------
# Per-device steps (run under `AXIS`)
# ---------------------------------------------------------------------------------------------


def metric_sums(logits, labels, loss_per_example, mask):
  """Sums over this device's examples: loss, top-1/top-5 hits and the example count."""
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  hit = topk == labels[:, None]
  return {"loss": jnp.sum(loss_per_example * mask),
          "top1": jnp.sum(hit[:, 0] * mask),
          "top5": jnp.sum(jnp.any(hit, axis=-1) * mask),
          "count": jnp.sum(mask)}


def distillation_loss(student_logits, teacher_logits, temperature: float):
  """Hinton et al.'s soft-label term per example: T² · KL(softmax(t/T) ‖ softmax(s/T)).

  The T² factor keeps its gradient scale independent of T. The teacher is a constant here.
  """
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  kl = optax.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t))
  return temperature ** 2 * kl


def train_step(state: TrainState, batch, teacher_variables=None, *, learning_rate_fn,
               label_smoothing: float, grad_accum_steps: int, teacher_apply=None,
               distill_weight: float = 0.0, distill_temperature: float = 1.0,
               scan_micro_batches: Optional[bool] = None):
  """One optimizer update from this device's share of the global batch.

  The share is split into `grad_accum_steps` micro-batches whose gradients are summed (BN
  statistics update after each micro-batch, as in successive forward passes), in a `lax.scan`
  (`scan_micro_batches`; default: off the CPU) or an unrolled loop. Gradients and
  metrics are averaged over all devices with `pmean`/`psum`; the model's BatchNorm averages
  its batch statistics over `AXIS` itself, so every replica holds identical state.

  With a teacher (`teacher_apply`, `teacher_variables`), the loss per example is
  (1 - w)·CE(smoothed labels) + w·`distillation_loss` with the teacher's eval-mode logits.
  """
  def loss_fn(params, batch_stats, images, labels):
    logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    if teacher_apply is not None:
      teacher_logits = teacher_apply(teacher_variables, images, train=False)
      per_example = ((1.0 - distill_weight) * per_example + distill_weight *
                     distillation_loss(logits, teacher_logits, distill_temperature))
    return per_example.mean(), (logits, per_example, updates["batch_stats"])

  def micro_step(carry, micro):
    grads, batch_stats = carry
    (_, (logits, per_example, batch_stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch_stats, micro["image"], micro["label"])
    grads = jax.tree.map(jnp.add, grads, g)
    mask = jnp.ones_like(per_example)
    return (grads, batch_stats), metric_sums(logits, micro["label"], per_example, mask)

  micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)
  carry = (jax.tree.map(jnp.zeros_like, state.params), state.batch_stats)
  if scan_micro_batches is None:
    scan_micro_batches = jax.default_backend() != "cpu"
  if grad_accum_steps == 1 or not scan_micro_batches:
    # Unrolled on the CPU: XLA:CPU ran the same body inside lax.scan ~25x slower.
    sums = []
    for i in range(grad_accum_steps):
      carry, s = micro_step(carry, jax.tree.map(lambda x: x[i], micro))
      sums.append(s)
    sums = jax.tree.map(lambda *x: sum(x), *sums)
  else:  # one compiled body whatever grad_accum_steps is (compile time stays flat)
    carry, sums = jax.lax.scan(micro_step, carry, micro)
    sums = jax.tree.map(lambda x: x.sum(0), sums)
  grads, batch_stats = carry
  grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
  grads = jax.lax.pmean(grads, axis_name=AXIS)
  sums = jax.lax.psum(sums, axis_name=AXIS)

  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {"loss": sums["loss"] / sums["count"], "top1": sums["top1"] / sums["count"],
             "top5": sums["top5"] / sums["count"],
             "learning_rate": learning_rate_fn(state.step)}
  return new_state, metrics


def eval_step(state: TrainState, batch):
  """Metric sums of one eval batch over all devices; padded examples (mask 0) count nothing."""
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          batch["image"], train=False)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return jax.lax.psum(metric_sums(logits, batch["label"], per_example, batch["mask"]), AXIS)


def bn_stats_step(stats_sum, state: TrainState, batch, *, apply_fn):
  """Add this batch's BN statistics (train-mode forward, ±1 weights) to a running sum.

  `apply_fn` is the model with `bn_momentum=0`, so the returned "running" statistics are
  exactly the (cross-device) batch statistics; their mean over batches is the estimate.
  """
  _, updates = apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        batch["image"], train=True, mutable=["batch_stats"])
  return jax.tree.map(jnp.add, stats_sum, updates["batch_stats"])


# ---------------------------------------------------------------------------------------------
# Mapping a per-device step over devices
# ---------------------------------------------------------------------------------------------


class Mapping:
  """Runs per-device functions on all devices with `jax.pmap` or `jax.shard_map`.

  Host-side layout is the same for both: a replicated PyTree (state) and a per-process batch
  whose leading axis is split over this process's devices. `global_state`/`from_global`
  convert between the mapped state and fully replicated global arrays (what checkpoints hold).
  """

  def __init__(self, kind: str, devices=None):
    if kind not in ("pmap", "shard_map"):
      raise ValueError(f"config.mapping={kind!r}: expected 'pmap' or 'shard_map'")
    self.kind = kind
    devices = list(jax.devices() if devices is None else devices)
    self.devices = devices
    self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(AXIS))
    self._local_mesh = Mesh(np.array(self.local_devices), (AXIS,))

  def map(self, fn: Callable, batched: tuple[bool, ...], donate: tuple[int, ...] = (),
          compiler_options: Optional[dict] = None):
    """Map `fn`; `batched[i]` says whether argument i is split over devices or replicated.

    Outputs are replicated (every per-device function here ends in a collective).
    `compiler_options` are XLA options for this function only (e.g.
    `ops.compiler_options()` for the train step).
    """
    if self.kind == "pmap":
      # All devices of all processes: pmap's collectives then span every host.
      mapped = jax.pmap(fn, axis_name=AXIS, donate_argnums=donate, devices=self.devices)
      # AOT lowering of a multi-process pmap takes global shapes while calls pass local ones,
      # so there the options are skipped (set them through XLA_FLAGS instead).
      if compiler_options and jax.process_count() == 1:
        return _CompiledWith(mapped, compiler_options)
      return mapped
    in_specs = tuple(P(AXIS) if b else P() for b in batched)
    # check_vma=False gives pmap's semantics: a gradient w.r.t. replicated params stays
    # per-device (with the checker on, JAX would psum it implicitly and the step's own pmean
    # would then average a sum), so the one step function means the same under both mappings.
    return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=P(),
                                 check_vma=False), donate_argnums=donate,
                   compiler_options=compiler_options or None)

  def put_replicated(self, tree):
    """Host (or global replicated) values → the mapped functions' replicated layout."""
    tree = jax.tree.map(_local_value, tree)
    if self.kind == "pmap":
      # Same mesh axis name as pmap's own outputs: a different sharding on the first call
      # would make pmap compile the step a second time.
      return flax.jax_utils.replicate(tree, self.local_devices, axis_name=AXIS)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, x), tree)

  def put_batch(self, batch, micro_batches: int = 1):
    """This process's batch → split over its devices (and, for shard_map, the global array).

    With `micro_batches` k > 1 the examples are reordered so that micro-batch j of every device
    holds its share of the j-th contiguous chunk of the process batch: accumulation then sees
    the same micro-batches whatever the number of local devices.
    """
    n = len(self.local_devices)
    if micro_batches > 1:
      batch = jax.tree.map(lambda x: np.reshape(np.swapaxes(
          np.reshape(x, (micro_batches, n, -1, *np.shape(x)[1:])), 0, 1), np.shape(x)), batch)
    if self.kind == "pmap":
      sharding = NamedSharding(self._local_mesh, P(AXIS))
      return jax.tree.map(
          lambda x: jax.device_put(np.reshape(x, (n, -1, *np.shape(x)[1:])), sharding), batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, x),
                        batch)

  def to_host(self, tree):
    """Replicated outputs → numpy values (one replica)."""
    if self.kind == "pmap":
      return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)
    return jax.tree.map(_local_value, tree)

  def global_state(self, tree):
    """Mapped state → fully replicated global arrays for checkpointing."""
    if self.kind == "shard_map":
      return tree
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.replicated, x),
                        self.to_host(tree))

  def abstract(self, tree):
    """ShapeDtypeStructs (replicated on the global mesh) describing `tree`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                       sharding=self.replicated), tree)


class _CompiledWith:
  """A pmapped function compiled ahead of time with XLA `options` (`jax.pmap` takes none).

  One executable per distinct argument signature (tree structure, shapes, dtypes), as jit's
  own cache would keep.
  """

  def __init__(self, mapped: Callable, options: dict):
    self._mapped, self._options, self._cache = mapped, dict(options), {}

  def __call__(self, *args):
    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
    if key not in self._cache:
      self._cache[key] = self._mapped.lower(*args).compile(compiler_options=self._options)
    return self._cache[key](*args)


def _local_value(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def prefetch(iterator: Iterator, put: Callable, size: int) -> Iterator:
  """Keep `size` batches already transferred to the devices (flax's prefetch_to_device idea)."""
  queue = collections.deque()
  for item in itertools.islice(iterator, max(size, 1)):
    queue.append(put(item))
  while queue:
    yield queue.popleft()
    for item in itertools.islice(iterator, 1):
      queue.append(put(item))


# ---------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------


class SyntheticData:
  """Deterministic in-memory data with the `bireal_jax.input_pipeline` interface.

  For smoke tests and throughput measurements without a dataset (`config.dataset =
  "synthetic"`): each image is its class's fixed random pattern plus noise, so a model can
  learn it. The global batch of step k is a pure function of (seed, k), and a process gets its
  slice of it, so any process/device split sees the same global batches.
  """

  NUM_CLASSES = 10
  NUM_TRAIN = 2048
  NUM_EVAL = 200

  @classmethod
  def dataset_info(cls, config):
    from types import SimpleNamespace
    s = config.image_size
    return SimpleNamespace(num_classes=cls.NUM_CLASSES, image_shape=(s, s, 3),
                           num_train=cls.NUM_TRAIN, num_eval=cls.NUM_EVAL,
                           eval_split=config.eval_split)

  @classmethod
  def _examples(cls, config, key, n):
    s = config.image_size
    protos = np.random.default_rng(1234).normal(
        size=(cls.NUM_CLASSES, s, s, 3)).astype(np.float32)
    rng = np.random.default_rng(key)
    labels = rng.integers(0, cls.NUM_CLASSES, n).astype(np.int32)
    images = protos[labels] + rng.normal(size=(n, s, s, 3)).astype(np.float32)
    return images.astype(np.float32), labels

  @classmethod
  def create_train_iter(cls, config, *, batch_size, seed, start_step=0, process_index=None,
                        process_count=None):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    for step in itertools.count(start_step):
      images, labels = cls._examples(config, [seed, step], batch_size * pc)
      sl = slice(pi * batch_size, (pi + 1) * batch_size)
      yield {"image": images[sl], "label": labels[sl]}

  @classmethod
  def create_eval_iter(cls, config, *, batch_size, split=None, process_index=None,
                       process_count=None):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    images, labels = cls._examples(config, [999], cls.NUM_EVAL)
    per_step = batch_size * pc
    for start in range(0, cls.NUM_EVAL, per_step):
      idx = np.arange(start, start + per_step)[pi * batch_size:(pi + 1) * batch_size]
      mask = (idx < cls.NUM_EVAL).astype(np.float32)
      idx = np.minimum(idx, cls.NUM_EVAL - 1)
      yield {"image": images[idx], "label": labels[idx], "mask": mask}


def get_data(config):
  """The data source for `config.dataset` (module or object with the pipeline interface)."""
  if config.dataset == "synthetic":
    return SyntheticData
  from bireal_jax import input_pipeline  # imports TensorFlow: only when real data is needed
  return input_pipeline


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


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


class _Preemption:
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


def _say(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


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


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _identity(config, model, info) -> dict:
  """What a checkpoint depends on; a workdir refuses any run that differs here."""
  mcfg = models.to_config(model)
  for k in ("dtype", "axis_name"):  # compute dtype and mapping may change between runs
    mcfg.pop(k, None)
  return {"dataset": config.dataset, "image_shape": list(info.image_shape),
          "num_classes": int(info.num_classes), "model": mcfg}


class _Setup:
  """Everything train and eval share: data info, model, schedule, mapped steps."""

  def __init__(self, config, workdir: str, data):
    self.config = config
    self.workdir = workdir
    self.data = data or get_data(config)
    config_lib.validate(config, device_count=jax.device_count(),
                        process_count=jax.process_count())
    self.info = self.data.dataset_info(config)
    self.image_shape = tuple(int(s) for s in self.info.image_shape)
    self.model = create_model(config, int(self.info.num_classes))
    self.steps_per_epoch, self.total_steps = optim.total_train_steps(config,
                                                                     self.info.num_train)
    self.lr_fn = optim.create_learning_rate_fn(config, self.steps_per_epoch, self.total_steps)
    self.mapping = Mapping(config.mapping)
    self.identity = _identity(config, self.model, self.info)
    self.is_chief = jax.process_index() == 0

  def new_state(self) -> TrainState:
    return create_train_state(self.config, self.model, self.image_shape, self.lr_fn)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data=None) -> dict:
  """Train (resuming from `workdir` if it holds checkpoints); returns the final eval metrics.

  Returns {"preempted": True, "step": n} instead when SIGTERM stopped the run.
  """
  s = _Setup(config, workdir, data)
  checkpoint.check_workdir(workdir, s.identity, config.to_dict(), write=s.is_chief)
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, checkpoint.CHECKPOINT_DIR),
                                 keep=config.keep_checkpoints,
                                 every_steps=config.checkpoint_every_steps,
                                 async_save=config.async_checkpointing)
  mlog = MetricLog(workdir, s.is_chief, config.tensorboard)
  try:
    with _ops_setting(config):
      return _train(s, ckpts, mlog)
  finally:
    ckpts.close()
    mlog.close()


def _ops_setting(config):
  """`ops.implementation(config.ops)`, or nothing when it is unset (BIREAL_OPS, else auto)."""
  return ops.implementation(config.ops) if config.get("ops") else contextlib.nullcontext()


def _train(s: _Setup, ckpts: checkpoint.Checkpoints, mlog: MetricLog) -> dict:
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
  step = int(meta["step"]) if restored is not None else int(_local_value(state.step))
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
    with _Preemption(single_process=pc == 1) as preemption:
      while step < s.total_steps:
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
    from bireal_jax import export
    ckpts.wait()
    host = mapping.to_host(pstate)
    export.save_inference(os.path.join(s.workdir, "inference"), s.model,
                          {"params": host.params, "batch_stats": host.batch_stats})
    _say(f"Exported inference checkpoint to {os.path.join(s.workdir, 'inference')}")
  return {**ev, "step": step}


def _pct(ev: dict) -> dict:
  return {k: ev[k] for k in ("loss", "top1", "top5")}


def reestimate_batch_stats(s: _Setup, pstate, num_steps: int, start_step: int):
  """Replace BN running statistics by their mean over `num_steps` training batches."""
  config, mapping = s.config, s.mapping
  frozen_bn = s.model.clone(bn_momentum=0.0)
  p_bn_step = mapping.map(functools.partial(bn_stats_step, apply_fn=frozen_bn.apply),
                          batched=(False, False, True))
  it = s.data.create_train_iter(config, batch_size=config.batch_size // jax.process_count(),
                                seed=config.seed + 1, start_step=start_step,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  zeros = jax.tree.map(np.zeros_like, mapping.to_host(pstate.batch_stats))
  total = mapping.put_replicated(zeros)
  for batch in prefetch(itertools.islice(it, num_steps), mapping.put_batch, config.prefetch):
    total = p_bn_step(total, pstate, batch)
  stats = jax.tree.map(lambda x: x / num_steps, mapping.to_host(total))
  return pstate.replace(batch_stats=mapping.put_replicated(stats))


def init_from_checkpoint(state: TrainState, path: str, mapping: Mapping) -> TrainState:
  """Two-step training: copy params and batch_stats of another run (e.g. the clip twin)."""
  abstract = mapping.abstract({"params": state.params, "batch_stats": state.batch_stats})
  directory = checkpoint.find_checkpoint_dir(path)
  restored, _ = checkpoint.restore_subtrees(directory, abstract)
  return state.replace(params=restored["params"], batch_stats=restored["batch_stats"])


def load_teacher(path: str, student_identity: dict):
  """Knowledge distillation: the teacher model and its variables from a finished run's workdir.

  The teacher is rebuilt from the model description its run stored in `config.json`; it must
  see the same dataset, image shape and classes as the student.
  """
  cfg_path = os.path.join(path, checkpoint.CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise checkpoint.CheckpointError(
        f"config.distill_from={path!r}: expected the workdir of a training run (with "
        f"{checkpoint.CONFIG_FILE} and {checkpoint.CHECKPOINT_DIR}/), found no {cfg_path}")
  with open(cfg_path) as f:
    identity = json.load(f)["identity"]
  for k in ("dataset", "image_shape", "num_classes"):
    if identity[k] != student_identity[k]:
      raise checkpoint.CheckpointError(
          f"config.distill_from={path!r}: the teacher was trained with {k}={identity[k]!r}, "
          f"the student uses {k}={student_identity[k]!r}")
  teacher = models.from_config({**identity["model"], "axis_name": None})
  abstract = jax.eval_shape(
      lambda: teacher.init(jax.random.key(0), jnp.zeros((1, *identity["image_shape"]),
                                                          jnp.float32), train=False))
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # every process reads it all
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
                          dict(abstract))
  variables, _ = checkpoint.restore_subtrees(
      os.path.join(path, checkpoint.CHECKPOINT_DIR), abstract)
  return teacher, jax.tree.map(np.asarray, variables)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, data=None,
                        split: Optional[str] = None) -> dict:
  """Eval-only mode: top-1/top-5 of the newest checkpoint in `workdir` on `split`."""
  with _ops_setting(config):
    return _evaluate_checkpoint(config, workdir, data, split)


def _evaluate_checkpoint(config, workdir, data, split):
  s = _Setup(config, workdir, data)
  checkpoint.check_workdir(workdir, s.identity, config.to_dict(), write=False)
  split = split or config.eval_split
  state = s.new_state()
  directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise checkpoint.CheckpointError(f"no checkpoint in workdir {workdir!r}: expected "
                                     f"{directory}/<step>/ from a training run")
  variables, step = checkpoint.restore_subtrees(
      directory, s.mapping.abstract({"params": state.params, "batch_stats": state.batch_stats}))
  state = state.replace(**variables)
  p_eval_step = s.mapping.map(eval_step, batched=(False, True))
  ev = evaluate(config, s.data, s.mapping, p_eval_step, s.mapping.put_replicated(state), split)
  MetricLog(workdir, s.is_chief, False).write(step, f"eval_only/{split}", _pct(ev))
  _say(f"Evaluation of {workdir} (step {step}, {config.model}) on {split}, "
       f"{int(ev['count'])} images: top-1 {100 * ev['top1']:.2f}%, "
       f"top-5 {100 * ev['top5']:.2f}%, loss {ev['loss']:.4f}")
  return {**ev, "step": step}
