"""The paper's outer optimizer: Adam(beta1 0.5) on the meta-gradient clipped by value.

Metz et al. (2019) train theta with Adam, beta1 = 0.5, on the meta-gradient
clipped elementwise at 0.1, at learning rate 3e-3 for the training-loss
objective and 3e-4 for the validation-loss objective (`docs/method.md` §8).
`outer_schedule` adds learning-rate schedules on top of it.
"""

import math
import numbers
from typing import Optional

import gin
from learned_optimization.optimizers import base as opt_base

from pathology_fix_core import errors
from pathology_fix.lo_boundary import lo_api

# Outer learning rate per meta-objective (the estimator's meta_loss_split).
PAPER_OUTER_LEARNING_RATE = {"train": 3e-3, "outer_valid": 3e-4}
PAPER_OUTER_BETA1 = 0.5
PAPER_OUTER_GRAD_CLIP = 0.1
# What configs bound before paper_outer_optimizer existed; it sets these
# itself, so a leftover binding would silently do nothing.
_REPLACED_BINDINGS = ("Adam.learning_rate", "Adam.beta1",
                      "GradientClipOptimizer.grad_clip",
                      "GradientClipOptimizer.opt")


def _reject_replaced_bindings():
  for name in _REPLACED_BINDINGS:
    try:
      value = lo_api.query_binding(name)
    except ValueError:
      continue  # not bound
    raise errors.InvalidArgument(
        f"{name} = {value!r} is bound, but the outer optimizer is "
        "paper_outer_optimizer, which sets it (beta1 0.5, clip 0.1); bind "
        "paper_outer_optimizer.learning_rate instead", name)


@gin.configurable
def paper_outer_optimizer(learning_rate: Optional[float] = None,
                          meta_loss_split: str = "outer_valid"
                          ) -> opt_base.Optimizer:
  """Metz et al. (2019)'s outer optimizer: Adam(beta1 0.5), clip by value 0.1.

  theta <- Adam_{lr, beta1=0.5}(clip(g, -0.1, 0.1)), elementwise clip of the
  meta-gradient g before Adam's moments.

  Args:
    learning_rate: Adam's step size; None takes the paper's for
      `meta_loss_split` (3e-3 training loss, 3e-4 validation loss).
    meta_loss_split: the meta-objective's split, "train" or "outer_valid";
      only read when learning_rate is None.

  Returns:
    LO's GradientClipOptimizer(Adam), the `GradientLearner.theta_opt`.

  Raises:
    ValueError: a bad learning_rate or meta_loss_split, or a gin binding
      this function overrides (e.g. `Adam.learning_rate`).
  """
  _reject_replaced_bindings()
  if learning_rate is None:
    if meta_loss_split not in PAPER_OUTER_LEARNING_RATE:
      raise errors.InvalidArgument(
          f"paper_outer_optimizer.meta_loss_split={meta_loss_split!r}; allowed:"
          f" {sorted(PAPER_OUTER_LEARNING_RATE)} (or set learning_rate)",
          "paper_outer_optimizer.meta_loss_split")
    learning_rate = PAPER_OUTER_LEARNING_RATE[meta_loss_split]
  if (isinstance(learning_rate, bool) or
      not isinstance(learning_rate, numbers.Real) or
      not 0 < learning_rate < math.inf):
    raise errors.InvalidArgument(
        f"paper_outer_optimizer.learning_rate={learning_rate!r}; must be a "
        "finite number > 0 (or None for the paper's)",
        "paper_outer_optimizer.learning_rate")
  return opt_base.GradientClipOptimizer(
      opt_base.Adam(learning_rate=learning_rate, beta1=PAPER_OUTER_BETA1),
      grad_clip=PAPER_OUTER_GRAD_CLIP)
