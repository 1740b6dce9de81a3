"""Throughput benchmark: training step, ELBO evaluation and sampling of a DenseFlow preset.

```
python -m tf_denseflow.bench --preset=small --image_size=32 --batch_size=16 \
    --json=runs/bench_small.json [--steps=10] [--warmup=2] [--jit_compile] \
    [--precision=bfloat16|float16] [--conv_kernels=auto|cpu|library] [--use_recompute_grad] \
    [--phases=train,eval,sample] [--timing_lock=FILE]
```
Random uint8 images, one device. Each phase is one `tf.function` (traced and compiled during the
warm-up calls, which are excluded), timed per call (outputs fetched to the host, so GPU work is
included) and summarised by the median:
- `train`: the training loop's step (`train_step.make_train_step` on the default strategy):
  single-sample ELBO with `training=True` (batch statistics), its gradient, the finiteness guard,
  an Adamax update (`optim.Adamax`, Keras's Adamax with a fused kernel) and the batch-norm running-statistics update.
  `--jit_compile` compiles the loss-and-gradient function with XLA; the noise draws and the
  update stay outside it.
- `eval`: the ELBO with `training=False` (as evaluation runs it, one sample).
- `sample`: `model.sample(batch_size)`.

`--phases` times a subset (the others are reported as skipped). `--precision` is the coupling
networks' compute dtype (`--coupling_dtype`, the older name, works too); float16 trains with the
dynamic loss scale (`precision.DynamicLossScale`). `--conv_kernels` is `tf_denseflow.kernels`'
switch (the JSON records the setting and the kernels it resolved to). On a GPU each phase also
reports its peak GPU memory (`peak_gpu_mb`, from `tf.config.experimental.get_memory_info`, reset
before the phase). `--timing_lock=FILE`: several bench processes on one machine trace their
functions at the same time (CPU work; `trace_s`) while only one at a time runs them (an exclusive
`flock` on FILE from the phase's first call, which then excludes tracing, to its last), so timings
and peak memory are each process's own; `benchmarks/gpu_check.sh` uses it.

FLOPs come from TF's profiler (`tf.compat.v1.profiler`, `float_operation()`) on the eval and
sample functions traced once more with the networks inlined (`nn.shared_function.sharing(False)`:
the profiler does not look inside the function calls of the shared networks): ops with registered flop statistics (MatMul, Conv2D,
BiasAdd, element-wise ops, ...), counted as 2 per multiply-add. The training step counts as 3x the
forward pass (forward + backward), the usual estimate; the gradient graph itself is not counted
(backward convolutions have no registered statistics). For reference, the official model's
conv/matmul cost at 32x32 is 2.32 GMAC per image for `small` and 16.35 GMAC for DenseFlow-74-10;
the profiler gives 2.324 GMAC (4.647 GFLOP) per image for `small` at 32x32.

This machine kind's speed drifts (shared cores): each run also times a 2048^3 fp32 matmul
(`sgemm_gflop_s`, best of 10, before the model is built) so runs can be compared as fractions of the machine's GEMM speed at
the time (performance.md: ~210 GFLOP/s on an idle machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from tf_denseflow.bench_phases import (  # noqa: F401 -- re-exported
  build_phases,
  count_flops,
  device_info,
  sgemm_gflop_s,
)
from tf_denseflow.checks import INT32_MAX as _INT32_MAX
from tf_denseflow.checks import INT64_MAX as _INT64_MAX
from tf_denseflow.config import COUPLING_DTYPES, PRESETS
from tf_denseflow.kernels import CONV_KERNELS

__all__ = [
  'OFFICIAL_GMAC_32',
  'PHASES',
  'count_flops',
  'define_bench_flags',
  'format_table',
  'run_benchmark',
]

# The official conv/matmul cost of one log-likelihood pass per 32x32 image (multiply-adds).
OFFICIAL_GMAC_32 = {'small': 2.32, 'denseflow_74_10': 16.35}


PHASES = ('train', 'eval', 'sample')


def _make_config(
  preset: str, image_size: int, coupling_dtype: str, use_recompute_grad: bool = False
):
  from tf_denseflow.config import DenseFlowConfig

  if preset not in PRESETS:
    raise ValueError(f'Unknown preset {preset!r}; choose one of {", ".join(PRESETS)}.')
  return getattr(DenseFlowConfig, preset)(
    (image_size, image_size, 3),
    coupling_dtype=coupling_dtype,
    use_recompute_grad=use_recompute_grad,
  )


def _fetch(outputs) -> None:
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
        _fetch(call(i))
        if i == 0:
          result['first_call_s'] = time.perf_counter() - start
      times = []
      for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        _fetch(call(i))
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
    The JSON-ready result (see the module docstring); a phase that fails holds `error`.
    Per phase: `step_s` (median), `step_s_all`, `img_s`, `first_call_s`, and on a GPU
    `peak_gpu_mb`; `conv_kernels` (the setting) and `conv_kernels_resolved` ('cpu'/'library').

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

  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
  result = {
    'train': phases['train'],
    'eval': phases['eval'],
    'sample': phases['sample'],
    'peak_rss_mb': rss_mb,
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


def format_table(result: Dict[str, Any], name: str = '') -> str:
  """A plain-text summary of `run_benchmark`'s result."""
  cfg = result['config']
  h, w, c = cfg['image_shape']
  lines = [
    f'DenseFlow bench {name}: {h}x{w}x{c}, batch {result["batch_size"]}, '
    f'{result["params"]:,} params, jit_compile={result["jit_compile"]}, '
    f'coupling_dtype={cfg["coupling_dtype"]}, recompute_grad={cfg.get("use_recompute_grad", False)}'
    f', conv_kernels={result.get("conv_kernels_resolved", "cpu")}',
    f'{"phase":<8}{"step_s":>10}{"img/s":>10}{"GFLOP/img":>11}{"GFLOP/s":>10}{"1st call s":>12}',
  ]
  flops = result.get('gflop_per_image') or {}
  for phase in ('train', 'eval', 'sample'):
    r = result[phase]
    if r.get('skipped'):
      lines.append(f'{phase:<8}  skipped')
      continue
    if 'error' in r:
      lines.append(f'{phase:<8}  failed: {r["error"]}')
      continue
    per_image = flops.get(phase)
    lines.append(
      f'{phase:<8}{r["step_s"]:>10.4f}{r["img_s"]:>10.1f}'
      f'{per_image if per_image is not None else float("nan"):>11.3f}'
      f'{r.get("gflop_s", float("nan")):>10.1f}{r.get("first_call_s", float("nan")):>12.1f}'
    )
  lines.append(
    f'peak RSS {result["peak_rss_mb"]:.0f} MB'
    + (f', peak GPU memory {result["peak_gpu_mb"]:.0f} MB' if 'peak_gpu_mb' in result else '')
  )
  gemm = result.get('sgemm_gflop_s')
  if gemm:
    train = result['train'].get('gflop_s')
    share = f'; the train step runs at {100 * train / gemm:.0f}% of it' if train else ''
    lines.append(f'machine: 2048^3 fp32 matmul {gemm:.0f} GFLOP/s{share}')
  if flops:
    lines.append(f'FLOPs: {flops["source"]}')
  return '\n'.join(lines)


def define_bench_flags() -> None:
  """Defines this entry point's flags (called only from `run`, never on import)."""
  from absl import flags

  from tf_denseflow import flags as flags_lib

  define = flags_lib.define  # leaves a flag another program defined (tests) as it is
  define(flags.DEFINE_enum, 'preset', 'small', list(PRESETS), 'DenseFlowConfig preset.')
  define(
    flags.DEFINE_integer,
    'image_size',
    32,
    'Image height = width in pixels.',
    lower_bound=1,
    upper_bound=_INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'batch_size',
    16,
    'Images per call.',
    lower_bound=1,
    upper_bound=_INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'steps',
    10,
    'Timed calls per phase (median reported).',
    lower_bound=1,
    upper_bound=_INT32_MAX,
  )
  define(
    flags.DEFINE_integer,
    'warmup',
    2,
    'Untimed calls per phase first (tracing).',
    lower_bound=1,
    upper_bound=_INT32_MAX,
  )
  define(flags.DEFINE_bool, 'jit_compile', False, 'XLA-compile the loss/gradient, eval and sample.')
  define(
    flags.DEFINE_enum, 'coupling_dtype', 'float32', list(COUPLING_DTYPES), 'Coupling-net dtype.'
  )
  define(
    flags.DEFINE_enum,
    'precision',
    None,
    list(COUPLING_DTYPES),
    'Coupling-net compute dtype (float16 with dynamic loss scaling); default --coupling_dtype.',
  )
  define(
    flags.DEFINE_enum,
    'conv_kernels',
    'auto',
    list(CONV_KERNELS),
    'Convolution kernels: cpu, library (tf.nn.conv2d) or auto (library on a GPU).',
  )
  define(
    flags.DEFINE_list, 'phases', list(PHASES), f'Phases to time, a subset of {",".join(PHASES)}.'
  )
  define(
    flags.DEFINE_string,
    'timing_lock',
    None,
    'flock this file around the timed calls of each phase (parallel bench processes).',
  )
  define(
    flags.DEFINE_bool,
    'use_recompute_grad',
    False,
    'Recompute coupling-network activations in the backward pass.',
  )
  define(flags.DEFINE_bool, 'count_flops', True, 'Count FLOPs with the TF profiler.')
  define(flags.DEFINE_string, 'json', None, 'Write the result to this JSON file.')
  define(
    flags.DEFINE_integer,
    'seed',
    0,
    'Data and initialisation seed.',
    lower_bound=0,
    upper_bound=_INT64_MAX,
  )


def main(argv: List[str]) -> None:
  """The `python -m tf_denseflow.bench` entry point (absl).

  Bad flags end it with one `error: ...` line on stderr and exit status 2; a failed phase with
  exit status 1 after the table.
  """
  from absl import flags

  from tf_denseflow import flags as flags_lib

  flags_lib.quiet_logs(flags.FLAGS)
  f = flags.FLAGS
  if len(argv) > 1:
    flags_lib.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  dtype = f.coupling_dtype
  if f.precision is not None:
    if not f['coupling_dtype'].using_default_value and f.coupling_dtype != f.precision:
      flags_lib.fail(
        f'--precision={f.precision} and --coupling_dtype={f.coupling_dtype} disagree; give one.'
      )
    dtype = f.precision
  bad_phases = [p for p in f.phases if p not in PHASES]
  if bad_phases or not f.phases:
    flags_lib.fail(f'--phases={",".join(f.phases)}: choose from {",".join(PHASES)}.')
  try:
    config = _make_config(f.preset, f.image_size, dtype, f.use_recompute_grad)
  except ValueError as e:
    flags_lib.fail(f'--preset={f.preset} --image_size={f.image_size}: {e}')
  if f.json:  # before the (slow) run: the result must have somewhere to go
    directory = os.path.dirname(f.json)
    try:
      if directory:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
      flags_lib.fail(f'--json={f.json}: cannot create its directory ({e.strerror or e}).')
    target = f.json if os.path.exists(f.json) else (directory or '.')
    if os.path.isdir(f.json) or not os.access(target, os.W_OK):
      flags_lib.fail(f'--json={f.json}: not a writable file path.')
  from tf_denseflow import kernels

  kernels.set_conv_kernels(f.conv_kernels)
  result = run_benchmark(
    config,
    f.batch_size,
    f.steps,
    f.warmup,
    f.jit_compile,
    f.count_flops,
    f.seed,
    phases=f.phases,
    timing_lock=f.timing_lock,
  )
  result['preset'] = f.preset
  if f.preset in OFFICIAL_GMAC_32 and f.image_size == 32:
    result['official_gmac_per_image_32'] = OFFICIAL_GMAC_32[f.preset]
  print(format_table(result, f.preset))
  if f.json:
    with open(f.json, 'w') as out:
      json.dump(result, out, indent=2, sort_keys=True)
    print(f'Wrote {f.json}')
  if any('error' in result[p] for p in PHASES):
    sys.exit(1)


def run() -> None:
  """Defines the flags and runs `main` (the `python -m tf_denseflow.bench` entry point)."""
  from absl import app

  from tf_denseflow import flags as flags_lib

  define_bench_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)


if __name__ == '__main__':
  run()
