"""The importance-weighted bound (IWBO) as a streaming reducer over chunks of draws.

Burda, Grosse, Salakhutdinov. Importance weighted autoencoders. ICLR 2016 (the bound);
Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021 (its use here).
`DenseFlow.log_prob_bound` and the serving signature `log_prob_bound` both reduce with these.
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = ['iwbo_accumulate', 'iwbo_normalize']


def iwbo_accumulate(acc: tf.Tensor, lls: tf.Tensor, draws: tf.Tensor, num_samples) -> tf.Tensor:
  """One streaming step of the importance-weighted bound: a running log-sum-exp per row.

  ```
  acc <- log(exp(acc) + sum_{j : draws[j] < num_samples} exp(lls[j]))
  ```
  Args:
    acc: `[N]` log-sum-exp of the draws so far (`-inf` at the start).
    lls: `[c, N]` single-sample ELBOs of `c` more draws of each row.
    draws: `[c]` int32 index of each of those draws.
    num_samples: the draws each row takes: a scalar, or `[N]` per row (serving); later draws are
      masked out, so chunks may overshoot.
  """
  valid = draws[:, None] < tf.cast(num_samples, draws.dtype)
  lls = tf.where(valid, lls, -math.inf)
  return tf.reduce_logsumexp(tf.concat([acc[None], lls], 0), axis=0)


def iwbo_normalize(acc: tf.Tensor, num_samples) -> tf.Tensor:
  """The IWBO `log (1/k) sum_j exp(elbo_j)` from `iwbo_accumulate`'s sum (`k` scalar or `[N]`)."""
  return acc - tf.math.log(tf.cast(num_samples, tf.float32))
