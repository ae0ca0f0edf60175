"""An exponential moving average of theta over outer steps (gin: `ThetaEMA`).

The math is `pathology_fix_core.averaging`: the bias-corrected EMA

  m_t = sum_{i=1..t} (1 - d) d^(t - i) theta_i / (1 - d^t),

over the thetas theta_1 (the one training starts from), theta_2 (after the
first outer step), ...; m_1 = theta_1 and the horizon is about 1 / (1 - d)
outer steps (d = 0.99: ~100 steps, ~15 minutes of the headline recipe at ~7
outer steps per minute).

Usage in a training loop:

  ema = ThetaEMA()                    # decay from gin
  state = ema.init(theta0)            # or restored from a checkpoint
  ...after each outer step: state = ema.update(state, theta)
  averaged_theta = state.average      # meta-validate / save it like theta

`EmaState` is a `flax.struct.dataclass`: `flax.serialization.to_bytes(state)`
and `from_bytes(ema.init(theta_template), data)` checkpoint and restore it.
"""

from typing import Any

import flax
import gin
import jax
import jax.numpy as jnp

from pathology_fix_core import errors
from pathology_fix_core import averaging


@flax.struct.dataclass
class EmaState:
  """average: the bias-corrected EMA m_t (theta's pytree); count: t, int32."""
  average: Any
  count: jnp.ndarray


@gin.configurable
class ThetaEMA:
  """Bias-corrected EMA of theta, decay in [0, 1) (0: no averaging)."""

  def __init__(self, decay: float = 0.99):
    try:
      ok = 0.0 <= float(decay) < 1.0
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise errors.InvalidArgument(
          f"ThetaEMA.decay={decay!r}; allowed: a float in [0, 1) "
          "(horizon about 1 / (1 - decay) outer steps)", "ThetaEMA.decay")
    self.decay = float(decay)
    self._update = jax.jit(self._update_impl)

  def init(self, theta: Any) -> EmaState:
    """The average of theta alone (t = 1)."""
    return EmaState(*averaging.ema_init(theta))

  def _update_impl(self, state: EmaState, theta: Any) -> EmaState:
    return EmaState(*averaging.ema_update(state.average, state.count, theta,
                                          self.decay))

  def update(self, state: EmaState, theta: Any) -> EmaState:
    """Adds the next theta: m_t = m_{t-1} + w_t (theta - m_{t-1})."""
    return self._update(state, theta)
