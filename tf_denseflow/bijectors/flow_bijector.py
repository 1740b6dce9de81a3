"""FlowBijector: a `tfb.Bijector` defined by one `*_and_log_det` pair per direction.

Subclasses implement `forward_and_log_det(z)` (sampling, latent -> data) and
`inverse_and_log_det(x)` (density, data -> latent). This base maps TFP's four hooks onto that
pair, and remembers the log-det computed alongside the last few outputs so that TFP's separate
`inverse(x)` and `inverse_log_det_jacobian(x)` calls (as in `TransformedDistribution.log_prob`)
evaluate each conditioner network once, not twice.
"""

from __future__ import annotations

import collections
import math
import weakref
from typing import Any, Tuple

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = ['FlowBijector', 'std_normal_log_prob', 'sum_event']

_MEMO_SIZE = 16


def sum_event(t: tf.Tensor) -> tf.Tensor:
  """Sums a `[..., H, W, C]` tensor over its three event dimensions (half precision -> float32)."""
  if t.dtype in (tf.bfloat16, tf.float16):
    t = tf.cast(t, tf.float32)
  return tf.reduce_sum(t, axis=[-3, -2, -1])


def std_normal_log_prob(t: tf.Tensor) -> tf.Tensor:
  """`log N(t; 0, I)` of a `[..., H, W, C]` tensor, summed over its event dimensions."""
  return sum_event(-0.5 * tf.square(t) - 0.5 * math.log(2.0 * math.pi))


class FlowBijector(tfb.Bijector):
  """Base class: TFP's hooks from the `forward_and_log_det` / `inverse_and_log_det` pair.

  Keyword arguments (such as `training=True` for the batch norms of the coupling networks, or a
  `context` tensor) pass through TFP's public methods to the pair. The memo holds at most a few
  entries, keyed like TFP's own cache: by the identity of the input tensors (checked through weak
  references) and by every keyword argument (Python values by value, tensors by identity), so
  `inverse(x, training=True)` never answers `inverse_log_det_jacobian(x, training=False)`. As
  with TFP's cache, a held tensor is one key: changing the variables between `inverse(x)` and
  `inverse_log_det_jacobian(x)` of the same tensor object is not seen.
  """

  def __init__(self, *, parameters, name, forward_min_event_ndims=3, **kwargs):
    """TFP's constructor; events are `[H, W, C]` (`forward_min_event_ndims=3`) unless given."""
    self._ldj_memo = collections.OrderedDict()
    super().__init__(
      parameters=parameters, name=name, forward_min_event_ndims=forward_min_event_ndims, **kwargs
    )

  # Subclasses implement these two.
  def forward_and_log_det(self, z: Any, **kwargs) -> Tuple[Any, tf.Tensor]:
    """Sampling direction: returns `(x, log|det dx/dz|)`, the log-det of shape batch."""
    raise NotImplementedError

  def inverse_and_log_det(self, x: Any, **kwargs) -> Tuple[Any, tf.Tensor]:
    """Density direction: returns `(z, log|det dz/dx|)`, the log-det of shape batch."""
    raise NotImplementedError

  # TFP's contract has no `training` notion: `_parameter_properties` as in RealNVP and Glow.
  @classmethod
  def _parameter_properties(cls, dtype=None, num_classes=None):
    return dict()

  def _memo_key(self, direction, value, kwargs):
    """`(key, referents)`: the key holds everything that changes the log-det.

    The input tensors by identity, and every keyword argument: Python values (`training`,
    `data_init`, ...) by value and type (`True` is not `1`), tensors (`context`) by identity.
    `referents` are the objects whose identity the key holds, checked through weak references.
    """
    leaves = tf.nest.flatten(value)
    referents = list(leaves)
    parts = []
    for name in sorted(kwargs):
      for leaf in tf.nest.flatten(kwargs[name]):
        if leaf is None or isinstance(leaf, (bool, int, float, str, bytes)):
          parts.append((name, type(leaf).__name__, leaf))
        else:
          parts.append((name, 'id', id(leaf)))
          referents.append(leaf)
    return (direction, tuple(id(t) for t in leaves), tuple(parts)), referents

  def _memo_put(self, direction, value, ldj, kwargs):
    key, referents = self._memo_key(direction, value, kwargs)
    try:
      refs = tuple(weakref.ref(t) for t in referents)
    except TypeError:  # not weak-referenceable (e.g. a Python float): not remembered
      return
    self._ldj_memo[key] = (refs, ldj)
    while len(self._ldj_memo) > _MEMO_SIZE:
      self._ldj_memo.popitem(last=False)

  def _memo_get(self, direction, value, kwargs):
    key, referents = self._memo_key(direction, value, kwargs)
    hit = self._ldj_memo.get(key)
    if hit is None:
      return None
    refs, ldj = hit
    if len(refs) == len(referents) and all(r() is t for r, t in zip(refs, referents)):
      return ldj
    return None

  # Every instance owns variables or networks: compare (and cache) by identity, never by
  # hyper-parameters, so that two `ActNorm(3)` never share TFP's cache.
  def _get_parameterization(self):
    return id(self)

  # Both ends of a pass are remembered: `TransformedDistribution.log_prob` calls `inverse(x)`
  # and then asks for the log-det at either end.
  def _forward(self, z, **kwargs):
    x, ldj = self.forward_and_log_det(z, **kwargs)
    self._memo_put('forward', z, ldj, kwargs)
    self._memo_put('inverse', x, -ldj, kwargs)
    return x

  def _inverse(self, x, **kwargs):
    z, ldj = self.inverse_and_log_det(x, **kwargs)
    self._memo_put('inverse', x, ldj, kwargs)
    self._memo_put('forward', z, -ldj, kwargs)
    return z

  def _forward_log_det_jacobian(self, z, **kwargs):
    ldj = self._memo_get('forward', z, kwargs)
    return ldj if ldj is not None else self.forward_and_log_det(z, **kwargs)[1]

  def _inverse_log_det_jacobian(self, x, **kwargs):
    ldj = self._memo_get('inverse', x, kwargs)
    return ldj if ldj is not None else self.inverse_and_log_det(x, **kwargs)[1]
