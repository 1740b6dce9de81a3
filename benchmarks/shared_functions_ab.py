"""Steady-state A/B of shared network functions: shared and inlined networks in one process.

```
python benchmarks/shared_functions_ab.py --preset=small --batch_size=16 --reps=16
```
Builds one model and traces the training step's loss and gradients, the ELBO and sampling twice,
with `nn.shared_function` on and off, then times the two variants' calls alternately (the order
flips every repetition), so a machine shared with other jobs slows both alike. Prints each
phase's median time and the median and range of the per-pair ratio inlined/shared (above 1: the
shared functions are faster). Results: docs/benchmarks.md section 4.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--reps', type=int, default=16)
  args = parser.parse_args(argv)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import numpy as np
  import tensorflow as tf

  from tf_denseflow import bench, train_step
  from tf_denseflow.model import DenseFlow
  from tf_denseflow.nn import shared_function

  batch = args.batch_size
  config = bench._make_config(args.preset, args.image_size, 'float32', False)
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

  calls = {}
  for mode in ('shared', 'inlined'):
    with shared_function.sharing(mode == 'shared'):
      train = tf.function(loss_and_grads, autograph=False)
      elbo = tf.function(lambda x: model.elbo(x, tf.constant([0, 3], tf.int64)), autograph=False)
      sample = tf.function(
        lambda: model.sample(batch, tf.constant([0, 5], tf.int64)), autograph=False
      )
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
      for mode in ('shared', 'inlined') if rep % 2 == 0 else ('inlined', 'shared'):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), calls[mode][phase]())
        times[(mode, phase)].append(time.perf_counter() - start)
  for phase in ('train', 'eval', 'sample'):
    shared, inlined = np.array(times[('shared', phase)]), np.array(times[('inlined', phase)])
    ratio = inlined / shared
    print(
      f'{phase:6s} shared {np.median(shared):.3f} s ({batch / np.median(shared):.1f} img/s), '
      f'inlined {np.median(inlined):.3f} s ({batch / np.median(inlined):.1f} img/s); '
      f'inlined/shared per pair: median {np.median(ratio):.3f} '
      f'(range {ratio.min():.3f}-{ratio.max():.3f})'
    )


if __name__ == '__main__':
  main()
