"""How `python -m tf_denseflow.bench` times the phases that `bench_phases.build_phases` builds.

`run_benchmark` times the training step, ELBO evaluation and sampling of a fresh model (warm-up
calls excluded, outputs fetched to the host, the median reported) and returns the JSON-ready
result that `bench` prints and writes (its module docstring says what each number is).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import statistics
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

from tf_denseflow.bench_phases import (
  PHASES,
  build_phases,
  count_flops,
  device_info,
  peak_rss_mb,
  sgemm_gflop_s,
)
from tf_denseflow.checks import INT32_MAX as _INT32_MAX
from tf_denseflow.checks import INT64_MAX as _INT64_MAX

__all__ = ['add_gflop_s', 'fetch', 'run_benchmark']


def add_gflop_s(phases: Dict[str, Dict[str, Any]], flops: Optional[Dict[str, Any]]) -> None:
  """Sets each timed phase's `gflop_s` (its GFLOP per image x images/s) where both are known."""
  for name, phase in phases.items():
    if 'img_s' in phase and (flops or {}).get(name):
      phase['gflop_s'] = flops[name] * phase['img_s']


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
  grappler_setting: Optional[str] = None,
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
    grappler_setting: `--grappler` ('auto', 'on' or 'off'), for the training step as the
      trainer calls it (`grappler.training_step_grappler`); None: the process's setting for
      every phase (`grappler.set_grappler` sets it for the others).

  Returns:
    The JSON-ready result (`tf_denseflow.bench`'s docstring); a phase that fails holds `error`.
    Per phase: `step_s` (median), `step_s_all`, `img_s`, `first_call_s`, `peak_rss_mb` (the
    process's peak RSS when the phase ended: it includes the phases before it; one phase per
    process for a phase's own, as `bench --isolate_phases` does), and on a GPU `peak_gpu_mb`;
    `conv_kernels` (the setting) and `conv_kernels_resolved` ('cpu'/'library'); `grappler`
    ('on'/'off' for the eval and sample functions, `tf_denseflow.grappler`) and
    `grappler_train` and `grappler_train_networks` (the same for the training step's own graph
    and for the network functions it calls).

  Raises:
    ValueError, TypeError: a bad argument (the message names it).
  """
  import tensorflow as tf

  from tf_denseflow import checks, grappler, kernels

  batch_size = checks.check_int('batch_size', batch_size, 1, _INT32_MAX)
  steps = checks.check_int('steps', steps, 1, _INT32_MAX)
  warmup = checks.check_int('warmup', warmup, 1, _INT32_MAX)
  seed = checks.check_int('seed', seed, 0, _INT64_MAX)
  unknown = [p for p in phases if p not in PHASES]
  if unknown or not phases:
    raise ValueError(f'`phases` must be a non-empty subset of {PHASES}, got {list(phases)}.')
  # Calibration first, before the model's graphs and buffers exist.
  gemm = sgemm_gflop_s() if not tf.config.list_physical_devices('GPU') else None
  parts = build_phases(config, batch_size, jit_compile, seed, with_train='train' in phases)
  model, batches = parts['model'], parts['batches']
  train_step, eval_fn, sample_fn = parts['train'], parts['eval'], parts['sample']
  process_grappler = grappler.process_enabled()
  train_grappler = networks_grappler = process_grappler
  if grappler_setting is not None and train_step is not None:
    train_grappler, networks_grappler = grappler.training_step_grappler(
      grappler_setting, jit_compile
    )
    train_step = grappler.calls_with(train_step, train_grappler, networks_grappler)
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
      add_gflop_s(phases, flops)

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
    'grappler': 'on' if process_grappler else 'off',
    'grappler_train': 'on' if train_grappler else 'off',
    'grappler_train_networks': 'on' if networks_grappler else 'off',
    # Skipped training steps (float16 overflows while the loss scale settles) time no update.
    'train_skipped_steps': (
      None if parts['skipped_steps'] is None else int(parts['skipped_steps'].numpy())
    ),
    'loss_scale': float(parts['loss_scale'].scale.numpy()) if parts['loss_scale'] else None,
    'build_s': build_s,
    'init_s': init_s,
    'device': device_info(),
  }
  if gpu:
    result['peak_gpu_mb'] = max(p.get('peak_gpu_mb', 0.0) for p in phases.values())
  return result
