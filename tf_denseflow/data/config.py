"""What to load: `DataConfig`, the names it accepts, and the errors of the input pipelines."""

from __future__ import annotations

import dataclasses

from tf_denseflow.checks import INT64_MAX
from tf_denseflow.config_flags import hparam

__all__ = [
  'AUGMENTATIONS',
  'DATASETS',
  'IMAGE_EXTENSIONS',
  'SPLITS',
  'BadDataError',
  'DataConfig',
  'DatasetNotFoundError',
  'check_split',
]

DATASETS = ('cifar10', 'imagenet_resized/32x32', 'imagenet_resized/64x64', 'celeb_a', 'embedded')
AUGMENTATIONS = ('eta', 'hflip', 'none')
SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


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

  # The `hparam` fields are also flags of `python -m tf_denseflow.train` (config_flags);
  # `--data_dir` is shared by the programs (flags.py), `seed` is the training seed's.
  dataset: str = hparam(
    'cifar10',
    'TFDS name (cifar10, imagenet_resized/32x32, imagenet_resized/64x64, celeb_a), embedded '
    '(32x32 patches of the photos shipped in scikit-learn, built locally), image_dir, or the '
    'path of a prepared TFDS dataset directory.',
  )
  data_dir: str | None = None
  image_dir: str | None = hparam(
    None, 'With --dataset=image_dir: a folder holding train/ and test/ image subfolders.'
  )
  image_size: int | None = hparam(
    None,
    'Image height = width in pixels (default: the dataset native size); a multiple of '
    '2**len(units_per_block), i.e. of 8 for three blocks.',
    minimum=1,
  )
  download: bool = hparam(False, 'Let TFDS download and prepare a missing dataset.')
  augmentation: str = hparam(
    'eta',
    'Training augmentation: eta = random flip + integer shift (1 px at 32x32, 3 px at 64x64, '
    'edge padding), as the official code; hflip = flip only (CelebA); none.',
    choices=AUGMENTATIONS,
  )
  shuffle_buffer: int = hparam(
    10_000, 'Shuffle buffer of the training stream, in examples.', minimum=0, maximum=INT64_MAX
  )
  cache: bool = True
  celeba_center_crop: bool = hparam(
    False,
    'CelebA: resize the RealNVP 148x148 centre crop instead of the whole image (official).',
  )
  embedded_num_train: int = hparam(20_000, 'Training patches of the embedded dataset.', minimum=1)
  embedded_num_test: int = hparam(2_000, 'Test patches of the embedded dataset.', minimum=1)
  seed: int = 0
  skip_bad_images: bool = hparam(
    False,
    'With --dataset=image_dir: leave out image files that cannot be decoded (a warning names '
    'each) instead of refusing to start with an error that lists them.',
  )

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


def check_split(split: str) -> None:
  """Refuses a split name other than `'train'` and `'test'`.

  Args:
    split: the split name.

  Raises:
    ValueError: `split` is not one of `SPLITS`.
  """
  if split not in SPLITS:
    raise ValueError(f'`split` must be one of {SPLITS}, got {split!r}.')
