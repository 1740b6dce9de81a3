"""Machine-speed calibration: one coupling network, forward + backward, in PyTorch and in TF.

This machine kind's speed drifts by 30-40% between days (shared cores). The official PyTorch
reference numbers in the issues and in `shared/reference/performance.md` were measured on a given
day; this script re-measures the same five coupling-network cases now, so a run of
`python -m tf_denseflow.bench` can be compared with the reference at the machine speed of the day:

```
python benchmarks/coupling_net_calibration.py --framework=tf a c d e
/tmp/tv/bin/python benchmarks/coupling_net_calibration.py --framework=torch a c d e
```
(the torch side needs `pip install torch==2.13.0 numpy` in a separate venv; the wheel lies on
disk on this machine kind). The torch network is an NCHW re-implementation of the official
coupling network's computation (1x1 projection; Nystrom attention with the official raw reshape;
dense block of depth 7, growth 64, gated output; concat, BatchNorm, ReLU, 1x1; 1x1 out), written
for timing only: same shapes and FLOPs as `tf_denseflow.nn.CouplingNetwork`. Cases (batch,
size, in -> mid -> out) as in performance.md: a 16,16x16,6->16->12; b 16,8x8,31->16->62;
c 4,16x16,31->48->62; d 4,8x8,77->48->154; e 4,4x4,154->48->308.
"""

import argparse
import math
import time

CASES = {
  'a': (16, 16, 6, 16, 12),
  'b': (16, 8, 31, 16, 62),
  'c': (4, 16, 31, 48, 62),
  'd': (4, 8, 77, 48, 154),
  'e': (4, 4, 154, 48, 308),
}
# performance.md, torch 2.13 (official module) on the day of the reference numbers, ms.
TORCH_REFERENCE_MS = {'a': 201.9, 'b': 55.7, 'c': 67.5, 'd': 26.1, 'e': 17.2}


def _best_ms(step, rounds=3, calls=10):
  for _ in range(3):
    step()
  best = math.inf
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      step()
    best = min(best, (time.perf_counter() - start) / calls * 1000)
  return best


def torch_case(name):
  import torch
  import torch.nn.functional as F
  from torch import nn

  torch.set_num_threads(2)

  class DenseLayer(nn.Module):
    def __init__(self, c, growth):
      super().__init__()
      self.conv_in = nn.Conv2d(c, c, 1)
      self.conv_out = nn.Conv2d(c, growth, 3, padding=1)

    def forward(self, x):
      return torch.cat([x, F.relu(self.conv_out(F.relu(self.conv_in(x))))], 1)

  class DenseBlock(nn.Module):
    def __init__(self, c_in, c_out, depth, growth):
      super().__init__()
      self.layers = nn.ModuleList()
      c = c_in
      for _ in range(depth):
        self.layers.append(DenseLayer(c, growth))
        c += growth
      self.gate = nn.Conv2d(c, 3 * c_out, 1)

    def forward(self, x):
      for layer in self.layers:
        x = layer(x)
      a, b, c = self.gate(x).chunk(3, 1)
      return a + b * torch.sigmoid(c)

  def pinv(k, iterations=6):
    a = k.abs()
    v = k.transpose(-1, -2) / (a.sum(-2).max(-1)[0] * a.sum(-1).max(-1)[0])[..., None, None]
    eye = torch.eye(k.shape[-1])
    for _ in range(iterations):
      kv = k @ v
      v = 0.25 * v @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
    return v

  class Attention(nn.Module):
    def __init__(self, c, landmarks=4):
      super().__init__()
      self.e, self.m = c // 2, landmarks
      self.qkv = nn.Conv2d(c, 3 * self.e, 1)
      self.out = nn.Conv2d(self.e, c, 1)

    def forward(self, x):
      n, _, h, w = x.shape
      length, e, m = h * w, self.e, self.m
      q, k, v = self.qkv(x).reshape(n, length, 3 * e).chunk(3, -1)
      scale = 1 / math.sqrt(length)
      qm = q.reshape(n, m, length // m, e).mean(2) * scale
      km = k.reshape(n, m, length // m, e).mean(2) * scale
      a1 = F.softmax(q @ km.transpose(1, 2), -2)
      a2 = F.softmax(qm @ km.transpose(1, 2), -2)
      a3 = F.softmax(qm @ k.transpose(1, 2), -2)
      return self.out(((a1 @ pinv(a2)) @ (a3 @ v) + v).reshape(n, e, h, w))

  class CouplingNet(nn.Module):
    def __init__(self, c_in, c_out, mid):
      super().__init__()
      self.project = nn.Conv2d(c_in, mid, 1)
      self.attention = Attention(mid)
      self.dense = DenseBlock(mid, mid, 7, 64)
      self.norm = nn.BatchNorm2d(2 * mid)
      self.mix = nn.Conv2d(2 * mid, mid, 1, bias=False)
      self.out = nn.Conv2d(mid, c_out, 1)

    def forward(self, x):
      h = self.project(x)
      h = torch.cat([self.attention(h), self.dense(h)], 1)
      return self.out(self.mix(F.relu(self.norm(h))))

  batch, size, c_in, mid, c_out = CASES[name]
  net = CouplingNet(c_in, c_out, mid)
  x = torch.randn(batch, c_in, size, size, requires_grad=True)
  upstream = torch.randn(batch, c_out, size, size)

  def step():
    net.zero_grad()
    x.grad = None
    (net(x) * upstream).sum().backward()

  return _best_ms(step)


def tf_case(name):
  import tensorflow as tf

  from tf_denseflow import nn

  batch, size, c_in, mid, c_out = CASES[name]
  net = nn.CouplingNetwork(c_in, c_out, mid, 7, 64, seeds=nn.Seeds(0))
  x = tf.random.normal([batch, size, size, c_in])
  upstream = tf.random.normal([batch, size, size, c_out])
  variables = net.trainable_variables

  @tf.function(autograph=False)
  def grads(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(net(x, training=True) * upstream)
    return tape.gradient(loss, [x] + variables)

  return _best_ms(lambda: grads(x)[0].numpy())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--framework', choices=['tf', 'torch'], required=True)
  parser.add_argument('cases', nargs='*', default=sorted(CASES))
  args = parser.parse_args()
  run = torch_case if args.framework == 'torch' else tf_case
  for name in args.cases:
    ms = run(name)
    ratio = ms / TORCH_REFERENCE_MS[name]
    print(
      f'{args.framework} case {name}: fwd+bwd {ms:.1f} ms '
      f'({ratio:.2f}x the reference-day torch time {TORCH_REFERENCE_MS[name]} ms)'
    )


if __name__ == '__main__':
  main()
