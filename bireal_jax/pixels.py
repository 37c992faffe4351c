"""What the pixels of a batch mean, shared by the input pipeline (TensorFlow) and the train
steps (JAX); depends on neither.

The ImageNet pipeline sends raw RGB as uint8 (4x fewer bytes from host to device than float32,
and no float work on the host); the steps normalise such batches on the device
(`bireal_jax.train.steps.model_input`). Other pipelines send float32 that is already
normalised.
"""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_uint8(images, xp):
  """uint8 RGB [..., 3] -> float32 (x / 255 - mean) / std, with `xp` numpy or jax.numpy."""
  mean = xp.asarray(IMAGENET_MEAN, xp.float32)
  std = xp.asarray(IMAGENET_STD, xp.float32)
  return (xp.asarray(images).astype(xp.float32) / 255.0 - mean) / std
