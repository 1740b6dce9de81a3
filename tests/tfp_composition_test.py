"""DenseFlow's bijectors composed with TFP: the examples of docs/tfp.md, run as tests."""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from absl.testing import parameterized

import tf_denseflow as tdf
from tf_denseflow.bijectors import (
  ActNorm,
  CrossUnitCoupling,
  DenseBlock,
  GlowStep,
  InvertibleConv1x1,
  Squeeze,
)
from tf_denseflow.nn import CouplingNetwork, CrossUnitNetwork

tfb = tfp.bijectors
tfd = tfp.distributions


def _perturb(variables, seed=0, scale=0.05):
  """Moves every weight off its initial value (the conditioners' last convs start at zero)."""
  rng = np.random.RandomState(seed)
  for v in variables:
    v.assign(v + scale * rng.standard_normal(v.shape).astype(np.float32))


def _coupling_net(channels):
  """The conditioner a `GlowStep` on `channels` channels needs (no attention: any size works)."""
  return CouplingNetwork(
    in_channels=(channels + 1) // 2,
    out_channels=2 * (channels // 2),
    mid_channels=8,
    depth=2,
    growth=8,
    use_attention=False,
  )


def _tiny_model(dequantization='variational'):
  config = tdf.DenseFlowConfig.tiny(
    image_shape=(8, 8, 3),
    units_per_block=(2, 1),
    steps_per_unit=(1, 1),
    coupling_channels=(8, 8),
    dequantization=dequantization,
  )
  model = tdf.DenseFlow(config)
  model.initialize(np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3)).astype(np.uint8))
  _perturb(model.trainable_variables)
  return model


class ModelBijectorTest(tf.test.TestCase, parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = _tiny_model(dequantization='uniform')
    cls.config = cls.model.config

  def test_joint_distribution_samples_data_and_noise(self):
    joint = self.model.joint_distribution  # p(x, noise_1..noise_K)
    parts = joint.sample(3, seed=(1, 2))  # stateless seed: reproducible
    shapes = [(3,) + self.config.image_shape] + [(3,) + s for s in self.config.noise_shapes()]
    self.assertEqual([tuple(p.shape) for p in parts], shapes)
    for got, again in zip(parts, joint.sample(3, seed=(1, 2))):
      self.assertAllEqual(got, again)
    log_prob = joint.log_prob(parts)
    self.assertEqual(log_prob.shape, (3,))
    self.assertAllEqual(tf.math.is_finite(log_prob), [True] * 3)
    # The same distribution, assembled by hand from TFP parts.
    by_hand = tfd.TransformedDistribution(self.model.base_distribution, self.model.bijector)
    self.assertAllClose(by_hand.log_prob(parts), log_prob, rtol=1e-5)
    # Sampling is the bijector's forward map of standard-normal latents.
    latents = self.model.base_distribution.sample(3, seed=(1, 2))
    for got, want in zip(self.model.bijector.forward(latents), joint.sample(3, seed=(1, 2))):
      self.assertAllClose(got, want, atol=1e-5)

  def test_joint_log_prob_is_the_model_bound(self):
    # log P(images) >= log p(x, noise) - log N(noise; 0, I) - D ln 256,  x = (images + u) / 256.
    images = np.random.RandomState(3).randint(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    u = tf.random.stateless_uniform(images.shape, seed=(4, 5))
    noise = self.model.noise_distribution.sample(2, seed=(6, 7))
    x = (tf.cast(images, tf.float32) + u) / 256.0
    bound = (
      self.model.joint_distribution.log_prob([x] + noise)
      - self.model.noise_distribution.log_prob(noise)
      - self.config.num_dims * np.log(256.0)
    )
    terms = self.model.elbo_terms(images, dequant_noise=u, noise=noise)
    self.assertAllClose(bound, terms['total'], rtol=1e-5, atol=1e-2)

  def test_invert_gives_the_density_direction(self):
    parts = self.model.joint_distribution.sample(2, seed=(8, 9))
    density = tfb.Invert(self.model.bijector)  # [x, noise...] -> latents
    for got, want in zip(density.forward(parts), self.model.bijector.inverse(parts)):
      self.assertAllClose(got, want, atol=1e-5)
    self.assertAllClose(
      density.forward_log_det_jacobian(parts),
      self.model.bijector.inverse_log_det_jacobian(parts),
      rtol=1e-5,
    )
    # Round trip back to the data and noise.
    for got, want in zip(self.model.bijector.forward(density.forward(parts)), parts):
      self.assertAllClose(got, want, atol=1e-4)

  def test_chain_with_stock_tfp_bijectors(self):
    # Centre the images at 0 in the sampling direction, leave the noise alone.
    num_noise = len(self.config.noise_shapes())
    centred = tfb.Chain(
      [tfb.JointMap([tfb.Shift(-0.5)] + [tfb.Identity()] * num_noise), self.model.bijector]
    )
    dist = tfd.TransformedDistribution(self.model.base_distribution, centred)
    parts = dist.sample(2, seed=(10, 11))
    uncentred = [parts[0] + 0.5] + list(parts[1:])
    self.assertAllClose(
      dist.log_prob(parts), self.model.joint_distribution.log_prob(uncentred), rtol=1e-5
    )


class BuildingBlocksTest(tf.test.TestCase, parameterized.TestCase):
  def test_glow_steps_and_squeeze_in_a_chain(self):
    # A small multi-scale-free flow on [8, 8, 3] images: latent [4, 4, 12] -> x.
    steps = [GlowStep(12, _coupling_net(12), name=f'step{k}') for k in range(2)]
    flow = tfb.Chain([tfb.Shift(0.5), Squeeze()] + steps)  # forward: steps, squeeze, shift
    x = tf.random.stateless_uniform([5, 8, 8, 3], seed=(1, 2))
    # ActNorm's data-dependent init: one density pass with `data_init=True` (steps[0] runs first).
    h = Squeeze().inverse(x - 0.5)
    for step in steps:
      h, _ = step.inverse_and_log_det(h, data_init=True)
    variables = [v for s in steps for v in s.trainable_variables] + [
      v for s in steps for v in s.coupling.conditioner.trainable_variables
    ]
    _perturb(variables)
    dist = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [4, 4, 12]), flow)
    self.assertEqual(dist.event_shape, [8, 8, 3])
    self.assertEqual(dist.sample(2, seed=(3, 4)).shape, [2, 8, 8, 3])
    self.assertAllClose(flow.forward(flow.inverse(x)), x, atol=1e-5)
    self.assertAllClose(
      tfb.Invert(flow).forward_log_det_jacobian(x, event_ndims=3),
      flow.inverse_log_det_jacobian(x, event_ndims=3),
      rtol=1e-5,
    )
    # Keyword arguments reach one bijector of a Chain through its name: batch-norm training mode.
    norm = steps[0].coupling.conditioner.norm
    before = norm.moving_mean.numpy()
    flow.inverse(x, step0={'training': True})
    self.assertNotAllClose(norm.moving_mean.numpy(), before)
    # Training: Keras 3 variables are invisible to tf.Module, so collect them from the networks.
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(dist.log_prob(x))
    grads = tape.gradient(loss, variables)
    self.assertEqual(
      len(variables), 2 * 3 + 2 * len(steps[0].coupling.conditioner.trainable_variables)
    )
    self.assertNotIn(None, grads)

  def test_single_bijectors_under_invert(self):
    act_norm, conv = ActNorm(4), InvertibleConv1x1(4, seed=tf.constant([1, 2]))
    x = tf.random.stateless_normal([3, 2, 2, 4], seed=(5, 6))
    act_norm.initialize(x)
    density = tfb.Invert(tfb.Chain([act_norm, conv]))  # x -> z: ActNorm^-1 then conv^-1
    z = density.forward(x)
    self.assertAllClose(density.inverse(z), x, atol=1e-5)
    self.assertAllClose(
      density.forward_log_det_jacobian(x, event_ndims=3),
      -density.inverse_log_det_jacobian(z, event_ndims=3),
      rtol=1e-5,
    )

  def test_dense_block_on_own_tensors(self):
    # One dense block: 2 units of one Glow step each; unit 1 gets g noise channels through a
    # cross-unit coupling whose network sees the block input x (official conditioning).
    c, g = 4, 2
    block = DenseBlock(
      units=[[GlowStep(c, _coupling_net(c))], [GlowStep(c + g, _coupling_net(c + g))]],
      couplings=[CrossUnitCoupling(g, CrossUnitNetwork(c, g))],
      in_channels=c,
      growth_rate=g,
    )
    networks = [unit[0].coupling.conditioner for unit in block.units] + [block.couplings[0].network]
    _perturb([v for net in networks for v in net.trainable_variables])
    joint = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [4, 4, c + g]), block)
    x, noise = joint.sample(3, seed=(7, 8))  # forward: z -> [x, noise]
    self.assertEqual(x.shape, [3, 4, 4, c])
    self.assertEqual(noise.shape, [3, 4, 4, g])
    for got, want in zip(block.forward(block.inverse([x, noise])), [x, noise]):
      self.assertAllClose(got, want, atol=1e-4)
    # A lower bound of log p(x): the augmented density minus the noise's N(0, I).
    noise_dist = tfd.Sample(tfd.Normal(0.0, 1.0), [4, 4, g])
    bound = joint.log_prob([x, noise]) - noise_dist.log_prob(noise)
    self.assertEqual(bound.shape, [3])
    self.assertAllEqual(tf.math.is_finite(bound), [True] * 3)
    # The image path alone (no noise recovered): the first part of the forward map.
    z = block.inverse([x, noise])
    self.assertAllClose(block.sample_data(z), x, atol=1e-4)


if __name__ == '__main__':
  tf.test.main()
