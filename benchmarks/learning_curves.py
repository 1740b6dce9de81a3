"""Test-ELBO learning curve of tf_denseflow with the official recipe, and the curve comparison.

Issue 13, goal 5: our test ELBO per step against the official PyTorch code's, same preset,
recipe and images (docs/benchmarks.md section 6). Three programs, one JSON format:
```
# 1. the images: our training stream (seed, shuffle, hflip) and the first K test patches
python benchmarks/export_embedded_npz.py --seed=0 --steps=400 --init_examples=16 \
    --test_examples=512 --out=runs/curves/data_s0.npz
# 2. ours (this file): small preset, batch 16, Adamax 1e-3, 50 warm-up steps, constant lr
python benchmarks/learning_curves.py --seed=0 --steps=400 --init_examples=16 --eval_every=50 \
    --eval_examples=512 --npz=runs/curves/data_s0.npz --json=runs/curves/ours_s0.json
# 3. the official code on the npz's batches, in order (torch only)
/tmp/tv/bin/python benchmarks/official_torch_curve.py --official_dir=/tmp/DenseFlow \
    --npz=runs/curves/data_s0.npz --seed=0 --eval_every=50 --json=runs/curves/official_s0.json
# 4. mean and std per step over the seeds, per code, and the difference
python benchmarks/learning_curves.py --compare runs/curves/*_s*.json
```
The run is `tf_denseflow.train_lib.train` (the trainer's own data stream, ActNorm
initialisation, Adamax, warm-up and evaluation), in a temporary workdir. The step-0 point is a
second `train` of 0 steps from the same seed (same weights and ActNorm init; the trainer has no
evaluation before its first step). Evaluation is the trainer's: single-sample ELBO in evaluation
mode on the first `--eval_examples` patches of the embedded test split, noise from the seed's
evaluation stream (the same noise at every evaluation). With `--npz` the script checks that the
trainer's batches, its ActNorm init images and those test patches are the npz's (and prints
SHA-256 checksums of the uint8 NHWC bytes, as the official script does). `--adamax_epsilon`
runs ours with another epsilon (2.13e-5 = the official one in our gradient units);
`--precision=bfloat16` runs our conditioner networks in bfloat16 (docs/benchmarks.md 6.7).

Output JSON: `curve` = a list of `{step, test_bpd, train_bpd, seconds}` (train_bpd: mean
training loss of the steps since the previous point; seconds: wall-clock since
`train_lib.train` was called, so set-up, ActNorm init, tracing and evaluations included; the
official script's clock starts at its training loop: compare `step_s`, not `seconds`),
`train_bpd_per_step`, `lr_per_step`, `step_s`, the recipe, the checksums, `timing` (median step, mean evaluation) and `adamax_at_end` (entries
where our eps, or the official one, would slow the Adamax step: docs/benchmarks.md 6.2 item 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

# The recipe both codes run (issue 13, goal 5).
PRESET = 'small'
IMAGE_SIZE = 32
EMBEDDED_NUM_TRAIN = 20_000
EMBEDDED_NUM_TEST = 2_000
SHUFFLE_BUFFER = 10_000


def sha256_uint8(images) -> str:
  """First 16 hex digits of the SHA-256 of uint8 NHWC images (the checksum both codes print)."""
  import numpy as np

  array = np.ascontiguousarray(np.asarray(images), dtype=np.uint8)
  return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def data_config(augmentation: str = 'hflip'):
  """The embedded 32x32 dataset of configs/default.cfg (20,000 train / 2,000 test patches)."""
  from tf_denseflow import data as data_lib

  return data_lib.DataConfig(
    dataset='embedded',
    image_size=IMAGE_SIZE,
    embedded_num_train=EMBEDDED_NUM_TRAIN,
    embedded_num_test=EMBEDDED_NUM_TEST,
    augmentation=augmentation,
    shuffle_buffer=SHUFFLE_BUFFER,
  )


def train_config(args, train_steps: int):
  """The `TrainConfig` of a curve run of `train_steps` steps."""
  from tf_denseflow.config import DenseFlowConfig
  from tf_denseflow.train_config import OptimConfig, TrainConfig

  optim = OptimConfig(
    global_batch_size=args.batch_size,
    learning_rate=args.lr,
    adamax_epsilon=args.adamax_epsilon,
    warmup_steps=args.warmup,
    lr_schedule='constant',
    train_steps=train_steps,
    finetune_steps=0,
  )
  model = getattr(DenseFlowConfig, args.preset)(
    (IMAGE_SIZE, IMAGE_SIZE, 3), coupling_dtype=args.precision
  )
  return TrainConfig(
    model=model,
    precision=args.precision,
    data=data_config(args.augmentation),
    optim=optim,
    seed=args.seed,
    init_examples=args.init_examples,
    eval_every=args.eval_every,
    eval_examples=args.eval_examples,
    eval_batch_size=args.eval_batch_size,
    log_every=max(1, args.eval_every or train_steps or 1),
    checkpoint_every=10**9,
    keep_checkpoints=1,
    sample_every=0,
    num_grid_samples=0,
    progress_bar=False,
  )


def check_data(args, config) -> dict:
  """Checksums of the trainer's first batch and of the evaluated test patches (vs `--npz`)."""
  import numpy as np

  from tf_denseflow import data as data_lib

  # What Trainer._dataset_fn reads on one replica, and what Trainer.restore_or_initialize
  # initialises ActNorm on (the stream does not depend on the batch size).
  stream = data_lib.make_train_dataset(config.data, args.batch_size, seed=args.seed)
  first = next(iter(stream)).numpy()
  init_count = args.init_examples or args.batch_size
  init = next(iter(data_lib.make_train_dataset(config.data, init_count, seed=args.seed))).numpy()
  test = np.stack(
    [x.numpy() for x in data_lib.load_split(config.data, 'test').take(args.eval_examples)]
  )
  out = {
    'first_batch_sha256': sha256_uint8(first),
    'init_images_sha256': sha256_uint8(init),
    'test_sha256': sha256_uint8(test),
  }
  print(
    f'[ours] first batch sha256 {out["first_batch_sha256"]} (mean {first.mean():.3f}); '
    f'ActNorm init images ({init_count}) {out["init_images_sha256"]}; '
    f'test[:{len(test)}] {out["test_sha256"]}',
    flush=True,
  )
  if args.npz:
    with np.load(args.npz) as f:
      ref_train, ref_test = f['train'], f['test']
    batches = min(args.steps, len(ref_train) // args.batch_size)
    stream_images = np.concatenate([b.numpy() for b in stream.take(max(batches, 1))])
    checks = {
      'first batch': np.array_equal(ref_train[: args.batch_size], first),
      f'all {batches} batches': np.array_equal(
        ref_train[: batches * args.batch_size], stream_images[: batches * args.batch_size]
      ),
      'init images': np.array_equal(ref_train[:init_count], init),
      'test images': len(ref_test) >= len(test) and np.array_equal(ref_test[: len(test)], test),
    }
    for what, same in checks.items():
      print(f'[ours] {what} == {args.npz}: {same}', flush=True)
    if not all(checks.values()):
      raise SystemExit(f'error: the trainer does not read the images of {args.npz}')
    out['npz_checked'] = True
  return out


def run_curve(args) -> dict:
  """Trains with `train_lib.train` and returns the curve and the run's details (the JSON)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import tensorflow as tf

  from tf_denseflow import train_lib

  print(f'[ours] TensorFlow {tf.__version__}', flush=True)
  config = train_config(args, args.steps)
  result = {
    'impl': 'tf_denseflow',
    'seed': args.seed,
    'preset': args.preset,
    'params': None,
    'batch_size': args.batch_size,
    'lr': args.lr,
    'adamax': 'ResourceApplyAdaMax: u = max(b2*u, |g|), w -= lr/(1-b1^t) * m/(u+eps)',
    'adamax_epsilon': args.adamax_epsilon,
    'precision': args.precision,
    'loss': 'mean nats per image (official: bits/dim, gradients smaller by D ln 2)',
    'warmup': args.warmup,
    'warmup_rule': 'lr*min(1,(t+1)/warmup), t = 0-based step (step 0 at lr/warmup)',
    'init_examples': args.init_examples or args.batch_size,
    'init_mode': 'separate pass before step 0 (model.initialize, training mode)',
    'augmentation': args.augmentation,
    'eval_examples': args.eval_examples,
    'eval_batch_size': args.eval_batch_size,
    'steps': args.steps,
    'npz': args.npz,
  }
  result.update(check_data(args, config))

  if args.init_weights:
    _start_from(args.init_weights)
    result['init_mode'] = f'the weights of {args.init_weights} (no ActNorm init of ours)'
  root = args.workdir or tempfile.mkdtemp(prefix='tfdf_curve_')
  if os.path.exists(root) and os.listdir(root):
    raise SystemExit(f'error: --workdir={root} is not empty (a run there would resume)')
  curve = []
  try:
    if args.eval_at_start or args.steps == 0:
      start = time.perf_counter()
      zero = train_lib.train(train_config(args, 0), os.path.join(root, 'step0'))
      took = time.perf_counter() - start
      curve.append({'step': 0, 'test_bpd': zero.test_bpd, 'train_bpd': None, 'seconds': 0.0})
      result['params'] = int(zero.model.num_parameters())
      result['step0_eval_s'] = zero.timing.get('eval_s')
      print(
        f'[ours] step 0: test {zero.test_bpd:.4f} bits/dim (build + init + eval {took:.1f} s, '
        f'eval {zero.timing.get("eval_s", math.nan):.1f} s)',
        flush=True,
      )
    if args.steps:
      _train_curve(args, config, os.path.join(root, 'run'), curve, result)
    result['curve'] = curve
  finally:
    if not args.workdir and not args.keep_workdir:
      shutil.rmtree(root, ignore_errors=True)
  return result


def _start_from(path: str) -> None:
  """Fresh runs start from the official state_dict in `path`, not from our draws and init.

  Both codes then start from the same weights (the same rotations, the same ActNorm init and
  batch-norm statistics), which removes the seed spread of the initial weights from the
  paired comparison (docs/benchmarks.md 6.2 item 5). A benchmark-only hook: it replaces the
  fresh-run branch of `Trainer.restore_or_initialize` in this process.
  """
  from tf_denseflow import trainer as trainer_lib
  from tf_denseflow.torch_config import check_preset, config_from_state_dict, preset_config
  from tf_denseflow.torch_keys import load_state_dict
  from tf_denseflow.torch_reader import read_state_dict

  state, _ = read_state_dict(path)
  resume = trainer_lib.Trainer.restore_or_initialize

  def restore_or_initialize(self, resuming):
    if resuming:
      return resume(self, resuming)
    config = self.config.model
    check_preset(
      preset_config(PRESET, config.image_shape),
      config_from_state_dict(state, config.image_shape[:2]),
    )
    with self.strategy.scope():
      assigned = load_state_dict(self.model, state)
    print(f'[ours] started from {path}: {len(assigned)} official keys', flush=True)
    return int(self.step.numpy())

  trainer_lib.Trainer.restore_or_initialize = restore_or_initialize


def _train_curve(args, config, workdir, curve, result) -> None:
  """The training run: appends its evaluations to `curve`, its details to `result`."""
  from tf_denseflow import train_lib

  per_step, lrs, ends = [], [], []
  scale = config.model.bits_per_dim_scale
  start = time.perf_counter()

  def callback(step, metrics, model):
    del model
    ends.append(time.perf_counter())
    per_step.append(metrics['loss'] * scale)
    lrs.append(metrics['learning_rate'])
    if step <= 3 or (args.eval_every and step % args.eval_every == 0):
      print(
        f'[ours] step {step}: train {per_step[-1]:.4f} bits/dim, lr {lrs[-1]:.3g}, '
        f'{ends[-1] - start:.1f} s since the start',
        flush=True,
      )

  run = train_lib.train(config, workdir, step_callback=callback)
  end = time.perf_counter()
  result['params'] = int(run.model.num_parameters())
  # run.evals: (step, seconds, bpd) of every evaluation (the last one after the final step).
  for step, _, bpd in run.evals:
    previous = curve[-1]['step'] if curve else 0
    window = per_step[previous:step]
    # The final evaluation runs after the last callback, the others before their step's.
    seconds = (end if step >= len(ends) else ends[step - 1]) - start
    curve.append(
      {
        'step': int(step),
        'test_bpd': float(bpd),
        'train_bpd': statistics.fmean(window) if window else None,
        'seconds': round(seconds, 3),
      }
    )
  # Step i + 1 took ends[i] - ends[i - 1] (its evaluation included, if it had one); the first
  # (from `start`) includes the model build, the ActNorm init and tracing.
  step_s = [ends[0] - start] + [ends[i] - ends[i - 1] for i in range(1, len(ends))]
  evaluated = {s for s, _, _ in run.evals}
  plain = [t for i, t in enumerate(step_s) if i and (i + 1) not in evaluated]
  timing = dict(run.timing)
  result['timing'] = {
    'to_first_step_s': round(step_s[0], 3),
    'step_s_median': statistics.median(plain) if plain else None,
    'eval_s_mean': timing.get('eval_s', 0.0) / max(1, len(run.evals)),
    'evals': len(run.evals),
    'trainer_timing': timing,
  }
  result['adamax_at_end'] = _small_u(run.optimizer, args.adamax_epsilon, config)
  print(f'[ours] Adamax slots after step {args.steps}: {result["adamax_at_end"]}', flush=True)
  result['train_bpd_per_step'] = per_step
  result['lr_per_step'] = lrs
  result['step_s'] = [round(t, 3) for t in step_s]


def _small_u(optimizer, epsilon, config) -> dict:
  """Fractions of Adamax entries (with m != 0) where an epsilon slows the update by >= 10%.

  `u < 10 eps` with our eps, and with the official eps 1e-8 in our units (its loss is bits/dim:
  1e-8 / bits_per_dim_scale = 2.13e-5 at 32x32x3); `official_torch_curve.py` records the same.
  """
  import numpy as np

  official = 1e-8 / config.model.bits_per_dim_scale
  moving = ours = theirs = 0
  for m, u in zip(optimizer._m, optimizer._u):
    m, u = np.asarray(m.numpy()), np.asarray(u.numpy())
    nonzero = m != 0
    moving += int(nonzero.sum())
    ours += int((nonzero & (u < 10 * epsilon)).sum())
    theirs += int((nonzero & (u < 10 * official)).sum())
  return {
    'u_below_10eps_of_moving': ours / max(moving, 1),
    'u_below_10_official_eps_of_moving': theirs / max(moving, 1),
    'official_eps_in_our_units': official,
  }


# -------------------------------------------------------------------------------------------------
# --compare


def _load(path):
  with open(path) as f:
    data = json.load(f)
  if isinstance(data, list):  # a bare curve
    data = {'impl': os.path.basename(path), 'curve': data}
  return data


def _mean_std(values):
  if not values:
    return None, None
  if len(values) == 1:
    return values[0], None
  return statistics.fmean(values), statistics.stdev(values)


def _fmt(mean, std, n):
  if mean is None:
    return '-'
  return f'{mean:.4f}' + (f' ± {std:.4f}' if std is not None else '') + f' ({n})'


def compare(paths, key='test_bpd') -> str:
  """A table of mean ± std over seeds per step and code, and their difference.

  With two codes: the difference of the means with a Welch z, and the mean ± std of the
  per-seed differences over the seeds both have at that step (a seed's runs read the same
  images, so the pairing removes the data's share of the spread; z = mean / (std / sqrt(n))).
  """
  runs = [_load(p) for p in paths]
  impls = sorted({r['impl'] for r in runs}, key=lambda s: (s != 'official', s))
  values = {}  # impl -> step -> {seed: value}
  seeds = {}
  for run in runs:
    seeds.setdefault(run['impl'], []).append(run.get('seed'))
    for row in run['curve']:
      v = row.get(key)
      if v is not None:
        by_seed = values.setdefault(run['impl'], {}).setdefault(int(row['step']), {})
        by_seed[run.get('seed', len(by_seed))] = float(v)
  steps = sorted({s for by_step in values.values() for s in by_step})
  header = ['step'] + [f'{i} {key}' for i in impls]
  pair = len(impls) == 2
  if pair:
    header += [f'{impls[1]} - {impls[0]}', 'z', 'paired difference', 'paired z']
  lines = [' | '.join(header), ' | '.join(['---'] * len(header))]
  for step in steps:
    cells = [str(step)]
    stats = []
    for impl in impls:
      vs = list(values.get(impl, {}).get(step, {}).values())
      mean, std = _mean_std(vs)
      stats.append((mean, std, len(vs)))
      cells.append(_fmt(mean, std, len(vs)))
    if pair:
      (m0, s0, n0), (m1, s1, n1) = stats
      if m0 is None or m1 is None:
        cells += ['-'] * 4
      else:
        cells.append(f'{m1 - m0:+.4f}')
        se = math.sqrt(s0**2 / n0 + s1**2 / n1) if s0 is not None and s1 is not None else 0.0
        cells.append(f'{(m1 - m0) / se:+.1f}' if se > 0 else '-')
        a, b = (values[i][step] for i in impls)
        diffs = [b[k] - a[k] for k in a if k in b]
        if not diffs:  # no seed run by both codes: nothing to pair
          cells += ['-', '-']
        else:
          mean, std = _mean_std(diffs)
          cells.append(_fmt(mean, std, len(diffs)).replace(f'{mean:.4f}', f'{mean:+.4f}', 1))
          cells.append(f'{mean / (std / math.sqrt(len(diffs))):+.1f}' if std else '-')
    lines.append(' | '.join(cells))
  seed_line = '; '.join(f'{i}: seeds {sorted(seeds[i], key=str)}' for i in impls)
  note = (
    'z = difference / sqrt(s0^2/n0 + s1^2/n1) (Welch); |z| < 2 is within the seed spread.'
    if pair
    else ''
  )
  return '\n'.join(['| ' + line + ' |' for line in lines] + ['', seed_line, note])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    '--compare', nargs='+', metavar='JSON', help='print the comparison table of these curves'
  )
  p.add_argument('--key', default='test_bpd', choices=('test_bpd', 'train_bpd'))
  p.add_argument('--seed', type=int, default=0, help='weights, data order and noise')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--preset', default=PRESET)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--warmup', type=int, default=50)
  p.add_argument(
    '--adamax_epsilon',
    type=float,
    default=1e-8,
    help='1e-8 as the official code; 2.13e-5 = 1e-8 * 32*32*3 * ln 2 is the official epsilon '
    'in our gradient units (the official loss is bits/dim, ours nats per image)',
  )
  p.add_argument('--augmentation', default='hflip', choices=('hflip', 'eta', 'none'))
  p.add_argument(
    '--init_examples',
    type=int,
    default=None,
    help='images of the ActNorm init (default: the batch size, as the official code)',
  )
  p.add_argument('--eval_every', type=int, default=50, help='0: only at the end')
  p.add_argument('--eval_examples', type=int, default=512, help='the first K test patches')
  p.add_argument('--eval_batch_size', type=int, default=64)
  p.add_argument(
    '--eval_at_start',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='also evaluate at step 0 (after the ActNorm init)',
  )
  p.add_argument(
    '--init_weights',
    default=None,
    metavar='NPZ',
    help='start from these weights (an official state_dict after its ActNorm init: '
    'official_torch_curve.py --save_init) instead of our own draws and ActNorm init',
  )
  p.add_argument(
    '--precision',
    default='float32',
    choices=('float32', 'bfloat16', 'float16'),
    help="the conditioner networks' compute dtype (train's --precision)",
  )
  p.add_argument('--npz', default=None, help='check the images against this export')
  p.add_argument('--workdir', default=None, help='an empty directory (default: a temporary one)')
  p.add_argument('--keep_workdir', action='store_true')
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)

  if args.compare:
    print(compare(args.compare, args.key))
    return
  result = run_curve(args)
  print(json.dumps(result['curve'], indent=1))
  t = result.get('timing')
  if t:
    print(
      f'[ours] median step {t["step_s_median"] or math.nan:.3f} s; mean evaluation of '
      f'{args.eval_examples} images {t["eval_s_mean"]:.1f} s; lr of steps 0-3: '
      f'{", ".join(f"{v:.3g}" for v in result["lr_per_step"][:4])}'
    )
  if args.json:
    directory = os.path.dirname(args.json)
    if directory:
      os.makedirs(directory, exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
    print('wrote', args.json)


if __name__ == '__main__':
  main()
