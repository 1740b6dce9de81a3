"""Test-ELBO learning curve of the OFFICIAL PyTorch DenseFlow on the batches of an .npz export.

```
python benchmarks/export_embedded_npz.py --seed=0 --steps=400 --out=runs/curves/data_s0.npz
/tmp/tv/bin/python benchmarks/official_torch_curve.py --official_dir=/tmp/DenseFlow \
    --npz=runs/curves/data_s0.npz --seed=0 --eval_every=50 --json=runs/curves/official_s0.json
python benchmarks/learning_curves.py --compare runs/curves/*.json
```
Torch only (no TensorFlow import); the counterpart of `benchmarks/learning_curves.py` (ours), same
JSON format (docs/benchmarks.md section 6). Needs a checkout of matejgrcic/DenseFlow (HEAD
`2c36349` has the cross-unit fix `a960f05`) and torch (`python3 -m venv /tmp/tv &&
/tmp/tv/bin/pip install torch==2.13.0 numpy`).

What runs, from the official code (experiments/image/...):
  * model: `model.model_flow.get_model` with the preset of `official_torch_bench.py` (`small`:
    block_conf 2 2 1, layers_conf 2 2 2, layer_mid_chnls 16 16 16, growth_rate 4;
    15,280,056 parameters), checkpointing off; weights from `torch.manual_seed(--seed)` (as
    `utils.set_seeds`), and every noise draw from torch's global RNG after it.
  * optimizer and schedule: `optim/expdecay_flow.py` with `--optimizer adamax --warmup W`:
    `torch.optim.Adamax(lr, betas=(0.9, 0.999))` (eps 1e-8), the official
    `LinearWarmupScheduler(total_epoch=W)` stepped after every `optimizer.step()`, as
    `experiment/baseline_flow.py:train_fn` does. Its lr at 0-based step t is `lr * min(1, t/W)`:
    step 0 runs at lr 0 (Adamax still updates its moments and step count); ours uses
    `lr * min(1, (t+1)/W)` (printed, and recorded in the JSON). The epoch-end `ExponentialLR`
    (reset by the warm-up scheduler at the next step: one step per epoch at `gamma * lr`) is
    left out unless `--epoch_steps` is given.
  * step: `model.train(); zero_grad(); loss = elbo_bpd(model, x); loss.backward(); step()`;
    no gradient clipping (`--use_grad_norm` default 0). x = the npz batch as a long NCHW tensor
    (the official loaders' ToTensor + Quantize(8)).
  * ActNorm data-dependent init (`transforms/bijections/actnorm.py`): the official code has no
    option for it; it initialises on its first training-mode forward, i.e. on the first training
    batch. `--init_mode=first_step` does that (needs --init_examples == batch size).
    `--init_mode=separate` emulates a larger init batch (glow's n_batch_init, our
    `--init_examples`): one training-mode forward under no_grad on the first `--init_examples`
    images of the npz before step 0 (this also moves the batch-norm running statistics once,
    as our `model.initialize` does). Default: first_step when init_examples == batch size.
  * evaluation: `experiment/baseline_flow.py:eval_fn`: `model.eval()`, `torch.no_grad()`, the
    official `elbo_bpd` per batch weighted by its size, over the npz's test images. Harness
    choice: it runs under `torch.random.fork_rng` with a fixed evaluation seed, so every
    evaluation draws the same noise and the training stream of random numbers does not depend
    on the evaluation cadence (ours: the evaluation noise is a fixed stateless stream too).
    The step-0 point (after the ActNorm init) in first_step mode initialises on the first batch
    inside that fork and restores the state dict afterwards, so the run itself is unchanged.
  * Adamax diagnostic: at every evaluation, the fraction of Adamax entries with u < 10 eps (of
    all, and of those with m != 0), where eps slows torch's step by 10% or more. The official
    loss is bits/dim and ours nats per image, so the official eps (1e-8) is 2.13e-5 in our
    gradient units (docs/benchmarks.md 6.2, item 2).
Switches that turn one official difference into ours: `--warmup_like_ours` (step t at
`lr*(t+1)/W`), `--eps=4.7e-12` (our eps in bits/dim gradient units; torch still adds it inside the
max), `--init_mode=separate` (a separate ActNorm init pass, which also moves the batch-norm
running statistics once).
Output: `curve` = a list of `{step, test_bpd, train_bpd, seconds}`, `train_bpd_per_step`,
`lr_per_step`, `step_s`, the recipe, the checksums (SHA-256 of uint8 NHWC bytes, as ours prints),
timing.
"""

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
import warnings

import numpy as np
import torch


def sha256_uint8(images) -> str:
  array = np.ascontiguousarray(np.asarray(images), dtype=np.uint8)
  return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def to_torch(batch: np.ndarray) -> torch.Tensor:
  """uint8 NHWC -> long NCHW in 0..255, what the official loaders deliver."""
  return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous().long()


def build_model(official_dir: str, preset: str):
  """The official model through `get_model`, as `official_torch_bench.py` builds it."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from official_torch_bench import PRESETS, official_model

  expected = PRESETS[preset][4]
  model = official_model(official_dir, preset)
  params = sum(q.numel() for q in model.parameters() if q.requires_grad)
  assert params == expected, f'parameter count {params} != expected {expected}'
  return model, params


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--official_dir', required=True, help='a checkout of matejgrcic/DenseFlow')
  p.add_argument('--npz', required=True, help='from benchmarks/export_embedded_npz.py')
  p.add_argument('--seed', type=int, default=0, help="torch's RNG: weights and noise")
  p.add_argument('--preset', default='small')
  p.add_argument('--steps', type=int, default=None, help="default: the npz's steps")
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--warmup', type=int, default=50)
  p.add_argument(
    '--warmup_like_ours',
    action='store_true',
    help='one scheduler step before training: step t at lr*(t+1)/W (ours) instead of lr*t/W',
  )
  p.add_argument(
    '--eps',
    type=float,
    default=1e-8,
    help='Adamax eps (torch default, official); 4.7e-12 = 1e-8 / (32*32*3 ln 2) is ours in '
    'bits/dim gradient units',
  )
  p.add_argument('--init_examples', type=int, default=None, help="default: the npz's")
  p.add_argument('--init_mode', default='auto', choices=('auto', 'first_step', 'separate'))
  p.add_argument('--eval_every', type=int, default=50, help='0: only at the end')
  p.add_argument('--eval_examples', type=int, default=None, help="default: all of the npz's")
  p.add_argument('--eval_batch_size', type=int, default=64)
  p.add_argument('--eval_at_start', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument('--epoch_steps', type=int, default=0, help='>0: ExponentialLR every N steps')
  p.add_argument('--gamma', type=float, default=0.995, help='official --gamma default')
  p.add_argument('--threads', type=int, default=2)
  p.add_argument(
    '--save_init',
    default=None,
    metavar='NPZ',
    help='write the state_dict after the ActNorm init (before step 0) for learning_curves.py '
    '--init_weights: both codes then start from the same weights',
  )
  p.add_argument('--json', default=None)
  a = p.parse_args()

  with np.load(a.npz) as f:
    train, test = f['train'], f['test']
    meta = json.loads(str(f['meta']))
  batch = meta['batch_size']
  if meta['seed'] != a.seed:
    print(f'warning: --seed={a.seed} but the npz holds the data order of seed {meta["seed"]}')
  init_examples = a.init_examples or meta['init_examples']
  init_mode = a.init_mode
  if init_mode == 'auto':
    init_mode = 'first_step' if init_examples == batch else 'separate'
  if init_mode == 'first_step' and init_examples != batch:
    raise SystemExit('error: --init_mode=first_step initialises on one batch: --init_examples')
  if a.save_init and init_mode != 'separate':
    raise SystemExit('error: --save_init needs --init_mode=separate (the init before step 0)')
  steps = a.steps if a.steps is not None else meta['steps']  # 0: the step-0 point only
  if steps * batch > len(train) or init_examples > len(train):
    raise SystemExit(f'error: the npz holds {len(train)} training images')
  test_count = len(test)
  test = test[: a.eval_examples] if a.eval_examples else test
  eval_seed = 1_000_003 * (a.seed + 1)

  torch.set_num_threads(a.threads)
  random.seed(a.seed)  # utils.set_seeds
  np.random.seed(a.seed)
  torch.manual_seed(a.seed)
  t0 = time.perf_counter()
  model, params = build_model(a.official_dir, a.preset)
  build_s = time.perf_counter() - t0
  from denseflow.optim.schedulers import LinearWarmupScheduler
  from denseflow.utils import elbo_bpd

  opt = torch.optim.Adamax(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=a.eps)
  warmup = LinearWarmupScheduler(opt, total_epoch=a.warmup) if a.warmup else None
  if warmup is not None and a.warmup_like_ours:
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": meant
      warnings.simplefilter('ignore')
      warmup.step()  # step t now runs at lr * (t + 1) / W, as ours
  decay = None
  if a.epoch_steps:
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=a.gamma)

  first = train[:batch]
  x0 = to_torch(first)
  checks = {
    'first_batch_sha256': sha256_uint8(first),
    'first_batch_as_fed_sha256': sha256_uint8(x0.permute(0, 2, 3, 1).to(torch.uint8).numpy()),
    'init_images_sha256': sha256_uint8(train[:init_examples]),
    'test_sha256': sha256_uint8(test),
  }
  print(
    f'[official] torch {torch.__version__}, {torch.get_num_threads()} threads; {params:,} params '
    f'(build {build_s:.1f} s); first batch sha256 {checks["first_batch_sha256"]} (as fed: '
    f'{checks["first_batch_as_fed_sha256"]}, mean {first.mean():.3f}); ActNorm init images '
    f'({init_examples}, {init_mode}) {checks["init_images_sha256"]}; test[:{len(test)}] '
    f'{checks["test_sha256"]}',
    flush=True,
  )
  if checks['first_batch_sha256'] != meta['first_batch_sha256']:
    raise SystemExit('error: the first batch differs from the checksum in the npz meta')
  if len(test) == test_count and checks['test_sha256'] != meta['test_sha256']:
    raise SystemExit('error: the test images differ from the checksum in the npz meta')

  def evaluate():
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(eval_seed)
      model.eval()
      total, count = 0.0, 0
      with torch.no_grad():
        for i in range(0, len(test), a.eval_batch_size):
          x = to_torch(test[i : i + a.eval_batch_size])
          total += elbo_bpd(model, x).item() * len(x)
          count += len(x)
    return total / count, time.perf_counter() - start

  def small_u():
    """Adamax entries where eps slows the update (u < 10 eps): of all, and of those with m != 0.

    torch's u >= eps, so m/u is damped by at least 10% there (0 < |g| < 9 eps); with m = 0
    (no gradient yet: upstream of a zero-initialised conv) neither code moves the weight.
    """
    small = moving = small_moving = total = 0
    for group in opt.param_groups:
      for q in group['params']:
        st = opt.state.get(q, {})
        if 'exp_inf' in st:
          below, nonzero = st['exp_inf'] < 10 * a.eps, st['exp_avg'] != 0
          total += below.numel()
          small += int(below.sum())
          moving += int(nonzero.sum())
          small_moving += int((below & nonzero).sum())
    return small / max(total, 1), small_moving / max(moving, 1)

  def init_forward(images):
    model.train()
    with torch.no_grad():
      elbo_bpd(model, to_torch(images))

  curve, eval_times = [], []
  if init_mode == 'separate':
    t = time.perf_counter()
    init_forward(train[:init_examples])
    print(
      f'[official] ActNorm init: one training-mode forward on {init_examples} images '
      f'({time.perf_counter() - t:.1f} s)',
      flush=True,
    )
  if a.save_init:
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(a.save_init, **state)
    print(f'[official] wrote {len(state)} arrays to {a.save_init}', flush=True)
  if a.eval_at_start:
    if init_mode == 'first_step':  # initialise on batch 0 in a fork, then restore everything
      saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
      with torch.random.fork_rng(devices=[]):
        init_forward(first)
        bpd, took = evaluate()
      model.load_state_dict(saved)
    else:
      bpd, took = evaluate()
    eval_times.append(took)
    curve.append({'step': 0, 'test_bpd': bpd, 'train_bpd': None, 'seconds': 0.0})
    print(f'[official] step 0: test {bpd:.4f} bits/dim (eval {took:.1f} s)', flush=True)

  per_step, lrs, step_times = [], [], []
  start = time.perf_counter()
  last_point = 0
  for step in range(steps):
    x = to_torch(train[step * batch : (step + 1) * batch])
    t = time.perf_counter()
    model.train()
    opt.zero_grad()
    loss = elbo_bpd(model, x)
    loss.backward()
    lrs.append(opt.param_groups[0]['lr'])
    opt.step()
    if warmup is not None:
      warmup.step()
    if decay is not None and (step + 1) % a.epoch_steps == 0:
      decay.step()
    per_step.append(loss.item())
    step_times.append(time.perf_counter() - t)
    done = step + 1
    if done <= 3 or (a.eval_every and done % a.eval_every == 0):
      print(
        f'[official] step {done}: train {per_step[-1]:.4f} bits/dim, lr {lrs[-1]:.3g}, '
        f'{step_times[-1]:.2f} s',
        flush=True,
      )
    if (a.eval_every and done % a.eval_every == 0) or done == steps:
      bpd, took = evaluate()
      eval_times.append(took)
      window = per_step[last_point:done]
      below = small_u()
      curve.append(
        {
          'step': done,
          'test_bpd': bpd,
          'train_bpd': statistics.fmean(window),
          'seconds': round(time.perf_counter() - start, 3),
          'adamax_u_below_10eps': below[0],
          'adamax_u_below_10eps_of_moving': below[1],
        }
      )
      last_point = done
      print(
        f'[official] step {done}: test {bpd:.4f} bits/dim (eval {took:.1f} s); Adamax u < 10 eps: '
        f'{below[0]:.2%} of all entries, {below[1]:.2%} of those with m != 0',
        flush=True,
      )

  result = {
    'impl': 'official',
    'seed': a.seed,
    'preset': a.preset,
    'params': params,
    'batch_size': batch,
    'lr': a.lr,
    'adamax': 'torch.optim.Adamax: u = max(b2*u, |g|+eps), w -= lr/(1-b1^t) * m/u',
    'adamax_epsilon': a.eps,
    'loss': 'bits/dim (official elbo_bpd)',
    'warmup': a.warmup,
    'warmup_rule': (
      'lr*min(1,(t+1)/warmup) (--warmup_like_ours)'
      if a.warmup_like_ours
      else 'lr*min(1,t/warmup), t = 0-based step (official LinearWarmupScheduler; step 0 at lr 0)'
    ),
    'epoch_steps': a.epoch_steps,
    'init_examples': init_examples,
    'init_mode': init_mode,
    'eval_examples': len(test),
    'eval_batch_size': a.eval_batch_size,
    'eval_seed': eval_seed,
    'steps': steps,
    'npz': a.npz,
    **checks,
    'timing': {
      'build_s': build_s,
      'step_s_median': statistics.median(step_times[1:]) if len(step_times) > 1 else None,
      'first_step_s': step_times[0] if step_times else None,
      'eval_s_mean': statistics.fmean(eval_times) if eval_times else None,
      'evals': len(eval_times),
      'threads': torch.get_num_threads(),
      'torch': torch.__version__,
    },
    'curve': curve,
    'train_bpd_per_step': per_step,
    'lr_per_step': lrs,
    'step_s': [round(v, 3) for v in step_times],
  }
  print(json.dumps(curve, indent=1))
  tm = result['timing']
  print(
    f'[official] median step {tm["step_s_median"] or math.nan:.3f} s; mean evaluation of '
    f'{len(test)} images {tm["eval_s_mean"] or math.nan:.1f} s; lr of steps 0-3: '
    f'{", ".join(f"{v:.3g}" for v in lrs[:4])}'
  )
  if a.json:
    directory = os.path.dirname(a.json)
    if directory:
      os.makedirs(directory, exist_ok=True)
    with open(a.json, 'w') as f:
      json.dump(result, f, indent=1)
    print('wrote', a.json)


if __name__ == '__main__':
  main()
