"""Where the images come from: TFDS names, prepared TFDS directories, image folders, embedded.

`resolve(config)` finds the data of a `DataConfig` (building the embedded dataset if needed) and
returns a `Source`: a TFDS builder or lists of image files, the image side, and the per-image
preprocessing that makes uint8 `[H, W, 3]` images of that side.

* TFDS by name: `cifar10`, `imagenet_resized/32x32`, `imagenet_resized/64x64`, `celeb_a`, read
  with `tfds.builder(name, data_dir=...)` (what `tfds.load` does). CelebA is resized to 64x64 as
  the official DenseFlow loader does it: the whole 218x178 image, squashed (its 148x148 crop at
  (40, 15) is computed but unused); `celeba_center_crop=True` uses the RealNVP crop instead.
* `embedded`: `tf_denseflow.data.embedded`, built once under a cache directory, then read
  through the same TFDS path as the other datasets.
* `image_dir`: `tf_denseflow.data.image_folder` lists and checks the files; they are decoded
  with `decode_image(channels=3)`, centre-cropped to a square and resized.
* A path to a prepared TFDS directory (one holding `dataset_info.json`, or its parent holding
  version folders), read with `tfds.builder_from_directory`.

Channels are converted, never refused: grey, grey + alpha, palette, RGBA, 16-bit and CMYK files
become 8-bit RGB as `decode_image(channels=3)` makes them (alpha is dropped, not composited); the
same holds for TFDS image features with 1 or 4 channels. A TFDS `image` feature must be uint8 with
a fixed channel count, and a dataset read as stored must have the configured shape; anything else
is refused from the feature spec (no data read) rather than failing in a reshape inside `tf.data`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from tf_denseflow.data import embedded, image_folder
from tf_denseflow.data.config import (
  DATASETS,
  BadDataError,
  DataConfig,
  DatasetNotFoundError,
)

__all__ = ['Source', 'looks_like_path', 'named_image_size', 'resolve', 'unknown_dataset']

_NATIVE_SIZE = {
  'cifar10': 32,
  'imagenet_resized/32x32': 32,
  'imagenet_resized/64x64': 64,
  'celeb_a': 64,
  'embedded': 32,
}
_FIXED_SIZE = ('cifar10', 'imagenet_resized/32x32', 'imagenet_resized/64x64')
_CELEBA_CROP = (40, 15, 148)  # top, left, side of the RealNVP centre crop


@dataclasses.dataclass(frozen=True)
class Source:
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
    """Number of examples of `split` (`'train'` or `'test'`)."""
    if self.files is not None:
      return len(self.files[split])
    return self.builder.info.splits[self.split_name(split)].num_examples


def named_image_size(config: DataConfig) -> int:
  """Image side of a dataset named in `DATASETS`: `config.image_size`, or its native size.

  Args:
    config: the data configuration (`config.dataset` in `DATASETS`).

  Returns:
    The side.

  Raises:
    ValueError: an image size a fixed-size dataset cannot provide.
  """
  name, size = config.dataset, config.image_size
  native = _NATIVE_SIZE[name]
  if name in _FIXED_SIZE and size is not None and size != native:
    raise ValueError(
      f'`image_size`={size} does not match dataset {name!r}, whose images are '
      f'{native}x{native}; use image_size={native} (or None), or another dataset.'
    )
  return native if size is None else size


def resolve(config: DataConfig, build: bool = True) -> Source:
  """Finds the data of `config` (building the embedded dataset if needed and `build`).

  Args:
    config: the data configuration.
    build: build the embedded dataset if missing, and check every file of an image folder
      (False: only find the image size).

  Returns:
    The `Source`.

  Raises:
    ValueError: unknown dataset name, or an unsupported image size.
    BadDataError: data that cannot give uint8 `[H, W, 3]` images of the configured size.
    DatasetNotFoundError: the data are missing; the message says how to prepare them.
  """
  name = config.dataset
  if name == 'embedded':
    size = named_image_size(config)
    args = (size, config.embedded_num_train, config.embedded_num_test, config.seed)
    data_dir = config.data_dir or embedded.default_embedded_data_dir()
    if build:
      data_dir = embedded.build_embedded_dataset(data_dir, *args)
    return Source(name, size, _identity, builder=embedded.embedded_builder(data_dir, *args))
  if name in DATASETS:
    size = named_image_size(config)
    builder = _prepared_builder(name, config.data_dir, config.download)
    feature = _image_feature(builder, name)
    if name == 'celeb_a':

      def preprocess(image):
        return _celeba_resize(_to_rgb(image), size, config.celeba_center_crop)

      return Source(name, size, preprocess, builder=builder)
    if tuple(feature.shape) != (size, size, 3):
      raise BadDataError(
        f'The prepared TFDS dataset {name!r} in {builder.data_dir!r} holds images of shape '
        f'{tuple(feature.shape)}, not the {(size, size, 3)} this dataset has; prepare it again '
        f'(`tfds build {name}`).'
      )
    return Source(name, size, _identity, builder=builder)
  if name == 'image_dir':
    listed = image_folder.list_image_dir(config.image_dir)
    files = listed
    if build:  # image_shape (build=False) only needs the size, not the full check
      files = image_folder.check_image_dir(config.image_dir, listed, config.skip_bad_images)
    # From the unchecked list, so that image_shape and the pipelines agree.
    size = config.image_size or image_folder.first_image_size(listed['train'])
    return Source(name, size, lambda path: _decode_file(path, size), files=files)
  if looks_like_path(name):
    return _directory_source(name, config.image_size)
  raise unknown_dataset(name)


def unknown_dataset(name: str) -> ValueError:
  """The error for a `dataset` that is neither a known name nor a path."""
  return ValueError(
    f'Unknown `dataset` {name!r}: expected one of {DATASETS + ("image_dir",)} or the path of a '
    'prepared TFDS dataset directory (one with dataset_info.json).'
  )


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


def looks_like_path(name: str) -> bool:
  """Whether `dataset` names a directory (a URL, an absolute or relative path, or a folder)."""
  return (
    '://' in name
    or os.path.isabs(name)
    or name.startswith(('.', '~'))
    or tf.io.gfile.isdir(os.path.expanduser(name))
  )


def _directory_source(path: str, image_size: int | None) -> Source:
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
    return Source(path, size, _identity, builder=builder)
  return Source(path, size, lambda image: _square_resize(image, size), builder=builder)


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
