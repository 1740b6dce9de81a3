"""Tests for tf_denseflow.data.

The TFDS loaders run for real (`download=False`) on tiny datasets written under the real TFDS
names and versions with `tfds.dataset_builders.store_as_tfds_dataset`; nothing is mocked.
"""

import io
import os
import re
import shutil
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized
from PIL import Image

from tf_denseflow import data
from tf_denseflow.data import embedded

_NUM_CIFAR_TRAIN = 12
_NUM_CIFAR_TEST = 5
_FIXTURES = {}


def _random_images(count, height, width, seed):
  return np.random.default_rng(seed).integers(0, 256, [count, height, width, 3], dtype=np.uint8)


def _smooth_images(count, height, width, seed):
  """Low-frequency images, so JPEG round trips stay close."""
  small = _random_images(count, height // 8, width // 8, seed)
  return np.stack(
    [np.asarray(Image.fromarray(x).resize((width, height), Image.BILINEAR)) for x in small]
  )


def _store(name, version, split_examples, data_dir, config=None):
  features = tfds.builder(f'{name}/{config}' if config else name).info.features
  tfds.dataset_builders.store_as_tfds_dataset(
    name=name,
    version=version,
    config=config,
    features=features,
    split_datasets={split: list(enumerate(examples)) for split, examples in split_examples.items()},
    data_dir=data_dir,
  )


def _celeb_a_example(image):
  info = tfds.builder('celeb_a').info.features
  return {
    'image': image,
    'landmarks': {key: 0 for key in info['landmarks'].keys()},
    'attributes': {key: False for key in info['attributes'].keys()},
    'identity': {'Identity_No': 1},
  }


def _tfds_fixture():
  """A data_dir with tiny cifar10, imagenet_resized/{32x32,64x64} and celeb_a (built once)."""
  if 'tfds' not in _FIXTURES:
    data_dir = tempfile.mkdtemp(prefix='data_test_tfds_')
    train = _random_images(_NUM_CIFAR_TRAIN, 32, 32, seed=1)
    test = _random_images(_NUM_CIFAR_TEST, 32, 32, seed=2)
    _store(
      'cifar10',
      '3.0.2',
      {
        'train': [{'image': x, 'label': i % 10, 'id': f'train_{i}'} for i, x in enumerate(train)],
        'test': [{'image': x, 'label': i % 10, 'id': f'test_{i}'} for i, x in enumerate(test)],
      },
      data_dir,
    )
    for side, counts in ((32, (6, 4)), (64, (4, 3))):
      images = _random_images(sum(counts), side, side, seed=side)
      _store(
        'imagenet_resized',
        '0.1.0',
        {
          'train': [{'image': x, 'label': 1} for x in images[: counts[0]]],
          'validation': [{'image': x, 'label': 2} for x in images[counts[0] :]],
        },
        data_dir,
        config=f'{side}x{side}',
      )
    faces = _smooth_images(6, 218, 178, seed=3)
    _store(
      'celeb_a',
      '2.1.0',
      {
        'train': [_celeb_a_example(x) for x in faces[:3]],
        'validation': [_celeb_a_example(faces[3])],
        'test': [_celeb_a_example(x) for x in faces[4:]],
      },
      data_dir,
    )
    _FIXTURES['tfds'] = (data_dir, train, test)
  return _FIXTURES['tfds']


def tearDownModule():
  if 'tfds' in _FIXTURES:
    shutil.rmtree(_FIXTURES['tfds'][0], ignore_errors=True)


def _cifar_config(**kwargs):
  return data.DataConfig(dataset='cifar10', data_dir=_tfds_fixture()[0], **kwargs)


def _embedded_config(data_dir, image_size, num_train, num_test, seed=0):
  """The `DataConfig` of what `build_embedded_dataset(data_dir, ...)` builds."""
  return data.DataConfig(
    dataset='embedded',
    data_dir=data_dir,
    image_size=image_size,
    embedded_num_train=num_train,
    embedded_num_test=num_test,
    seed=seed,
  )


def _batches(ds, count):
  return [b.numpy() for b in ds.take(count)]


def _as_set(images):
  return {x.tobytes() for x in np.reshape(images, [-1, *np.shape(images)[-3:]])}


def _eta_reference(image, flip, ty, tx):
  """Official order: flip, edge pad, translate, centre crop (numpy)."""
  pad = int(np.ceil(0.04 * image.shape[0]))
  flipped = image[:, ::-1] if flip else image
  padded = np.pad(flipped, ((pad, pad), (pad, pad), (0, 0)), mode='edge')
  height, width = image.shape[:2]
  return padded[pad - ty : pad - ty + height, pad - tx : pad - tx + width]


class DataConfigTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ('augmentation', dict(augmentation='flip')),
    ('zero_size', dict(image_size=0)),
    ('negative_size', dict(image_size=-32)),
    ('float_size', dict(image_size=31.5)),
    ('shuffle_buffer', dict(shuffle_buffer=-1)),
    ('embedded_counts', dict(embedded_num_test=0)),
    ('image_dir_missing', dict(dataset='image_dir')),
  )
  def test_rejects_bad_arguments(self, kwargs):
    with self.assertRaises(ValueError):
      data.DataConfig(**kwargs)

  @parameterized.parameters(
    ('cifar10', None, 32),
    ('imagenet_resized/32x32', None, 32),
    ('imagenet_resized/64x64', None, 64),
    ('celeb_a', None, 64),
    ('celeb_a', 32, 32),
    ('embedded', None, 32),
    ('embedded', 16, 16),
  )
  def test_image_shape(self, dataset, image_size, side):
    config = data.DataConfig(dataset=dataset, image_size=image_size)
    self.assertEqual(data.image_shape(config), (side, side, 3))

  def test_size_mismatch_of_fixed_size_dataset(self):
    with self.assertRaisesRegex(ValueError, r'image_size.*cifar10.*32x32'):
      data.image_shape(data.DataConfig(dataset='cifar10', image_size=64))

  @parameterized.parameters('mnist', 'imagenet_resized/16x16', 'cifar-10')
  def test_unknown_dataset_name(self, name):
    config = data.DataConfig(dataset=name, data_dir=self.get_temp_dir())
    for fn in (data.image_shape, lambda c: data.load_split(c, 'train')):
      with self.assertRaisesRegex(ValueError, r'Unknown `dataset`.*cifar10.*embedded'):
        fn(config)

  def test_unknown_split(self):
    with self.assertRaisesRegex(ValueError, 'split'):
      data.load_split(_cifar_config(), 'valid')


class TfdsLoaderTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(
    ('cifar10', 32, 12, 5),
    ('imagenet_resized/32x32', 32, 6, 4),  # test -> validation
    ('imagenet_resized/64x64', 64, 4, 3),
    ('celeb_a', 64, 3, 2),
  )
  def test_loads_real_names(self, name, side, num_train, num_test):
    config = data.DataConfig(dataset=name, data_dir=_tfds_fixture()[0])
    for split, count in (('train', num_train), ('test', num_test)):
      ds = data.load_split(config, split)
      self.assertEqual(ds.element_spec, tf.TensorSpec([side, side, 3], tf.uint8))
      self.assertLen(list(ds), count)
      self.assertEqual(data.num_examples(config, split), count)

  def test_cifar10_pixels_unchanged(self):
    _, train, test = _tfds_fixture()
    config = _cifar_config()
    self.assertEqual(_as_set(list(data.load_split(config, 'train'))), _as_set(train))
    self.assertEqual(_as_set(list(data.load_split(config, 'test'))), _as_set(test))

  @parameterized.parameters(False, True)
  def test_celeb_a_resize_matches_official(self, center_crop):
    """Official: PIL bilinear resize of the whole image (or the RealNVP crop) to 64x64."""
    data_dir = _tfds_fixture()[0]
    config = data.DataConfig(dataset='celeb_a', data_dir=data_dir, celeba_center_crop=center_crop)
    ours = np.stack(list(data.load_split(config, 'train').as_numpy_iterator()))
    full = tfds.builder('celeb_a', data_dir=data_dir).as_dataset(split='train')
    expected = []
    for example in full.as_numpy_iterator():
      image = Image.fromarray(example['image'])
      if center_crop:
        image = image.crop((15, 40, 15 + 148, 40 + 148))  # left, top, right, bottom
      expected.append(np.asarray(image.resize((64, 64), Image.BILINEAR)))
    diff = np.abs(ours.astype(int) - np.stack(expected).astype(int))
    self.assertLessEqual(diff.max(), 1)

  @parameterized.parameters('cifar10', 'celeb_a')
  def test_missing_dataset_says_how_to_build(self, name):
    config = data.DataConfig(dataset=name, data_dir=self.get_temp_dir())
    with self.assertRaises(data.DatasetNotFoundError) as cm:
      data.load_split(config, 'train')
    message = str(cm.exception)
    self.assertIn(f'tfds build {name} --data_dir={self.get_temp_dir()}', message)
    self.assertIn('download=True', message)

  @parameterized.parameters('32', '64')
  def test_missing_imagenet_says_how_to_prepare(self, side):
    name = f'imagenet_resized/{side}x{side}'
    config = data.DataConfig(dataset=name, data_dir=self.get_temp_dir())
    with self.assertRaises(data.DatasetNotFoundError) as cm:
      data.make_train_dataset(config, 2)
    message = str(cm.exception)
    for text in ('image-net.org', f'Imagenet{side}_', 'manual', f'tfds build {name}', '0.1.0'):
      self.assertIn(text, message)

  def test_prepared_directory(self):
    data_dir = _tfds_fixture()[0]
    for path in (os.path.join(data_dir, 'cifar10', '3.0.2'), os.path.join(data_dir, 'cifar10')):
      config = data.DataConfig(dataset=path)
      self.assertEqual(data.image_shape(config), (32, 32, 3))
      self.assertLen(list(data.load_split(config, 'test')), _NUM_CIFAR_TEST)
    resized = data.load_split(data.DataConfig(dataset=path, image_size=16), 'train')
    self.assertEqual(resized.element_spec, tf.TensorSpec([16, 16, 3], tf.uint8))

  def test_prepared_directory_missing(self):
    with self.assertRaisesRegex(data.DatasetNotFoundError, 'dataset_info.json'):
      data.load_split(data.DataConfig(dataset=self.get_temp_dir()), 'train')


def _store_custom(root, shape, dtype, images):
  """A prepared TFDS directory with one `image` feature of `shape`/`dtype`; returns its path."""
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=shape, dtype=dtype)})
  examples = [(i, {'image': x}) for i, x in enumerate(images)]
  tfds.dataset_builders.store_as_tfds_dataset(
    name='custom_images',
    version='1.0.0',
    features=features,
    split_datasets={'train': examples, 'test': examples},
    data_dir=root,
  )
  return os.path.join(root, 'custom_images', '1.0.0')


class TfdsFeatureCheckTest(tf.test.TestCase, parameterized.TestCase):
  """TFDS image features the pipeline cannot make uint8 RGB of are refused, named, up front."""

  @parameterized.named_parameters(
    ('grey', 1, lambda x: np.repeat(x, 3, axis=-1)),
    ('rgba', 4, lambda x: x[..., :3]),
  )
  def test_converts_other_channel_counts(self, channels, expected):
    images = np.random.default_rng(channels).integers(0, 256, [2, 8, 8, channels], np.uint8)
    path = _store_custom(self.get_temp_dir(), (8, 8, channels), np.uint8, images)
    config = data.DataConfig(dataset=path)
    data.check_data(config)
    self.assertEqual(data.image_shape(config), (8, 8, 3))
    loaded = np.stack(list(data.load_split(config, 'train').as_numpy_iterator()))
    self.assertAllEqual(loaded, np.stack([expected(x) for x in images]))

  def test_refuses_16_bit_images(self):
    images = np.full([2, 8, 8, 1], 40_000, np.uint16)
    path = _store_custom(self.get_temp_dir(), (8, 8, 1), np.uint16, images)
    with self.assertRaisesRegex(data.BadDataError, r'custom_images.*uint16.*uint8'):
      data.check_data(data.DataConfig(dataset=path))

  @parameterized.named_parameters(('unknown', None), ('grey_alpha', 2))
  def test_refuses_channel_counts_tf_cannot_decode(self, channels):
    images = np.zeros([2, 8, 8, channels or 3], np.uint8)
    path = _store_custom(self.get_temp_dir(), (None, None, channels), np.uint8, images)
    with self.assertRaisesRegex(data.BadDataError, 'number of channels must be fixed'):
      data.make_train_dataset(data.DataConfig(dataset=path, image_size=8), 2)

  def test_named_datasets_pass(self):
    data.check_data(_cifar_config())
    data.check_data(data.DataConfig(dataset='celeb_a', data_dir=_tfds_fixture()[0]))


class AugmentTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters((8, 0), (16, 1), (32, 1), (64, 3), (128, 6))
  def test_eta_max_shift(self, size, shift):
    self.assertEqual(data.eta_max_shift(size), shift)

  def _augment_many(self, image, augmentation, count=300):
    ds = tf.data.Dataset.range(count).map(
      lambda i: data.augment(
        tf.constant(image), tf.stack([tf.constant(5, tf.int64), i]), augmentation
      )
    )
    return list(ds.as_numpy_iterator())

  @parameterized.parameters(32, 64)
  def test_eta_is_flip_and_edge_replicated_translation(self, side):
    """Each output is one (flip, ty, tx) of the official transform, |t| <= max shift."""
    image = _random_images(1, side, side, seed=side)[0]
    limit = data.eta_max_shift(side)
    candidates = [
      (flip, ty, tx)
      for flip in (False, True)
      for ty in range(-limit, limit + 1)
      for tx in range(-limit, limit + 1)
    ]
    found = []
    for out in self._augment_many(image, 'eta'):
      self.assertEqual(out.dtype, np.uint8)
      matches = [c for c in candidates if np.array_equal(out, _eta_reference(image, *c))]
      self.assertLen(matches, 1)
      found.append(matches[0])
    found = np.array(found, dtype=int)
    self.assertEqual(set(found[:, 0]), {0, 1})
    self.assertEqual(set(found[:, 1]), set(range(-limit, limit + 1)))
    self.assertEqual(set(found[:, 2]), set(range(-limit, limit + 1)))
    # torchvision draws round(U(-m, m)), m = 0.04 * padded side: P(t = 0) = 0.5 / m.
    m = 0.04 * (side + 2 * np.ceil(0.04 * side))
    self.assertAllClose(np.mean(found[:, 1:] == 0), 0.5 / m, atol=0.07)

  def test_hflip(self):
    image = _random_images(1, 16, 16, seed=0)[0]
    outs = self._augment_many(image, 'hflip', count=40)
    flipped = [bool(np.array_equal(out, image[:, ::-1])) for out in outs]
    for out, was_flipped in zip(outs, flipped):
      self.assertTrue(was_flipped or np.array_equal(out, image))
    self.assertEqual(set(flipped), {False, True})

  def test_none_and_seed_determinism(self):
    image = tf.constant(_random_images(1, 16, 16, seed=0)[0])
    self.assertAllEqual(data.augment(image, [1, 2], 'none'), image)
    self.assertAllEqual(data.augment(image, [1, 2]), data.augment(image, [1, 2]))

  def test_unknown_augmentation(self):
    with self.assertRaisesRegex(ValueError, 'augmentation'):
      data.augment(tf.zeros([4, 4, 3], tf.uint8), [0, 0], 'rotate')


class TrainDatasetTest(tf.test.TestCase, parameterized.TestCase):
  def test_batches(self):
    ds = data.make_train_dataset(_cifar_config(), 4)
    self.assertEqual(ds.element_spec, tf.TensorSpec([4, 32, 32, 3], tf.uint8))
    batches = _batches(ds, 7)  # infinite: more batches than one epoch
    self.assertLen(batches, 7)

  def test_epochs_are_reshuffled_permutations(self):
    _, train, _ = _tfds_fixture()
    ds = data.make_train_dataset(_cifar_config(augmentation='none'), 4)
    batches = np.stack(_batches(ds, 6))
    epoch0, epoch1 = batches[:3].reshape(-1, 32, 32, 3), batches[3:].reshape(-1, 32, 32, 3)
    self.assertEqual(_as_set(epoch0), _as_set(train))
    self.assertEqual(_as_set(epoch1), _as_set(train))
    self.assertNotAllEqual(epoch0, epoch1)

  def test_same_seed_same_batches(self):
    config = _cifar_config()
    first = _batches(data.make_train_dataset(config, 5, seed=3), 4)
    again = _batches(data.make_train_dataset(config, 5, seed=3), 4)
    other = _batches(data.make_train_dataset(config, 5, seed=4), 4)
    self.assertAllEqual(np.stack(first), np.stack(again))
    self.assertNotAllEqual(np.stack(first), np.stack(other))

  @parameterized.parameters(1, 2, 3, 7)
  def test_skip_batches_equals_skipping_the_stream(self, skip):
    config = _cifar_config()  # 12 examples, batches of 5 run across epochs
    stream = _batches(data.make_train_dataset(config, 5, seed=1), skip + 3)
    resumed = _batches(data.make_train_dataset(config, 5, seed=1, skip_batches=skip), 3)
    self.assertAllEqual(np.stack(stream[skip:]), np.stack(resumed))

  @parameterized.parameters(
    dict(pipelines=2, replicas=2, skip=0),
    dict(pipelines=3, replicas=3, skip=2),
    dict(pipelines=2, replicas=4, skip=0),
    dict(pipelines=2, replicas=4, skip=6),
  )
  def test_pipelines_cut_the_one_stream(self, pipelines, replicas, skip):
    # Multi-worker: pipeline p yields the per-replica batches of its replicas, cut from the
    # stream one pipeline gives, so every step sees the same examples for any worker count.
    config = _cifar_config()  # 12 examples, batches of 2 run across epochs
    local = replicas // pipelines
    steps = 3
    first_step = skip // local
    stream = _batches(data.make_train_dataset(config, 2, seed=3), (first_step + steps) * replicas)
    for pipeline in range(pipelines):
      context = tf.distribute.InputContext(
        num_input_pipelines=pipelines, input_pipeline_id=pipeline, num_replicas_in_sync=replicas
      )
      ds = data.make_train_dataset(config, 2, input_context=context, seed=3, skip_batches=skip)
      want = [
        stream[step * replicas + pipeline * local + i]
        for step in range(first_step, first_step + steps)
        for i in range(local)
      ]
      self.assertAllEqual(np.stack(_batches(ds, steps * local)), np.stack(want))

  def test_unseeded_stream(self):
    ds = data.make_train_dataset(_cifar_config(), 4, seed=None)
    self.assertEqual(_batches(ds, 1)[0].shape, (4, 32, 32, 3))

  @parameterized.parameters(dict(batch_size=0), dict(batch_size=2, skip_batches=-1))
  def test_bad_arguments(self, **kwargs):
    with self.assertRaises(ValueError):
      data.make_train_dataset(_cifar_config(), **kwargs)

  def test_eval_dataset(self):
    config = _cifar_config()
    ds = data.make_eval_dataset(config, 2)
    batches = _batches(ds, 10)
    self.assertEqual([len(b) for b in batches], [2, 2, 1])
    self.assertAllEqual(np.concatenate(batches), np.concatenate(_batches(ds, 10)))
    self.assertAllEqual(np.concatenate(batches), np.stack(list(data.load_split(config, 'test'))))
    dropped = _batches(data.make_eval_dataset(config, 2, drop_remainder=True, max_examples=3), 10)
    self.assertEqual([len(b) for b in dropped], [2])


class ImageDirTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp(dir=self.get_temp_dir())
    self.square = _random_images(1, 16, 16, seed=0)[0]
    files = {
      'train/a/b/square.png': self.square,
      'train/wide.PNG': _random_images(1, 20, 30, seed=1)[0],
      'train/photo.jpg': _smooth_images(1, 40, 32, seed=2)[0],
      'test/x/tall.jpeg': _smooth_images(1, 48, 24, seed=3)[0],
    }
    for path, image in files.items():
      os.makedirs(os.path.dirname(os.path.join(self.root, path)), exist_ok=True)
      Image.fromarray(image).save(os.path.join(self.root, path))
    with open(os.path.join(self.root, 'train', 'notes.txt'), 'w') as f:
      f.write('not an image')

  def test_loads_and_resizes(self):
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=8)
    train = np.stack(list(data.load_split(config, 'train').as_numpy_iterator()))
    self.assertEqual(train.shape, (3, 8, 8, 3))
    self.assertEqual(train.dtype, np.uint8)
    self.assertEqual(data.num_examples(config, 'test'), 1)
    batch = _batches(data.make_train_dataset(config, 2), 1)[0]
    self.assertEqual(batch.shape, (2, 8, 8, 3))

  def test_native_square_image_keeps_pixels(self):
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=16)
    train = list(data.load_split(config, 'train').as_numpy_iterator())
    self.assertTrue(any(np.array_equal(x, self.square) for x in train))

  def test_size_from_first_image(self):
    os.remove(os.path.join(self.root, 'train', 'a', 'b', 'square.png'))  # first is now 40x32
    config = data.DataConfig(dataset='image_dir', image_dir=self.root)
    with self.assertRaisesRegex(ValueError, 'image_size'):
      data.image_shape(config)

  def test_missing_split_folder(self):
    shutil.rmtree(os.path.join(self.root, 'test'))
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=8)
    with self.assertRaisesRegex(data.DatasetNotFoundError, 'test/'):
      data.load_split(config, 'train')

  def test_empty_split_folder(self):
    os.remove(os.path.join(self.root, 'test', 'x', 'tall.jpeg'))
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=8)
    with self.assertRaisesRegex(data.DatasetNotFoundError, 'no image files'):
      data.load_split(config, 'test')

  def test_missing_root(self):
    config = data.DataConfig(dataset='image_dir', image_dir=os.path.join(self.root, 'nope'))
    with self.assertRaisesRegex(data.DatasetNotFoundError, 'image_dir'):
      data.load_split(config, 'train')

  def _write(self, path, contents):
    path = os.path.join(self.root, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(contents)
    return path

  def _encoded(self, image, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    return buffer.getvalue()

  def _write_bad_files(self):
    jpeg = self._encoded(_smooth_images(1, 16, 16, seed=5)[0], 'JPEG')
    self._write('train/broken.jpg', jpeg[: len(jpeg) // 2])
    self._write('test/empty.png', b'')

  def test_bad_files_of_both_splits_named_in_one_error_before_training(self):
    self._write_bad_files()
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=8)
    for build in (
      lambda: data.check_data(config),
      lambda: data.make_train_dataset(config, 2),  # building the stream, before any step
      lambda: data.num_examples(config, 'train'),
    ):
      with self.assertRaises(data.BadDataError) as caught:
        build()
      message = str(caught.exception)
      self.assertNotIn('\n', message)
      self.assertIn('2 of the 6 image files', message)
      self.assertRegex(message, r'train/broken\.jpg: truncated or corrupt JPEG')
      self.assertIn('test/empty.png: empty file (0 bytes)', message)
      self.assertIn('--skip_bad_images', message)

  def test_skip_bad_images_warns_naming_each_and_yields_only_good_images(self):
    self._write_bad_files()
    config = data.DataConfig(
      dataset='image_dir', image_dir=self.root, image_size=8, skip_bad_images=True
    )
    with self.assertLogs('absl', level='WARNING') as logs:
      data.check_data(config)
    skipped = [line for line in logs.output if 'Skipping bad image file' in line]
    self.assertLen(skipped, 2)
    self.assertIn('broken.jpg', skipped[0] + skipped[1])
    self.assertIn('empty.png', skipped[0] + skipped[1])
    self.assertEqual(
      (data.num_examples(config, 'train'), data.num_examples(config, 'test')), (3, 1)
    )
    clean = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=8)
    os.remove(os.path.join(self.root, 'train', 'broken.jpg'))
    os.remove(os.path.join(self.root, 'test', 'empty.png'))
    for split in ('train', 'test'):
      self.assertAllEqual(
        np.stack(list(data.load_split(config, split).as_numpy_iterator())),
        np.stack(list(data.load_split(clean, split).as_numpy_iterator())),
      )
    self.assertEqual(_batches(data.make_train_dataset(config, 3), 1)[0].shape, (3, 8, 8, 3))

  @parameterized.named_parameters(
    ('truncated_png', 'train/cut.png', 'truncated or corrupt PNG'),
    ('not_an_image', 'train/notes.png', 'not an image'),
    ('empty_jpeg', 'test/empty.jpeg', r'empty file \(0 bytes\)'),
    ('dangling_link', 'train/gone.png', 'cannot be read'),
    ('unreadable', 'test/secret.png', 'cannot be read'),
  )
  def test_names_each_kind_of_bad_file(self, path, reason):
    png = self._encoded(_random_images(1, 8, 8, seed=7)[0], 'PNG')
    if path.endswith('cut.png'):
      self._write(path, png[: len(png) // 2])
    elif path.endswith('notes.png'):
      self._write(path, b'just some text, not a picture')
    elif path.endswith('gone.png'):
      os.symlink(os.path.join(self.root, 'missing.png'), os.path.join(self.root, path))
    elif path.endswith('secret.png'):
      if os.geteuid() == 0:
        self.skipTest('root reads files whatever their permissions')
      os.chmod(self._write(path, png), 0)
    else:
      self._write(path, b'')
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=8)
    with self.assertRaisesRegex(data.BadDataError, re.escape(path) + ': ' + reason):
      data.check_data(config)

  def test_lists_the_first_ten_bad_files_and_a_count(self):
    for i in range(12):
      self._write(f'train/bad{i:02d}.png', b'')
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=8)
    with self.assertRaisesRegex(data.BadDataError, '12 of the 16') as caught:
      data.check_data(config)
    message = str(caught.exception)
    self.assertIn('bad09.png', message)
    self.assertNotIn('bad10.png', message)
    self.assertIn('and 2 more', message)

  def test_split_left_empty_by_skipping(self):
    os.remove(os.path.join(self.root, 'test', 'x', 'tall.jpeg'))
    self._write('test/empty.png', b'')
    config = data.DataConfig(
      dataset='image_dir', image_dir=self.root, image_size=8, skip_bad_images=True
    )
    with self.assertRaisesRegex(data.BadDataError, r'none of the 1 image files of test/'):
      data.check_data(config)

  def test_converts_grey_alpha_palette_and_16_bit_files_to_rgb(self):
    shutil.rmtree(os.path.join(self.root, 'train'))
    rgb = _random_images(1, 16, 16, seed=9)[0]
    grey = rgb[..., 0]
    files = {
      'train/grey.png': Image.fromarray(grey),
      'train/grey16.png': Image.fromarray(grey.astype(np.uint16) * 257),
      'train/grey_alpha.png': Image.fromarray(np.dstack([grey, rgb[..., 1]]), 'LA'),
      'train/rgba.png': Image.fromarray(np.dstack([rgb, grey])),
      'train/palette.png': Image.fromarray(rgb).quantize(256),
    }
    for path, image in files.items():
      os.makedirs(os.path.join(self.root, 'train'), exist_ok=True)
      image.save(os.path.join(self.root, path))
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=16)
    data.check_data(config)
    loaded = dict(zip(sorted(files), data.load_split(config, 'train').as_numpy_iterator()))
    grey_rgb = np.repeat(grey[..., None], 3, axis=-1)
    for path in ('train/grey.png', 'train/grey16.png', 'train/grey_alpha.png'):
      self.assertAllEqual(loaded[path], grey_rgb)
    self.assertAllEqual(loaded['train/rgba.png'], rgb)
    self.assertEqual(loaded['train/palette.png'].shape, (16, 16, 3))

  def test_size_from_first_readable_image(self):
    self._write('train/0.png', b'')  # sorts first; the first good image is square.png (16x16)
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, skip_bad_images=True)
    self.assertEqual(data.image_shape(config), (16, 16, 3))
    self.assertEqual(data.load_split(config, 'train').element_spec.shape, (16, 16, 3))

  def test_empty_split_folder_names_the_other_files(self):
    os.remove(os.path.join(self.root, 'test', 'x', 'tall.jpeg'))
    self._write('test/photo.webp', b'RIFF')
    config = data.DataConfig(dataset='image_dir', image_dir=self.root, image_size=8)
    with self.assertRaisesRegex(data.DatasetNotFoundError, r'1 other files.*photo\.webp'):
      data.check_data(config)


class EmbeddedDatasetTest(tf.test.TestCase, parameterized.TestCase):
  _ARGS = dict(image_size=16, num_train=40, num_test=10, seed=1)

  def test_regions_are_disjoint_and_spread(self):
    regions = data.embedded_regions(427, 640)
    self.assertLen(regions['train'], 15)
    self.assertLen(regions['test'], 5)
    masks = {}
    for split, blocks in regions.items():
      masks[split] = np.zeros([427, 640], int)
      for top, left, bottom, right in blocks:
        masks[split][top:bottom, left:right] += 1
    self.assertEqual(masks['train'].max(), 1)
    self.assertEqual(masks['test'].max(), 1)
    self.assertFalse((masks['train'] & masks['test']).any())
    self.assertTrue((masks['train'] | masks['test']).all())
    # Test blocks touch every row band and every column band of the photo.
    self.assertTrue(masks['test'].any(axis=1).all())
    self.assertTrue(masks['test'].any(axis=0).all())

  def test_no_test_patch_overlaps_a_train_pixel(self):
    shapes = [(427, 640), (427, 640)]
    boxes = data.embedded_patch_boxes(32, 600, 200, seed=0, photo_shapes=shapes)
    for photo in range(len(shapes)):
      masks = {}
      for split, split_boxes in boxes.items():
        masks[split] = np.zeros(shapes[photo], bool)
        for p, top, left, side in split_boxes:
          if p == photo:
            masks[split][top : top + side, left : left + side] = True
        self.assertTrue(masks[split].any())
      self.assertFalse((masks['train'] & masks['test']).any())
    sides = np.concatenate([b[:, 3] for b in boxes.values()])
    self.assertBetween(sides.min(), 32, 33)
    self.assertGreater(sides.max(), 64)  # zoomed-out crops, up to 3x
    self.assertLessEqual(sides.max(), 96)

  def test_too_large_image_size(self):
    with self.assertRaisesRegex(ValueError, 'image_size'):
      data.embedded_patch_boxes(120, 10, 10, photo_shapes=[(427, 640)])

  def test_build_load_and_reuse(self):
    data_dir = self.get_temp_dir()
    self.assertEqual(data.build_embedded_dataset(data_dir, **self._ARGS), data_dir)
    version_dir = os.path.join(
      data_dir, data.EMBEDDED_NAME, '16x16_n40_t10_seed1', data.EMBEDDED_VERSION
    )
    info = os.path.join(version_dir, 'dataset_info.json')
    stamp = os.stat(info).st_mtime_ns
    self.assertEqual(data.build_embedded_dataset(data_dir, **self._ARGS), data_dir)
    self.assertEqual(os.stat(info).st_mtime_ns, stamp)
    self.assertEqual(os.listdir(data_dir), [data.EMBEDDED_NAME])  # no temporary folder left

    config = _embedded_config(data_dir, **self._ARGS)
    expected = data.embedded_patches(**self._ARGS)
    for split in ('train', 'test'):
      loaded = np.stack(list(data.load_split(config, split).as_numpy_iterator()))
      self.assertAllEqual(loaded, expected[split])
    self.assertEqual(os.stat(info).st_mtime_ns, stamp)
    batch = _batches(data.make_train_dataset(config, 8), 1)[0]
    self.assertEqual(batch.shape, (8, 16, 16, 3))
    # The same files through the plain TFDS API.
    ds = tfds.load(
      f'{data.EMBEDDED_NAME}/16x16_n40_t10_seed1', split='test', data_dir=data_dir, download=False
    )
    self.assertLen(list(ds), 10)

  def test_build_is_deterministic(self):
    def record_bytes(seed):
      data_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
      data.build_embedded_dataset(data_dir, **{**self._ARGS, 'seed': seed})
      version_dir = os.path.join(
        data_dir,
        data.EMBEDDED_NAME,
        data.embedded_config_name(**{**self._ARGS, 'seed': seed}),
        data.EMBEDDED_VERSION,
      )
      return {
        name: open(os.path.join(version_dir, name), 'rb').read()
        for name in sorted(os.listdir(version_dir))
        if 'tfrecord' in name
      }

    first, again, other = record_bytes(1), record_bytes(1), record_bytes(2)
    self.assertLen(first, 2)
    self.assertEqual(first, again)
    self.assertNotEqual(first, other)

  def test_builder_stores_the_generator_patches_as_the_old_build_did(self):
    args = dict(image_size=8, num_train=300, num_test=60, seed=0)
    name = data.embedded_config_name(**args)
    expected = data.embedded_patches(**args)
    root = self.get_temp_dir()

    def store_version_1(data_dir, patches):  # what build_embedded_dataset wrote by hand before
      tfds.dataset_builders.store_as_tfds_dataset(
        name=data.EMBEDDED_NAME,
        version='1.0.0',
        config=name,
        features=tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(8, 8, 3))}),
        split_datasets={
          split: [(i, {'image': image}) for i, image in enumerate(images)]
          for split, images in patches.items()
        },
        data_dir=data_dir,
        disable_shuffling=True,
      )

    old_dir, new_dir = os.path.join(root, 'old'), os.path.join(root, 'new')
    store_version_1(old_dir, expected)
    # A stale 1.0.0 build of other images in the new data_dir must not be read.
    store_version_1(new_dir, {split: np.zeros_like(images) for split, images in expected.items()})
    builder = embedded.DenseflowPhotoPatches(config=name, data_dir=new_dir)
    self.assertFalse(builder.is_prepared())
    builder.download_and_prepare(download_dir=os.path.join(root, 'downloads'))  # as `tfds build`
    self.assertTrue(builder.info.disable_shuffling)
    self.assertEqual(str(builder.version), data.EMBEDDED_VERSION)
    self.assertNotEqual(data.EMBEDDED_VERSION, '1.0.0')
    self.assertEqual(data.build_embedded_dataset(new_dir, **args), new_dir)  # reused
    config = _embedded_config(new_dir, **args)
    for split in ('train', 'test'):
      stored = np.stack([x['image'] for x in tfds.as_numpy(builder.as_dataset(split=split))])
      self.assertAllEqual(stored, expected[split])  # same patches, same order
      self.assertAllEqual(
        np.stack(list(data.load_split(config, split).as_numpy_iterator())), stored
      )
      record = f'{data.EMBEDDED_NAME}-{split}.tfrecord-00000-of-00001'
      paths = [
        os.path.join(old_dir, data.EMBEDDED_NAME, name, '1.0.0', record),
        os.path.join(str(builder.data_path), record),
      ]
      old_bytes, new_bytes = (open(path, 'rb').read() for path in paths)
      self.assertEqual(new_bytes, old_bytes)  # byte for byte what the old build wrote

  def test_builder_configs(self):
    cls = embedded.DenseflowPhotoPatches
    self.assertEqual(list(cls.builder_configs), ['32x32', '8x8_n64_t16_seed0'])
    default = cls.get_builder_config('32x32')
    self.assertEqual(
      (default.image_size, default.num_train, default.num_test, default.seed),
      (32, 20_000, 2_000, 0),
    )
    self.assertEqual(str(default.version), data.EMBEDDED_VERSION)
    other = cls.get_builder_config('16x16_n40_t10_seed1')
    self.assertEqual(
      (other.image_size, other.num_train, other.num_test, other.seed), (16, 40, 10, 1)
    )
    self.assertEqual(other.name, data.embedded_config_name(**self._ARGS))
    for name in ('32x32_n20000_t2000_seed0', '16x8', '16x16_n40', 'cifar10'):
      self.assertIsNone(cls.get_builder_config(name), name)
    self.assertIsNone(cls.get_builder_config('16x16_n40_t10_seed1', version='1.0.0'))

  def test_default_config_name(self):
    self.assertEqual(data.embedded_config_name(), '32x32')
    self.assertEqual(data.embedded_config_name(**self._ARGS), '16x16_n40_t10_seed1')

  @pytest.mark.slow
  def test_default_build_is_fast(self):
    data_dir = self.get_temp_dir()
    start = time.perf_counter()
    data.build_embedded_dataset(data_dir)
    seconds = time.perf_counter() - start
    config = data.DataConfig(dataset='embedded', data_dir=data_dir)
    self.assertEqual(data.num_examples(config, 'train'), 20_000)
    self.assertLen(list(data.load_split(config, 'test')), 2_000)
    self.assertLess(seconds, 60.0)


if __name__ == '__main__':
  tf.test.main()
