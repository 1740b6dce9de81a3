"""Where the training loop's time goes, next to `tf_denseflow.bench`'s step, in one process.

```
python benchmarks/loop_vs_step.py --preset=small --batch_size=16 --reps=12 [--strategy=one_device]
```
Builds the trainer of a real run (`trainer.Trainer`: the run's strategy, the embedded 32x32 TFDS
patches through the training input pipeline, ActNorm initialised on the first batch) and the
bench's step (`bench_phases.build_phases`: the default strategy, two random batches from memory)
for the same model config, then times their steps alternately (the order flips every repetition,
so a machine shared with other jobs slows both alike). Also times the input pipeline alone
(`next()` on the training dataset, no model running) and `--eval_reps` evaluations of
`--eval_examples` test images (`Trainer.evaluate`, one function call; and the per-batch Python
loop it replaced in session 8) against the bench's ELBO calls on as many random images,
alternated too.
Prints medians and the per-pair ratio trainer/bench (1.0: the loop's step costs what the bench's
does). Results: docs/benchmarks.md section 5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _median(values):
  values = sorted(values)
  return values[len(values) // 2]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--reps', type=int, default=12)
  parser.add_argument('--strategy', default='auto', help='the trainer strategy (--strategy)')
  parser.add_argument('--eval_examples', type=int, default=512)
  parser.add_argument('--eval_reps', type=int, default=3, help='evaluation pairs (alternated)')
  parser.add_argument('--augmentation', default='hflip')
  args = parser.parse_args(argv)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import tensorflow as tf

  from tf_denseflow import bench, bench_phases, train_lib
  from tf_denseflow import data as data_lib
  from tf_denseflow.optim import WarmupSchedule
  from tf_denseflow.train_config import OptimConfig, TrainConfig
  from tf_denseflow.trainer import Trainer

  batch = args.batch_size
  model_config = bench.make_config(args.preset, args.image_size, 'float32', False)
  config = TrainConfig(
    model=model_config,
    data=data_lib.DataConfig(
      dataset='embedded',
      image_size=args.image_size,
      augmentation=args.augmentation,
      shuffle_buffer=10_000,
    ),
    optim=OptimConfig(global_batch_size=batch, warmup_steps=50),
    strategy=args.strategy,
    eval_examples=args.eval_examples,
    progress_bar=False,
  )
  strategy = train_lib.make_strategy(0, args.strategy)
  workdir = tempfile.mkdtemp(prefix='loop_vs_step_')
  trainer = Trainer(config, strategy, workdir, WarmupSchedule(config.optim))
  trainer.restore_or_initialize(resuming=False)
  phases = bench_phases.build_phases(model_config, batch)

  def trainer_step():
    return float(trainer.train(1)['loss'][0])

  def bench_step():
    return float(phases['train'](phases['iterator'])['loss'])

  for name, fn in (('trainer', trainer_step), ('bench', bench_step)):
    start = time.perf_counter()
    fn()
    print(f'{name}: first call {time.perf_counter() - start:.1f} s', flush=True)
    fn()

  times = {'trainer': [], 'bench': []}
  order = [('trainer', trainer_step), ('bench', bench_step)]
  for rep in range(args.reps):
    for name, fn in order if rep % 2 == 0 else order[::-1]:
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  ratios = [t / b for t, b in zip(times['trainer'], times['bench'])]
  for name, values in times.items():
    print(f'{name} step: median {_median(values):.3f} s ({batch / _median(values):.2f} img/s)')
  print(
    f'ratio trainer/bench: median {_median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}'
  )

  # The input pipeline alone: a fresh iterator, the model idle.
  iterator = iter(data_lib.make_train_dataset(config.data, batch, seed=1))
  next(iterator)  # fills the shuffle buffer
  start = time.perf_counter()
  for _ in range(50):
    next(iterator)
  print(f'input pipeline: {(time.perf_counter() - start) / 50 * 1e3:.2f} ms a batch', flush=True)

  # Evaluations of the test split against the bench's ELBO on as many images, alternated; and the
  # trainer's evaluation as it was before session 8 (a Python loop over the distributed dataset,
  # one function call and host sync per batch), from the same per-batch function.
  images = phases['batches'][0]
  calls = -(-args.eval_examples // batch)
  eval_batch = tf.function(trainer._eval_batch, autograph=False)

  def per_batch_eval():
    total = count = 0.0
    batches = iter(trainer._eval_dataset)  # repeated: one pass is trainer._eval_batches
    for index in range(trainer._eval_batches):
      b = next(batches)
      t, c = eval_batch(b, tf.constant(index, tf.int64))
      total, count = total + float(t), count + float(c)
    return total / count

  def bench_eval():
    for i in range(calls):
      phases['eval'](images, phases['seed_of'](i)).numpy()

  evals = {'trainer': trainer.evaluate, 'per_batch': per_batch_eval, 'bench': bench_eval}
  for fn in evals.values():
    fn()  # traces
  took = {name: [] for name in evals}
  for rep in range(args.eval_reps):
    for name in list(evals)[:: 1 if rep % 2 == 0 else -1]:
      start = time.perf_counter()
      evals[name]()
      took[name].append(time.perf_counter() - start)
  medians = {name: statistics.median(values) for name, values in took.items()}
  print(
    f'evaluation of {args.eval_examples} images ({calls} calls of {batch}), {args.eval_reps} '
    'alternated repetitions, median s: '
    + ', '.join(f'{name} {value:.2f}' for name, value in medians.items())
  )
  for name in ('trainer', 'per_batch'):
    ratios = [t / b for t, b in zip(took[name], took['bench'])]
    print(
      f'  {name}/bench per repetition: median {statistics.median(ratios):.3f} '
      f'(range {min(ratios):.3f}-{max(ratios):.3f})'
    )
  tf.io.gfile.rmtree(workdir)


if __name__ == '__main__':
  main()
