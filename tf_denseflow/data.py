"""Input pipelines: TFDS datasets, a folder of images, and the embedded photo-patch dataset.

Every source yields uint8 images `[H, W, 3]` of the configured size (checked before training);
batches are uint8 `[B, H, W, 3]`. Dequantization happens inside the model step, not here.

Sources (`DataConfig.dataset`):
* TFDS by name: `cifar10`, `imagenet_resized/32x32`, `imagenet_resized/64x64`, `celeb_a`, read
  with `tfds.builder(name, data_dir=...)` (what `tfds.load` does). CelebA is resized to 64x64 as
  the official DenseFlow loader does it: the whole 218x178 image, squashed (its 148x148 crop at
  (40, 15) is computed but unused); `celeba_center_crop=True` uses the RealNVP crop instead.
* `embedded`: patches cut from the two photographs shipped in scikit-learn
  (`load_sample_images`), train and test from disjoint blocks of each photo, built once into a
  real TFDS dataset (`denseflow_photo_patches`) under a cache directory and then read through the
  same TFDS path as the other datasets.
* `image_dir`: `DataConfig.image_dir` holds `train/` and `test/`, each with PNG/JPEG files at any
  depth (no labels), centre-cropped to a square and resized.
* A path to a prepared TFDS directory (one holding `dataset_info.json`, or its parent holding
  version folders), read with `tfds.builder_from_directory`.

Images that are not images are refused before training, named, with `BadDataError` (a
`ValueError`; `check_data` runs all the checks):
* `image_dir`: every `.png`/`.jpg`/`.jpeg` file of both splits is read and fully decoded once, with
  the decoder the pipeline uses (`tf.io.decode_image`), in parallel threads (about a millisecond
  per small image; the result is cached per file, path + size + mtime, so the pipelines built
  afterwards do not decode again). Unreadable, empty (0-byte), truncated or corrupt files and
  files that are not images at all are listed (the first 10 and a count, with the reason for
  each); `skip_bad_images=True` (`--skip_bad_images`) leaves them out instead, with a warning
  naming each. An empty split (or one left empty by skipping) is refused too.
* Channels are converted, never refused: grey (8 or 16 bit), grey + alpha, palette, RGBA,
  16-bit and CMYK files become 8-bit RGB as `decode_image(channels=3)` makes them (alpha is
  dropped, not composited). The same holds for TFDS image features with 1 or 4 channels.
* TFDS (named or a directory): the `image` feature must be uint8 with a fixed channel count, and
  a dataset read as stored must have the configured shape; anything else is refused from the
  feature spec (no data read) rather than failing in a reshape inside `tf.data`.

Training streams are deterministic: for a given seed, shuffling, file order and augmentation come
from stateless seeds derived from `(seed, input pipeline, epoch, position in epoch)`, so the same
seed gives the same batches and `skip_batches=N` gives exactly the stream from batch N on.

Augmentations (training only), as in the official `get_augmentation`:
* `eta`: random horizontal flip, then an integer translation in both axes with edge replication
  (official: flip, `Pad(ceil(0.04*H), 'edge')`, `RandomAffine(translate=(0.04, 0.04))`,
  `CenterCrop(H)`; the shift is `round(U(-0.04*(H + 2*pad), +0.04*(H + 2*pad)))`, that is at most
  1 pixel at 32x32 and 3 at 64x64, with the official distribution).
* `hflip`: horizontal flip only (used for CelebA).
* `none`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

__all__ = [
  'AUGMENTATIONS',
  'DATASETS',
  'BadDataError',
  'EMBEDDED_NAME',
  'EMBEDDED_VERSION',
  'DataConfig',
  'DatasetNotFoundError',
  'augment',
  'build_embedded_dataset',
  'check_data',
  'default_embedded_data_dir',
  'embedded_config_name',
  'embedded_patch_boxes',
  'embedded_patches',
  'embedded_regions',
  'eta_max_shift',
  'image_shape',
  'load_split',
  'make_eval_dataset',
  'make_train_dataset',
  'num_examples',
]

DATASETS = ('cifar10', 'imagenet_resized/32x32', 'imagenet_resized/64x64', 'celeb_a', 'embedded')
AUGMENTATIONS = ('eta', 'hflip', 'none')
SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

EMBEDDED_NAME = 'denseflow_photo_patches'
EMBEDDED_VERSION = '1.0.0'  # bump when the patch recipe changes

_NATIVE_SIZE = {
  'cifar10': 32,
  'imagenet_resized/32x32': 32,
  'imagenet_resized/64x64': 64,
  'celeb_a': 64,
  'embedded': 32,
}
_FIXED_SIZE = ('cifar10', 'imagenet_resized/32x32', 'imagenet_resized/64x64')
_CELEBA_CROP = (40, 15, 148)  # top, left, side of the RealNVP centre crop
_MAX_CACHE_BYTES = 4 * 2**30  # decoded uint8 splits up to this size are cached in RAM
_EMBEDDED_DEFAULTS = (20_000, 2_000, 0)  # num_train, num_test, seed
_EMBEDDED_MAX_ZOOM = 3.0  # patches are crops of 1x..3x the patch side, area-downscaled
_EMBEDDED_GRID = (4, 5)  # blocks per photo (rows, columns); see embedded_regions
_AUTOTUNE = tf.data.AUTOTUNE
_MAX_LISTED = 10  # bad files named in the error message (all are logged)
_FILE_CHECKS: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime) -> why bad
_WARNED: set[str] = set()  # warnings already given (skipped files, ignored files)


class DatasetNotFoundError(RuntimeError):
  """The requested dataset is not prepared; the message says how to prepare it."""


class BadDataError(ValueError):
  """The data cannot give uint8 images of the configured shape; the message names what and why.

  Bad image files of an image folder (each named, with the reason), an image folder split with no
  usable image, or a TFDS dataset whose `image` feature cannot become uint8 `[H, W, 3]` images.
  """


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to load and how to augment it.

  Attributes:
    dataset: a name from `DATASETS`, `'image_dir'`, or a path to a prepared TFDS directory.
    data_dir: TFDS data directory (default: TFDS's, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`;
      for `embedded`: `default_embedded_data_dir()`).
    image_dir: folder with `train/` and `test/` image subfolders (for `dataset='image_dir'`).
    image_size: side of the square images; None = the dataset's native size (32 for cifar10,
      imagenet_resized/32x32 and embedded, 64 for imagenet_resized/64x64 and celeb_a).
    download: let TFDS download and prepare a missing dataset.
    augmentation: training augmentation, one of `AUGMENTATIONS`.
    shuffle_buffer: shuffle buffer size in examples (0 or 1: no shuffling).
    cache: cache decoded splits in RAM when they need at most 4 GiB (not ImageNet64 train).
    celeba_center_crop: CelebA only: resize the 148x148 RealNVP crop instead of the whole image.
    embedded_num_train: number of training patches of the embedded dataset.
    embedded_num_test: number of test patches of the embedded dataset.
    seed: seed of the embedded dataset's patch positions.
    skip_bad_images: `image_dir` only: leave out the files that cannot be decoded (a warning
      names each) instead of refusing the folder with a `BadDataError` that lists them.
  """

  dataset: str = 'cifar10'
  data_dir: str | None = None
  image_dir: str | None = None
  image_size: int | None = None
  download: bool = False
  augmentation: str = 'eta'
  shuffle_buffer: int = 10_000
  cache: bool = True
  celeba_center_crop: bool = False
  embedded_num_train: int = 20_000
  embedded_num_test: int = 2_000
  seed: int = 0
  skip_bad_images: bool = False

  def __post_init__(self):
    if not isinstance(self.dataset, str) or not self.dataset:
      raise ValueError(f'`dataset` must be a non-empty string, got {self.dataset!r}.')
    if self.image_size is not None and (
      isinstance(self.image_size, bool)
      or int(self.image_size) != self.image_size
      or self.image_size <= 0
    ):
      raise ValueError(f'`image_size` must be a positive integer or None, got {self.image_size!r}.')
    if self.augmentation not in AUGMENTATIONS:
      raise ValueError(f'`augmentation` must be one of {AUGMENTATIONS}, got {self.augmentation!r}.')
    if self.shuffle_buffer < 0:
      raise ValueError(f'`shuffle_buffer` must be >= 0, got {self.shuffle_buffer}.')
    if self.embedded_num_train <= 0 or self.embedded_num_test <= 0:
      raise ValueError(
        '`embedded_num_train` and `embedded_num_test` must be positive, got '
        f'{self.embedded_num_train} and {self.embedded_num_test}.'
      )
    if self.dataset == 'image_dir' and not self.image_dir:
      raise ValueError("`dataset='image_dir'` needs `image_dir` (a folder with train/ and test/).")


# ---------------------------------------------------------------------------------------------
# Public API


def image_shape(config: DataConfig) -> tuple[int, int, int]:
  """The `(H, W, 3)` shape of the images `config` produces.

  Args:
    config: the data configuration.

  Returns:
    `(image_size, image_size, 3)`.

  Raises:
    ValueError: unknown dataset name, or an image size the dataset cannot provide.
    DatasetNotFoundError: an image folder or prepared directory is missing (only looked at when
      the size has to be read from the data).
  """
  if config.dataset in DATASETS:
    size = _named_image_size(config)
  elif config.dataset != 'image_dir' and not _looks_like_path(config.dataset):
    raise _unknown_dataset(config.dataset)
  elif config.image_size is not None:
    size = config.image_size
  else:
    size = _resolve(config, build=False).image_size
  return (size, size, 3)


def load_split(config: DataConfig, split: str) -> tf.data.Dataset:
  """Unbatched uint8 `[H, W, 3]` images of one split, in a fixed order, without augmentation.

  `test` reads the `validation` split of datasets that have no `test` split (imagenet_resized).

  Args:
    config: the data configuration.
    split: `'train'` or `'test'`.

  Returns:
    A finite `tf.data.Dataset` of uint8 images.

  Raises:
    ValueError: unknown dataset name or split, or an unsupported image size.
    DatasetNotFoundError: the data are missing; the message says how to prepare them.
  """
  ds, _, _ = _load(config, split)
  return ds


def num_examples(config: DataConfig, split: str) -> int | None:
  """Number of examples in a split (None if the dataset does not record it).

  Args:
    config: the data configuration.
    split: `'train'` or `'test'`.

  Returns:
    The number of examples.

  Raises:
    ValueError: unknown dataset name or split.
    DatasetNotFoundError: the data are missing.
  """
  _check_split(split)
  if config.dataset == 'embedded':
    return config.embedded_num_train if split == 'train' else config.embedded_num_test
  source = _resolve(config, build=True)
  return source.num_examples(split)


def check_data(config: DataConfig) -> None:
  """Checks, before training, that both splits give uint8 `[H, W, 3]` images of the set size.

  Builds (does not run) the pipelines of `train` and `test`. For `image_dir` that reads and fully
  decodes every image file of both splits once (see the module docstring; cached, so the
  pipelines built afterwards do not decode again); for TFDS datasets it checks the `image`
  feature's dtype and shape and that both splits exist and are not empty (no data read). The
  embedded dataset is built if missing.

  Args:
    config: the data configuration.

  Raises:
    BadDataError: bad image files (the first 10 named with the reason, and a count; with
      `skip_bad_images` they are skipped with a warning instead), a split with no usable image,
      or an `image` feature that cannot become uint8 `[H, W, 3]` images.
    DatasetNotFoundError: the data are missing; the message says how to prepare them.
  """
  for split in SPLITS:
    _load(config, split)


def make_train_dataset(
  config: DataConfig,
  batch_size: int,
  *,
  input_context: tf.distribute.InputContext | None = None,
  seed: int | None = 0,
  skip_batches: int = 0,
) -> tf.data.Dataset:
  """The infinite, shuffled, augmented training stream of uint8 `[B, H, W, 3]` batches.

  Determinism: with an integer `seed`, the stream is a pure function of `(config, batch_size,
  input pipeline, seed)`. The order of the record files is shuffled once from `seed` (the same
  for every epoch); epoch `e` is the (cached) split passed through a shuffle buffer seeded from
  `(seed, pipeline, e)`; example `i` of epoch `e` is augmented with the stateless seed
  `fold_in(fold_in((seed, pipeline), e), i)`; batches run across epoch boundaries and drop no
  examples. `skip_batches=N` starts directly in the epoch that holds batch N, so it costs at most
  one epoch of reading and gives exactly the stream from batch N on (for resuming at step N).
  `seed=None` draws a fresh seed and lets tf.data reorder for throughput (not reproducible).

  Args:
    config: the data configuration.
    batch_size: examples per batch of this input pipeline (the per-replica batch under
      `distribute_datasets_from_function`).
    input_context: with `num_input_pipelines > 1`, this pipeline reads only its shard (an even
      split of the examples; shards are disjoint).
    seed: stream seed, or None for a non-reproducible stream.
    skip_batches: index of the first batch to produce.

  Returns:
    An infinite `tf.data.Dataset` of uint8 batches, `drop_remainder=True`, prefetched.

  Raises:
    ValueError: bad arguments (non-positive batch size, negative skip, empty shard, ...).
    DatasetNotFoundError: the data are missing; the message says how to prepare them.
  """
  if int(batch_size) <= 0:
    raise ValueError(f'`batch_size` must be positive, got {batch_size}.')
  if int(skip_batches) < 0:
    raise ValueError(f'`skip_batches` must be >= 0, got {skip_batches}.')
  num_shards, shard_index = 1, 0
  if input_context is not None:
    num_shards = input_context.num_input_pipelines
    shard_index = input_context.input_pipeline_id
  deterministic = seed is not None
  if seed is None:
    seed = random.SystemRandom().randrange(2**31)
  seed = int(seed) % 2**63

  base, size, side = _load(
    config, 'train', num_shards=num_shards, shard_index=shard_index, file_seed=seed
  )
  if config.cache and size * side * side * 3 <= _MAX_CACHE_BYTES:
    base = base.cache()

  stream_seed = tf.constant([seed, shard_index], tf.int64)
  buffer_size = min(config.shuffle_buffer, size)

  def epoch_examples(epoch):
    epoch_seed = tf.random.experimental.stateless_fold_in(stream_seed, epoch, alg='philox')
    ds = base
    if buffer_size > 1:
      shuffle_seed = tf.random.stateless_uniform(
        [], epoch_seed, minval=None, maxval=None, dtype=tf.int64, alg='philox'
      )
      ds = ds.shuffle(buffer_size, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds.enumerate().map(
      lambda i, x: (x, tf.random.experimental.stateless_fold_in(epoch_seed, i, alg='philox'))
    )

  first_example = int(skip_batches) * int(batch_size)
  first_epoch, offset = divmod(first_example, size)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_examples)
  if offset:
    ds = ds.skip(offset)
  augmentation = config.augmentation
  ds = ds.map(lambda x, s: augment(x, s, augmentation), num_parallel_calls=_AUTOTUNE)
  ds = ds.batch(int(batch_size), drop_remainder=True)
  ds = ds.prefetch(_AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = deterministic
  if input_context is not None:
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return ds.with_options(options)


def make_eval_dataset(
  config: DataConfig,
  batch_size: int,
  *,
  split: str = 'test',
  drop_remainder: bool = False,
  max_examples: int | None = None,
) -> tf.data.Dataset:
  """Batches of a split in a fixed order, without augmentation, for evaluation.

  Args:
    config: the data configuration.
    batch_size: examples per batch.
    split: `'test'` (default) or `'train'`.
    drop_remainder: drop a last, smaller batch.
    max_examples: use only the first `max_examples` examples.

  Returns:
    A finite `tf.data.Dataset` of uint8 `[B, H, W, 3]` batches (cached when small, prefetched).

  Raises:
    ValueError: bad arguments.
    DatasetNotFoundError: the data are missing; the message says how to prepare them.
  """
  if int(batch_size) <= 0:
    raise ValueError(f'`batch_size` must be positive, got {batch_size}.')
  if max_examples is not None and int(max_examples) <= 0:
    raise ValueError(f'`max_examples` must be positive or None, got {max_examples}.')
  ds, size, side = _load(config, split)
  if max_examples is not None:
    ds = ds.take(int(max_examples))
    size = min(size, int(max_examples))
  if config.cache and size * side * side * 3 <= _MAX_CACHE_BYTES:
    ds = ds.cache()
  ds = ds.batch(int(batch_size), drop_remainder=drop_remainder).prefetch(_AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


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


# ---------------------------------------------------------------------------------------------
# The embedded dataset: patches of the photographs shipped in scikit-learn


def default_embedded_data_dir() -> str:
  """`$XDG_CACHE_HOME/tf_denseflow/tfds`, or `~/.cache/tf_denseflow/tfds`.

  Returns:
    The directory (not created).
  """
  cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache_home, 'tf_denseflow', 'tfds')


def embedded_config_name(
  image_size: int = 32, num_train: int = 20_000, num_test: int = 2_000, seed: int = 0
) -> str:
  """TFDS config name of an embedded dataset: `'32x32'`, plus the build parameters if not default.

  Args:
    image_size: patch side.
    num_train: number of training patches.
    num_test: number of test patches.
    seed: patch-position seed.

  Returns:
    For example `'32x32'` or `'16x16_n100_t20_seed3'`.
  """
  name = f'{image_size}x{image_size}'
  if (num_train, num_test, seed) != _EMBEDDED_DEFAULTS:
    name += f'_n{num_train}_t{num_test}_seed{seed}'
  return name


def embedded_regions(height: int, width: int) -> dict[str, list[tuple[int, int, int, int]]]:
  """The disjoint blocks of a photo that train and test patches are cut from.

  The photo is cut into a 4x5 grid (rows x columns) of blocks. One block per column, on the
  diagonal `row = column % 4`, is a test block (5 of 20, spread over every row and column so
  that test patches show the same kinds of content as train patches); the others are train
  blocks. Every patch lies inside a single block.

  Args:
    height: photo height.
    width: photo width.

  Returns:
    `{'train': boxes, 'test': boxes}`, lists of half-open boxes `(top, left, bottom, right)`.
  """
  num_rows, num_cols = _EMBEDDED_GRID
  rows = np.linspace(0, height, num_rows + 1).round().astype(int).tolist()
  cols = np.linspace(0, width, num_cols + 1).round().astype(int).tolist()
  regions = {'train': [], 'test': []}
  for c in range(num_cols):
    for r in range(num_rows):
      split = 'test' if r == c % num_rows else 'train'
      regions[split].append((rows[r], cols[c], rows[r + 1], cols[c + 1]))
  return regions


def embedded_patch_boxes(
  image_size: int = 32,
  num_train: int = 20_000,
  num_test: int = 2_000,
  seed: int = 0,
  photo_shapes: list[tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
  """Source squares of the embedded patches (deterministic in the arguments).

  Patch `i` of a split comes from photo `i % num_photos`, from a block of its split
  (`embedded_regions`) drawn uniformly, at a uniform position inside that block. Its square has
  side `round(image_size * zoom)`, `zoom` log-uniform in `[1, max_zoom]`, `max_zoom <= 3` chosen
  so that the square fits every block (train and test see the same zooms).

  Args:
    image_size: patch side.
    num_train: number of training patches.
    num_test: number of test patches.
    seed: seed of the blocks, positions and zooms (train and test draw independent streams).
    photo_shapes: `(height, width)` per photo; default: the scikit-learn sample photos.

  Returns:
    `{'train': boxes, 'test': boxes}`, int64 `[N, 4]` rows `(photo, top, left, side)`.

  Raises:
    ValueError: non-positive sizes, or patches larger than the smallest block.
  """
  if image_size <= 0 or num_train <= 0 or num_test <= 0:
    raise ValueError(
      'embedded dataset: image_size, num_train and num_test must be positive, got '
      f'{image_size}, {num_train}, {num_test}.'
    )
  if photo_shapes is None:
    photo_shapes = [photo.shape[:2] for photo in _sample_photos()]
  regions = [embedded_regions(h, w) for h, w in photo_shapes]
  max_side = min(
    min(bottom - top, right - left)
    for photo_regions in regions
    for blocks in photo_regions.values()
    for top, left, bottom, right in blocks
  )
  if image_size > max_side:
    raise ValueError(
      f'embedded dataset: image_size={image_size} is larger than the photo blocks allow '
      f'(at most {max_side}).'
    )
  max_zoom = min(_EMBEDDED_MAX_ZOOM, max_side / image_size)
  boxes = {}
  for split_index, (split, count) in enumerate((('train', num_train), ('test', num_test))):
    rng = np.random.default_rng([seed, split_index])
    blocks = np.array([photo_regions[split] for photo_regions in regions])  # [P, blocks, 4]
    photo = np.arange(count) % len(photo_shapes)
    bounds = blocks[photo, rng.integers(0, blocks.shape[1], count)]  # [N, 4]
    zoom = np.exp(rng.uniform(0.0, math.log(max_zoom), count))
    side = np.clip(np.round(image_size * zoom), image_size, max_side).astype(np.int64)
    free = bounds[:, 2:] - bounds[:, :2] - side[:, None] + 1  # positions per axis
    corner = bounds[:, :2] + np.floor(rng.uniform(size=[count, 2]) * free).astype(np.int64)
    boxes[split] = np.stack([photo, corner[:, 0], corner[:, 1], side], axis=1).astype(np.int64)
  return boxes


def embedded_patches(
  image_size: int = 32, num_train: int = 20_000, num_test: int = 2_000, seed: int = 0
) -> dict[str, np.ndarray]:
  """Cuts the embedded dataset's patches (see `embedded_patch_boxes`) from the photos.

  Each square is cropped, then area-downscaled (PIL box filter) to `image_size`, so a patch only
  ever sees pixels of its own region.

  Args:
    image_size: patch side.
    num_train: number of training patches.
    num_test: number of test patches.
    seed: seed of the positions and zooms.

  Returns:
    `{'train': images, 'test': images}`, uint8 `[N, image_size, image_size, 3]`.

  Raises:
    ValueError: as `embedded_patch_boxes`.
  """
  from PIL import Image

  photos = _sample_photos()
  boxes = embedded_patch_boxes(
    image_size, num_train, num_test, seed, photo_shapes=[p.shape[:2] for p in photos]
  )
  patches = {}
  for split, split_boxes in boxes.items():
    out = np.empty([len(split_boxes), image_size, image_size, 3], np.uint8)
    for i, (photo, top, left, side) in enumerate(split_boxes):
      crop = photos[photo][top : top + side, left : left + side]
      if side != image_size:
        crop = np.asarray(Image.fromarray(crop).resize((image_size, image_size), Image.BOX))
      out[i] = crop
    patches[split] = out
  return patches


def build_embedded_dataset(
  data_dir: str | None = None,
  image_size: int = 32,
  num_train: int = 20_000,
  num_test: int = 2_000,
  seed: int = 0,
) -> str:
  """Builds the embedded dataset as a TFDS dataset once; later calls reuse it.

  The dataset is `denseflow_photo_patches/<embedded_config_name(...)>:1.0.0` with features
  `{'image': Image(shape=(s, s, 3))}` and splits `train`/`test`, stored in record order (no
  TFDS shuffling). It is written to a temporary folder and renamed into place, so readers never
  see a partial build and concurrent builders do not clash. Same arguments => same bytes.

  Args:
    data_dir: TFDS data directory (local); default `default_embedded_data_dir()`.
    image_size: patch side.
    num_train: number of training patches.
    num_test: number of test patches.
    seed: seed of the patch positions.

  Returns:
    The data directory to pass to `tfds.builder`/`tfds.load`.

  Raises:
    ValueError: bad sizes.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_embedded_data_dir()))
  config_name = embedded_config_name(image_size, num_train, num_test, seed)
  final_dir = os.path.join(data_dir, EMBEDDED_NAME, config_name, EMBEDDED_VERSION)
  if os.path.exists(os.path.join(final_dir, 'dataset_info.json')):
    return data_dir
  start = time.perf_counter()
  patches = embedded_patches(image_size, num_train, num_test, seed)
  os.makedirs(data_dir, exist_ok=True)
  tmp_root = tempfile.mkdtemp(prefix=f'.{EMBEDDED_NAME}-', dir=data_dir)
  try:
    tfds.dataset_builders.store_as_tfds_dataset(
      name=EMBEDDED_NAME,
      version=EMBEDDED_VERSION,
      config=config_name,
      features=tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(image_size, image_size, 3))}
      ),
      split_datasets={
        split: [(i, {'image': image}) for i, image in enumerate(images)]
        for split, images in patches.items()
      },
      data_dir=tmp_root,
      description=(
        f'{image_size}x{image_size} patches of the scikit-learn sample photos (china.jpg, '
        'flower.jpg); train and test from disjoint blocks of each photo (15 and 5 of a 4x5 '
        f'grid); num_train={num_train}, num_test={num_test}, seed={seed}. Built by '
        'tf_denseflow.data.'
      ),
      disable_shuffling=True,
    )
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    try:
      os.rename(os.path.join(tmp_root, EMBEDDED_NAME, config_name, EMBEDDED_VERSION), final_dir)
    except OSError:
      if not os.path.exists(os.path.join(final_dir, 'dataset_info.json')):
        raise  # not a concurrent build that finished first
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  logging.info(
    'Built %s/%s (%d train, %d test) in %s in %.1f s.',
    EMBEDDED_NAME,
    config_name,
    num_train,
    num_test,
    data_dir,
    time.perf_counter() - start,
  )
  return data_dir


def _sample_photos() -> list[np.ndarray]:
  """The scikit-learn sample photos (china.jpg, flower.jpg), uint8 `[427, 640, 3]`."""
  from sklearn.datasets import load_sample_images

  return [np.asarray(photo, np.uint8) for photo in load_sample_images().images]


# ---------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class _Source:
  """A resolved dataset: a prepared TFDS builder or lists of image files."""

  name: str
  image_size: int
  preprocess: Callable[[tf.Tensor], tf.Tensor]
  builder: tfds.core.DatasetBuilder | None = None
  files: dict[str, tuple[str, ...]] | None = None

  def split_name(self, split: str) -> str:
    """The TFDS split that serves `split` (`test` -> `validation` when there is no test)."""
    available = list(self.builder.info.splits.keys())
    if split == 'test' and 'test' not in available and 'validation' in available:
      return 'validation'
    if split not in available:
      raise DatasetNotFoundError(
        f'Dataset {self.name!r} has no {split!r} split (it has {sorted(available)}).'
      )
    return split

  def num_examples(self, split: str) -> int:
    if self.files is not None:
      return len(self.files[split])
    return self.builder.info.splits[self.split_name(split)].num_examples


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'`split` must be one of {SPLITS}, got {split!r}.')


def _named_image_size(config: DataConfig) -> int:
  name, size = config.dataset, config.image_size
  native = _NATIVE_SIZE[name]
  if name in _FIXED_SIZE and size is not None and size != native:
    raise ValueError(
      f'`image_size`={size} does not match dataset {name!r}, whose images are '
      f'{native}x{native}; use image_size={native} (or None), or another dataset.'
    )
  return native if size is None else size


def _resolve(config: DataConfig, build: bool = True) -> _Source:
  """Finds the data of `config` (building the embedded dataset if needed and `build`)."""
  name = config.dataset
  if name == 'embedded':
    size = _named_image_size(config)
    args = (size, config.embedded_num_train, config.embedded_num_test, config.seed)
    data_dir = config.data_dir or default_embedded_data_dir()
    if build:
      data_dir = build_embedded_dataset(data_dir, *args)
    builder = tfds.builder(f'{EMBEDDED_NAME}/{embedded_config_name(*args)}', data_dir=data_dir)
    return _Source(name, size, _identity, builder=builder)
  if name in DATASETS:
    size = _named_image_size(config)
    builder = _prepared_builder(name, config.data_dir, config.download)
    feature = _image_feature(builder, name)
    if name == 'celeb_a':

      def preprocess(image):
        return _celeba_resize(_to_rgb(image), size, config.celeba_center_crop)

      return _Source(name, size, preprocess, builder=builder)
    if tuple(feature.shape) != (size, size, 3):
      raise BadDataError(
        f'The prepared TFDS dataset {name!r} in {builder.data_dir!r} holds images of shape '
        f'{tuple(feature.shape)}, not the {(size, size, 3)} this dataset has; prepare it again '
        f'(`tfds build {name}`).'
      )
    return _Source(name, size, _identity, builder=builder)
  if name == 'image_dir':
    listed = _list_image_dir(config.image_dir)
    files = listed
    if build:  # image_shape (build=False) only needs the size, not the full check
      files = _check_image_dir(config.image_dir, listed, config.skip_bad_images)
    # From the unchecked list, so that image_shape and the pipelines agree.
    size = config.image_size or _first_image_size(listed['train'])
    return _Source(name, size, lambda path: _decode_file(path, size), files=files)
  if _looks_like_path(name):
    return _directory_source(name, config.image_size)
  raise _unknown_dataset(name)


def _unknown_dataset(name: str) -> ValueError:
  return ValueError(
    f'Unknown `dataset` {name!r}: expected one of {DATASETS + ("image_dir",)} or the path of a '
    'prepared TFDS dataset directory (one with dataset_info.json).'
  )


def _load(
  config: DataConfig,
  split: str,
  *,
  num_shards: int = 1,
  shard_index: int = 0,
  file_seed: int | None = None,
) -> tuple[tf.data.Dataset, int, int]:
  """Unbatched uint8 images of one split (or one shard of it), their number and side."""
  _check_split(split)
  source = _resolve(config)
  size = source.image_size
  if source.files is not None:
    files = source.files[split][shard_index::num_shards]
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    count = len(files)
  else:
    split_arg = source.split_name(split)
    if num_shards > 1:
      split_arg = tfds.even_splits(split_arg, num_shards)[shard_index]
    count = source.builder.info.splits[split_arg].num_examples
    read_config = tfds.ReadConfig(
      try_autocache=False,
      shuffle_seed=file_seed,
      shuffle_reshuffle_each_iteration=False,
    )
    ds = source.builder.as_dataset(
      split=split_arg,
      # Ordered datasets (the embedded one) refuse file shuffling.
      shuffle_files=file_seed is not None and not source.builder.info.disable_shuffling,
      read_config=read_config,
      decoders=tfds.decode.PartialDecoding({'image': True}),
    )
  if count == 0:
    raise BadDataError(
      f'Split {split!r} of {config.dataset!r} has no examples for input pipeline {shard_index} '
      f'of {num_shards}.'
    )

  def preprocess(element):
    return source.preprocess(element if source.files is not None else element['image'])

  spec = ds.map(preprocess).element_spec
  if spec.dtype != tf.uint8 or not spec.shape.is_compatible_with([size, size, 3]):
    raise BadDataError(  # a guard: the checks of _resolve should make this unreachable
      f'Dataset {config.dataset!r} gives {spec.dtype.name} images of shape {spec.shape}, not '
      f'uint8 images of shape {(size, size, 3)}.'
    )
  ds = ds.map(
    lambda element: tf.ensure_shape(preprocess(element), [size, size, 3]),
    num_parallel_calls=_AUTOTUNE,
  )
  return ds, count, size


def _prepared_builder(name: str, data_dir: str | None, download: bool) -> tfds.core.DatasetBuilder:
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if not download:
    raise DatasetNotFoundError(_how_to_prepare(name, data_dir, builder.data_dir))
  try:
    builder.download_and_prepare()
  except Exception as e:  # network, quota and checksum errors all end here
    raise DatasetNotFoundError(
      f'Downloading {name!r} failed ({type(e).__name__}: {e}).\n'
      + _how_to_prepare(name, data_dir, builder.data_dir)
    ) from e
  return builder


def _how_to_prepare(name: str, data_dir: str | None, looked_in: str) -> str:
  root = data_dir or tfds.core.constants.DATA_DIR
  message = f'TFDS dataset {name!r} is not prepared in data_dir={root!r} (looked for {looked_in}).'
  if name.startswith('imagenet_resized'):
    size = name.split('/')[1]
    side = size.split('x')[0]
    parts = 'train_part1, train_part2, val' if side == '64' else 'train, val'
    manual_dir = os.path.join(root, 'downloads', 'manual')
    return (
      f'{message}\nImageNet cannot be downloaded automatically any more. Get '
      f'Imagenet{side}_{{{parts}}}_npz.zip from the download page of image-net.org (an '
      f'account is needed), put them in {manual_dir}/ (TFDS picks them up by file name and '
      f'checks their checksums), then run `tfds build {name} --data_dir={root}` (or pass '
      f'download=True); or copy a prepared `imagenet_resized/{size}/0.1.0/` directory into '
      f'{root}.'
    )
  return (
    f'{message}\nPrepare it once on a machine with internet access: '
    f'`tfds build {name} --data_dir={root}` (then copy `{name}/` into data_dir), '
    f'or pass download=True (--download) to let TFDS download it.'
  )


def _looks_like_path(name: str) -> bool:
  return (
    '://' in name
    or os.path.isabs(name)
    or name.startswith(('.', '~'))
    or tf.io.gfile.isdir(os.path.expanduser(name))
  )


def _directory_source(path: str, image_size: int | None) -> _Source:
  """A prepared TFDS directory (or its parent holding version folders)."""
  path = os.path.expanduser(path)
  if not tf.io.gfile.isdir(path):
    raise DatasetNotFoundError(f'`dataset` {path!r} is not an existing directory.')
  if not tf.io.gfile.exists(os.path.join(path, 'dataset_info.json')):
    versions = [
      entry.rstrip('/')
      for entry in tf.io.gfile.listdir(path)
      if tf.io.gfile.exists(os.path.join(path, entry.rstrip('/'), 'dataset_info.json'))
    ]
    if not versions:
      raise DatasetNotFoundError(
        f'No prepared TFDS dataset in {path!r}: expected dataset_info.json there or in a version '
        'subfolder (e.g. imagenet_resized/64x64/0.1.0/).'
      )
    path = os.path.join(path, max(versions, key=_version_key))
  builder = tfds.builder_from_directory(path)
  feature = _image_feature(builder, path)
  height, width, channels = feature.shape
  size = image_size
  if size is None:
    if height is None or height != width:
      raise BadDataError(
        f'The images in {path!r} have shape {feature.shape}; set `image_size` to resize them.'
      )
    size = height
  if (height, width, channels) == (size, size, 3):
    return _Source(path, size, _identity, builder=builder)
  return _Source(path, size, lambda image: _square_resize(image, size), builder=builder)


def _image_feature(builder: tfds.core.DatasetBuilder, name: str) -> tfds.features.Image:
  """The `image` feature of a TFDS dataset, if the pipeline can make uint8 RGB images of it."""
  features = builder.info.features
  feature = features['image'] if 'image' in features else None
  if not isinstance(feature, tfds.features.Image):
    raise BadDataError(f'The TFDS dataset {name!r} has no `image` feature (an Image feature).')
  dtype = tf.as_dtype(feature.tf_dtype)
  if dtype != tf.uint8:
    raise BadDataError(
      f'The TFDS dataset {name!r} stores {dtype.name} images; the model reads 8-bit (uint8) '
      'images: convert the dataset to uint8 first.'
    )
  channels = feature.shape[-1]
  if channels not in (1, 3, 4):
    raise BadDataError(
      f'The TFDS dataset {name!r} has images of shape {feature.shape}: the number of channels '
      'must be fixed, 1 (grey), 3 (RGB) or 4 (RGBA); TF cannot decode 2 (grey + alpha).'
    )
  return feature


def _version_key(version: str) -> tuple:
  try:
    return (1, tuple(int(p) for p in version.split('.')))
  except ValueError:
    return (0, (version,))


def _list_image_dir(image_dir: str) -> dict[str, tuple[str, ...]]:
  """The sorted image files (by extension) of each split of an image folder."""
  root = os.path.expanduser(image_dir)
  if not tf.io.gfile.isdir(root):
    raise DatasetNotFoundError(f'`image_dir` {image_dir!r} is not an existing directory.')
  files = {}
  for split in SPLITS:
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
      raise DatasetNotFoundError(
        f'`image_dir` {image_dir!r} has no {split}/ subfolder; expected {split}/ with PNG or '
        'JPEG files (any nesting) for each of train/ and test/.'
      )
    found, others = [], []
    for dirpath, _, filenames in tf.io.gfile.walk(split_dir):
      for filename in filenames:
        path = os.path.join(dirpath, filename)
        (found if filename.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
    others.sort()
    if not found:
      held = f' (it holds {len(others)} other files, e.g. {others[0]!r})' if others else ''
      raise DatasetNotFoundError(
        f'`image_dir` {image_dir!r}: {split}/ contains no image files {IMAGE_EXTENSIONS}{held}.'
      )
    if others and _warn_once(f'ignored:{split_dir}'):
      logging.warning(
        'Ignoring %d files of %s without an image extension %s, e.g. %s.',
        len(others),
        split_dir,
        IMAGE_EXTENSIONS,
        others[0],
      )
    files[split] = tuple(sorted(found))
  return files


def _check_image_dir(
  image_dir: str, files: dict[str, tuple[str, ...]], skip_bad: bool
) -> dict[str, tuple[str, ...]]:
  """The files of `files` that decode into images; refuses (or skips) the others, named."""
  paths = [path for split in SPLITS for path in files[split]]
  results = _check_image_files(paths)
  bad = [(path, results[path]) for path in paths if results[path] is not None]
  root = os.path.expanduser(image_dir)
  if bad and not skip_bad:
    if len(bad) > _MAX_LISTED:  # the message names the first ones; the log names them all
      for path, reason in bad:
        logging.error('Bad image file %s: %s', path, reason)
    listed = '; '.join(f'{_relative(path, root)}: {reason}' for path, reason in bad[:_MAX_LISTED])
    more = len(bad) - _MAX_LISTED
    listed += f'; and {more} more (all in the log)' if more > 0 else ''
    raise BadDataError(
      f'{len(bad)} of the {len(paths)} image files in image_dir {image_dir!r} cannot be decoded '
      f'into images: {listed}. Fix or remove them, or pass --skip_bad_images '
      '(`skip_bad_images=True`) to leave them out.'
    )
  for path, reason in bad:
    if _warn_once(f'skip:{path}:{reason}'):
      logging.warning('Skipping bad image file %s: %s', path, reason)
  good = {}
  for split in SPLITS:
    good[split] = tuple(path for path in files[split] if results[path] is None)
    if not good[split]:
      first = files[split][0]
      raise BadDataError(
        f'`image_dir` {image_dir!r}: none of the {len(files[split])} image files of {split}/ '
        f'can be decoded, so skip_bad_images leaves none; first: {_relative(first, root)}: '
        f'{results[first]}.'
      )
  return good


def _check_image_files(paths: Sequence[str]) -> dict[str, str | None]:
  """`{path: why it is bad, or None}`, from the cache or a full decode."""
  keys = {}
  for path in paths:
    try:
      stat = tf.io.gfile.stat(path)
      keys[path] = (path, stat.length, stat.mtime_nsec)
    except tf.errors.OpError:
      keys[path] = (path, -1, -1)  # unreadable or a dangling link: _check_image_file says why
  todo = [path for path in paths if keys[path] not in _FILE_CHECKS]
  if todo:
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
      for path, result in zip(todo, pool.map(_check_image_file, todo)):
        _FILE_CHECKS[keys[path]] = result
    logging.info('Decoded %d image files in %.1f s.', len(todo), time.perf_counter() - start)
  return {path: _FILE_CHECKS[keys[path]] for path in paths}


def _check_image_file(path: str) -> str | None:
  """Reads and decodes one file as the pipeline does: why it is bad, or None."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      contents = f.read()
  except (tf.errors.OpError, OSError) as e:
    return f'cannot be read ({_error_text(e)})'
  if not contents:
    return 'empty file (0 bytes)'
  try:
    with tf.device('/CPU:0'):
      image = tf.io.decode_image(contents, channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    kind = _image_format(contents)
    if kind is None:
      return f'not an image (not JPEG, PNG, GIF, BMP or WebP; it starts with {contents[:8]!r})'
    return f'truncated or corrupt {kind} ({_error_text(e)})'
  height, width, channels = image.shape
  if image.dtype != tf.uint8 or channels != 3 or not height or not width:
    return f'decodes to {image.dtype.name} {image.shape}, not an RGB image'
  return None


def _image_format(contents: bytes) -> str | None:
  """The image format named by the file's first bytes (for the message of a failed decode)."""
  if contents.startswith(b'\xff\xd8\xff'):
    return 'JPEG'
  if contents.startswith(b'\x89PNG'):
    return 'PNG'
  if contents.startswith((b'GIF87a', b'GIF89a')):
    return 'GIF'
  if contents.startswith(b'BM'):
    return 'BMP'
  if contents.startswith(b'RIFF') and contents[8:12] == b'WEBP':
    return 'WebP'
  return None


def _error_text(error: Exception) -> str:
  """A TF or OS error as one short line (without TF's function-node and op decorations)."""
  text = error.message if isinstance(error, tf.errors.OpError) else str(error)
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]', '', text)
  return ' '.join(text.split()) or type(error).__name__


def _relative(path: str, root: str) -> str:
  return path[len(root) :].lstrip('/') if path.startswith(root) else path


def _warn_once(key: str) -> bool:
  """True the first time `key` is seen in this process."""
  if key in _WARNED:
    return False
  _WARNED.add(key)
  return True


def _first_image_size(paths: Sequence[str]) -> int:
  """Side of the first image whose header Pillow reads (`image_size=None` for `image_dir`)."""
  from PIL import Image

  for path in paths:
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        width, height = Image.open(f).size
      break
    except (OSError, ValueError, Image.DecompressionBombError, tf.errors.OpError):
      continue
  else:
    raise BadDataError(
      f'`image_size` is None and none of the {len(paths)} train images of image_dir has a '
      f'readable header (first: {paths[0]!r}); set `image_size`, and see data.check_data.'
    )
  if width != height:
    raise BadDataError(
      f'`image_size` is None but the images in image_dir are not square (first one, {path!r}, '
      f'is {width}x{height}); set `image_size`.'
    )
  return width


# ---------------------------------------------------------------------------------------------
# Image ops (uint8 in, uint8 out)


def _identity(image: tf.Tensor) -> tf.Tensor:
  return image


def _resize(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """Antialiased bilinear resize to uint8 (matches PIL's BILINEAR to within 1 level)."""
  resized = tf.image.resize(image, [height, width], method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """`[H, W, C]` with a static C of 1, 3 or 4 as RGB, as `decode_image(channels=3)` does it.

  Grey (C=1) is repeated; RGBA (C=4) loses the alpha (dropped, not composited).
  """
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels == 4:
    return image[..., :3]
  return image


def _square_resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Centre crop to a square, then resize to `size`; grey and RGBA images become RGB."""
  image = _to_rgb(image)
  shape = tf.shape(image)
  side = tf.minimum(shape[0], shape[1])
  top = (shape[0] - side) // 2
  left = (shape[1] - side) // 2
  image = image[top : top + side, left : left + side]
  return _resize(image, size, size)


def _celeba_resize(image: tf.Tensor, size: int, center_crop: bool) -> tf.Tensor:
  """CelebA as DenseFlow's loader: the whole image squashed to size x size (or the crop)."""
  if center_crop:
    top, left, side = _CELEBA_CROP
    image = image[top : top + side, left : left + side]
  return _resize(image, size, size)


def _decode_file(path: tf.Tensor, size: int) -> tf.Tensor:
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  return _square_resize(image, size)
