"""DenseBlock: DenseFlow's incremental augmentation, a multipart bijector latent <-> [x, noise].

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from tf_denseflow.bijectors.cross_unit import CrossUnitCoupling
from tf_denseflow.bijectors.flow_bijector import FlowBijector
from tf_denseflow.checks import check_int

__all__ = ['DenseBlock']


class DenseBlock(FlowBijector):
  """K units of Glow steps; before unit i >= 1, `growth_rate` noise channels join the latent.

  Density direction (inverse), with `h_0 = x` and `noise_1..noise_{K-1} ~ N(0, I)`:
  ```
  y_0 = f_0(x)
  for i = 1..K-1:
    eta_i = mu_i + exp(log_sigma_i) * noise_i,  (mu_i, log_sigma_i) = g_i(concat[x, y_0..y_{i-2}])
    y_i = f_i(concat[y_{i-1}, eta_i])          # eta is appended as the last G channels
  z = y_{K-1}                                   # C + (K-1)*G channels
  log-det = sum_i log|det df_i| + sum_i sum(log_sigma_i)
  ```
  (`include_previous=True`, the paper-clean variant, also feeds `y_{i-1}` to g_i.) Sampling
  (forward) inverts the units from the last, peels off each `eta_i`, and recovers
  `noise_i = (eta_i - mu_i) * exp(-log_sigma_i)`; `sample_data(z)` skips that and returns x only
  (g is not needed to sample an image).

  Events: forward `z [H, W, C+(K-1)G]` -> `[x [H, W, C], noise_1 [H, W, G], ...]`;
  `forward_min_event_ndims=3`, `inverse_min_event_ndims=[3] * K`. With K = 1 the block is
  `[x] <-> z`. Keyword arguments: `training`, `data_init` (see `GlowStep`).

  Variables: those of the steps and of the cross-unit networks.

  #### References
  [1]: Matej Grcic, Ivan Grubisic, Sinisa Segvic. Densely connected normalizing flows. In
       _Neural Information Processing Systems_, 2021.
  """

  def __init__(
    self,
    units: Sequence[Sequence[FlowBijector]],
    couplings: Optional[Sequence[Optional[CrossUnitCoupling]]],
    in_channels: int,
    growth_rate: int,
    include_previous: bool = False,
    validate_args: bool = False,
    name: str = 'dense_block',
  ):
    parameters = dict(locals())
    num_units = len(units)
    if num_units == 0:
      raise ValueError('`units` must hold at least one unit.')
    in_channels = check_int('in_channels', in_channels, minimum=1)
    growth_rate = check_int('growth_rate', growth_rate, minimum=0)
    if num_units > 1 and growth_rate <= 0:
      raise ValueError(f'`growth_rate` must be positive with {num_units} units, got {growth_rate}.')
    couplings = list(couplings) if couplings is not None else [None] * (num_units - 1)
    if len(couplings) != num_units - 1:
      raise ValueError(f'`couplings` must have {num_units - 1} entries, got {len(couplings)}.')
    with tf.name_scope(name) as name:
      self.units = [list(u) for u in units]
      self.couplings = couplings
      self._in_channels = int(in_channels)
      self._growth_rate = int(growth_rate)
      self._include_previous = include_previous
      super().__init__(
        forward_min_event_ndims=3,
        inverse_min_event_ndims=[3] * num_units,
        validate_args=validate_args,
        parameters=parameters,
        name=name,
      )

  @property
  def num_units(self) -> int:
    """Number of units K."""
    return len(self.units)

  @property
  def in_channels(self) -> int:
    """Channels C of the block input x."""
    return self._in_channels

  @property
  def out_channels(self) -> int:
    """Channels of the block output, `C + (K-1)*G`."""
    return self._in_channels + (self.num_units - 1) * self._growth_rate

  @staticmethod
  def _unit_inverse(unit, h, **kwargs):
    log_det = 0.0
    for step in unit:
      h, ld = step.inverse_and_log_det(h, **kwargs)
      log_det += ld
    return h, log_det

  @staticmethod
  def _unit_forward(unit, h, training=False):
    log_det = 0.0
    for step in reversed(unit):
      h, ld = step.forward_and_log_det(h, training=training)
      log_det += ld
    return h, log_det

  def _conditioning(self, cond_inputs):
    return tf.concat(cond_inputs, axis=-1) if len(cond_inputs) > 1 else cond_inputs[0]

  def _eta(self, i, cond_inputs, noise):
    coupling = self.couplings[i - 1]
    if coupling is None:  # unconditional noise (ablation): eta = noise
      return noise, 0.0
    (_, eta), ld = coupling.inverse_and_log_det([self._conditioning(cond_inputs), noise])
    return eta, ld

  def _noise(self, i, cond_inputs, eta):
    coupling = self.couplings[i - 1]
    if coupling is None:
      return eta, 0.0
    (_, noise), ld = coupling.forward_and_log_det([self._conditioning(cond_inputs), eta])
    return noise, ld

  def inverse_and_log_det(self, parts, training=False, data_init=False, **kwargs):
    parts = list(parts) if isinstance(parts, (list, tuple)) else [parts]
    x, noises = parts[0], parts[1:]
    y, log_det = self._unit_inverse(self.units[0], x, training=training, data_init=data_init)
    cond_inputs = [x]
    for i in range(1, self.num_units):
      if self._include_previous:
        cond_inputs.append(y)
      eta, ld = self._eta(i, cond_inputs, noises[i - 1])
      if not self._include_previous:
        cond_inputs.append(y)
      y, ld_unit = self._unit_inverse(
        self.units[i], tf.concat([y, eta], axis=-1), training=training, data_init=data_init
      )
      log_det += ld + ld_unit
    return y, log_det

  def _peel(self, z, training):
    """Sampling through the units: returns `(x, [y_0..y_{K-2}], [eta_1..eta_{K-1}], log_det)`."""
    g = self._growth_rate
    outputs, etas, log_det = [], [], 0.0
    h = z
    for i in reversed(range(1, self.num_units)):
      h, ld = self._unit_forward(self.units[i], h, training)
      log_det += ld
      h, eta = tf.split(h, [h.shape[-1] - g, g], axis=-1)
      outputs.insert(0, h)
      etas.insert(0, eta)
    x, ld = self._unit_forward(self.units[0], h, training)
    return x, outputs, etas, log_det + ld

  def forward_and_log_det(self, z, training=False, **kwargs):
    x, outputs, etas, log_det = self._peel(z, training)
    noises, cond_inputs = [], [x]
    for i in range(1, self.num_units):
      if self._include_previous:
        cond_inputs.append(outputs[i - 1])
      noise, ld = self._noise(i, cond_inputs, etas[i - 1])
      if not self._include_previous:
        cond_inputs.append(outputs[i - 1])
      noises.append(noise)
      log_det += ld
    return [x] + noises, log_det

  def sample_data(self, z: tf.Tensor, training: bool = False) -> tf.Tensor:
    """Sampling direction without recovering the noise: `z -> x` (the image path only)."""
    return self._peel(z, training)[0]

  def _forward_dtype(self, dtype, **kwargs):
    return [dtype] * self.num_units

  def _inverse_dtype(self, dtypes, **kwargs):
    return dtypes[0]

  def _forward_event_shape(self, s):
    s = tf.TensorShape(s)
    return [s[:-1].concatenate([self._in_channels])] + [s[:-1].concatenate([self._growth_rate])] * (
      self.num_units - 1
    )

  def _inverse_event_shape(self, s):
    return tf.TensorShape(s[0])[:-1].concatenate([self.out_channels])

  def _forward_event_shape_tensor(self, s):
    return [tf.concat([s[:-1], [self._in_channels]], 0)] + [
      tf.concat([s[:-1], [self._growth_rate]], 0)
    ] * (self.num_units - 1)

  def _inverse_event_shape_tensor(self, s):
    return tf.concat([s[0][:-1], [self.out_channels]], 0)
