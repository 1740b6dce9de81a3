r"""The embedded dataset: patches of the two photographs shipped in scikit-learn, as a TFDS dataset.

`DenseflowPhotoPatches` (TFDS name `denseflow_photo_patches`) is a
`tfds.core.GeneratorBasedBuilder`: TFDS writes it (`download_and_prepare`, into a temporary folder
renamed into place, so readers never see a partial build) and reads it like any TFDS dataset.
Nothing is downloaded: the photos ship inside the scikit-learn wheel (`load_sample_images`).

Configs are named by `embedded_config_name`: `'32x32'` (the default: 20,000 train and 2,000 test
patches, seed 0) and `'<s>x<s>_n<num_train>_t<num_test>_seed<seed>'` for other values, e.g.
`'8x8_n64_t16_seed0'` (configs/smoke.cfg). `BUILDER_CONFIGS` lists those two; every other
canonical name is accepted too (`DenseflowPhotoPatches.get_builder_config` parses it), so any
`DataConfig` has its config. The pipelines build the dataset on first use
(`build_embedded_dataset`, under `default_embedded_data_dir()`); to build it ahead, from the
repository root:

  tfds build tf_denseflow/data/embedded.py --config=32x32 \
      --data_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tf_denseflow/tfds"

(`--config=8x8_n64_t16_seed0` and the like for other configs, none for both listed ones;
`tfds build denseflow_photo_patches --imports=tf_denseflow.data --config=...` is the same). The
`tfds` command of tensorflow-datasets 4.9.10 imports `apache_beam` and `mlcroissant` at start
(`pip install apache-beam mlcroissant`); without them, `python -c 'from tf_denseflow import data;
data.build_embedded_dataset()'` builds the default config the same way.

Examples are stored in generation order (`disable_shuffling=True`), so a split reads back as
`embedded_patches(...)[split]`, patch by patch. Version 1.1.0 holds the same examples as the 1.0.0
that `build_embedded_dataset` wrote by hand before (`store_as_tfds_dataset`); it has its own
directory, so a 1.0.0 cache is never read by this code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from tf_denseflow.data.patches import embedded_patch_boxes, embedded_patches

__all__ = [
  'EMBEDDED_NAME',
  'EMBEDDED_VERSION',
  'DenseflowPhotoPatches',
  'DenseflowPhotoPatchesConfig',
  'build_embedded_dataset',
  'default_embedded_data_dir',
  'embedded_builder',
  'embedded_config_name',
]

EMBEDDED_NAME = 'denseflow_photo_patches'
EMBEDDED_VERSION = '1.1.0'  # bump when the patch recipe or the stored layout changes
_RELEASE_NOTES = {
  '1.1.0': (
    'Built by the DenseflowPhotoPatches GeneratorBasedBuilder (`tfds build` works on it); the '
    'same examples in the same order as 1.0.0.'
  ),
  '1.0.0': 'Built by tf_denseflow.data with tfds.dataset_builders.store_as_tfds_dataset.',
}
_DEFAULTS = (20_000, 2_000, 0)  # num_train, num_test, seed
_CONFIG_NAME = re.compile(
  r'(-?\d+)x(-?\d+)(?:_n(-?\d+)_t(-?\d+)_seed(-?\d+))?'
)  # bad values fail later, by name


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
  if (num_train, num_test, seed) != _DEFAULTS:
    name += f'_n{num_train}_t{num_test}_seed{seed}'
  return name


@dataclasses.dataclass(eq=False)
class DenseflowPhotoPatchesConfig(tfds.core.BuilderConfig):
  """One embedded dataset: patch side, patch counts and seed (named by `embedded_config_name`).

  Attributes:
    image_size: patch side.
    num_train: number of training patches.
    num_test: number of test patches.
    seed: seed of the patch positions and zooms.
  """

  image_size: int = 32
  num_train: int = 20_000
  num_test: int = 2_000
  seed: int = 0

  @classmethod
  def of(
    cls, image_size: int = 32, num_train: int = 20_000, num_test: int = 2_000, seed: int = 0
  ) -> DenseflowPhotoPatchesConfig:
    """The config of these values, named `embedded_config_name(...)`, at `EMBEDDED_VERSION`.

    Args:
      image_size: patch side.
      num_train: number of training patches.
      num_test: number of test patches.
      seed: seed of the patch positions and zooms.

    Returns:
      The config.
    """
    return cls(
      name=embedded_config_name(image_size, num_train, num_test, seed),
      version=EMBEDDED_VERSION,
      release_notes=_RELEASE_NOTES,
      description=(
        f'{image_size}x{image_size} patches, num_train={num_train}, num_test={num_test}, '
        f'seed={seed}.'
      ),
      image_size=image_size,
      num_train=num_train,
      num_test=num_test,
      seed=seed,
    )

  @classmethod
  def from_name(cls, name: str) -> DenseflowPhotoPatchesConfig | None:
    """The config named `name` (as `embedded_config_name` spells it), or None if not a name."""
    match = _CONFIG_NAME.fullmatch(name)
    if match is None or match[1] != match[2]:
      return None
    values = [int(match[1])] + ([int(v) for v in match.groups()[2:]] if match[3] else [])
    config = cls.of(*values)
    return config if config.name == name else None  # e.g. '32x32_n20000_t2000_seed0' is not


class DenseflowPhotoPatches(tfds.core.GeneratorBasedBuilder):
  """Patches of the scikit-learn sample photos; train and test from disjoint photo blocks.

  Features `{'image': Image(shape=(s, s, 3))}` (uint8, PNG-encoded), splits `train` and `test`,
  stored in generation order. Build: see the module docstring.
  """

  VERSION = tfds.core.Version(EMBEDDED_VERSION)
  RELEASE_NOTES = _RELEASE_NOTES
  BUILDER_CONFIGS = [  # the first is the default
    DenseflowPhotoPatchesConfig.of(32, 20_000, 2_000, 0),  # configs/default.cfg
    DenseflowPhotoPatchesConfig.of(8, 64, 16, 0),  # configs/smoke.cfg
  ]

  @classmethod
  def get_builder_config(
    cls, name: str, version: str | tfds.core.Version | None = None
  ) -> tfds.core.BuilderConfig | None:
    """A listed config, or the one any other canonical config name describes.

    Args:
      name: a config name, e.g. `'32x32'` or `'16x16_n40_t10_seed1'`.
      version: the requested version (None or `EMBEDDED_VERSION` for unlisted names).

    Returns:
      The config, or None if `name` (at `version`) names none.
    """
    config = super().get_builder_config(name, version)
    if config is None and (version is None or str(version) == EMBEDDED_VERSION):
      config = DenseflowPhotoPatchesConfig.from_name(name)
    return config

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        f'{config.image_size}x{config.image_size} patches of the scikit-learn sample photos '
        '(china.jpg, flower.jpg); train and test from disjoint blocks of each photo (15 and 5 '
        f'of a 4x5 grid); num_train={config.num_train}, num_test={config.num_test}, '
        f'seed={config.seed}. Built by tf_denseflow.data.'
      ),
      features=tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(config.image_size, config.image_size, 3))}
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager  # nothing to download: the photos ship inside scikit-learn
    config = self.builder_config
    patches = embedded_patches(config.image_size, config.num_train, config.num_test, config.seed)
    return {split: self._generate_examples(images) for split, images in patches.items()}

  def _generate_examples(self, images: np.ndarray):
    for i, image in enumerate(images):
      yield i, {'image': image}


def embedded_builder(
  data_dir: str | None = None,
  image_size: int = 32,
  num_train: int = 20_000,
  num_test: int = 2_000,
  seed: int = 0,
) -> DenseflowPhotoPatches:
  """The builder of one embedded dataset (not built; see `build_embedded_dataset`).

  Args:
    data_dir: TFDS data directory; default `default_embedded_data_dir()`.
    image_size: patch side.
    num_train: number of training patches.
    num_test: number of test patches.
    seed: seed of the patch positions.

  Returns:
    `DenseflowPhotoPatches` with config `embedded_config_name(...)`.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_embedded_data_dir()))
  config = embedded_config_name(image_size, num_train, num_test, seed)
  return DenseflowPhotoPatches(config=config, data_dir=data_dir)


def build_embedded_dataset(
  data_dir: str | None = None,
  image_size: int = 32,
  num_train: int = 20_000,
  num_test: int = 2_000,
  seed: int = 0,
) -> str:
  """Builds the embedded dataset as a TFDS dataset once; later calls reuse it.

  The dataset is `denseflow_photo_patches/<embedded_config_name(...)>:<EMBEDDED_VERSION>`,
  prepared by TFDS (`DenseflowPhotoPatches.download_and_prepare`): written to a temporary folder
  and renamed into place, so readers never see a partial build; a concurrent build that finishes
  first wins. Same arguments => same bytes.

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
  builder = embedded_builder(data_dir, image_size, num_train, num_test, seed)
  if builder.is_prepared():
    return data_dir
  embedded_patch_boxes(image_size, num_train, num_test, seed)  # bad sizes fail before any write
  start = time.perf_counter()
  # Nothing is downloaded; the download folder TFDS makes goes to a temporary one.
  with tempfile.TemporaryDirectory(prefix=f'{EMBEDDED_NAME}-') as download_dir:
    try:
      builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
    except OSError:  # the final rename failed: fine if a concurrent build finished first
      if not embedded_builder(data_dir, image_size, num_train, num_test, seed).is_prepared():
        raise
  logging.info(
    'Built %s/%s (%d train, %d test) in %s in %.1f s.',
    EMBEDDED_NAME,
    builder.builder_config.name,
    num_train,
    num_test,
    data_dir,
    time.perf_counter() - start,
  )
  return data_dir
