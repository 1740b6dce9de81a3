"""The per-example loss of one replica, with replica-independent noise.

With `noise_seeding='global_batch'` (the default) every replica derives the noise of the whole
global batch from the step's seed (`DenseFlow.draw_noise`) and keeps the rows of its own
examples, so example `j` of the global batch gets the same noise whatever the number of replicas;
with `'per_replica'` the replica id is folded into the seed instead (cheaper: no redundant
draws). The training step (`train_step.make_train_step`), the trainer's evaluation and
`python -m tf_denseflow.evaluate` share these. Seeds come from `seeds.py`.
"""

from __future__ import annotations

from typing import List, Tuple

import tensorflow as tf

from tf_denseflow.model import DenseFlow

__all__ = ['negative_elbo', 'nll_given_noise', 'replica_noise']


def replica_noise(
  model: DenseFlow,
  seed: tf.Tensor,
  replica_id,
  global_batch: int,
  size: int,
  noise_seeding: str = 'global_batch',
) -> Tuple[tf.Tensor, List[tf.Tensor]]:
  """The dequantization and augmentation noise of one replica's `size` examples.

  'global_batch': rows `replica_id * size ...` of `model.draw_noise(seed, global_batch)` (example
  j's noise does not depend on the replica count); 'per_replica': the draws of
  `model.elbo(images, fold_in(seed, replica_id))`.

  Drawn by TF's kernels outside any XLA cluster (XLA's stateless generators give other numbers
  for the same seed), so `--jit_compile` does not change the noise.
  """
  replica_id = tf.cast(replica_id, tf.int64)
  if noise_seeding == 'per_replica':
    return model.draw_noise(tf.random.experimental.stateless_fold_in(seed, replica_id), size)
  return model.draw_noise(seed, global_batch, replica_id * size, size)


def nll_given_noise(model: DenseFlow, images, noise, training: bool) -> tf.Tensor:
  """`-elbo` in nats, `[B]`, with the noise `(u, [noise_1, ...])` of `replica_noise`."""
  u, augmentation = noise
  terms = model.elbo_terms(images, training=training, dequant_noise=u, noise=augmentation)
  return -terms['total']


def negative_elbo(
  model: DenseFlow,
  images: tf.Tensor,
  seed: tf.Tensor,
  replica_id,
  global_batch: int,
  training: bool,
  noise_seeding: str = 'global_batch',
) -> tf.Tensor:
  """Single-sample negative ELBO in nats, `[B]`, of one replica's slice of a global batch.

  Args:
    model: the flow.
    images: uint8 `[B, H, W, C]`, rows `replica_id * B ...` of the global batch.
    seed: the step's stateless seed `[2]` (int64).
    replica_id: the replica's index (int or scalar tensor).
    global_batch: examples in the global batch (`B * replicas`).
    training: batch-norm mode.
    noise_seeding: 'global_batch' (noise of global row j is the same for any replica count) or
      'per_replica' (`model.elbo` with the replica id folded into the seed).

  Returns:
    `-elbo`, `[B]`.

  Raises:
    ValueError: the batch size is not static.
  """
  size = images.shape[0]
  if size is None:
    raise ValueError('negative_elbo needs a static batch size.')
  noise = replica_noise(model, seed, replica_id, global_batch, size, noise_seeding)
  return nll_given_noise(model, images, noise, training)
