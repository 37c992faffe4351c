"""Seeds and per-image preprocessing: stateless keys folded from (seed, process, epoch,
position), decoding by the bytes, RandomResizedCrop + flip for training and resize + centre
crop for evaluation (ImageNet; uint8 out, normalised on the device)."""
from __future__ import annotations

import math

from bireal_jax.data import resize_op
from bireal_jax.data.tf_env import tf


RRC_SCALE = (0.08, 1.0)


RRC_RATIO = (3 / 4, 4 / 3)


RRC_ATTEMPTS = 10  # as torchvision RandomResizedCrop


def base_key(seed: int, process_index: int) -> tf.Tensor:
  return tf.constant([int(seed), process_index], tf.int64)


def fold_key(key, *data):
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


SHUFFLE_STREAM, AUGMENT_STREAM = 0, 1  # streams folded into an epoch's key


def seed_tensors(key, n: int) -> list[tf.Tensor]:
  """`n` int64 seeds drawn from `key` (for tf.data's shuffle seeds), as tensors: the same values
  eagerly and inside a tf.data function."""
  draws = tf.random.stateless_uniform([n], seed=key, minval=0, maxval=2**62, dtype=tf.int64)
  return tf.unstack(draws)


def random_resized_crop_window(image_hw, key):
  """torchvision RandomResizedCrop's window (y, x, h, w) for an image of shape `image_hw`.

  Ten attempts drawn at once: area fraction ~ U(0.08, 1), log aspect ~ U(log 3/4, log 4/3); the
  first that fits wins, else the centre crop with the aspect clamped into [3/4, 4/3].
  """
  height = tf.cast(image_hw[0], tf.float32)
  width = tf.cast(image_hw[1], tf.float32)
  u = tf.random.stateless_uniform([4, RRC_ATTEMPTS], seed=key)
  area = height * width * (RRC_SCALE[0] + u[0] * (RRC_SCALE[1] - RRC_SCALE[0]))
  log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
  ratio = tf.exp(log_lo + u[1] * (log_hi - log_lo))
  w = tf.round(tf.sqrt(area * ratio))
  h = tf.round(tf.sqrt(area / ratio))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  y = tf.floor(u[2] * (height - h + 1))
  x = tf.floor(u[3] * (width - w + 1))
  k = tf.argmax(tf.cast(fits, tf.int32))  # first fitting attempt (0 when none fits)
  in_ratio = width / height
  fb_w = tf.where(in_ratio > RRC_RATIO[1], tf.round(height * RRC_RATIO[1]), width)  # too wide
  fb_h = tf.where(in_ratio < RRC_RATIO[0], tf.round(width / RRC_RATIO[0]), height)  # too tall
  ok = tf.reduce_any(fits)
  window = tf.where(ok, tf.stack([y[k], x[k], h[k], w[k]]),
                    tf.stack([tf.floor((height - fb_h) / 2), tf.floor((width - fb_w) / 2),
                              fb_h, fb_w]))
  return tf.cast(window, tf.int32)


def is_jpeg(encoded):
  return tf.equal(tf.strings.substr(encoded, 0, 3), b"\xff\xd8\xff")  # SOI + first marker


def _decode_other(encoded):
  """A non-JPEG image (PNG, GIF: first frame, BMP, WebP) -> uint8 [H, W, 3]."""
  x = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  x.set_shape([None, None, 3])
  return x


def decode_rgb(encoded, ratio: int = 1):
  """Encoded image -> uint8 [H, W, 3], by its bytes (a PNG named .JPEG decodes as PNG).

  Grayscale and CMYK JPEGs come out RGB. `ratio` (1, 2, 4, 8) scales JPEGs down while decoding.
  """
  return tf.cond(is_jpeg(encoded),
                 lambda: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio),
                 lambda: _decode_other(encoded))


_DCT_RATIOS = (1, 2, 4)  # JPEG decode scales used (1/8 would need windows of 8x the output)


def _resize_region(image, top, left, height, width, out_hw):
  """Bilinear antialiased resize of the region (top, left, height, width) of `image` (float
  coordinates in its pixels) to `out_hw`: uint8 [out_h, out_w, 3].

  The compiled op of `resize_op` (uint8 in and out, equal to the rounded float result) where it
  could be built; else one ScaleAndTranslate, the kernel tf.image.resize(antialias=True) runs,
  computing only the output pixels (its float32 kernel is faster than its uint8 one, cast
  included), rounded. Without the op, when the region is the whole image and neither side
  shrinks (a small RandomResizedCrop window), the triangle kernel is plain bilinear
  interpolation and ResizeBilinear (half-pixel centres), ~3x faster than ScaleAndTranslate,
  gives the same values but for float rounding (the op is faster still).
  """
  out_h, out_w = out_hw
  op = resize_op.resize_region_op()
  if op is not None:  # faster than ResizeBilinear as well (docs/speed.md), and exact
    x = op(image, tf.stack([top, left, height, width]), tf.stack([out_h, out_w]))
    x.set_shape([None, None, 3])
    return x

  fh, fw = tf.cast(out_h, tf.float32), tf.cast(out_w, tf.float32)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)

  def to_uint8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

  def antialiased():
    scale = tf.stack([fh / height, fw / width])
    return to_uint8(tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(image, tf.float32)[None], size=tf.stack([out_h, out_w]), scale=scale,
        translation=-tf.stack([top, left]) * scale, kernel_type="triangle",
        antialias=True)[0])

  def bilinear():
    return to_uint8(tf.raw_ops.ResizeBilinear(images=image[None], size=tf.stack([out_h, out_w]),
                                              half_pixel_centers=True)[0])

  whole_upsampled = ((top == 0.0) & (left == 0.0) & (height == shape[0]) & (width == shape[1])
                     & (height <= fh) & (width <= fw))
  return tf.cond(whole_upsampled, bilinear, antialiased)


def _decode_region(encoded, box, out_hw, margin: bool):
  """Encoded image -> its region `box` = (y, x, h, w) (float, original pixels) resized to
  `out_hw`, uint8 [out_h, out_w, 3].

  JPEGs decode only the rows and columns the resize reads (decode_and_crop_jpeg), at the DCT
  scale 1/r (r in 1, 2, 4) when the region is at least r times the output in both sides: the
  decoder's own downscale then does what the antialiased resize would (pixels differ slightly:
  tests/test_imagenet_pipeline.py states by how much). `margin`: also decode the pixels around
  the region that the resize kernel reaches (a resize of the whole image, then a crop, as eval);
  without, the region's edge is the image's edge (a resize of the crop, as RandomResizedCrop).
  Other images (PNG, ...) decode whole, then are cut.
  """
  y, x, h, w = [tf.cast(v, tf.float32) for v in box]
  out_h, out_w = [tf.cast(v, tf.float32) for v in out_hw]
  # The triangle kernel reaches max(1, source/output) source pixels on each side.
  my = tf.maximum(1.0, h / out_h) + 1.0 if margin else 0.0
  mx = tf.maximum(1.0, w / out_w) + 1.0 if margin else 0.0

  def cut(full_hw, r: int):
    """(y0, x0, y1, x1): the window to decode, in pixels of the image decoded at 1/r."""
    rh = tf.math.ceil(tf.cast(full_hw[0], tf.float32) / r)
    rw = tf.math.ceil(tf.cast(full_hw[1], tf.float32) / r)
    y0 = tf.clip_by_value(tf.floor((y - my) / r), 0.0, rh - 1)
    x0 = tf.clip_by_value(tf.floor((x - mx) / r), 0.0, rw - 1)
    y1 = tf.clip_by_value(tf.math.ceil((y + h + my) / r), y0 + 1, rh)
    x1 = tf.clip_by_value(tf.math.ceil((x + w + mx) / r), x0 + 1, rw)
    return y0, x0, y1, x1

  def jpeg():
    full_hw = tf.image.extract_jpeg_shape(encoded)[:2]
    fits = [tf.logical_and(h >= r * out_h, w >= r * out_w) for r in _DCT_RATIOS]
    pick = tf.reduce_sum(tf.cast(tf.stack(fits[1:]), tf.int32))  # ratios are nested

    def branch(r):
      def fn():
        y0, x0, y1, x1 = cut(full_hw, r)
        window = tf.cast(tf.stack([y0, x0, y1 - y0, x1 - x0]), tf.int32)
        crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, ratio=r)
        return crop, y0, x0, tf.constant(float(r))
      return fn

    return tf.switch_case(pick, [branch(r) for r in _DCT_RATIOS])

  def other():
    image = _decode_other(encoded)
    y0, x0, y1, x1 = cut(tf.shape(image)[:2], 1)
    crop = image[tf.cast(y0, tf.int32):tf.cast(y1, tf.int32),
                 tf.cast(x0, tf.int32):tf.cast(x1, tf.int32)]
    return crop, y0, x0, tf.constant(1.0)

  crop, y0, x0, r = tf.cond(is_jpeg(encoded), jpeg, other)
  crop.set_shape([None, None, 3])
  return _resize_region(crop, y / r - y0, x / r - x0, h / r, w / r, out_hw)


def encoded_image_hw(encoded):
  """(height, width) of an encoded image, from the JPEG header without decoding."""
  return tf.cond(is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                 lambda: tf.shape(_decode_other(encoded))[:2])


def imagenet_train_image(encoded, size: int, key):
  """Encoded image -> RandomResizedCrop(size) + flip, uint8 [size, size, 3] (normalised on the
  device: `normalise_images`)."""
  window = random_resized_crop_window(encoded_image_hw(encoded), key)
  x = _decode_region(encoded, tf.unstack(window), (size, size), margin=False)
  flip = tf.random.stateless_uniform([], seed=fold_key(key, 1)) < 0.5
  return tf.cond(flip, lambda: tf.reverse(x, [1]), lambda: x)


def imagenet_eval_image(encoded, size: int):
  """Encoded image -> resize shorter side to 256*size/224, centre crop size, uint8."""
  hw = tf.cast(encoded_image_hw(encoded), tf.float64)
  h, w = hw[0], hw[1]
  short = float(round(256 * size / 224))
  # As torchvision Resize(int): shorter side -> `short`, the longer one truncated, not rounded.
  new_hw = tf.where(h <= w, tf.stack([short, tf.floor(w * short / h)]),
                    tf.stack([tf.floor(h * short / w), short]))
  top = tf.round((new_hw[0] - size) / 2)
  left = tf.round((new_hw[1] - size) / 2)
  # The centre crop's region in the original image: only that part (and the resize kernel's
  # reach around it) is decoded and resized.
  sy, sx = h / new_hw[0], w / new_hw[1]
  box = [top * sy, left * sx, size * sy, size * sx]
  return _decode_region(encoded, box, (size, size), margin=True)
