"""Training augmentations with stateless randomness, as in the official `get_augmentation`.

* `eta`: random horizontal flip, then an integer translation in both axes with edge replication
  (official: flip, `Pad(ceil(0.04*H), 'edge')`, `RandomAffine(translate=(0.04, 0.04))`,
  `CenterCrop(H)`; the shift is `round(U(-0.04*(H + 2*pad), +0.04*(H + 2*pad)))`, that is at most
  1 pixel at 32x32 and 3 at 64x64, with the official distribution).
* `hflip`: horizontal flip only (used for CelebA).
* `none`.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tf_denseflow.data.config import AUGMENTATIONS

__all__ = ['augment', 'eta_max_shift']


def eta_max_shift(size: int) -> int:
  """Largest translation (pixels) of the `eta` augmentation for images of side `size`.

  Args:
    size: image side H.

  Returns:
    `round(0.04 * (H + 2 * ceil(0.04 * H)))`, capped at the padding: 1 for 32, 3 for 64.
  """
  pad = math.ceil(0.04 * size)
  return min(pad, math.floor(0.04 * (size + 2 * pad) + 0.5))


def augment(image: tf.Tensor, seed: tf.Tensor, augmentation: str = 'eta') -> tf.Tensor:
  """Augments one uint8 image `[H, W, C]` with stateless randomness.

  `eta`: `out[y, x] = image[clip(y - ty), flip(clip(x - tx))]`, where `flip` mirrors the column
  with probability 1/2 and `tx, ty = round(U(-m, m))`, `m = 0.04 * (side + 2 * ceil(0.04 * side))`
  (torchvision's `RandomAffine` draw on the edge-padded image), so `|t| <= eta_max_shift(side)`.
  Clipping the index replicates the edge pixels, as the official edge padding does.

  Args:
    image: uint8 (or any dtype) `[H, W, C]` image with a static shape.
    seed: int32/int64 `[2]` stateless seed.
    augmentation: one of `AUGMENTATIONS`.

  Returns:
    The augmented image, same shape and dtype.

  Raises:
    ValueError: unknown augmentation.
  """
  if augmentation not in AUGMENTATIONS:
    raise ValueError(f'`augmentation` must be one of {AUGMENTATIONS}, got {augmentation!r}.')
  if augmentation == 'none':
    return image
  height, width = image.shape[0], image.shape[1]
  flip_seed, y_seed, x_seed = tf.unstack(
    tf.random.experimental.stateless_split(seed, 3, alg='philox')
  )
  rows = tf.range(height)
  cols = tf.range(width)
  if augmentation == 'eta':
    rows = tf.clip_by_value(rows - _eta_shift(height, y_seed), 0, height - 1)
    cols = tf.clip_by_value(cols - _eta_shift(width, x_seed), 0, width - 1)
  flip = tf.random.stateless_uniform([], flip_seed, alg='philox') < 0.5
  cols = tf.where(flip, width - 1 - cols, cols)
  return tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)


def _eta_shift(size: int, seed: tf.Tensor) -> tf.Tensor:
  """Integer shift as torchvision's RandomAffine draws it on the padded image."""
  pad = math.ceil(0.04 * size)
  max_dx = 0.04 * (size + 2 * pad)
  limit = eta_max_shift(size)
  shift = tf.round(tf.random.stateless_uniform([], seed, -max_dx, max_dx, alg='philox'))
  return tf.clip_by_value(tf.cast(shift, tf.int32), -limit, limit)
