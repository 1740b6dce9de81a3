"""Image grids (PNG files and TensorBoard images) and TensorBoard scalars without `tensorboard`.

TensorFlow 2.21 no longer installs the `tensorboard` package, and `tf.summary.scalar`/`image` need
it. The events here are written with the core op `tf.summary.write` and the summary metadata that
TensorBoard's scalar and image plugins expect (plugin name and data class), so the files read
the same in TensorBoard and need no extra dependency.
"""

from __future__ import annotations

import io
import json
import math
from typing import Mapping, Optional

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from tf_denseflow import checks
from tf_denseflow import workdir as workdir_lib

__all__ = ['append_json_line', 'image_grid', 'save_png', 'write_image_grid', 'write_scalars']


def image_grid(images: np.ndarray, columns: Optional[int] = None, padding: int = 1) -> np.ndarray:
  """Tiles images into one grid image.

  Args:
    images: uint8 `[N, H, W, C]` (C = 1 or 3).
    columns: images per row (default `ceil(sqrt(N))`).
    padding: pixels of white between images (and around the grid).

  Returns:
    uint8 `[rows * (H + padding) + padding, columns * (W + padding) + padding, C]`.

  Raises:
    ValueError, TypeError: `images` is not a non-empty 4-D uint8 array, `columns` is not a
      positive integer or `padding` a non-negative one.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0 or images.dtype != np.uint8:
    raise ValueError(
      f'`images` must be a non-empty uint8 [N, H, W, C] array, got {images.dtype} {images.shape}.'
    )
  n, h, w, c = images.shape
  columns = checks.check_int('columns', math.ceil(math.sqrt(n)) if columns is None else columns)
  padding = checks.check_int('padding', padding, 0)
  rows = math.ceil(n / columns)
  grid = np.full(
    (rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8
  )
  for i, image in enumerate(images):
    top = padding + (i // columns) * (h + padding)
    left = padding + (i % columns) * (w + padding)
    grid[top : top + h, left : left + w] = image
  return grid


def save_png(image: np.ndarray, path: str) -> str:
  """Writes a uint8 `[H, W, C]` image as PNG (atomically, through a temporary file).

  Args:
    image: uint8 `[H, W, 1 or 3]`.
    path: destination (local or any `tf.io.gfile` file system).

  Returns:
    `path`.
  """
  from PIL import Image

  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  png = io.BytesIO()
  Image.fromarray(image).save(png, format='PNG')
  return workdir_lib.atomic_write(path, png.getvalue())


def _metadata(plugin_name: str, data_class: int) -> bytes:
  return summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name),
    data_class=data_class,
  ).SerializeToString()


def write_image_grid(
  writer: tf.summary.SummaryWriter, name: str, images: np.ndarray, step: int
) -> None:
  """Writes `image_grid(images)` as one TensorBoard image (PNG-encoded, images plugin).

  Args:
    writer: the summary writer.
    name: the tag.
    images: uint8 `[N, H, W, C]`.
    step: the global step.
  """
  grid = image_grid(images)
  height, width = grid.shape[:2]
  png = tf.io.encode_png(grid)
  tensor = tf.stack([tf.as_string(width), tf.as_string(height), png])
  with writer.as_default():
    tf.summary.write(
      name,
      tensor,
      step=step,
      metadata=_metadata('images', summary_pb2.DATA_CLASS_BLOB_SEQUENCE),
    )
  writer.flush()


def write_scalars(
  writer: tf.summary.SummaryWriter, scalars: Mapping[str, float], step: int
) -> None:
  """Writes every scalar of `scalars` at `step` (scalars plugin) and flushes.

  Args:
    writer: the summary writer.
    scalars: tag -> value.
    step: the global step.
  """
  metadata = _metadata('scalars', summary_pb2.DATA_CLASS_SCALAR)
  with writer.as_default():
    for name, value in scalars.items():
      tf.summary.write(name, tf.constant(float(value), tf.float32), step=step, metadata=metadata)
  writer.flush()


def append_json_line(path: str, record: Mapping) -> None:
  """Appends `record` to the JSON-lines file `path` as strict JSON: NaN and Inf floats as null.

  (`json.dumps` would write the non-standard `NaN`, e.g. for the bits/dim of a window of skipped
  steps, which strict readers refuse.)
  """
  record = {
    k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
  }
  with tf.io.gfile.GFile(path, 'a') as f:
    f.write(json.dumps(record) + '\n')
