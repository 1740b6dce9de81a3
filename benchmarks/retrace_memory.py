"""Memory of a process that traces again: RSS after rounds of new evaluation and sample functions.

```
python benchmarks/retrace_memory.py --preset=small --batch_size=16 --rounds=6
```
Each round makes a new `tf.function` for the ELBO and one for sampling (as `evaluate.evaluate`
and `sample.sample_grid` do per call), traces and calls each once, drops them and collects
garbage, then prints the process's RSS (`VmRSS`). A graph that something still refers to after
its function is dropped shows as RSS growing by about a graph per round: `tf.custom_gradient`
registered a gradient function per call that kept its graph (BUILD.md, "Known TF bugs";
2026-11-30, `small` b16: +16 MB per round before `nn.gradient_rules`, +2 MB after;
docs/benchmarks.md section 4). `--drop_step` also traces the training step's loss and
gradients once and reports whether its graph is freed when the function is dropped.
"""

import argparse
import gc
import os
import sys
import weakref


def _rss_mb() -> float:
  with open('/proc/self/status') as f:
    return int(f.read().split('VmRSS:')[1].split()[0]) / 1024


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--drop_step', action='store_true')
  args = parser.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import numpy as np
  import tensorflow as tf

  from tf_denseflow import bench_phases, train_step
  from tf_denseflow.model import DenseFlow

  config = bench_phases.make_config(args.preset, args.image_size)
  model = DenseFlow(config, seed=0)
  shape = (args.batch_size, *config.image_shape)
  images = tf.constant(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
  model.initialize(images)
  print(f'model built: RSS {_rss_mb():.0f} MB', flush=True)
  if args.drop_step:
    variables = model.trainable_variables

    def loss_and_grads(x):
      return train_step.replica_loss_and_grads(
        model, variables, lambda: -model.elbo_terms(x, training=True)['total'], args.batch_size
      )

    step = tf.function(loss_and_grads, autograph=False)
    graph = weakref.ref(step.get_concrete_function(images).graph)
    print(f'training step traced: RSS {_rss_mb():.0f} MB', flush=True)
    del step
    gc.collect()
    freed = 'freed' if graph() is None else 'NOT freed'
    print(f'training step dropped: its graph {freed}; RSS {_rss_mb():.0f} MB', flush=True)
  for i in range(args.rounds):
    seed = tf.constant([0, i], tf.int64)
    elbo = tf.function(lambda x, s: model.elbo(x, s), autograph=False)
    elbo(images, seed).numpy()
    sample = tf.function(lambda s: model.sample(args.batch_size, s), autograph=False)
    sample(seed).numpy()
    del elbo, sample
    gc.collect()
    print(f'round {i}: RSS {_rss_mb():.0f} MB', flush=True)


if __name__ == '__main__':
  sys.exit(main())
