r"""Test bits/dim of a trained run: the importance-weighted bound (IWBO) with K samples.

```
python -m tf_denseflow.evaluate --workdir=runs/cifar10 --num_importance_samples=1000 --chunk_size=50
python -m tf_denseflow.evaluate --workdir=runs/default --num_importance_samples=8 --max_examples=500
```
The protocol of the official `eval_loglik.py` (denseflow_spec.md section 5): batches of
`--batch_size` test images (64), each tiled `--chunk_size` times per pass with fresh
dequantization and augmentation noise per copy, `log p(x) ~ logsumexp_j log p_j(x) - log K`, batch
norm in evaluation mode; bits/dim = `-sum IWBO / (N * D * ln 2)`. `--num_importance_samples=1`
gives the single-sample ELBO, with the noise of the training run's evaluation (batch k's seed is
`seeds.step_seed(seed, k, EVAL_STREAM)`), so with the run's `--seed` and `--batch_size` equal to
its `--eval_batch_size` it reproduces the run's test bits/dim of that checkpoint. (Before the
one registry of seed streams, evaluate drew from stream 5: its numbers then differed from
training's by the noise.) The dataset is the run's (`WORKDIR/train_config.json`); `--data_dir`
overrides where it is read from, and `--dataset` (with `--image_size`) names one for workdirs
without a train config (e.g. from `tf_denseflow.convert_torch`). The result is printed and written
to `WORKDIR/eval_<split>_k<K>.json` (or `--output`; the `workdir.py` layout). Runs on one device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Dict, Optional, Sequence

import tensorflow as tf
from absl import app, flags

from tf_denseflow import checks, grappler, seeds, train_lib
from tf_denseflow import data as data_lib
from tf_denseflow import flags as flags_lib
from tf_denseflow import workdir as workdir_lib

__all__ = ['evaluate_workdir', 'main', 'workdir_data_config']

FLAGS = flags.FLAGS


def workdir_data_config(
  workdir: str, dataset: Optional[str] = None, data_dir: Optional[str] = None
) -> data_lib.DataConfig:
  """The data config of a run: its `train_config.json`, with `dataset`/`data_dir` overrides.

  Raises:
    ValueError: no train config in the workdir and no `dataset`.
  """
  saved = train_lib.load_train_config(workdir).get('data')
  if saved is None and dataset is None:
    raise ValueError(
      f'{workdir!r} has no {train_lib.TRAIN_CONFIG_FILE}: pass --dataset (and --data_dir).'
    )
  fields = dict(saved or {})
  if dataset is not None:
    fields = {'dataset': dataset, 'image_size': fields.get('image_size')}
  if data_dir is not None:
    fields['data_dir'] = data_dir
  return train_lib.data_config_from_json(fields)


def evaluate_workdir(
  workdir: str,
  num_importance_samples: int,
  *,
  batch_size: int = 64,
  chunk_size: int = 50,
  max_examples: Optional[int] = None,
  split: str = 'test',
  seed: int = 0,
  checkpoint: Optional[str] = None,
  data_config: Optional[data_lib.DataConfig] = None,
  output: Optional[str] = None,
  progress_bar: bool = True,
) -> Dict:
  """Computes the IWBO bits/dim of a run's checkpoint on a split and writes it as JSON.

  Args:
    workdir: the run directory.
    num_importance_samples: importance samples K (1: the ELBO).
    batch_size: images per batch (the last batch is padded, padding is masked out).
    chunk_size: draws evaluated together (the batch is tiled this many times).
    max_examples: evaluate only the first examples of the split.
    split: 'test' or 'train'.
    seed: seed of the noise draws.
    checkpoint: checkpoint prefix (default: the latest).
    data_config: the data (default: the run's).
    output: JSON path (default `WORKDIR/eval_<split>_k<K>.json`).
    progress_bar: show a tqdm bar over the batches.

  Returns:
    The JSON record: `bits_per_dim`, `nats_per_image`, `num_examples`, `num_importance_samples`,
    `step`,
    `checkpoint`, `dataset`, `split`, `seconds`, ...

  Raises:
    ValueError, TypeError: a bad argument (the message names it), a data/model shape mismatch,
      or a non-finite result (nothing is written then).
    FileNotFoundError: no model config or checkpoint in the workdir.
    OSError: the result cannot be written.
    workdir.CheckpointError: the checkpoint does not fit the workdir's model (a ValueError).
  """
  num_samples = checks.check_int(
    'num_importance_samples', num_importance_samples, 1, flags_lib.INT32_MAX
  )
  batch_size = checks.check_int('batch_size', batch_size, 1, flags_lib.INT32_MAX)
  chunk_size = checks.check_int('chunk_size', chunk_size, 1, flags_lib.INT32_MAX)
  if max_examples is not None:
    max_examples = checks.check_int('max_examples', max_examples, 1, flags_lib.INT64_MAX)
  seed = checks.check_int('seed', seed, flags_lib.INT64_MIN, flags_lib.INT64_MAX)
  if split not in ('test', 'train'):
    raise ValueError(f"`split` must be 'test' or 'train', got {split!r}.")
  data_config = data_config or workdir_data_config(workdir)
  checkpoint = workdir_lib.resolve_checkpoint(workdir, checkpoint)
  model, step = workdir_lib.restore_model(workdir, checkpoint)
  shape = tuple(model.config.image_shape)
  if tuple(data_lib.image_shape(data_config)) != shape:
    raise ValueError(
      f'The model takes {shape} images but {data_config.dataset!r} gives '
      f'{data_lib.image_shape(data_config)}; pass --image_size or another --dataset.'
    )
  count = data_lib.num_examples(data_config, split)
  if max_examples is not None:
    count = max_examples if count is None else min(count, max_examples)
  num_batches = math.ceil(count / batch_size)
  padding = num_batches * batch_size - count
  examples = data_lib.load_split(data_config, split).take(count).map(lambda x: (x, 1.0))
  pad = tf.data.Dataset.from_tensors((tf.zeros(shape, tf.uint8), 0.0)).repeat(padding)
  dataset = examples.concatenate(pad).batch(batch_size, drop_remainder=True)
  dataset = dataset.prefetch(tf.data.AUTOTUNE)

  @tf.function(autograph=False)
  def bound(images, seed):
    if num_samples == 1:
      return model.elbo(images, seed, training=False)
    return model.log_prob_bound(images, num_samples, seed, chunk_size=chunk_size)

  total, seen = 0.0, 0.0
  start = time.time()
  batches = enumerate(dataset)
  if progress_bar:
    from tqdm import tqdm

    batches = tqdm(batches, total=num_batches, unit='batch', dynamic_ncols=True)
  for index, (images, weights) in batches:
    log_p = bound(images, seeds.step_seed(seed, index, seeds.EVAL_STREAM))
    total += float(tf.reduce_sum(log_p * weights))
    seen += float(tf.reduce_sum(weights))
    if progress_bar:
      batches.set_postfix(bpd=f'{-total / seen * model.config.bits_per_dim_scale:.4f}')
  nats = -total / seen
  if not math.isfinite(nats):
    raise ValueError(
      f'checkpoint {checkpoint} gives a non-finite bound on {data_config.dataset!r} ({nats} '
      'nats per image); no result written.'
    )
  record = {
    'bits_per_dim': nats * model.config.bits_per_dim_scale,
    'nats_per_image': nats,
    'bound': 'elbo' if num_samples == 1 else 'iwbo',
    'num_importance_samples': num_samples,
    'chunk_size': chunk_size,
    'batch_size': batch_size,
    'num_examples': int(seen),
    'split': split,
    'dataset': data_config.dataset,
    'data': dataclasses.asdict(data_config),
    'step': step,
    'checkpoint': checkpoint,
    'seed': seed,
    'seconds': round(time.time() - start, 3),
  }
  output = output or workdir_lib.eval_result_path(workdir, split, num_samples)
  try:
    workdir_lib.atomic_write(output, json.dumps(record, indent=2, sort_keys=True, allow_nan=False))
  except (tf.errors.OpError, OSError) as e:
    message = getattr(e, 'message', None) or e
    raise OSError(f'cannot write the result to {output}: {message}') from None
  record['output'] = output
  return record


def main(argv: Sequence[str]) -> None:
  flags_lib.start_main(argv, FLAGS)
  try:
    grappler.set_grappler(FLAGS.grappler)  # before any function is first called
    dataset = FLAGS.dataset if flags_lib.explicitly_set(FLAGS, 'dataset') else None
    data_config = workdir_data_config(FLAGS.workdir, dataset, FLAGS.data_dir)
    if flags_lib.explicitly_set(FLAGS, 'image_size'):
      data_config = dataclasses.replace(data_config, image_size=FLAGS.image_size)
    record = evaluate_workdir(
      FLAGS.workdir,
      FLAGS.num_importance_samples,
      batch_size=FLAGS.batch_size,
      chunk_size=FLAGS.chunk_size,
      max_examples=FLAGS.max_examples,
      split=FLAGS.split,
      seed=FLAGS.seed,
      checkpoint=FLAGS.checkpoint,
      data_config=data_config,
      output=FLAGS.output,
      progress_bar=FLAGS.progress_bar,
    )
  except data_lib.DatasetNotFoundError as e:  # bad input too: one line, exit 2
    flags_lib.fail(str(e))
  except (ValueError, TypeError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
    flags_lib.fail(str(e))
  except (tf.errors.NotFoundError, tf.errors.DataLossError) as e:  # damaged data files
    flags_lib.fail(f'cannot read the data: {e.message}')
  print(
    f'{FLAGS.split} bits/dim: {record["bits_per_dim"]:.4f} ({record["bound"]}, '
    f'K={record["num_importance_samples"]}, {record["num_examples"]} examples, step {record["step"]})'
  )
  print(f'result: {record["output"]}')


def run() -> None:
  """Defines the flags and runs `main` (the `python -m tf_denseflow.evaluate` entry point)."""
  flags_lib.define_evaluate_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)


if __name__ == '__main__':
  run()
