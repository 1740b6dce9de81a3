"""The input pipelines: training stream, evaluation batches and plain splits of a `DataConfig`.

Every source yields uint8 images `[H, W, 3]` of the configured size (checked before training,
`check_data`); batches are uint8 `[B, H, W, 3]`. Dequantization happens inside the model step,
not here.

Training streams are deterministic: for a given seed, shuffling, file order and augmentation come
from stateless seeds derived from `(seed, input pipeline, epoch, position in epoch)`, so the same
seed gives the same batches and `skip_batches=N` gives exactly the stream from batch N on.
"""

from __future__ import annotations

import random

import tensorflow as tf
import tensorflow_datasets as tfds

from tf_denseflow.data.augmentation import augment
from tf_denseflow.data.config import (
  DATASETS,
  SPLITS,
  BadDataError,
  DataConfig,
  check_split,
)
from tf_denseflow.data.sources import looks_like_path, named_image_size, resolve, unknown_dataset

__all__ = [
  'check_data',
  'image_shape',
  'load_split',
  'make_eval_dataset',
  'make_padded_eval_dataset',
  'make_train_dataset',
  'num_examples',
]

_MAX_CACHE_BYTES = 4 * 2**30  # decoded uint8 splits up to this size are cached in RAM
_AUTOTUNE = tf.data.AUTOTUNE


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
    size = named_image_size(config)
  elif config.dataset != 'image_dir' and not looks_like_path(config.dataset):
    raise unknown_dataset(config.dataset)
  elif config.image_size is not None:
    size = config.image_size
  else:
    size = resolve(config, build=False).image_size
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
  check_split(split)
  if config.dataset == 'embedded':
    return config.embedded_num_train if split == 'train' else config.embedded_num_test
  source = resolve(config, build=True)
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

  Determinism: with an integer `seed`, the stream is a pure function of `(config, seed)`, the
  same for every input pipeline (each keeps its own batches of it, `input_context`). The order
  of the record files is shuffled once from `seed` (the same for every epoch); epoch `e` is the
  (cached) split passed through a shuffle buffer seeded from `fold_in((seed, 0), e)`; example
  `i` of epoch `e` is augmented with the stateless seed `fold_in(fold_in((seed, 0), e), i)`;
  batches run across epoch boundaries and drop no examples. So the sequence of examples does not
  depend on `batch_size`: with one input pipeline, batch `k` holds examples `k * batch_size ...`
  of it, and `batch_size=N` gives its first `N` examples as one batch (the images of ActNorm's
  initialisation, `--init_examples`). `skip_batches=N` starts directly in
  the epoch that holds batch N, so it costs at most one epoch of reading and gives exactly the
  stream from batch N on (for resuming at step N).
  `seed=None` draws a fresh seed and lets tf.data reorder for throughput (not reproducible).

  Args:
    config: the data configuration.
    batch_size: examples per batch of this input pipeline (the per-replica batch under
      `distribute_datasets_from_function`).
    input_context: with `num_input_pipelines > 1` (multi-worker), this pipeline yields only the
      per-replica batches of its own replicas, cut from the one stream above: global
      per-replica batch `j` (examples `j * batch_size ...`) goes to replica `j % R` of the `R`
      replicas, which lives on pipeline `(j % R) // (R / num_input_pipelines)`. So the batches
      of every step, their noise and their augmentation are the same whatever the number of
      workers (each pipeline reads the whole stream and augments only its own examples).
    seed: stream seed, or None for a non-reproducible stream.
    skip_batches: index of the first batch to produce (of this pipeline's batches).

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
  pipelines, pipeline, replicas = 1, 0, 1
  if input_context is not None:
    pipelines = input_context.num_input_pipelines
    pipeline = input_context.input_pipeline_id
    replicas = input_context.num_replicas_in_sync
  if pipelines > 1 and replicas % pipelines:
    raise ValueError(f'{replicas} replicas cannot be split evenly over {pipelines} pipelines.')
  deterministic = seed is not None
  if seed is None:
    seed = random.SystemRandom().randrange(2**31)
  seed = int(seed) % 2**63

  base, size, side = _load(config, 'train', file_seed=seed)
  if config.cache and size * side * side * 3 <= _MAX_CACHE_BYTES:
    base = base.cache()

  stream_seed = tf.constant([seed, 0], tf.int64)
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

  # Position in the one stream: this pipeline's batch `skip_batches` is global per-replica
  # batch `(skip_batches // local) * replicas + pipeline * local + skip_batches % local`.
  local = replicas // pipelines
  steps, within = divmod(int(skip_batches), local)
  first_batch = steps * replicas + (pipeline * local + within if pipelines > 1 else within)
  first_example = first_batch * int(batch_size)
  first_epoch, offset = divmod(first_example, size)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_examples)
  if offset:
    ds = ds.skip(offset)
  if pipelines > 1:
    ds = _keep_pipeline_share(ds, pipeline, pipelines, replicas, int(batch_size), first_batch)
  augmentation = config.augmentation
  ds = ds.map(lambda x, s: augment(x, s, augmentation), num_parallel_calls=_AUTOTUNE)
  ds = ds.batch(int(batch_size), drop_remainder=True)
  ds = ds.prefetch(_AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = deterministic
  if input_context is not None:
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return ds.with_options(options)


def make_padded_eval_dataset(
  config: DataConfig,
  count: int,
  global_batch: int,
  input_context: tf.distribute.InputContext,
) -> tf.data.Dataset:
  """The first `count` test examples as `(images, weights)` per-replica batches, padded.

  The split is padded with weight-0 zero images to whole global batches. Global batch k holds
  examples `k * global_batch ...`, and replica r's rows are `r * global_batch / replicas ...` of
  it, as in training; with several input pipelines (multi-worker) this pipeline keeps only its
  replicas' batches (the rule of `make_train_dataset`).

  Args:
    config: the data configuration.
    count: test examples to use (>= 1).
    global_batch: examples per global evaluation batch.
    input_context: from `distribute_datasets_from_function`.

  Returns:
    A finite dataset of `(uint8 [B, H, W, 3], float32 [B])`, `B` the per-replica batch.
  """
  padded = -(-count // global_batch) * global_batch
  shape = image_shape(config)
  examples = load_split(config, 'test').take(count).map(lambda x: (x, tf.constant(1.0)))
  padding = tf.data.Dataset.from_tensors((tf.zeros(shape, tf.uint8), tf.constant(0.0)))
  ds = examples.concatenate(padding.repeat(padded - count)).cache()
  ds = ds.batch(input_context.get_per_replica_batch_size(global_batch), drop_remainder=True)
  if input_context.num_input_pipelines > 1:
    ds = _keep_pipeline_share(
      ds,
      input_context.input_pipeline_id,
      input_context.num_input_pipelines,
      input_context.num_replicas_in_sync,
    )
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return ds.prefetch(_AUTOTUNE).with_options(options)


def _keep_pipeline_share(
  ds: tf.data.Dataset,
  pipeline: int,
  pipelines: int,
  replicas: int,
  elements_per_batch: int = 1,
  first_batch: int = 0,
) -> tf.data.Dataset:
  """The elements of `ds` that belong to the per-replica batches of `pipeline`'s replicas.

  Element `n` of `ds` is part of global per-replica batch `j = first_batch + n //
  elements_per_batch`, which replica `j % replicas` takes; replica `r` lives on pipeline
  `r // (replicas / pipelines)` (MultiWorkerMirroredStrategy numbers a worker's replicas
  consecutively).
  """
  local = replicas // pipelines

  def own(n, _):
    return tf.equal(((first_batch + n // elements_per_batch) % replicas) // local, pipeline)

  return ds.enumerate().filter(own).map(lambda _, element: element)


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


def _load(
  config: DataConfig,
  split: str,
  *,
  file_seed: int | None = None,
) -> tuple[tf.data.Dataset, int, int]:
  """Unbatched uint8 images of one split, their number and side."""
  check_split(split)
  source = resolve(config)
  size = source.image_size
  if source.files is not None:
    files = source.files[split]
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    count = len(files)
  else:
    split_arg = source.split_name(split)
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
    raise BadDataError(f'Split {split!r} of {config.dataset!r} has no examples.')

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
