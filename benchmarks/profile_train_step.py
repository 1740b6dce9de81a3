"""Where the time of a benchmark phase goes: TF profiler op times, summed by op type.

```
python benchmarks/profile_train_step.py --preset=small --batch_size=16 --phase=train --steps=3
python benchmarks/profile_train_step.py --preset=denseflow_74_10 --batch_size=4 --by=name
python benchmarks/profile_train_step.py --preset=small --batch_size=16 --precision=bfloat16
```
Builds the phase exactly as `python -m tf_denseflow.bench` does (`bench.build_phases`), warms it
up, then records `--steps` calls with `tf.profiler.experimental` and sums the executor's op events
(`tf_Compute` lines of the host plane) per op type (`--by=type`) or per op name without its number suffix
(`--by=name`, e.g. `gradient_tape/MatMul`). With `--inter_op=1` (the default) ops run one at a time, so their times add up to
the step and the shares are exact; TF's default (`--inter_op=0`) overlaps independent ops and is
what the bench times.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time


def _parse_xplane(logdir):
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  (path,) = glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*.xplane.pb'))
  space = xplane_pb2.XSpace()
  with open(path, 'rb') as f:
    space.ParseFromString(f.read())
  events = []
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if not line.name.startswith('tf_Compute'):
        continue
      for event in line.events:
        name = names.get(event.metadata_id, '')
        if ':' not in name or '::' in name:
          continue  # spans (ExecutorState::Process, ParallelFor), not op executions
        events.append((names.get(event.metadata_id, '?'), event.duration_ps / 1e9))  # ms
  return events


def _key(name, by):
  op_name, _, op_type = name.rpartition(':')
  if by == 'type':
    return op_type
  return re.sub(r'_\d+', '', op_name) + ':' + op_type


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--phase', choices=['train', 'eval', 'sample'], default='train')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--inter_op', type=int, default=1, help='inter-op threads (0 = TF default)')
  parser.add_argument('--by', choices=['type', 'name'], default='type')
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--use_recompute_grad', action='store_true')
  parser.add_argument(
    '--precision',
    choices=['float32', 'bfloat16', 'float16'],
    default='float32',
    help="the conditioner networks' compute dtype (bench's --precision)",
  )
  args = parser.parse_args(argv)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import tensorflow as tf

  from tf_denseflow import bench

  if args.inter_op:
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
  config = bench.make_config(args.preset, args.image_size, args.precision, args.use_recompute_grad)
  parts = bench.build_phases(config, args.batch_size)
  seed_of, batches = parts['seed_of'], parts['batches']
  call = {
    'train': lambda i: parts['train'](parts['iterator']),
    'eval': lambda i: parts['eval'](batches[i % 2], seed_of(i)),
    'sample': lambda i: parts['sample'](seed_of(i)),
  }[args.phase]
  for i in range(2):
    bench.fetch(call(i))
  logdir = tempfile.mkdtemp(prefix='profile_')
  tf.profiler.experimental.start(logdir)
  start = time.perf_counter()
  for i in range(args.steps):
    bench.fetch(call(i))
  wall = (time.perf_counter() - start) / args.steps * 1000
  tf.profiler.experimental.stop()

  totals = collections.Counter()
  counts = collections.Counter()
  for name, ms in _parse_xplane(logdir):
    key = _key(name, args.by)
    totals[key] += ms / args.steps
    counts[key] += 1 / args.steps
  total = sum(totals.values())
  print(
    f'{args.preset} b{args.batch_size} {args.phase} {args.precision}: {wall:.1f} ms per call (profiled), '
    f'op time {total:.1f} ms per call, inter_op={args.inter_op}'
  )
  print(f'{"ops":<90}{"ms/call":>10}{"share":>8}{"count":>8}')
  for key, ms in totals.most_common(args.top):
    print(f'{key[-89:]:<90}{ms:>10.1f}{100 * ms / total:>7.1f}%{counts[key]:>8.0f}')


if __name__ == '__main__':
  main()
