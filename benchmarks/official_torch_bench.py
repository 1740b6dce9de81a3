"""Same-day yardstick: times the OFFICIAL PyTorch DenseFlow (github.com/matejgrcic/DenseFlow).

```
git clone https://github.com/matejgrcic/DenseFlow /path/to/DenseFlow     # not a dependency
python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 numpy
/tmp/tv/bin/python benchmarks/official_torch_bench.py --official_dir=/path/to/DenseFlow \
    --preset=small --batch_size=16 --steps=5 --warmup=1
```
The phases match `python -m tf_denseflow.bench` (train step, ELBO evaluation, sampling; random
uint8 images at 32x32, median of the timed steps), so the two can be run back to back on the same
day: this machine kind's speed drifts by up to ~1.9x between days (docs/benchmarks.md).

The model is built through the official experiment entry point
`experiments/image/model/model_flow.py:get_model(args, data_shape)` (the same call
`experiments/image/train.py` makes), with the official defaults for everything
that is not a command-line option of the official training script:
  * checkpointing=False  (official `--checkpointing` is store_true, default False,
    and the README training commands do not pass it)
  * num_bits=8, VariationalDequantization(DequantizationFlow(...)) as hard-coded in
    dense_flow.py
  * intra-unit coupling net DNMH = DenseNetMultihead(depth=7, growth=64,
    gated_conv=True, NystromAttention) as hard-coded in affine_coupling.py

Loss / step exactly as experiments/image/experiment/baseline_flow.py:train_fn:
    model.train(); optimizer.zero_grad(); loss = elbo_bpd(model, x); loss.backward();
    optimizer.step()
(use_grad_norm defaults to 0 -> no clipping; the LinearWarmup / ExponentialLR
schedulers only change the lr and are left out.)  Optimizer: torch.optim.Adamax(lr=1e-3)
(official: Adamax(lr, betas=(0.9, 0.999)) == torch defaults).

Data: random pixel values in {0..255} as a torch.long tensor of shape (B,3,32,32),
which is what the official loaders produce (ToTensor + Quantize(num_bits=8) -> .long()).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

PRESETS = {
  # name: (block_conf, layers_conf, layer_mid_chnls, growth_rate, expected #params @32x32, default batch)
  'small': ((2, 2, 1), (2, 2, 2), (16, 16, 16), 4, 15_280_056, 16),
  'denseflow_74_10': ((6, 4, 1), (5, 6, 20), (48, 48, 48), 10, 130_647_294, 4),
}


def peak_rss_mb():
  # Linux: ru_maxrss is in kilobytes
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def official_model(official_dir: str, preset: str):
  """The official model of `preset` at 32x32 through `get_model`, as the official training runs."""
  sys.path.insert(0, os.path.join(official_dir, 'experiments', 'image'))  # model.model_flow
  sys.path.insert(0, official_dir)  # the `denseflow` package
  from model.model_flow import get_model  # official experiment module

  block_conf, layers_conf, mid, growth, _, _ = PRESETS[preset]
  margs = argparse.Namespace(
    block_conf=list(block_conf),
    layers_conf=list(layers_conf),
    layer_mid_chnls=list(mid),
    growth_rate=growth,
    checkpointing=False,
    num_classes=10,
  )
  return get_model(margs, data_shape=(3, 32, 32))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--official_dir', required=True, help='a checkout of matejgrcic/DenseFlow')
  p.add_argument('--preset', default='small', choices=sorted(PRESETS))
  p.add_argument('--batch_size', type=int, default=None)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument(
    '--phases',
    default='train,eval,sample',
    help='comma list out of train,eval,sample (train always runs first if present)',
  )
  p.add_argument('--count_only', action='store_true', help='build + count parameters, no timing')
  p.add_argument('--json', default=None, help='write results to this JSON file')
  a = p.parse_args()

  sys.path.insert(0, os.path.join(a.official_dir, 'experiments', 'image'))  # model.model_flow
  sys.path.insert(0, a.official_dir)  # the `denseflow` package
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)

  block_conf, layers_conf, mid, growth, expected, default_bs = PRESETS[a.preset]
  bs = a.batch_size if a.batch_size is not None else default_bs
  assert a.steps >= 1 and a.warmup >= 0

  from denseflow.utils import elbo_bpd  # official loss (bits/dim)

  data_shape = (3, 32, 32)
  t0 = time.perf_counter()
  model = official_model(a.official_dir, a.preset)
  build_s = time.perf_counter() - t0
  n_train = sum(q.numel() for q in model.parameters() if q.requires_grad)
  n_all = sum(q.numel() for q in model.parameters())
  print(
    f'[official DenseFlow] preset={a.preset} block_conf={block_conf} layers_conf={layers_conf} '
    f'layer_mid_chnls={mid} growth_rate={growth} out_shape={model.out_shape}'
  )
  print(
    f'trainable params: {n_train:,} (all params: {n_all:,}); expected {expected:,}; build {build_s:.1f}s'
  )
  assert n_train == expected, f'parameter count {n_train} != expected {expected}'

  res = {
    'impl': 'official matejgrcic/DenseFlow',
    'preset': a.preset,
    'block_conf': block_conf,
    'layers_conf': layers_conf,
    'layer_mid_chnls': mid,
    'growth_rate': growth,
    'params': n_train,
    'batch_size': bs,
    'steps': a.steps,
    'warmup': a.warmup,
    'threads': torch.get_num_threads(),
    'torch': torch.__version__,
    'python': platform.python_version(),
    'build_s': build_s,
    'phases': {},
  }
  if a.count_only:
    res['peak_rss_mb'] = peak_rss_mb()
    print(f'peak RSS: {res["peak_rss_mb"]:.0f} MB')
    if a.json:
      with open(a.json, 'w') as f:
        json.dump(res, f, indent=2)
    return

  # random 8-bit images, long dtype, as the official data loaders deliver them
  x = torch.randint(0, 256, (bs,) + data_shape, dtype=torch.long)
  opt = torch.optim.Adamax(model.parameters(), lr=1e-3)

  def train_step():
    model.train()
    opt.zero_grad()
    loss = elbo_bpd(model, x)
    loss.backward()
    opt.step()
    return loss.item()

  def eval_step():
    model.eval()
    with torch.no_grad():
      return elbo_bpd(model, x).item()

  def sample_step():
    model.eval()
    with torch.no_grad():
      s = model.sample(bs)
    assert s.shape == (bs,) + data_shape, s.shape
    return float(s.float().mean())

  fns = {'train': train_step, 'eval': eval_step, 'sample': sample_step}
  phases = [ph for ph in a.phases.split(',') if ph]
  for ph in phases:
    assert ph in fns, ph
  if 'train' in phases:
    phases = ['train'] + [ph for ph in phases if ph != 'train']
  if 'train' in phases and a.warmup >= 1:
    pass  # ActNorm data-dependent init happens in the first (untimed) train warm-up forward
  else:
    # no train phase requested: still do the official data-dependent init (one train-mode forward)
    model.train()
    with torch.no_grad():
      elbo_bpd(model, x)
    print('did one train-mode forward for ActNorm data-dependent init')

  for ph in phases:
    fn = fns[ph]
    for i in range(a.warmup):
      t = time.perf_counter()
      v = fn()
      dt = time.perf_counter() - t
      print(f'  {ph} warmup {i}: {dt:.3f}s  value={v:.4f}', flush=True)
    times, vals = [], []
    for i in range(a.steps):
      t = time.perf_counter()
      v = fn()
      dt = time.perf_counter() - t
      times.append(dt)
      vals.append(v)
      print(f'  {ph} step {i}: {dt:.3f}s  value={v:.4f}', flush=True)
    med = statistics.median(times)
    res['phases'][ph] = {
      'median_s': med,
      'img_per_s': bs / med,
      'step_times_s': times,
      'values': vals,
      'peak_rss_mb_after': peak_rss_mb(),
    }
    print(
      f'{ph:6s}: median {med:.3f}s/step  ->  {bs / med:.2f} img/s  '
      f'(peak RSS so far {peak_rss_mb():.0f} MB)',
      flush=True,
    )

  res['peak_rss_mb'] = peak_rss_mb()
  phases_text = ' | '.join(f'{k} {v["img_per_s"]:.2f} img/s' for k, v in res['phases'].items())
  print(
    f'SUMMARY preset={a.preset} bs={bs} threads={torch.get_num_threads()} params={n_train} | '
    f'{phases_text} | peak RSS {res["peak_rss_mb"]:.0f} MB'
  )
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(res, f, indent=2)
    print('wrote', a.json)


if __name__ == '__main__':
  main()
