"""CrossUnitCoupling: DenseFlow's noise augmentation as an affine coupling in (data, noise) space.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

import tensorflow as tf

from tf_denseflow.bijectors.flow_bijector import FlowBijector, sum_event
from tf_denseflow.checks import check_int
from tf_denseflow.shapes import concat_shape, shape_of

__all__ = ['CrossUnitCoupling']


class CrossUnitCoupling(FlowBijector):
  """Two-part bijector `[h, noise] <-> [h, eta]` with parameters from earlier latents `h`.

  ```
  (mu, s) = g(h);  log_sigma = 2 * tanh(s / 2)
  inverse (density):   eta   = mu + exp(log_sigma) * noise      log-det  sum(log_sigma)
  forward (sampling):  noise = (eta - mu) * exp(-log_sigma)     log-det -sum(log_sigma)
  ```
  `h` (`[H, W, C_h]`) passes through unchanged. `noise ~ N(0, I)` is the augmentation variable
  e_i of the paper; `eta` is what DenseFlow appends to the next unit's input. In the joint space
  this is an exact bijection, so `log p(x, noise) = log p(latents) + log-dets` and the bound
  `log p(x) >= E[log p(x, noise) - log N(noise; 0, I)]` (the paper's Eq. 9) is exact bookkeeping.
  `forward_min_event_ndims=[3, 3]`.

  Variables: those of `network` (g_i, a Keras layer with a zero-initialised last conv, so
  `eta == noise` at initialisation).

  #### References
  [1]: Matej Grcic, Ivan Grubisic, Sinisa Segvic. Densely connected normalizing flows. In
       _Neural Information Processing Systems_, 2021.
  """

  def __init__(self, growth_rate: int, network, validate_args: bool = False, name='cross_unit'):
    parameters = dict(locals())
    growth_rate = check_int('growth_rate', growth_rate, minimum=1)
    with tf.name_scope(name) as name:
      self._growth_rate = int(growth_rate)
      self.network = network
      super().__init__(
        forward_min_event_ndims=[3, 3],
        inverse_min_event_ndims=[3, 3],
        validate_args=validate_args,
        parameters=parameters,
        name=name,
      )

  @property
  def growth_rate(self) -> int:
    """Noise channels G."""
    return self._growth_rate

  def mu_and_log_sigma(self, h: tf.Tensor):
    """`(mu, log_sigma)`, each `[..., H, W, G]`, from the conditioning latents `h`."""
    batch = shape_of(h)[:-3]
    height, width = h.shape[-3], h.shape[-2]
    out = tf.cast(self.network(tf.reshape(h, [-1, height, width, h.shape[-1]])), h.dtype)
    out = tf.reshape(out, concat_shape(batch, [height, width, 2 * self._growth_rate]))
    mu, s = tf.split(out, 2, axis=-1)
    return mu, 2.0 * tf.tanh(s / 2.0)

  def forward_and_log_det(self, parts, **kwargs):
    h, eta = parts
    mu, log_sigma = self.mu_and_log_sigma(h)
    return [h, (eta - mu) * tf.exp(-log_sigma)], -sum_event(log_sigma)

  def inverse_and_log_det(self, parts, **kwargs):
    h, noise = parts
    mu, log_sigma = self.mu_and_log_sigma(h)
    return [h, mu + tf.exp(log_sigma) * noise], sum_event(log_sigma)

  def _forward_dtype(self, dtypes, **kwargs):
    return dtypes

  def _inverse_dtype(self, dtypes, **kwargs):
    return dtypes

  def _forward_event_shape(self, s):
    return s

  def _inverse_event_shape(self, s):
    return s

  def _forward_event_shape_tensor(self, s):
    return s

  def _inverse_event_shape_tensor(self, s):
    return s
