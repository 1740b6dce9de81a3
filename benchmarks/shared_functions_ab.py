"""Steady-state A/B of a switch in one process: shared functions, concatenations or grappler.

```
python benchmarks/shared_functions_ab.py --preset=small --batch_size=16 --reps=16
python benchmarks/shared_functions_ab.py --switch=concatenations --reps=16
python benchmarks/shared_functions_ab.py --switch=grappler --reps=16
```
Builds one model and traces the training step's loss and gradients, the ELBO and sampling twice,
with the switch on and off, then times the two variants' calls alternately (the order flips
every repetition), so a machine shared with other jobs slows both alike. Prints each phase's
median time and the median and range of the per-pair ratio off/on (above 1: the switch makes it
faster). `--switch=shared_functions`: `nn.shared_function` (shared vs inlined networks);
`--switch=concatenations`: `nn.recompute.ENABLED` (the dense blocks rebuild their
concatenations in the backward pass, or keep them); `--switch=grappler`: the same traced
functions called (so instantiated) with and without grappler (`grappler.calls_with`). Results:
docs/benchmarks.md sections 4 and 5.4.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--reps', type=int, default=16)
  parser.add_argument(
    '--switch',
    choices=('shared_functions', 'concatenations', 'grappler'),
    default='shared_functions',
  )
  args = parser.parse_args(argv)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import numpy as np
  import tensorflow as tf

  from tf_denseflow import bench, grappler, train_step
  from tf_denseflow.model import DenseFlow
  from tf_denseflow.nn import recompute, shared_function

  if args.switch == 'shared_functions':
    on, off, switch = 'shared', 'inlined', shared_function.sharing
  elif args.switch == 'concatenations':
    on, off, switch = 'rebuilt', 'kept', recompute.rebuilding
  else:  # one trace, called both ways
    on, off, switch = 'grappler', 'without', lambda enabled: contextlib.nullcontext()

  batch = args.batch_size
  config = bench.make_config(args.preset, args.image_size, 'float32', False)
  model = DenseFlow(config, seed=0)
  shape = (batch, *config.image_shape)
  images = tf.constant(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
  model.initialize(images)
  variables = model.trainable_variables
  u, noise = model.draw_noise(tf.constant([0, 1], tf.int64), batch)

  def loss_and_grads(x):
    def nll():
      return -model.elbo_terms(x, training=True, dequant_noise=u, noise=noise)['total']

    return train_step.replica_loss_and_grads(model, variables, nll, batch)

  calls, traced = {}, None
  for mode in (on, off):
    with switch(mode == on):
      if traced is None or args.switch != 'grappler':
        traced = (
          tf.function(loss_and_grads, autograph=False),
          tf.function(lambda x: model.elbo(x, tf.constant([0, 3], tf.int64)), autograph=False),
          tf.function(lambda: model.sample(batch, tf.constant([0, 5], tf.int64)), autograph=False),
        )
      train, elbo, sample = traced
      if args.switch == 'grappler':
        train, elbo, sample = (grappler.calls_with(f, mode == on) for f in traced)
      calls[mode] = {
        'train': lambda f=train: f(images),
        'eval': lambda f=elbo: f(images),
        'sample': lambda f=sample: f(),
      }
      for phase, call in calls[mode].items():
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), call())
        print(f'{mode:8s} {phase:6s} first call {time.perf_counter() - start:6.1f} s', flush=True)

  times = {(mode, phase): [] for mode in calls for phase in calls[mode]}
  for rep in range(args.reps):
    for phase in ('train', 'eval', 'sample'):
      for mode in (on, off) if rep % 2 == 0 else (off, on):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), calls[mode][phase]())
        times[(mode, phase)].append(time.perf_counter() - start)
  for phase in ('train', 'eval', 'sample'):
    t_on, t_off = np.array(times[(on, phase)]), np.array(times[(off, phase)])
    ratio = t_off / t_on
    print(
      f'{phase:6s} {on} {np.median(t_on):.3f} s ({batch / np.median(t_on):.1f} img/s), '
      f'{off} {np.median(t_off):.3f} s ({batch / np.median(t_off):.1f} img/s); '
      f'{off}/{on} per pair: median {np.median(ratio):.3f} '
      f'(range {ratio.min():.3f}-{ratio.max():.3f})'
    )


if __name__ == '__main__':
  main()
