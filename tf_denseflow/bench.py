"""Throughput benchmark: training step, ELBO evaluation and sampling of a DenseFlow preset.

```
python -m tf_denseflow.bench --preset=small --image_size=32 --batch_size=16 \
    --json=runs/bench_small.json [--steps=10] [--warmup=2] [--jit_compile] \
    [--precision=bfloat16|float16] [--conv_kernels=auto|cpu|library] [--use_recompute_grad] \
    [--phases=train,eval,sample] [--isolate_phases] [--timing_lock=FILE]
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

`--phases` times a subset (the others are reported as skipped). Each phase reports the process's
peak RSS when it ended (`peak_rss_mb`), which includes the phases before it; `--isolate_phases`
runs each phase in a process of its own (model, data and functions built again there), so each
peak is the phase's own, as the official code's is measured (`benchmarks/official_torch_bench.py
--phases=P`). `--precision` is the compute dtype of the conditioner networks (coupling,
cross-unit and dequantization networks; `--coupling_dtype`, the older name, works too); float16
trains with the dynamic loss scale (`precision.DynamicLossScale`). `--conv_kernels` is
`tf_denseflow.kernels`' switch (the JSON records the setting and the kernels it resolved to). On
a GPU each phase also
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

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

from tf_denseflow.bench_phases import (  # noqa: F401 -- re-exported
  PHASES,
  build_phases,
  count_flops,
  device_info,
  make_config,
  sgemm_gflop_s,
)
from tf_denseflow.bench_timing import add_gflop_s, fetch, run_benchmark  # noqa: F401 -- re-exported
from tf_denseflow.checks import INT32_MAX as _INT32_MAX
from tf_denseflow.checks import INT64_MAX as _INT64_MAX
from tf_denseflow.config import COUPLING_DTYPES, PRESETS
from tf_denseflow.grappler import GRAPPLER
from tf_denseflow.kernels import CONV_KERNELS

__all__ = [
  'OFFICIAL_GMAC_32',
  'PHASES',
  'count_flops',
  'define_bench_flags',
  'format_table',
  'make_config',
  'run_benchmark',
  'run_isolated',
]

# The official conv/matmul cost of one log-likelihood pass per 32x32 image (multiply-adds).
OFFICIAL_GMAC_32 = {'small': 2.32, 'denseflow_74_10': 16.35}


def format_table(result: Dict[str, Any], name: str = '') -> str:
  """A plain-text summary of `run_benchmark`'s result."""
  cfg = result['config']
  h, w, c = cfg['image_shape']
  lines = [
    f'DenseFlow bench {name}: {h}x{w}x{c}, batch {result["batch_size"]}, '
    f'{result["params"]:,} params, jit_compile={result["jit_compile"]}, '
    f'coupling_dtype={cfg["coupling_dtype"]}, recompute_grad={cfg.get("use_recompute_grad", False)}'
    f', conv_kernels={result.get("conv_kernels_resolved", "cpu")}'
    f', grappler={result.get("grappler", "on")}'
    f' (train step: {result.get("grappler_train", result.get("grappler", "on"))}, its networks: '
    f'{result.get("grappler_train_networks", result.get("grappler", "on"))})',
    f'{"phase":<8}{"step_s":>10}{"img/s":>10}{"GFLOP/img":>11}{"GFLOP/s":>10}{"1st call s":>12}'
    f'{"peak RSS MB":>13}',
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
      f'{r.get("peak_rss_mb", float("nan")):>13.0f}'
    )
  how = (
    'each phase in a process of its own'
    if result.get('isolated_phases')
    else "per phase: the process's peak when it ended (--isolate_phases: each phase's own)"
  )
  lines.append(
    f'peak RSS {result["peak_rss_mb"]:.0f} MB ({how})'
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
    flags.DEFINE_enum, 'coupling_dtype', 'float32', list(COUPLING_DTYPES), 'Conditioner-net dtype.'
  )
  define(
    flags.DEFINE_enum,
    'precision',
    None,
    list(COUPLING_DTYPES),
    'Conditioner-net compute dtype (float16 with dynamic loss scaling); default --coupling_dtype.',
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
  define(
    flags.DEFINE_enum,
    'grappler',
    'auto',
    list(GRAPPLER),
    "TensorFlow's graph optimizer for the timed functions: auto (off for the training step on "
    'the CPU kernels without XLA, as `train` runs it), on or off (tf_denseflow.grappler).',
  )
  define(flags.DEFINE_bool, 'count_flops', True, 'Count FLOPs with the TF profiler.')
  define(
    flags.DEFINE_bool,
    'isolate_phases',
    False,
    "Run each phase in a process of its own (each phase's own peak RSS).",
  )
  define(flags.DEFINE_string, 'json', None, 'Write the result to this JSON file.')
  define(
    flags.DEFINE_integer,
    'seed',
    0,
    'Data and initialisation seed.',
    lower_bound=0,
    upper_bound=_INT64_MAX,
  )


# What a phase's own process is given (`--isolate_phases`): every flag but the phases, the output
# and the dtype, which goes as the resolved `--coupling_dtype` (`--precision` given next to a
# default `--coupling_dtype` on a command line would read as a disagreement).
_CHILD_FLAGS = (
  'preset',
  'image_size',
  'batch_size',
  'steps',
  'warmup',
  'jit_compile',
  'conv_kernels',
  'grappler',
  'timing_lock',
  'use_recompute_grad',
  'count_flops',
  'seed',
)


def run_isolated(flag_args: List[str], phases: List[str]) -> Dict[str, Any]:
  """Each of `phases` timed by `python -m tf_denseflow.bench` in a process of its own, in turn.

  Args:
    flag_args: the bench flags for every phase's process (`--preset=small`, ...).
    phases: a subset of `PHASES`.

  Returns:
    `run_benchmark`'s result with each phase from its own process: the phase's `peak_rss_mb`
    is that process's peak when the phase ended (before the FLOP count), `peak_rss_mb` the
    largest of the processes' whole peaks, `isolated_phases` True. The FLOP counts
    come from the eval phase's process. A process that wrote no result leaves its phase an
    `error` naming its exit status and last line on stderr.

  Raises:
    RuntimeError: no phase's process wrote a result.
  """
  results: Dict[str, Dict[str, Any]] = {}
  errors: Dict[str, str] = {}
  with tempfile.TemporaryDirectory(prefix='bench_') as tmp:
    for phase in phases:
      path = os.path.join(tmp, f'{phase}.json')
      args = [a for a in flag_args if a] + [f'--phases={phase}', f'--json={path}']
      proc = subprocess.run(
        [sys.executable, '-m', 'tf_denseflow.bench', *args], capture_output=True, text=True
      )
      if os.path.exists(path):
        with open(path) as f:
          results[phase] = json.load(f)
      else:
        last = (proc.stderr.strip().splitlines() or [''])[-1]
        errors[phase] = f'its process exited with status {proc.returncode}: {last}'[:500]
  if not results:
    raise RuntimeError('--isolate_phases: no phase finished; ' + '; '.join(errors.values()))
  merged = dict(next(iter(results.values())))
  merged.update({p: {'skipped': True} for p in PHASES})
  merged.update({p: {'error': why} for p, why in errors.items()})
  for phase, result in results.items():
    merged[phase] = result[phase]  # its peak_rss_mb: that process's, before the FLOP count
  for key in ('train_skipped_steps', 'loss_scale'):  # the training step's own
    merged[key] = (results.get('train') or {}).get(key)
  merged['gflop_per_image'] = (results.get('eval') or {}).get('gflop_per_image')
  add_gflop_s({p: merged[p] for p in PHASES}, merged['gflop_per_image'])
  merged['peak_rss_mb'] = max(r['peak_rss_mb'] for r in results.values())
  gpu = [r['peak_gpu_mb'] for r in results.values() if r.get('peak_gpu_mb') is not None]
  merged.pop('peak_gpu_mb', None)
  if gpu:
    merged['peak_gpu_mb'] = max(gpu)
  merged['isolated_phases'] = True
  return merged


def main(argv: List[str]) -> None:
  """The `python -m tf_denseflow.bench` entry point (absl).

  Bad flags end it with one `error: ...` line on stderr and exit status 2; a failed phase with
  exit status 1 after the table; with `--isolate_phases`, no phase's process finishing with one
  `error: ...` line and exit status 1 (no table).
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
    config = make_config(f.preset, f.image_size, dtype, f.use_recompute_grad)
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
  if f.isolate_phases and len(f.phases) > 1:
    try:
      args = [f[name].serialize() for name in _CHILD_FLAGS] + [f'--coupling_dtype={dtype}']
      result = run_isolated(args, f.phases)
    except RuntimeError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
  else:
    from tf_denseflow import grappler, kernels

    kernels.set_conv_kernels(f.conv_kernels)
    grappler.set_grappler(f.grappler)
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
      grappler_setting=f.grappler,
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
