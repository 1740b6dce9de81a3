"""Dumps our exact training stream and the first test patches to an .npz for the official code.

```
python benchmarks/export_embedded_npz.py --seed=0 --steps=400 --init_examples=16 \
    --test_examples=512 --out=runs/curves/data_s0.npz
```
`train`: uint8 `[N, 32, 32, 3]` (NHWC), the first `N = max(steps * batch_size, init_examples)`
examples of `data.make_train_dataset` for the embedded 32x32 dataset of configs/default.cfg
(20,000 train / 2,000 test patches, shuffle buffer 10,000, hflip) with the run's `--seed`: what
`tf_denseflow.train_lib.train` with that seed trains on, in order (batch k = rows
`k * batch_size ...`), and whose first `init_examples` rows initialise ActNorm (the stream does
not depend on the batch size; checked here). `test`: the first `--test_examples` patches of the
test split, in the order the trainer evaluates them. `meta`: a JSON string (recipe, checksums).
`benchmarks/official_torch_curve.py` trains the official model on exactly these batches, so
data order is not a difference between the two curves (docs/benchmarks.md section 6).
About 3 KB per image: 400 steps of 16 are 20 MB. Keep the file out of the repository (runs/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--seed', type=int, default=0, help='the training seed of the run to mirror')
  p.add_argument('--steps', type=int, required=True)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--init_examples', type=int, default=None, help='default: --batch_size')
  p.add_argument('--test_examples', type=int, default=512)
  p.add_argument('--augmentation', default='hflip', choices=('hflip', 'eta', 'none'))
  p.add_argument('--out', required=True)
  args = p.parse_args(argv)

  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, os.path.dirname(here))
  sys.path.insert(0, here)
  import numpy as np
  from learning_curves import data_config, sha256_uint8

  from tf_denseflow import data as data_lib

  start = time.perf_counter()
  config = data_config(args.augmentation)
  init_examples = args.init_examples or args.batch_size
  count = max(args.steps * args.batch_size, init_examples)
  batches = -(-count // args.batch_size)
  stream = data_lib.make_train_dataset(config, args.batch_size, seed=args.seed)
  train = np.concatenate([b.numpy() for b in stream.take(batches)])[:count]
  # The trainer initialises ActNorm on make_train_dataset(config, init_examples)'s first batch.
  init = next(iter(data_lib.make_train_dataset(config, init_examples, seed=args.seed))).numpy()
  if not np.array_equal(init, train[:init_examples]):
    raise SystemExit('error: the ActNorm init images are not the first images of the stream')
  test = np.stack([x.numpy() for x in data_lib.load_split(config, 'test').take(args.test_examples)])
  meta = {
    'seed': args.seed,
    'batch_size': args.batch_size,
    'steps': args.steps,
    'init_examples': init_examples,
    'augmentation': args.augmentation,
    'data_config': {
      k: getattr(config, k)
      for k in (
        'dataset',
        'image_size',
        'embedded_num_train',
        'embedded_num_test',
        'shuffle_buffer',
        'augmentation',
      )
    },
    'layout': 'uint8 NHWC; train batch k = rows k*batch_size..(k+1)*batch_size-1',
    'first_batch_sha256': sha256_uint8(train[: args.batch_size]),
    'init_images_sha256': sha256_uint8(train[:init_examples]),
    'test_sha256': sha256_uint8(test),
  }
  directory = os.path.dirname(args.out)
  if directory:
    os.makedirs(directory, exist_ok=True)
  np.savez(args.out, train=train, test=test, meta=np.array(json.dumps(meta)))
  print(
    f'wrote {args.out}: train {train.shape} ({batches} batches of {args.batch_size}), test '
    f'{test.shape}; first batch sha256 {meta["first_batch_sha256"]}, init images '
    f'{meta["init_images_sha256"]}, test {meta["test_sha256"]} '
    f'({time.perf_counter() - start:.1f} s)'
  )


if __name__ == '__main__':
  main()
