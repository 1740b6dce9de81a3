"""Parity with the official PyTorch DenseFlow on the golden tiny models (weights + recorded noise)."""

import json
import os

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import tf_denseflow as tdf
from tf_denseflow import convert_torch

GOLDEN = os.path.join(os.path.dirname(__file__), 'testdata', 'golden')


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _load(name):
  data = np.load(os.path.join(GOLDEN, f'{name}_official.npz'))
  kwargs = json.loads(str(data['config']))['model_kwargs']
  config = tdf.DenseFlowConfig.tiny(units_per_block=tuple(kwargs['block_config']))
  model = tdf.DenseFlow(config)
  state = {k[len('param/') :]: data[k] for k in data.files if k.startswith('param/')}
  convert_torch.load_state_dict(model, state)
  return data, model


def _close(test, got, want, rtol=1e-5, atol=1e-3):
  test.assertAllClose(got, want, rtol=rtol, atol=atol)


class GoldenParityTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(('tiny', 'tiny'), ('tiny_3units', 'tiny_3units'))
  def test_elbo_terms_match_official(self, name):
    data, model = _load(name)
    noise_keys = sorted(k for k in data.files if k.startswith('noise/'))
    terms = model.elbo_terms(
      data['x'],
      dequant_noise=_nhwc(data[noise_keys[0]]),
      noise=[_nhwc(data[k]) for k in noise_keys[1:]],
    )
    terms = {k: v.numpy() for k, v in terms.items()}
    _close(self, terms['dequantization'], data['ldj/transforms.0'])
    for b in range(model.config.num_blocks):
      official = data[f'ldj/transforms.{3 + 2 * b}']
      _close(self, terms[f'block{b}'] + terms[f'noise_block{b}'], official)
      if b < model.config.num_blocks - 1:
        _close(self, terms[f'transition{b}'], data[f'ldj/transforms.{4 + 2 * b}'])
    _close(self, terms['base'], data['base/log_p'])
    _close(self, terms['total'], data['ll/total'])
    _close(self, terms['total'] * -model.config.bits_per_dim_scale, data['ll/bpd'], atol=1e-6)

  @parameterized.named_parameters(('tiny', 'tiny'), ('tiny_3units', 'tiny_3units'))
  def test_sample_matches_official(self, name):
    data, model = _load(name)
    nb = model.config.num_blocks
    latents = [_nhwc(data[f'sample_noise/00{nb - 1 - b}_transition{b}']) for b in range(nb - 1)]
    latents.append(_nhwc(data['sample_noise/000_base']))
    x = model.bijector.sample_data([tf.constant(z) for z in latents]).numpy()
    want = _nhwc(data['sample/continuous'])
    self.assertLess(np.max(np.abs(x - want)), 1e-4 * np.max(np.abs(want)))
    images = model.decode([tf.constant(z) for z in latents]).numpy()
    # Pixels within float error of a quantisation boundary may differ by one level.
    near_boundary = np.abs(want * 256 - np.round(want * 256)) < 1e-3
    mismatch = images != data['sample/x_uint8']
    self.assertFalse(np.any(mismatch & ~near_boundary))
    self.assertAllEqual(images, np.clip(np.floor(x * 256), 0, 255).astype(np.uint8))


if __name__ == '__main__':
  tf.test.main()
