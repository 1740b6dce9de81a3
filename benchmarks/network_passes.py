"""First training call and peak with grappler's passes chosen for the step's network functions.

```
python benchmarks/network_passes.py --preset=small --batch_size=16 --passes=all
python benchmarks/network_passes.py --passes=remapping        # the op fusions alone
python benchmarks/network_passes.py --passes=remapping,prune  # and the model pruner
python benchmarks/network_passes.py --passes=off              # no grappler on them
```
Builds the bench's training step (`bench.build_phases`), traces it with the given
`tf.config.optimizer` options in force, so the shared network functions it calls record them
(their call ops' `config_proto`: `tf_denseflow.grappler`), then calls it with grappler off for
its own graph, as `--grappler=auto` does on a CPU. Prints the trace, the first call after it
(instantiation, grappler on the networks, kernels, the run), the median of `--steps` more
calls and the process's peak RSS. One setting per process (instances are kept per setting and
`ru_maxrss` never falls). Results: docs/benchmarks.md section 5.5.
"""

import argparse
import os
import resource
import statistics
import sys
import time

PASSES = (
  'layout_optimizer',
  'constant_folding',
  'shape_optimization',
  'remapping',
  'arithmetic_optimization',
  'dependency_optimization',
  'loop_optimization',
  'function_optimization',
  'debug_stripper',
  'implementation_selector',
  'pin_to_host_optimization',
)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument(
    '--passes',
    default='all',
    help="'all' (TF's default), 'off', or a comma-separated subset of the passes "
    f"{PASSES} and 'prune' (the model pruner), all others off",
  )
  args = parser.parse_args(argv)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import tensorflow as tf

  from tf_denseflow import bench

  if args.passes == 'all':
    options = {}
  elif args.passes == 'off':
    options = {'disable_meta_optimizer': True}
  else:
    keep = args.passes.split(',')
    unknown = [p for p in keep if p not in PASSES + ('prune',)]
    if unknown:
      parser.error(f'unknown passes {unknown}')
    options = {p: p in keep for p in PASSES}
    options['disable_model_pruning'] = 'prune' not in keep
  config = bench.make_config(args.preset, args.image_size)
  parts = bench.build_phases(config, args.batch_size)
  step, iterator = parts['train'], parts['iterator']
  tf.config.optimizer.set_experimental_options(options)
  start = time.perf_counter()
  step.get_concrete_function(iterator)
  trace = time.perf_counter() - start
  tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': True})
  start = time.perf_counter()
  bench.fetch(step(iterator))
  first = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    bench.fetch(step(iterator))
    times.append(time.perf_counter() - start)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(
    f'{args.preset} b{args.batch_size} networks: {args.passes}: trace {trace:.2f} s, first call '
    f'{first:.2f} s (together {trace + first:.2f} s), step {statistics.median(times):.3f} s, '
    f'peak RSS {peak:.0f} MB'
  )


if __name__ == '__main__':
  main()
