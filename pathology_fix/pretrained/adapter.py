"""Any LO learned optimizer, with a fixed theta, as an optax transformation."""

from typing import Any, NamedTuple, Optional

import jax
from learned_optimization.learned_optimizers import base as lopt_base
import optax


class LOptOptaxState(NamedTuple):
  """The wrapped LO optimizer's state (it holds its own copy of the params)."""
  lopt_state: Any


def lopt_to_optax(learned_opt: lopt_base.LearnedOptimizer, theta: Any,
                  num_steps: int) -> optax.GradientTransformationExtraArgs:
  """`learned_opt.opt_fn(theta)` as an optax `GradientTransformationExtraArgs`.

  An LO optimizer maps (state holding params_t, grad_t, loss_t) to a state
  holding params_{t+1}; as optax, `update(grads, state, params, loss=loss)`
  returns `updates = params_{t+1} - params` (so `optax.apply_updates` gives
  params_{t+1}, up to float rounding of that difference) and the new state.
  The caller's `params` replace the state's copy before each step, so a
  transformation chained before or after this one is respected.

  Args:
    learned_opt: an LO `LearnedOptimizer` (e.g. `mlp_lopt.MLPLOpt()`).
    theta: its meta-parameters (e.g. from `pretrained.load`).
    num_steps: length of the training run; learned optimizers may condition
      on training progress, so pass the number of steps you will take.

  Returns:
    A transformation whose `update(updates, state, params, *, loss,
    model_state=None, key=None, **ignored)` needs `params` (a pytree like
    the one given to `init`) and `loss` (the scalar training loss at params,
    the extra argument); it is jit-able.
  """
  if not isinstance(learned_opt, lopt_base.LearnedOptimizer):
    raise TypeError("lopt_to_optax.learned_opt must be an LO "
                    f"LearnedOptimizer, got {type(learned_opt).__name__}")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(
        f"lopt_to_optax.num_steps must be an integer >= 1, got {num_steps!r}")
  opt = learned_opt.opt_fn(theta)

  def init_fn(params):
    state = opt.init(params, num_steps=int(num_steps))
    if not hasattr(state, "params") or not hasattr(state, "replace"):
      raise TypeError(
          f"lopt_to_optax: {type(learned_opt).__name__}'s optimizer state "
          f"({type(state).__name__}) has no replaceable `params` field")
    return LOptOptaxState(state)

  def update_fn(updates, state, params=None, *, loss=None,
                model_state=None, key=None, **extra_args):
    del extra_args  # other transformations' extra arguments
    if params is None:
      raise ValueError("lopt_to_optax update: params is None; pass the "
                       "current params (update(grads, state, params, loss=...))")
    if loss is None:
      raise ValueError("lopt_to_optax update: loss is None; pass the training "
                       "loss at params as update(..., loss=loss)")
    lopt_state = state.lopt_state.replace(params=params)
    lopt_state = opt.update(lopt_state, updates, loss=loss,
                            model_state=model_state, key=key)
    new_params = opt.get_params(lopt_state)
    step = jax.tree_util.tree_map(lambda new, old: new - old, new_params,
                                  params)
    return step, LOptOptaxState(lopt_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
