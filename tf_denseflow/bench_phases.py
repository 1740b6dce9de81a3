"""The pieces `python -m tf_denseflow.bench` times and counts (also used by `benchmarks/`).

`run_benchmark` times the three phases of a fresh model (the training loop's own step, the ELBO
evaluation, sampling) that `build_phases` builds; `count_flops` counts a traced graph's float
operations with TF's profiler; `sgemm_gflop_s` calibrates the machine; `device_info` describes
it; `make_config` is a preset's `DenseFlowConfig`. TensorFlow is imported inside the functions,
so `bench`'s flag errors come before the slow import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np

from tf_denseflow.checks import INT32_MAX as _INT32_MAX
from tf_denseflow.checks import INT64_MAX as _INT64_MAX
from tf_denseflow.config import PRESETS

__all__ = [
  'PHASES',
  'build_phases',
  'count_flops',
  'device_info',
  'fetch',
  'make_config',
  'peak_rss_mb',
  'run_benchmark',
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


def build_phases(config, batch_size: int, jit_compile: bool = False, seed: int = 0):
  """A fresh, initialised model of `config` and the three timed functions (untraced).

  Returns a dict: `model`, `batches` (two random uint8 batches), `train` (called as
  `train(iterator)`), `iterator`, `eval` (`eval(images, seed_of(i))`), `sample`
  (`sample(seed_of(i))`), `seed_of`, `build_s`, `init_s`, `loss_scale` (the training step's
  `precision.DynamicLossScale` when `config.coupling_dtype` is 'float16', else None),
  `skipped_steps` (int64 variable: training steps whose update was skipped). Also used
  by `benchmarks/profile_train_step.py`.
  """
  import tensorflow as tf

  from tf_denseflow import precision, replica_loss, seeds, xla
  from tf_denseflow import train_step as train_step_lib
  from tf_denseflow.model import DenseFlow
  from tf_denseflow.optim import Adamax

  rng = np.random.default_rng(seed)
  shape = (batch_size,) + tuple(config.image_shape)
  batches = [tf.constant(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(2)]

  start = time.perf_counter()
  model = DenseFlow(config, seed=seed)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  model.initialize(batches[0])
  init_s = time.perf_counter() - start
  variables = model.trainable_variables
  optimizer = Adamax(learning_rate=1e-3)
  optimizer.build(variables)  # eagerly: tracing the slot creation is ~3x slower
  loss_scale = precision.loss_scale_for(config.coupling_dtype)

  # The training loop's own step (train_step.make_train_step) on the default strategy: noise
  # drawn outside the (optionally XLA-compiled) loss-and-gradient function, batch-norm
  # statistics recorded and assigned with the update, finiteness guard.
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
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
    step,
    skipped,
    seed_fn=lambda s: seeds.step_seed(seed, s),
    learning_rate_fn=lambda s: tf.constant(1e-3),
    jit_compile=jit_compile,
    loss_scale=loss_scale,
  )
  iterator = iter(tf.data.Dataset.from_tensor_slices(tf.stack(batches)).repeat())
  compile_fn = (
    xla.jit if jit_compile else lambda fn: tf.function(fn, jit_compile=False, autograph=False)
  )
  eval_fn = compile_fn(lambda images, s: model.elbo(images, s))
  sample_fn = compile_fn(lambda s: model.sample(batch_size, s))

  def seed_of(i):
    return tf.constant([seed, i], tf.int64)

  return {
    'model': model,
    'batches': batches,
    'train': train_step,
    'iterator': iterator,
    'eval': eval_fn,
    'sample': sample_fn,
    'seed_of': seed_of,
    'build_s': build_s,
    'init_s': init_s,
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


def fetch(outputs) -> None:
  """Copies every output to the host: the call has finished on the device."""
  import tensorflow as tf

  for t in tf.nest.flatten(outputs):
    if hasattr(t, 'numpy'):
      t.numpy()


@contextlib.contextmanager
def _exclusive(lock_path: Optional[str], result: Dict[str, Any]) -> Iterator[None]:
  """Holds an exclusive `flock` on `lock_path` (if given); records the wait in `result`."""
  if not lock_path:
    yield
    return
  start = time.perf_counter()
  with open(lock_path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    result['lock_wait_s'] = time.perf_counter() - start
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _time_phase(
  call: Callable[[int], Any],
  warmup: int,
  steps: int,
  lock_path: Optional[str] = None,
  trace: Optional[Callable[[], Any]] = None,
) -> Dict[str, Any]:
  """Runs `call(i)` `warmup` + `steps` times; timings of the last `steps` calls.

  With `lock_path`, `trace()` first traces the function (CPU work, in parallel with other
  processes; `trace_s`), then every call holds the lock: the first one (graph optimisation, XLA
  compilation, `first_call_s`) and the timed ones run with the device to themselves, and a
  process's device memory peak never overlaps another's (each bench process exits after it).
  """
  result: Dict[str, Any] = {}
  try:
    if lock_path and trace is not None:
      start = time.perf_counter()
      trace()
      result['trace_s'] = time.perf_counter() - start
    with _exclusive(lock_path, result):
      start = time.perf_counter()
      for i in range(warmup):
        fetch(call(i))
        if i == 0:
          result['first_call_s'] = time.perf_counter() - start
      times = []
      for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        fetch(call(i))
        times.append(time.perf_counter() - start)
  except Exception as e:  # noqa: BLE001 -- one failing phase (e.g. an XLA-unsupported op) is reported, the others still run.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = [ln for ln in lines if ln.startswith(('Detected', 'No registered'))] or lines or ['']
    result['error'] = f'{type(e).__name__}: {why[0]}'[:500]
    return result
  result['step_s'] = statistics.median(times)
  result['step_s_all'] = times
  return result


def run_benchmark(
  config,
  batch_size: int,
  steps: int = 10,
  warmup: int = 2,
  jit_compile: bool = False,
  with_flops: bool = True,
  seed: int = 0,
  phases: Sequence[str] = PHASES,
  timing_lock: Optional[str] = None,
) -> Dict[str, Any]:
  """Times the training step, ELBO evaluation and sampling of a fresh model of `config`.

  Args:
    config: a `DenseFlowConfig`.
    batch_size: images per call.
    steps: timed calls per phase (the median is reported).
    warmup: untimed calls first (tracing and compilation; at least 1).
    jit_compile: XLA-compile the loss-and-gradient, eval and sample functions.
    with_flops: count FLOPs with TF's profiler (adds a few seconds for big models; only when the
      `eval` phase runs, whose trace it reuses).
    seed: data and weight-initialisation seed.
    phases: the phases to time, a subset of `PHASES`; the others hold `{'skipped': True}`.
    timing_lock: a file to `flock` around each phase's calls after the first (module docstring).

  Returns:
    The JSON-ready result (`tf_denseflow.bench`'s docstring); a phase that fails holds `error`.
    Per phase: `step_s` (median), `step_s_all`, `img_s`, `first_call_s`, `peak_rss_mb` (the
    process's peak RSS when the phase ended: it includes the phases before it; one phase per
    process for a phase's own, as `bench --isolate_phases` does), and on a GPU `peak_gpu_mb`;
    `conv_kernels` (the setting) and `conv_kernels_resolved` ('cpu'/'library'); `grappler`
    ('on'/'off', `tf_denseflow.grappler`).

  Raises:
    ValueError, TypeError: a bad argument (the message names it).
  """
  import tensorflow as tf

  from tf_denseflow import checks, kernels

  batch_size = checks.check_int('batch_size', batch_size, 1, _INT32_MAX)
  steps = checks.check_int('steps', steps, 1, _INT32_MAX)
  warmup = checks.check_int('warmup', warmup, 1, _INT32_MAX)
  seed = checks.check_int('seed', seed, 0, _INT64_MAX)
  unknown = [p for p in phases if p not in PHASES]
  if unknown or not phases:
    raise ValueError(f'`phases` must be a non-empty subset of {PHASES}, got {list(phases)}.')
  # Calibration first, before the model's graphs and buffers exist.
  gemm = sgemm_gflop_s() if not tf.config.list_physical_devices('GPU') else None
  parts = build_phases(config, batch_size, jit_compile, seed)
  model, batches = parts['model'], parts['batches']
  train_step, eval_fn, sample_fn = parts['train'], parts['eval'], parts['sample']
  iterator, seed_of = parts['iterator'], parts['seed_of']
  build_s, init_s = parts['build_s'], parts['init_s']

  calls = {
    'train': lambda i: train_step(iterator),
    'eval': lambda i: eval_fn(batches[i % 2], seed_of(i)),
    'sample': lambda i: sample_fn(seed_of(i)),
  }
  traces = {  # the same input signatures as the calls: these traces are the ones called
    'train': lambda: train_step.get_concrete_function(iterator),
    'eval': lambda: eval_fn.get_concrete_function(batches[0], seed_of(0)),
    'sample': lambda: sample_fn.get_concrete_function(seed_of(0)),
  }
  gpu = bool(tf.config.list_logical_devices('GPU'))
  timed = {}
  for name in PHASES:
    if name not in phases:
      timed[name] = {'skipped': True}
      continue
    if gpu:
      tf.config.experimental.reset_memory_stats('GPU:0')
    timed[name] = _time_phase(calls[name], warmup, steps, timing_lock, traces[name])
    timed[name]['peak_rss_mb'] = peak_rss_mb()  # so far: the process's phases add up
    if gpu:
      timed[name]['peak_gpu_mb'] = tf.config.experimental.get_memory_info('GPU:0')['peak'] / 2**20
  phases = timed
  for phase in phases.values():
    if 'step_s' in phase:
      phase['img_s'] = batch_size / phase['step_s']

  flops = None
  if with_flops and 'step_s' in phases['eval']:
    # Traced again with the networks inlined: the profiler counts one graph's ops, not those of
    # the (shared, non-inlined) network functions it calls.
    forward = count_flops(eval_fn.python_function, batches[0], seed_of(0))
    sampling = count_flops(sample_fn.python_function, seed_of(0))
    if forward:
      flops = {
        'source': 'tf.compat.v1.profiler float_operation() on the traced eval/sample graphs; '
        'train = 3 x eval (forward + backward estimate)',
        'eval': forward / batch_size / 1e9,
        'train': 3.0 * forward / batch_size / 1e9,
        'sample': sampling / batch_size / 1e9 if sampling else None,
      }
      for name, phase in phases.items():
        if 'img_s' in phase and flops.get(name):
          phase['gflop_s'] = flops[name] * phase['img_s']

  optimizer_options = tf.config.optimizer.get_experimental_options()
  result = {
    'train': phases['train'],
    'eval': phases['eval'],
    'sample': phases['sample'],
    'peak_rss_mb': peak_rss_mb(),
    'sgemm_gflop_s': gemm,
    'params': model.num_parameters(),
    'config': dataclasses.asdict(config),
    'gflop_per_image': flops,
    'batch_size': batch_size,
    'steps': steps,
    'warmup': warmup,
    'jit_compile': jit_compile,
    'conv_kernels': kernels.get_conv_kernels(),
    'conv_kernels_resolved': kernels.resolve(),
    # Whether the functions ran through grappler (`tf_denseflow.grappler`; TF's default: on).
    'grappler': 'off' if optimizer_options.get('disable_meta_optimizer') else 'on',
    # Skipped training steps (float16 overflows while the loss scale settles) time no update.
    'train_skipped_steps': int(parts['skipped_steps'].numpy()),
    'loss_scale': float(parts['loss_scale'].scale.numpy()) if parts['loss_scale'] else None,
    'build_s': build_s,
    'init_s': init_s,
    'device': device_info(),
  }
  if gpu:
    result['peak_gpu_mb'] = max(p.get('peak_gpu_mb', 0.0) for p in phases.values())
  return result
