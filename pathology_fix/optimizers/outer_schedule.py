"""The paper's outer optimizer with a learning-rate schedule over outer steps.

`outer_optimizer.paper_outer_optimizer` is Metz et al. (2019)'s outer optimizer
(`docs/method.md` §8): Adam with beta1 = 0.5 on the meta-gradient clipped by
value at 0.1, at a constant learning rate. `scheduled_outer_optimizer` keeps
all of it and multiplies the step size by a schedule of the outer step t
(t = 0 for the first update):

  warm-up (t < W):   lr(t) = lr * (t + 1) / W
  then, with p = min((t - W) / (T - W), 1) the decay's progress,
    "constant":      lr(t) = lr
    "cosine":        lr(t) = lr * (f + (1 - f) (1 + cos(pi p)) / 2)
    "linear":        lr(t) = lr * (1 - (1 - f) p)

with lr the peak learning rate, W = warmup_steps, T = total_steps (the
decay ends there; lr(t) = lr * f for t >= T) and f = final_fraction. The
warm-up's first step is lr / W, not 0, so that no outer step is wasted.

The update of outer step t is therefore Adam's, with step size lr(t):
  theta <- theta - lr(t) * mhat_t / (sqrt(vhat_t + eps_root) + eps)
on g = clip(meta-gradient, -0.1, 0.1), beta1 0.5, beta2 0.999, eps = eps_root
= 1e-8 (LO's `Adam`).

It is a LO `Optimizer` (a `GradientClipOptimizer` around an optax-based LO
optimizer, on LO 0.0.1 and LO main), so it is the GradientLearner's theta
optimizer in gin:

  GradientLearner.theta_opt = @scheduled_outer_optimizer()
  scheduled_outer_optimizer.schedule = "cosine"
  scheduled_outer_optimizer.total_steps = 400
  scheduled_outer_optimizer.final_fraction = 0.1

The schedule's step counter lives in the optimizer state (optax's count), so
a restored checkpoint continues the schedule where it stopped. The constant
schedule without warm-up is exactly `paper_outer_optimizer` (same state
structure, same numbers), so its checkpoints restore either way.

Runs bounded by time (`run_train.num_seconds`) must choose total_steps from
their outer steps per minute (the headline recipe: ~7 per minute on one core,
~420 in 60 minutes); after T the rate stays at lr * f.
"""

import dataclasses
import math
from typing import Optional

import gin
import jax.numpy as jnp
from learned_optimization.optimizers import base as opt_base
import optax

from pathology_fix_core import errors
from pathology_fix.lo_boundary import lo_api
from pathology_fix.optimizers import outer_optimizer

SCHEDULES = ("constant", "cosine", "linear")
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-8  # LO's Adam: eps and eps_root
_PREFIX = "scheduled_outer_optimizer."


@dataclasses.dataclass(frozen=True)
class OuterSchedule:
  """lr(t) of the module docstring; `__call__` is jit-able (t int or array)."""
  learning_rate: float
  schedule: str = "constant"
  total_steps: Optional[int] = None
  warmup_steps: int = 0
  final_fraction: float = 0.0

  def __post_init__(self):
    check_schedule(self.learning_rate, self.schedule, self.total_steps,
                   self.warmup_steps, self.final_fraction)

  @property
  def is_constant(self) -> bool:
    return self.schedule == "constant" and self.warmup_steps == 0

  def __call__(self, step) -> jnp.ndarray:
    t = jnp.asarray(step, jnp.float32)
    lr, w, f = self.learning_rate, float(self.warmup_steps), self.final_fraction
    if self.schedule == "constant":
      decay = jnp.ones_like(t)
    else:
      p = jnp.clip((t - w) / (self.total_steps - w), 0.0, 1.0)
      if self.schedule == "cosine":
        decay = f + (1.0 - f) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
      else:  # "linear"
        decay = 1.0 - (1.0 - f) * p
    if self.warmup_steps:
      decay = jnp.where(t < w, (t + 1.0) / w, decay)
    return lr * decay


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def check_schedule(learning_rate, schedule, total_steps, warmup_steps,
                   final_fraction, prefix: str = _PREFIX):
  """Raises ValueError naming the bad parameter and its allowed values."""
  if not (isinstance(learning_rate, (int, float)) and
          math.isfinite(learning_rate) and learning_rate > 0):
    raise errors.InvalidArgument(
        f"{prefix}learning_rate={learning_rate!r}; allowed: a "
        "finite float > 0", f"{prefix}learning_rate")
  if schedule not in SCHEDULES:
    raise errors.InvalidArgument(
        f"{prefix}schedule={schedule!r}; allowed: {SCHEDULES}",
        f"{prefix}schedule")
  if not (_is_int(warmup_steps) and warmup_steps >= 0):
    raise errors.InvalidArgument(
        f"{prefix}warmup_steps={warmup_steps!r}; allowed: an "
        "integer >= 0", f"{prefix}warmup_steps")
  if schedule != "constant":
    if not (_is_int(total_steps) and total_steps > warmup_steps):
      raise errors.InvalidArgument(
          f"{prefix}total_steps={total_steps!r}; allowed: an integer > "
          f"warmup_steps ({warmup_steps}) for schedule {schedule!r}",
          f"{prefix}total_steps")
    if not (isinstance(final_fraction, (int, float)) and
            0.0 <= final_fraction <= 1.0):
      raise errors.InvalidArgument(
          f"{prefix}final_fraction={final_fraction!r}; allowed: "
          "a float in [0, 1]", f"{prefix}final_fraction")
  elif total_steps is not None and not (_is_int(total_steps) and
                                        total_steps >= 1):
    raise errors.InvalidArgument(
        f"{prefix}total_steps={total_steps!r}; allowed: None or "
        "an integer >= 1", f"{prefix}total_steps")


def _optax_optimizer_class():
  """LO's optax wrapper: `optimizers.base` on 0.0.1, `optax_opts` on main."""
  if hasattr(opt_base, "OptaxOptimizer"):
    return opt_base.OptaxOptimizer
  from learned_optimization.optimizers import optax_opts  # pylint: disable=g-import-not-at-top
  return optax_opts.OptaxOptimizer


class ScheduledOuterOptimizer(opt_base.GradientClipOptimizer):
  """clip by value, then Adam(beta1 0.5) with step size `schedule(t)`.

  `schedule` is the `OuterSchedule`; `learning_rate(t)` its value at outer
  step t (for logging the outer learning rate).
  """

  def __init__(self, schedule: OuterSchedule):
    if schedule.is_constant:
      # Exactly paper_outer_optimizer's inner optimizer and state structure.
      adam = opt_base.Adam(learning_rate=schedule.learning_rate,
                           beta1=outer_optimizer.PAPER_OUTER_BETA1)
    else:
      adam = _optax_optimizer_class()(optax.adam(
          learning_rate=schedule, b1=outer_optimizer.PAPER_OUTER_BETA1,
          b2=ADAM_BETA2, eps=ADAM_EPSILON, eps_root=ADAM_EPSILON))
    super().__init__(adam, grad_clip=outer_optimizer.PAPER_OUTER_GRAD_CLIP)
    self.schedule = schedule

  def learning_rate(self, step) -> float:
    return float(self.schedule(step))

  @property
  def name(self) -> str:
    s = self.schedule
    return (f"ScheduledOuterAdam_lr{s.learning_rate}_{s.schedule}"
            f"_T{s.total_steps}_W{s.warmup_steps}_f{s.final_fraction}")


def _bound_paper_learning_rate() -> Optional[float]:
  try:
    return lo_api.query_binding("paper_outer_optimizer.learning_rate")
  except ValueError:
    return None  # not bound


@gin.configurable
def scheduled_outer_optimizer(learning_rate: Optional[float] = None,
                              meta_loss_split: str = "outer_valid",
                              schedule: str = "constant",
                              total_steps: Optional[int] = None,
                              warmup_steps: int = 0,
                              final_fraction: float = 0.0
                             ) -> ScheduledOuterOptimizer:
  """The paper's outer optimizer with the learning-rate schedule lr(t).

  Args:
    learning_rate: peak learning rate lr. None takes the
      `paper_outer_optimizer.learning_rate` binding if there is one (so a
      config that includes a recipe only adds the schedule), else the
      paper's rate for `meta_loss_split` (3e-3 "train", 3e-4 "outer_valid").
    meta_loss_split: only read when learning_rate is None and unbound.
    schedule: "constant", "cosine" or "linear" (module docstring).
    total_steps: T, the outer step at which the decay reaches
      lr * final_fraction; required unless schedule is "constant".
    warmup_steps: W, linear warm-up steps (0: none).
    final_fraction: f in [0, 1], lr(t >= T) / lr.

  Returns:
    A ScheduledOuterOptimizer (a LO GradientClipOptimizer).

  Raises:
    ValueError: naming the bad parameter and its allowed values, or a gin
      binding this function overrides (e.g. `Adam.learning_rate`).
  """
  outer_optimizer._reject_replaced_bindings()  # pylint: disable=protected-access
  if learning_rate is None:
    learning_rate = _bound_paper_learning_rate()
  if learning_rate is None:
    if meta_loss_split not in outer_optimizer.PAPER_OUTER_LEARNING_RATE:
      raise errors.InvalidArgument(
          f"{_PREFIX}meta_loss_split={meta_loss_split!r}; allowed: "
          f"{sorted(outer_optimizer.PAPER_OUTER_LEARNING_RATE)} (or set "
          "learning_rate)", f"{_PREFIX}meta_loss_split")
    learning_rate = outer_optimizer.PAPER_OUTER_LEARNING_RATE[meta_loss_split]
  return ScheduledOuterOptimizer(OuterSchedule(
      learning_rate, schedule, total_steps, warmup_steps, final_fraction))
