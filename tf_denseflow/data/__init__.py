"""Input pipelines: TFDS datasets, a folder of images, and the embedded photo-patch dataset.

Every source yields uint8 images `[H, W, 3]` of the configured size (checked before training);
batches are uint8 `[B, H, W, 3]`. Dequantization happens inside the model step, not here.

Where each thing lives:
* `config`: `DataConfig` (what to load and how to augment it), the names it accepts
  (`DATASETS`, `AUGMENTATIONS`) and the errors (`DatasetNotFoundError`, `BadDataError`, a
  `ValueError`).
* `pipeline`: `make_train_dataset` (the infinite, deterministic, augmented training stream),
  `make_eval_dataset`, `load_split`, `num_examples`, `image_shape`, and `check_data`, which
  refuses, before training, data that cannot give uint8 images of the configured shape.
* `augmentation`: `augment` (`eta`: flip + edge-replicated shift, as the official
  `get_augmentation`; `hflip`; `none`) and `eta_max_shift`.
* `sources`: how `DataConfig.dataset` is found: TFDS by name (`cifar10`,
  `imagenet_resized/32x32`, `imagenet_resized/64x64`, `celeb_a`), a prepared TFDS directory, an
  image folder (`image_dir`), or `embedded`; CelebA resizing and channel conversion.
* `image_folder`: the files of an image folder and their decode checks (`skip_bad_images`).
* `embedded`: the embedded dataset, `DenseflowPhotoPatches`, a TFDS `GeneratorBasedBuilder`
  (`tfds build tf_denseflow/data/embedded.py --config=32x32 --data_dir=...`), built on first use
  under `default_embedded_data_dir()`; `patches`: the patch recipe it stores.

Use it as `from tf_denseflow import data as data_lib`; every name below is importable from here.
"""

from tf_denseflow.data.augmentation import augment, eta_max_shift
from tf_denseflow.data.config import (
  AUGMENTATIONS,
  DATASETS,
  BadDataError,
  DataConfig,
  DatasetNotFoundError,
)
from tf_denseflow.data.embedded import (
  EMBEDDED_NAME,
  EMBEDDED_VERSION,
  build_embedded_dataset,
  default_embedded_data_dir,
  embedded_config_name,
)
from tf_denseflow.data.patches import embedded_patch_boxes, embedded_patches, embedded_regions
from tf_denseflow.data.pipeline import (
  check_data,
  image_shape,
  load_split,
  make_eval_dataset,
  make_padded_eval_dataset,
  make_train_dataset,
  num_examples,
)

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
  'make_padded_eval_dataset',
  'make_train_dataset',
  'num_examples',
]
