"""What train and eval share (`Setup`): data info, model, schedule, mapping, and the identity a
workdir is recorded under. Its own module so that the trainer's parts (loop, two_step) take it
without importing each other."""
from __future__ import annotations

import jax

from bireal_jax import models, optim
from bireal_jax import config as config_lib
from bireal_jax.train.data import get_data
from bireal_jax.train.mapping import Mapping
from bireal_jax.train.steps import TrainState, create_model, create_train_state


def identity(config, model, info) -> dict:
  """What a checkpoint depends on; a workdir refuses any run that differs here."""
  mcfg = models.to_config(model)
  for k in ("dtype", "axis_name"):  # compute dtype and mapping may change between runs
    mcfg.pop(k, None)
  return {"dataset": config.dataset, "image_shape": list(info.image_shape),
          "num_classes": int(info.num_classes), "model": mcfg}


class Setup:
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
    self.identity = identity(config, self.model, self.info)
    self.is_chief = jax.process_index() == 0
    self.check_lock = lambda: None  # raises once another job holds the workdir

  def new_state(self) -> TrainState:
    return create_train_state(self.config, self.model, self.image_shape, self.lr_fn)
