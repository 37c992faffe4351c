"""Knowledge distillation: the soft-label loss term and the teacher loaded from a finished run."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bireal_jax import checkpoint, models, storage


def distillation_loss(student_logits, teacher_logits, temperature: float):
  """Hinton et al.'s soft-label term per example: T² · KL(softmax(t/T) ‖ softmax(s/T)).

  The T² factor keeps its gradient scale independent of T. The teacher is a constant here.
  """
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  kl = optax.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t))
  return temperature ** 2 * kl


def load_teacher(path: str, student_identity: dict):
  """Knowledge distillation: the teacher model and its variables from a finished run's workdir.

  The teacher is rebuilt from the model description its run stored in `config.json`; it must
  see the same dataset, image shape and classes as the student.
  """
  cfg_path = storage.join(path, checkpoint.CONFIG_FILE)
  if not storage.exists(cfg_path):
    raise checkpoint.CheckpointError(
        f"config.distill_from={path!r}: expected the workdir of a training run (with "
        f"{checkpoint.CONFIG_FILE} and {checkpoint.CHECKPOINT_DIR}/), found no {cfg_path}")
  identity = json.loads(storage.read_text(cfg_path))["identity"]
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
      storage.join(path, checkpoint.CHECKPOINT_DIR), abstract)
  return teacher, jax.tree.map(np.asarray, variables)
