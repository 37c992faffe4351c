"""TensorFlow for the input pipelines, with the GPUs and TPUs hidden from it on import, so tf.data
never takes accelerator memory from JAX. Every module of bireal_jax.data gets `tf` and `tfds`
from here."""
import logging

import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError:  # TF was initialised before this module was imported
      logging.warning("bireal_jax.data: TensorFlow already initialised; could not hide its %s "
                      "devices (import bireal_jax.data before using TensorFlow)", kind)


_hide_accelerators_from_tf()

import tensorflow_datasets as tfds  # noqa: E402  (after the devices are hidden)
