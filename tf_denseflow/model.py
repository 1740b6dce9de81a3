"""DenseFlow: the model, its joint distribution over (data, noise) and its likelihood bounds.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tf_denseflow.bijectors.flow_bijector import std_normal_log_prob
from tf_denseflow.bounds import iwbo_accumulate, iwbo_normalize
from tf_denseflow.checks import check_float, check_images, check_int, check_seed
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.dequantization import make_dequantizer
from tf_denseflow.flow import DenseFlowBijector
from tf_denseflow.nn.layers import BatchNorm, Seeds

tfd = tfp.distributions

__all__ = ['DenseFlow', 'iwbo_accumulate', 'iwbo_normalize']  # the reducers: bounds.py


def _std_normal_parts(shapes) -> tfd.Distribution:
  """N(0, I) over a list of event shapes (a `JointDistributionSequential`)."""
  return tfd.JointDistributionSequential(
    [tfd.Sample(tfd.Normal(0.0, 1.0), sample_shape=list(shape)) for shape in shapes]
  )


def _unique(items) -> list:
  """`items` without repeats (by identity), in first-seen order."""
  seen, out = set(), []
  for item in items:
    if id(item) not in seen:
      seen.add(id(item))
      out.append(item)
  return out


class DenseFlow(tf.Module):
  """DenseFlow: a normalizing flow over images, widened by noise (incremental augmentation).

  The flow is an exact bijection between latents and `[x, noise_1..noise_K]`, where `x` is the
  dequantized image in `[0, 1]` and `noise_k ~ N(0, I)` the augmentation noise. For uint8 images
  (D = H*W*C, b = num_bits, levels = images // 2**(8 - b), Glow's reduction to b bits):
  ```
  log P(levels) >= E_{u, noise}[ log p(x, noise) - log N(noise; 0, I) - log q(u|levels) ] - D b ln 2
  x = (levels + u) / 2**b
  ```
  Images are integer levels 0..255 (uint8, or integer-valued in another dtype); anything else
  (floats in [0, 1], 300, -5, NaN) is refused with an error naming `images`.
  `elbo` draws one `(u, noise)`, `log_prob_bound` takes the log-mean-exp of `num_samples` draws
  (the importance-weighted bound, IWBO).

  Attributes:
    config: the architecture.
    bijector: the flow as one `tfb.Bijector`, forward = latents -> `[x, noise...]`.
    dequantizer: `VariationalDequantization` or `UniformDequantization`.
  """

  def __init__(self, config: DenseFlowConfig, seed: int = 0, name: str = 'denseflow'):
    super().__init__(name=name)
    if not isinstance(config, DenseFlowConfig):
      raise TypeError(f'`config` must be a DenseFlowConfig, got {type(config).__name__}.')
    self.config = config
    seeds = Seeds(seed)
    with self.name_scope:
      self.bijector = DenseFlowBijector(config, seeds=seeds)
      self.dequantizer = make_dequantizer(config, seeds)

  # ---------------------------------------------------------------------------------------------
  # Distributions.

  @property
  def base_distribution(self) -> tfd.Distribution:
    """Standard normal over every latent (a `JointDistributionSequential`)."""
    return _std_normal_parts(self.config.latent_shapes())

  @property
  def joint_distribution(self) -> tfd.Distribution:
    """p(x, noise_1..noise_K): `TransformedDistribution(base, bijector)`; its event is a list."""
    return tfd.TransformedDistribution(self.base_distribution, self.bijector)

  @property
  def noise_distribution(self) -> tfd.Distribution:
    """The augmentation noise's N(0, I), one part per injection."""
    return _std_normal_parts(self.config.noise_shapes())

  # ---------------------------------------------------------------------------------------------
  # Variables and initialisation.

  def _keras_layers(self) -> list:
    """The Keras layers of the module tree, in a deterministic order."""
    return self._flatten(predicate=lambda m: isinstance(m, keras.layers.Layer))

  @property
  def trainable_variables(self) -> List[tf.Variable]:
    """Every trainable variable: tf.Variables and those of the Keras 3 networks.

    `tf.Module` does not see Keras 3 variables (tensorflow/tensorflow#84019), so they are
    collected explicitly from every Keras layer in the module tree, in a deterministic order.
    """
    keras_variables = (v for layer in self._keras_layers() for v in layer.trainable_variables)
    return _unique([*super().trainable_variables, *keras_variables])

  @property
  def non_trainable_keras_variables(self) -> list:
    """Batch-norm running statistics."""
    return _unique(v for layer in self._keras_layers() for v in layer.non_trainable_variables)

  def _layers_of_type(self, cls: type) -> list:
    """Every Keras layer of the networks (nested ones too) that is a `cls`, deterministic order."""
    nested = (layer._flatten_layers(include_self=True) for layer in self._keras_layers())
    return _unique(sub for layers in nested for sub in layers if isinstance(sub, cls))

  @property
  def batch_norm_layers(self) -> list:
    """Every `nn.BatchNorm` layer of the networks, in a deterministic order."""
    return self._layers_of_type(BatchNorm)

  def num_parameters(self) -> int:
    """Number of trainable parameters."""
    return int(sum(v.shape.num_elements() for v in self.trainable_variables))

  @property
  def is_initialized(self) -> bool:
    """Whether every ActNorm has been initialised (from data or a checkpoint)."""
    return all(bool(step.act_norm.initialized.numpy()) for step in self.bijector.steps)

  def initialize(self, images, seed=(0, 0)) -> None:
    """Data-dependent ActNorm initialisation from a uint8 batch; a no-op once initialised.

    Runs the density pass in training mode (batch statistics, as the official first training
    step) and initialises each ActNorm from the activations it receives. Call it once, in
    cross-replica context (e.g. inside `strategy.scope()`, outside `strategy.run`).
    """
    if self.is_initialized:
      return
    self._log_likelihood(self.levels(images), check_seed(seed), training=True, data_init=True)

  # ---------------------------------------------------------------------------------------------
  # Likelihood.

  def levels(self, images) -> tf.Tensor:
    """Checked 8-bit `images` -> the model's float32 levels `0..2**num_bits - 1`, `[B, H, W, C]`.

    Glow's reduction: the `8 - num_bits` low bits are dropped (`images // 2**(8 - num_bits)`).

    Raises:
      TypeError, ValueError: `images` not a `[B, H, W, C]` batch of integer levels 0..255
        (`checks.check_images`).
    """
    images = check_images(images, self.config.image_shape)
    if self.config.num_bits < 8:
      images = tf.floor(images / float(2 ** (8 - self.config.num_bits)))
    return images

  def draw_noise(self, seed, batch, offset=0, size=None) -> Tuple[tf.Tensor, List[tf.Tensor]]:
    """The bound's randomness from one seed: `(dequant_noise, [noise_1..noise_K])`.

    The one derivation that training, evaluation, export and the parity replay share:
    ```
    seed_u, seed_noise = stateless_split(seed, 2)
    dequant_noise = dequantizer.draw_noise([batch, *noise_shape], seed_u)  # U(0,1) or N(0, I)
    seed_k        = stateless_split(seed_noise, max(1, K))[k]
    noise_k       = stateless_normal([batch, *noise_shapes()[k]], seed_k)
    ```
    and rows `[offset, offset + size)` of those (a replica's slice of a global batch; default:
    all `batch` rows). Stateless draws fill in row-major order, so row `r` is the same in any
    batch of more than `r` rows: a batch of one is a row's noise on its own (serving). `seed` is
    `[2]` of any integer dtype (used as int64). Returns float32 `dequant_noise [size,
    *dequantizer.noise_shape]` and `K` tensors `[size, *noise_shapes()[k]]`.
    """
    seed = tf.cast(seed, tf.int64)
    seed_u, seed_noise = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = self.dequantizer.draw_noise(tf.concat([[batch], self.dequantizer.noise_shape], 0), seed_u)
    shapes = self.config.noise_shapes()
    seeds = tf.random.experimental.stateless_split(seed_noise, max(1, len(shapes)))
    noise = [
      tf.random.stateless_normal(tf.concat([[batch], shape], 0), seed=seeds[k])
      for k, shape in enumerate(shapes)
    ]
    if size is None and isinstance(offset, int) and offset == 0:
      return u, noise
    size = batch - offset if size is None else size
    return u[offset : offset + size], [n[offset : offset + size] for n in noise]

  def elbo_terms(
    self,
    images,
    seed=None,
    training: bool = False,
    dequant_noise: Optional[tf.Tensor] = None,
    noise: Optional[Sequence[tf.Tensor]] = None,
    data_init: bool = False,
  ) -> Dict[str, tf.Tensor]:
    """The single-sample bound split into its terms, each `[B]` nats.

    Args:
      images: uint8 `[B, H, W, C]` (integer levels 0..255 in any integer or float dtype).
      seed: stateless seed `[2]` (int) for the dequantization and augmentation noise.
      training: batch-norm mode of the coupling networks.
      dequant_noise: optional dequantizer noise to replay instead of drawing (parity tests).
      noise: optional augmentation noise list (N(0, I) draws) to replay instead of drawing.
      data_init: initialise every ActNorm from this pass (see `initialize`).

    Returns:
      A dict with `dequantization` (`-D b ln 2 - log q(u|x)`), `block{b}` (the block's Glow steps
      and `sum(log_sigma)` of its cross-unit couplings), `noise_block{b}` (`-log N(noise; 0, I)`
      of the block's noise), `transition{b}` (`log N(z_out; 0, I)`), `base` (`log N(z_B; loc,
      scale)`), and `total`, their sum: the single-sample ELBO.

    Raises:
      TypeError, ValueError: bad `images` (see `levels`) or `seed` (not two integers).
    """
    seed = tf.constant([0, 0], tf.int64) if seed is None else check_seed(seed)
    return self._terms(self.levels(images), seed, training, dequant_noise, noise, data_init)

  def _unless_empty(self, x: tf.Tensor, compute: Callable, empty: Callable):
    """`compute()`, or `empty()` when `x`'s batch is 0 (static: no `tf.cond`; else one cond).

    TF 2.21's oneDNN `Conv2D` on Intel AMX CPUs returns its input for an empty batch (BUILD.md,
    "Known TF bugs"), so inference never runs the networks on one. Not for training passes:
    their batch-norm updates are recorded from the pass, which a branch would hide.
    """
    if x.shape[0] is not None:  # a traced static batch too (a cond costs memory: ~190 MB, DF)
      return compute() if x.shape[0] > 0 else empty()
    return tf.cond(tf.shape(x)[0] > 0, compute, empty)

  def _term_names(self) -> List[str]:
    n = self.config.num_blocks
    names = ['dequantization']
    for b in range(n):
      names += [f'block{b}', f'noise_block{b}'] + ([f'transition{b}'] if b < n - 1 else [])
    return names + ['base', 'total']

  def _terms(self, images, seed, training, dequant_noise=None, noise=None, data_init=False):
    """`elbo_terms` of checked float32 levels (`levels`) and an integer seed `[2]`."""
    compute = lambda: self._nonempty_terms(  # noqa: E731
      images, seed, training, dequant_noise, noise, data_init
    )
    if training or data_init:
      return compute()
    return self._unless_empty(
      images, compute, lambda: {k: tf.zeros([0]) for k in self._term_names()}
    )

  def _nonempty_terms(self, images, seed, training, dequant_noise, noise, data_init):
    # int64 always: stateless ops draw other numbers from the same seed values in int32
    # (`stateless_fold_in` returns int32).
    seed = tf.cast(seed, tf.int64)
    batch = tf.shape(images)[0]
    if dequant_noise is None or noise is None:
      drawn_u, drawn_noise = self.draw_noise(seed, batch)
      dequant_noise = drawn_u if dequant_noise is None else dequant_noise
      noise = drawn_noise if noise is None else noise
    u, log_q = self.dequantizer.sample_and_log_prob(images, noise=dequant_noise, training=training)
    levels = float(2**self.config.num_bits)
    x = (images + u) / levels
    noise = [tf.convert_to_tensor(n, tf.float32) for n in noise]
    latents, flow_terms = self.bijector.inverse_with_terms(
      [x] + noise, training=training, data_init=data_init
    )
    terms = {'dequantization': -self.config.num_dims * math.log(levels) - log_q}
    k = 0
    for b in range(self.config.num_blocks):
      terms[f'block{b}'] = flow_terms[f'block{b}']
      n = self.config.units_per_block[b] - 1
      terms[f'noise_block{b}'] = -tf.add_n(
        [std_normal_log_prob(e) for e in noise[k : k + n]] + [tf.zeros([batch])]
      )
      k += n
      if b < self.config.num_blocks - 1:
        terms[f'transition{b}'] = std_normal_log_prob(latents[b])
    terms['base'] = flow_terms['base'] + std_normal_log_prob(latents[-1])
    terms['total'] = tf.add_n(list(terms.values()))
    return terms

  def _log_likelihood(self, levels, seed, training=False, data_init=False):
    return self._terms(levels, seed, training, data_init=data_init)['total']

  def elbo(self, images, seed=None, training: bool = False) -> tf.Tensor:
    """Single-sample lower bound of log P(images) in nats, `[B]`.

    Args:
      images: uint8 `[B, H, W, C]`.
      seed: stateless seed `[2]`; the dequantization and augmentation noise derive from it.
      training: use batch statistics in the coupling networks' batch norms (and update the
        running statistics), as during training.

    Raises:
      TypeError, ValueError: bad `images` (see `levels`) or `seed` (not two integers).
    """
    seed = tf.constant([0, 0], tf.int64) if seed is None else check_seed(seed)
    return self._log_likelihood(self.levels(images), seed, training=training)

  def log_prob_bound(
    self, images, num_samples: int = 1, seed=None, chunk_size: int = 16
  ) -> tf.Tensor:
    """Importance-weighted bound (IWBO) of log P(images) in nats, `[B]`.

    ```
    log P(x) >= log (1/k) sum_j exp(elbo_j(x)),   k = num_samples independent (u, noise) draws
    ```
    Evaluated `chunk_size` draws at a time (the batch is tiled `chunk_size` times), with a
    running log-sum-exp, to bound memory. Never below the mean single-sample ELBO (Jensen).

    Raises:
      TypeError, ValueError: bad `images` (see `levels`), `num_samples` or `chunk_size` not an
        integer >= 1, `seed` not two integers.
    """
    images = self.levels(images)
    num_samples = check_int('num_samples', num_samples, minimum=1)
    chunk_size = check_int('chunk_size', chunk_size, minimum=1)
    seed = tf.constant([0, 0], tf.int64) if seed is None else check_seed(seed)
    num_samples = tf.cast(num_samples, tf.int32)
    chunk = tf.minimum(num_samples, chunk_size)
    batch = tf.shape(images)[0]
    num_chunks = (num_samples + chunk - 1) // chunk

    def body(i, acc):
      tiled = tf.tile(images, [chunk, 1, 1, 1])
      lls = tf.reshape(
        self._log_likelihood(tiled, tf.random.experimental.stateless_fold_in(seed, i)),
        [chunk, batch],
      )
      # The last chunk may overshoot num_samples: iwbo_accumulate masks the surplus draws out.
      return i + 1, iwbo_accumulate(acc, lls, tf.range(chunk) + i * chunk, num_samples)

    acc0 = tf.fill([batch], -math.inf)
    _, acc = tf.while_loop(
      lambda i, _: i < num_chunks, body, (tf.constant(0), acc0), maximum_iterations=None
    )
    return iwbo_normalize(acc, num_samples)

  def bits_per_dim(self, images, num_samples: int = 1, seed=None) -> tf.Tensor:
    """`-bound / (D ln 2)`, `[B]`; the ELBO for `num_samples=1`, else the IWBO.

    Bits per `2**num_bits`-level dimension (a `num_bits=5` model scores about 5 at init on
    uniform data).
    """
    num_samples = check_int('num_samples', num_samples, minimum=1)
    if isinstance(num_samples, int) and num_samples == 1:
      bound = self.elbo(images, seed)
    else:
      bound = self.log_prob_bound(images, num_samples, seed)
    return -bound * self.config.bits_per_dim_scale

  # ---------------------------------------------------------------------------------------------
  # Sampling.

  def sample_latents(self, num, seed, temperature=1.0) -> List[tf.Tensor]:
    """`temperature * N(0, I)` latents for `num` samples (stateless, from `seed`).

    Raises:
      TypeError, ValueError: `num` not an integer >= 0, `temperature` not finite and >= 0,
        `seed` not two integers.
    """
    num = check_int('num', num, minimum=0)
    temperature = check_float('temperature', temperature, minimum=0.0)
    shapes = self.config.latent_shapes()
    seeds = tf.random.experimental.stateless_split(check_seed(seed), len(shapes))
    temperature = tf.cast(temperature, tf.float32)
    return [
      temperature * tf.random.stateless_normal(tf.concat([[num], s], 0), seed=seeds[k])
      for k, s in enumerate(shapes)
    ]

  def decode(self, latents: Sequence[tf.Tensor]) -> tf.Tensor:
    """Latents -> uint8 images on the 0..255 scale.

    The flow's sampling path, then the level `floor(2**b * x)` clipped to `[0, 2**b - 1]`, times
    `2**(8 - b)` (Glow's postprocessing; the identity scale for b = 8).
    """
    levels = float(2**self.config.num_bits)

    def compute():
      x = self.bijector.sample_data(latents)
      level = tf.clip_by_value(tf.floor(x * levels), 0.0, levels - 1.0)
      return tf.cast(level * float(2 ** (8 - self.config.num_bits)), tf.uint8)

    return self._unless_empty(
      latents[0], compute, lambda: tf.zeros([0, *self.config.image_shape], tf.uint8)
    )

  def sample(self, num: int, seed=(0, 0), temperature: float = 1.0) -> tf.Tensor:
    """`num` uint8 samples `[num, H, W, C]`; temperature scales the std of every latent.

    Raises:
      TypeError, ValueError: see `sample_latents`.
    """
    return self.decode(self.sample_latents(num, seed, temperature))
