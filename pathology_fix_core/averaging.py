"""Exponential moving average of the meta-parameters theta, bias-corrected.

The meta-gradient estimates are noisy, so theta wanders around the optimum it
is drifting to; an average of recent thetas is often better than the last one
(Polyak averaging). With thetas theta_1, theta_2, ... (theta_1 the first one
averaged, e.g. the initial theta) and decay d in [0, 1), the average after t
thetas is

  m_t = sum_{i=1..t} (1 - d) d^(t - i) theta_i / (1 - d^t),

the zero-initialized EMA divided by the sum of its weights (Adam's bias
correction). The weights sum to one for every t, so m_1 = theta_1 and early
averages are not pulled towards zero or dominated by the first theta; for
large t it is the plain EMA with horizon about 1 / (1 - d) thetas.

It is computed in the equivalent running form

  m_t = m_{t-1} + w_t (theta_t - m_{t-1}),   w_t = (1 - d) / (1 - d^t),

which keeps m_t a convex combination of thetas in floating point (w_1 = 1,
w_t decreases to 1 - d); 1 - d^t is evaluated as -expm1(t log d), without
the cancellation of 1 - d^t for d near 1.

Pure functions on pytrees of float arrays (any shapes), jit-able: `count` is
an int32 scalar array, `decay` a Python or array float.
"""

from typing import Any, Tuple

import jax
import jax.numpy as jnp

Pytree = Any


def ema_weight(count: jnp.ndarray, decay) -> jnp.ndarray:
  """w_t = (1 - d) / (1 - d^t) for the t-th theta (t = count >= 1); float32 [].

  d = 0 gives w_t = 1 (no averaging: the average is the latest theta).
  """
  t = jnp.asarray(count, jnp.float32)
  d = jnp.asarray(decay, jnp.float32)
  # 1 - d^t = -expm1(t log d); log(0) = -inf gives 1 - 0^t = 1 for t >= 1.
  normalizer = -jnp.expm1(t * jnp.log(d))
  return (1.0 - d) / normalizer


def ema_init(theta: Pytree) -> Tuple[Pytree, jnp.ndarray]:
  """(m_1, t = 1): the average of the single theta `theta` is theta itself."""
  average = jax.tree_util.tree_map(jnp.asarray, theta)
  return average, jnp.asarray(1, jnp.int32)


def ema_update(average: Pytree, count: jnp.ndarray, theta: Pytree,
               decay) -> Tuple[Pytree, jnp.ndarray]:
  """(m_t, t) from (m_{t-1}, t - 1) and theta_t.

  m_t = m_{t-1} + w_t (theta_t - m_{t-1}), w_t = `ema_weight(t, decay)`.

  average and theta: pytrees of the same structure and leaf shapes; each
  leaf of the result keeps average's dtype.
  """
  count = jnp.asarray(count, jnp.int32) + 1
  w = ema_weight(count, decay)
  average = jax.tree_util.tree_map(
      lambda m, x: (m + w * (x - m)).astype(jnp.result_type(m)), average,
      theta)
  return average, count
