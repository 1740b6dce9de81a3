"""What `python -m tf_denseflow.bench` times and counts (also used by `benchmarks/`).

`build_phases` builds a fresh model and the three timed functions (the training loop's own step,
the ELBO evaluation, sampling; `bench_timing.run_benchmark` times them); `count_flops` counts a
traced graph's float operations with TF's profiler; `sgemm_gflop_s` calibrates the machine;
`device_info` describes it; `make_config` is a preset's `DenseFlowConfig`.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import time
from typing import Any, Dict, Optional

import numpy as np

from tf_denseflow.config import PRESETS

__all__ = [
  'PHASES',
  'build_phases',
  'count_flops',
  'device_info',
  'make_config',
  'peak_rss_mb',
  'sgemm_gflop_s',
]

PHASES = ('train', 'eval', 'sample')


def peak_rss_mb() -> float:
  """The process's peak resident set so far (`ru_maxrss`, MB); it never goes down."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def count_flops(fn, *args) -> Optional[float]:
  """Float operations of `fn(*args)` (TF profiler), or None if unavailable.

  `fn` is traced for the count with the networks inlined (`shared_function.sharing(False)`):
  TF's profiler counts the ops of one graph and does not look inside function calls, so a graph
  calling the shared network functions would count only what is around them.
  """
  import tensorflow as tf

  from tf_denseflow.nn import shared_function

  logger, level = tf.get_logger(), tf.get_logger().level
  logger.setLevel('ERROR')  # the v1 profiler warns about its own deprecated internals
  try:
    with shared_function.sharing(False):
      graph = tf.function(fn, autograph=False).get_concrete_function(*args).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    return float(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)
  except Exception:  # noqa: BLE001 -- the profiler is best effort; timing does not depend on it.
    return None
  finally:
    logger.setLevel(level)


def sgemm_gflop_s(size: int = 2048, repeats: int = 10) -> float:
  """Best-of-`repeats` GFLOP/s of a `size`^3 fp32 matmul in a `tf.function` (calibration)."""
  import tensorflow as tf

  a = tf.random.stateless_normal([size, size], seed=[0, 0])
  matmul = tf.function(lambda x: tf.matmul(x, x), autograph=False)
  matmul(a).numpy()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).numpy()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best / 1e9


def device_info() -> Dict[str, Any]:
  """TensorFlow and Python versions, machine, CPU count and GPU names (for the result JSON)."""
  import tensorflow as tf

  gpus = tf.config.list_physical_devices('GPU')
  info = {
    'tensorflow': tf.__version__,
    'python': platform.python_version(),
    'machine': platform.machine(),
    'cpu_count': os.cpu_count(),
    'gpus': [],
  }
  for gpu in gpus:
    details = tf.config.experimental.get_device_details(gpu)
    info['gpus'].append(details.get('device_name', gpu.name))
  return info


def build_phases(
  config, batch_size: int, jit_compile: bool = False, seed: int = 0, with_train: bool = True
):
  """A fresh, initialised model of `config` and the three timed functions (untraced).

  Returns a dict: `model`, `batches` (two random uint8 batches), `train` (called as
  `train(iterator)`), `iterator`, `eval` (`eval(images, seed_of(i))`), `sample`
  (`sample(seed_of(i))`), `seed_of`, `build_s`, `init_s`, `loss_scale` (the training step's
  `precision.DynamicLossScale` when `config.coupling_dtype` is 'float16', else None),
  `skipped_steps` (int64 variable: training steps whose update was skipped). With
  `with_train=False` no optimizer slots or training step exist (as in an evaluation or
  sampling process): `train`, `iterator`, `loss_scale` and `skipped_steps` are None. Also used by
  `benchmarks/profile_train_step.py`.
  """
  import tensorflow as tf

  from tf_denseflow import xla
  from tf_denseflow.model import DenseFlow

  rng = np.random.default_rng(seed)
  shape = (batch_size,) + tuple(config.image_shape)
  batches = [tf.constant(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(2)]
  start = time.perf_counter()
  model = DenseFlow(config, seed=seed)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  model.initialize(batches[0])
  init_s = time.perf_counter() - start
  parts = {'train': None, 'iterator': None, 'loss_scale': None, 'skipped_steps': None}
  if with_train:
    parts.update(_train_step(model, batches, batch_size, jit_compile, seed))
  compile_fn = (
    xla.jit if jit_compile else lambda fn: tf.function(fn, jit_compile=False, autograph=False)
  )

  def seed_of(i):
    return tf.constant([seed, i], tf.int64)

  return dict(
    parts,
    model=model,
    batches=batches,
    eval=compile_fn(lambda images, s: model.elbo(images, s)),
    sample=compile_fn(lambda s: model.sample(batch_size, s)),
    seed_of=seed_of,
    build_s=build_s,
    init_s=init_s,
  )


def _train_step(model, batches, batch_size: int, jit_compile: bool, seed: int) -> Dict[str, Any]:
  """The training loop's own step (`train_step.make_train_step`) on the default strategy.

  Noise drawn outside the (optionally XLA-compiled) loss-and-gradient function, batch-norm
  statistics recorded and assigned with the update, finiteness guard; Adamax slots built.
  """
  import tensorflow as tf

  from tf_denseflow import precision, replica_loss, seeds
  from tf_denseflow import train_step as train_step_lib
  from tf_denseflow.optim import Adamax

  variables = model.trainable_variables
  optimizer = Adamax(learning_rate=1e-3)
  optimizer.build(variables)  # eagerly: tracing the slot creation is ~3x slower
  loss_scale = precision.loss_scale_for(model.config.coupling_dtype)
  skipped = tf.Variable(0, dtype=tf.int64, trainable=False)
  train_step = train_step_lib.make_train_step(
    tf.distribute.get_strategy(),
    model,
    optimizer,
    variables,
    lambda images, s, replica: replica_loss.replica_noise(
      model, s, replica, batch_size, batch_size
    ),
    lambda images, noise: replica_loss.nll_given_noise(model, images, noise, training=True),
    batch_size,
    tf.Variable(0, dtype=tf.int64, trainable=False),
    skipped,
    seed_fn=lambda s: seeds.step_seed(seed, s),
    learning_rate_fn=lambda s: tf.constant(1e-3),
    jit_compile=jit_compile,
    loss_scale=loss_scale,
  )
  return {
    'train': train_step,
    'iterator': iter(tf.data.Dataset.from_tensor_slices(tf.stack(batches)).repeat()),
    'loss_scale': loss_scale,
    'skipped_steps': skipped,
  }


def make_config(
  preset: str, image_size: int, coupling_dtype: str = 'float32', use_recompute_grad: bool = False
):
  """`DenseFlowConfig.<preset>` for `image_size` x `image_size` x 3 images.

  Raises:
    ValueError: an unknown preset (the message lists them), or a bad size or dtype.
  """
  from tf_denseflow.config import DenseFlowConfig

  if preset not in PRESETS:
    raise ValueError(f'Unknown preset {preset!r}; choose one of {", ".join(PRESETS)}.')
  return getattr(DenseFlowConfig, preset)(
    (image_size, image_size, 3),
    coupling_dtype=coupling_dtype,
    use_recompute_grad=use_recompute_grad,
  )
