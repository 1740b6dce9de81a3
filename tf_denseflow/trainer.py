"""The trainer: the run's strategy, model, optimizer and checkpoint, and its compiled functions.

Orbit's seams (`orbit.StandardTrainer` / `StandardEvaluator`): a `Trainer` owns the state and
the `tf.function`s, and `train(num_steps)` runs `num_steps` steps in one call (the inner loop);
the outer loop in `train_lib.train` owns the cadence of logging, evaluation, checkpoints and
samples. The step itself (loss, one all-reduce, guarded update) is `train_step.py`'s, the
replica's loss with replica-independent noise `replica_loss.py`'s.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from tf_denseflow import cluster, grappler, precision, seeds
from tf_denseflow import data as data_lib
from tf_denseflow import train_step as train_step_lib
from tf_denseflow import workdir as workdir_lib
from tf_denseflow.model import DenseFlow
from tf_denseflow.optim import Adamax
from tf_denseflow.replica_loss import negative_elbo, nll_given_noise, replica_noise
from tf_denseflow.train_config import ConfigError, TrainConfig, TrainingError

__all__ = [
  'Trainer',
]


# -------------------------------------------------------------------------------------------------
# The trainer.


class Trainer:
  """The state of a run and the functions that advance, evaluate and sample it.

  Attributes:
    config: the run's settings.
    strategy: the MirroredStrategy every variable lives under.
    model: the flow; `optimizer`: its Adamax; `step`: the global step (int64 variable, counts
      skipped steps too); `nonfinite_steps`: skipped steps (int64 variable).
    manager: the `tf.train.CheckpointManager` this worker saves with: `WORKDIR/checkpoints` on
      the chief, a temporary `WORKDIR/checkpoints/workertemp_<task>` (removed after every save)
      on the other workers of a multi-worker run.
    worker: this process's `cluster.WorkerInfo` (chief or not, number of workers).
    loss_scale: the `precision.DynamicLossScale` of float16 training (checkpointed), else None.
    checkpoint_dir: `WORKDIR/checkpoints`, where every worker restores from.
  """

  def __init__(
    self,
    config: TrainConfig,
    strategy: tf.distribute.Strategy,
    workdir: str,
    learning_rate_fn: Callable[[tf.Tensor], tf.Tensor],
  ):
    """Builds the model, optimizer and checkpoint under `strategy` (nothing is restored yet).

    Args:
      config: the run's settings (batch sizes divisible by the replica count).
      strategy: the distribution strategy.
      workdir: the run directory (checkpoints go to `WORKDIR/checkpoints`).
      learning_rate_fn: the learning rate at a step (`train_config.WarmupSchedule`).
    """
    self.config = config
    self.strategy = strategy
    self.global_batch = config.optim.global_batch_size
    self.eval_batch = config.eval_batch_size or self.global_batch
    with strategy.scope():
      self.model = DenseFlow(config.model, seed=config.seed)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
      self.nonfinite_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name='nonfinite_steps')
      self.optimizer = Adamax(
        learning_rate=lambda: learning_rate_fn(self.step), epsilon=config.optim.adamax_epsilon
      )
      self.optimizer.build(self.model.trainable_variables)
      # float16: dynamic loss scaling (precision.py); None for float32 and bfloat16.
      self.loss_scale = precision.loss_scale_for(config.precision)
    self._state = dict(
      model=self.model,
      optimizer=self.optimizer,
      step=self.step,
      nonfinite_steps=self.nonfinite_steps,
    )
    if self.loss_scale is not None:
      self._state['loss_scale'] = self.loss_scale
    checkpoint = tf.train.Checkpoint(
      **self._state, model_config=workdir_lib.model_config_variable(config.model)
    )
    self.worker = cluster.worker_info(strategy)
    self.checkpoint_dir = workdir_lib.checkpoint_dir(workdir)
    # Every worker saves (a save may run collectives); only the chief's files stay.
    self.manager = tf.train.CheckpointManager(
      checkpoint,
      cluster.write_dir(self.checkpoint_dir, self.worker),
      max_to_keep=config.keep_checkpoints,
    )
    self._workdir = workdir
    self._saved_step = -1
    self._train_step = train_step_lib.make_train_step(
      strategy,
      self.model,
      self.optimizer,
      self.model.trainable_variables,
      lambda images, seed, replica_id: replica_noise(
        self.model,
        seed,
        replica_id,
        self.global_batch,
        self.global_batch // strategy.num_replicas_in_sync,
        config.noise_seeding,
      ),
      lambda images, noise: self.replica_loss(self._static_batch(images, self.global_batch), noise),
      self.global_batch,
      self.step,
      self.nonfinite_steps,
      seed_fn=lambda s: seeds.step_seed(config.seed, s),
      learning_rate_fn=learning_rate_fn,
      jit_compile=config.jit_compile,
      loss_scale=self.loss_scale,
    )
    self._train_loop = None
    if config.steps_per_loop > 1:
      self._train_loop = train_step_lib.make_train_loop(self._train_step)
    # Called (so instantiated) with or without grappler as `--grappler` says for the training
    # step (tf_denseflow.grappler: 'auto' goes without it on the 'cpu' kernels).
    step, networks = grappler.training_step_grappler(config.grappler, config.jit_compile)
    self._train_step = grappler.calls_with(self._train_step, step, networks)
    if self._train_loop is not None:
      self._train_loop = grappler.calls_with(self._train_loop, step, networks)
    self._iterator = None
    self._eval_dataset, self._eval_batches, self._eval_iterator = None, 0, None
    if self.can_evaluate:  # checked before any step: the test split is not empty
      self._eval_dataset, self._eval_batches = _distributed_eval_dataset(
        config, strategy, self.eval_batch
      )
    self._eval_loop = tf.function(self._eval_all, autograph=False)
    self._sample = tf.function(
      lambda seed: self.model.sample(config.num_grid_samples, seed, config.sample_temperature),
      autograph=False,
    )

  # ----------------------------------------------------------------- State

  def replica_loss(self, images: tf.Tensor, noise) -> tf.Tensor:
    """The per-example training loss `[B]` (nats) of a replica's images given their noise."""
    return nll_given_noise(self.model, images, noise, training=True)

  def restore_or_initialize(self, resuming: bool) -> int:
    """Restores the latest checkpoint, or initialises ActNorm on the first images; the step.

    A fresh run initialises ActNorm on the first `config.init_examples` images (default: one
    global batch) of the training stream, unsharded, so every worker computes the same init (the
    stream's examples do not depend on its batch size: these are the first steps' images).

    Resuming restores everything, all or nothing (`workdir.restore_checkpoint`): the model
    config the checkpoint was written for, every model and optimizer variable (resuming without
    the Adamax slots would silently restart the moments), the step and the skipped-step counter.
    The restored values must be finite (the update bound of `optim.Adamax` assumes finite slots).

    Raises:
      ConfigError: the checkpoint cannot be resumed (the message says why).
    """
    config = self.config
    if resuming:
      path = self.latest_checkpoint
      try:
        workdir_lib.restore_checkpoint(
          path,
          self._state,
          config.model,
          config_source=(
            f'the model config of this run ({self._workdir}/{workdir_lib.CONFIG_FILE})'
          ),
          exclusive=('model', 'optimizer'),
          # A checkpoint written without float16 (precision is weight-neutral) has no loss
          # scale: it then starts afresh.
          optional=('loss_scale',),
        )
      except workdir_lib.CheckpointError as e:
        raise ConfigError(f'Cannot resume: {e}') from None
      bad = workdir_lib.nonfinite_variables(self._weights() + list(self.optimizer.variables))
      if bad:
        raise ConfigError(f'Cannot resume from {path}: non-finite values in {", ".join(bad[:3])}.')
      self._saved_step = int(self.step.numpy())
    else:
      # ActNorm's data-dependent init, once, in cross-replica context (images: see above).
      count = self.global_batch if config.init_examples is None else config.init_examples
      first = next(iter(data_lib.make_train_dataset(config.data, count, seed=config.seed)))
      with self.strategy.scope():
        self.model.initialize(first, seed=(config.seed, seeds.INIT_STREAM))
      # Every worker computed the same init; the chief's values make it exactly the same.
      cluster.broadcast_from_chief(self.strategy, self._weights())
    step = int(self.step.numpy())
    if not cluster.agree(self.strategy, step):
      raise ConfigError(
        f'The workers start at different steps (this one, {self.worker.name}, at {step}): they '
        f'must all see the same {self.checkpoint_dir} (a shared filesystem).'
      )
    return step

  @property
  def latest_checkpoint(self) -> Optional[str]:
    """The newest checkpoint in `WORKDIR/checkpoints` (the chief's), or None."""
    return tf.train.latest_checkpoint(self.checkpoint_dir)

  def _static_batch(self, images: tf.Tensor, global_batch: int) -> tf.Tensor:
    """`images` with the static per-replica batch (multi-worker datasets leave it unknown)."""
    size = global_batch // self.strategy.num_replicas_in_sync
    return tf.ensure_shape(images, [size, *self.config.model.image_shape])

  def _weights(self) -> list:
    return self.model.trainable_variables + self.model.non_trainable_keras_variables

  def save(self, step: int) -> Optional[str]:
    """Checkpoints the state as `ckpt-<step>` (once per step); returns the latest checkpoint.

    Raises:
      TrainingError: a weight is NaN or Inf (nothing is written).
    """
    if step == self._saved_step:
      return self.latest_checkpoint
    bad = workdir_lib.nonfinite_variables(self._weights())
    if bad:
      raise TrainingError(
        f'Non-finite weights at step {step} ({", ".join(bad[:3])}'
        f'{f" and {len(bad) - 3} more" if len(bad) > 3 else ""}): not saving them. The last '
        f'good checkpoint is {self.latest_checkpoint}.'
      )
    path = self.manager.save(checkpoint_number=step)
    self._saved_step = step
    if not self.worker.is_chief:
      cluster.remove_write_dir(self.checkpoint_dir, self.worker)
      path = os.path.join(self.checkpoint_dir, os.path.basename(path))
    return path

  # ----------------------------------------------------------------- Training

  def train(self, num_steps: int) -> Dict[str, np.ndarray]:
    """Runs `num_steps` steps in one `tf.function` call (`steps_per_loop > 1`) or one by one.

    Returns:
      Every step's `loss`, `grad_norm`, `finite`, `skip_reason` and `learning_rate`, NumPy
      arrays `[num_steps]` in step order.
    """
    if self._iterator is None:  # from the batch after the last one taken (resuming included)
      self._iterator = iter(self.strategy.distribute_datasets_from_function(self._dataset_fn))
    if self._train_loop is None:
      steps = [self._train_step(self._iterator) for _ in range(num_steps)]
      return {k: np.array([s[k].numpy() for s in steps]) for k in train_step_lib.OUTPUT_DTYPES}
    out = self._train_loop(self._iterator, tf.constant(num_steps, tf.int32))
    return {k: v.numpy() for k, v in out.items()}

  def _dataset_fn(self, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    batches_per_step = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    return data_lib.make_train_dataset(
      self.config.data,
      ctx.get_per_replica_batch_size(self.global_batch),
      input_context=ctx,
      seed=self.config.seed,
      skip_batches=int(self.step.numpy()) * batches_per_step,
    )

  # ----------------------------------------------------------------- Evaluation and samples

  @property
  def can_evaluate(self) -> bool:
    """Whether the run evaluates (`eval_examples != 0`)."""
    return self.config.eval_examples != 0

  def evaluate(self) -> float:
    """The single-sample ELBO of the test split (evaluation mode), bits/dim (`can_evaluate`).

    Batch k's noise comes from `seeds.step_seed(seed, k, EVAL_STREAM)`, as in
    `python -m tf_denseflow.evaluate --num_importance_samples=1` with the same batch size.
    """
    if self._eval_iterator is None:  # one iterator for the run: every evaluation takes a pass
      self._eval_iterator = iter(self._eval_dataset)
    batches = tf.constant(self._eval_batches, tf.int64)
    total, count = self._eval_loop(self._eval_iterator, batches)
    return float(total) / max(float(count), 1.0) * self.config.model.bits_per_dim_scale

  def _eval_all(self, iterator, num_batches):
    """The weighted sums of `-elbo` (nats) and of the weights over `num_batches` global batches.

    One `tf.function` call for the whole test split (a `tf.while_loop`, as `make_train_loop`
    does for steps): the host waits once per evaluation, not once per batch. Sums in float64.
    """

    def body(index, total, count):
      t, c = self._eval_batch(next(iterator), index)
      return index + 1, total + tf.cast(t, tf.float64), count + tf.cast(c, tf.float64)

    zero = tf.constant(0.0, tf.float64)
    start = (tf.constant(0, tf.int64), zero, zero)
    _, total, count = tf.while_loop(lambda i, *_: i < num_batches, body, start)
    return total, count

  def _eval_batch(self, batch, index):
    seed = seeds.step_seed(self.config.seed, index, seeds.EVAL_STREAM)
    strategy = self.strategy

    def replica_eval(images, weights):
      ctx = tf.distribute.get_replica_context()
      images = self._static_batch(images, self.eval_batch)
      nll = negative_elbo(
        self.model,
        images,
        seed,
        ctx.replica_id_in_sync_group,
        self.eval_batch,
        False,
        self.config.noise_seeding,
      )
      return tf.reduce_sum(nll * weights), tf.reduce_sum(weights)

    total, count = strategy.run(replica_eval, args=(batch[0], batch[1]))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, total, axis=None)
    return total, strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None)

  def draw_samples(self) -> np.ndarray:
    """`config.num_grid_samples` uint8 samples from the fixed seed `(seed, SAMPLE_STREAM)`.

    No collective runs: in a multi-worker run only the chief draws them.
    """
    with self.strategy.scope():
      return self._sample(seeds.stream_seed(self.config.seed, seeds.SAMPLE_STREAM)).numpy()


def _distributed_eval_dataset(
  config: TrainConfig, strategy: tf.distribute.Strategy, eval_batch: int
) -> Tuple[tf.distribute.DistributedDataset, int]:
  """The test split as `(images, weights)` per replica (`data.make_padded_eval_dataset`),
  repeated, and its number of global batches (one evaluation's pass).

  Repeated so that one iterator serves every evaluation: a fresh iterator per evaluation let
  each evaluation wait on a wall-clock grid of ~20.5 s (idle: 20.5 s against 12-14 s with one
  iterator, docs/benchmarks.md 5.1), and never completed the pipeline's cache.

  Raises:
    ConfigError: the test split is empty.
  """
  count = data_lib.num_examples(config.data, 'test')
  if config.eval_examples is not None:
    count = config.eval_examples if count is None else min(count, config.eval_examples)
  if not count:
    raise ConfigError(f'The test split of {config.data.dataset!r} is empty.')
  dataset = strategy.distribute_datasets_from_function(
    lambda ctx: data_lib.make_padded_eval_dataset(config.data, count, eval_batch, ctx).repeat()
  )
  return dataset, -(-count // eval_batch)
