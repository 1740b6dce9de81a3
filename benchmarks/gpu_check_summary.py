"""Collects the bench JSONs of `benchmarks/gpu_check.sh` into one `gpu_check.json` and a table.

```
python benchmarks/gpu_check_summary.py --out=runs/gpu_check --runs=fp32,bf16 --rcs=0,0 \
    --tests_rc=0 --elapsed_s=400 --dry_run=0
```
Per run: `step_s` (median training step), `img_s`, `peak_gpu_mb` (the training phase's peak,
`tf.config.experimental.get_memory_info('GPU:0')['peak']`), `imagenet64_epoch_h` (1,281,167
training images / img/s, in hours, on this one GPU), `first_call_s` and `trace_s`; or `error`
(the bench's, a timeout, or a missing JSON). Standard library only (no TensorFlow import).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

IMAGENET64_TRAIN_IMAGES = 1_281_167


def summarize_run(path: str, rc: int) -> Dict[str, Any]:
  """One run's summary from its bench JSON at `path` and its exit status `rc`."""
  if not os.path.exists(path):
    why = 'timed out (the deadline)' if rc in (124, 137) else f'no JSON (exit status {rc})'
    return {'error': why, 'rc': rc}
  with open(path) as f:
    result = json.load(f)
  train = result['train']
  out: Dict[str, Any] = {
    'rc': rc,
    'precision': result['config']['coupling_dtype'],
    'jit_compile': result['jit_compile'],
    'conv_kernels': result.get('conv_kernels_resolved'),
    'batch_size': result['batch_size'],
    'image_shape': result['config']['image_shape'],
    'params': result['params'],
    'train_skipped_steps': result.get('train_skipped_steps'),
    'device': result['device'],
  }
  if 'error' in train:
    out['error'] = train['error']
    return out
  out.update(
    step_s=train['step_s'],
    img_s=train['img_s'],
    peak_gpu_mb=train.get('peak_gpu_mb'),
    imagenet64_epoch_h=IMAGENET64_TRAIN_IMAGES / train['img_s'] / 3600.0,
    first_call_s=train.get('first_call_s'),
    trace_s=train.get('trace_s'),
    step_s_all=train['step_s_all'],
  )
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='gpu_check.sh output directory.')
  parser.add_argument('--runs', required=True, help='Comma-separated run names.')
  parser.add_argument('--rcs', required=True, help='Comma-separated exit statuses, same order.')
  parser.add_argument('--tests_rc', type=int, required=True)
  parser.add_argument('--elapsed_s', type=int, required=True)
  parser.add_argument('--dry_run', default='0')
  args = parser.parse_args(argv)
  names, rcs = args.runs.split(','), [int(rc) for rc in args.rcs.split(',')]
  if len(names) != len(rcs):
    parser.error(f'--runs has {len(names)} names, --rcs {len(rcs)} statuses.')
  runs = {n: summarize_run(os.path.join(args.out, f'{n}.json'), rc) for n, rc in zip(names, rcs)}
  summary = {
    'dry_run': args.dry_run == '1',
    'elapsed_s': args.elapsed_s,
    'tests': {'rc': args.tests_rc, 'log': os.path.join(args.out, 'tests.log')},
    'imagenet64_train_images': IMAGENET64_TRAIN_IMAGES,
    'runs': runs,
  }
  path = os.path.join(args.out, 'gpu_check.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2, sort_keys=True)

  print(f'tests: exit status {args.tests_rc} ({summary["tests"]["log"]})')
  print(
    f'{"run":<18}{"step_s":>9}{"img/s":>9}{"peak GPU MB":>13}{"IN64 epoch h":>14}{"1st call s":>12}'
  )
  for name, r in runs.items():
    if 'error' in r:
      print(f'{name:<18}  {r["error"]}')
      continue
    peak = r['peak_gpu_mb']
    print(
      f'{name:<18}{r["step_s"]:>9.3f}{r["img_s"]:>9.1f}'
      f'{peak if peak is not None else float("nan"):>13.0f}{r["imagenet64_epoch_h"]:>14.2f}'
      f'{r["first_call_s"] or float("nan"):>12.1f}'
    )
  print(f'{args.elapsed_s} s in all. Wrote {path}')
  failed = args.tests_rc != 0 or any('error' in r for r in runs.values())
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
