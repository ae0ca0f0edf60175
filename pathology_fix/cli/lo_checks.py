"""Checks of learned_optimization's configurables that our configs bind.

LO's constructors take any value: `MLPLOpt.hidden_size = -1` fails deep in
JAX, `FixedDimQuadraticFamily.dim = 0` trains on an empty problem with a
meta-loss of 0. The CLI checks their gin bindings before anything is built;
each rule names the allowed values. Only values a user bound are checked (LO's
defaults are fine), unscoped or in LO main's "default_scope"; references
(@f(), %MACRO) are not followed.
"""

import math
import numbers
from typing import Any, Callable, Dict, Tuple

import gin

from pathology_fix_core import errors

Rule = Tuple[Callable[[Any], bool], str]


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool) and
          math.isfinite(value))


INT_AT_LEAST_1: Rule = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
INT_AT_LEAST_0: Rule = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
POSITIVE: Rule = (lambda v: _is_real(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Rule = (lambda v: _is_real(v) and v >= 0, "a finite number >= 0")
FRACTION: Rule = (lambda v: _is_real(v) and 0 <= v < 1,
                  "a number in [0, 1)")
BOOL: Rule = (lambda v: isinstance(v, bool), "True or False")

# configurable name -> {parameter: rule}: LO's configurables in our configs
# (and the other learned optimizers the tests cover).
RULES: Dict[str, Dict[str, Rule]] = {
    "MLPLOpt": dict(hidden_size=INT_AT_LEAST_1, hidden_layers=INT_AT_LEAST_0,
                    step_mult=POSITIVE, exp_mult=POSITIVE),
    "AdafacMLPLOpt": dict(hidden_size=INT_AT_LEAST_1,
                          hidden_layers=INT_AT_LEAST_0, step_mult=POSITIVE,
                          exp_mult=POSITIVE),
    "RNNMLPLOpt": dict(hidden_size=INT_AT_LEAST_1, hidden_layer=INT_AT_LEAST_0,
                       lstm_hidden_size=INT_AT_LEAST_1,
                       step_multiplier=POSITIVE, magnitude_rate=POSITIVE),
    "NNAdam": dict(output_scale=POSITIVE, initial_learning_rate=POSITIVE,
                   initial_beta1=FRACTION, initial_beta2=FRACTION,
                   initial_epsilon=POSITIVE),
    "FixedDimQuadraticFamily": dict(dim=INT_AT_LEAST_1),
    "ConstantTruncationSchedule": dict(total_length=INT_AT_LEAST_1),
    "LogUniformLengthSchedule": dict(min_length=INT_AT_LEAST_1,
                                     max_length=INT_AT_LEAST_1),
    "TruncatedPES": dict(trunc_length=INT_AT_LEAST_1, steps_per_jit=INT_AT_LEAST_1,
                         std=POSITIVE, num_tasks=INT_AT_LEAST_1,
                         random_initial_iteration_offset=INT_AT_LEAST_0,
                         train_and_meta=BOOL),
    "Adam": dict(learning_rate=POSITIVE, beta1=FRACTION, beta2=FRACTION,
                 epsilon=NON_NEGATIVE),
    "SGD": dict(learning_rate=POSITIVE),
    "GradientClipOptimizer": dict(grad_clip=POSITIVE),
}

_LO_MAIN_SCOPE = "default_scope"


def _bound(name: str) -> Dict[str, Any]:
  bound = {}
  for scope in (_LO_MAIN_SCOPE, None):  # unscoped wins, as gin resolves
    try:
      with gin.config_scope(scope):
        bound.update(gin.get_bindings(name, resolve_references=False))
    except ValueError:  # not registered in this LO
      return {}
  return bound


def check_bindings():
  """Raises InvalidArgument for the first bound value a rule rejects."""
  for name, rules in RULES.items():
    bound = _bound(name)
    for parameter, (allowed, description) in rules.items():
      value = bound.get(parameter)
      # A reference (@f(), %MACRO) is left to the callee.
      if (parameter in bound and
          not isinstance(value, gin.config.ConfigurableReference) and
          not allowed(value)):
        raise errors.InvalidArgument(
            f"{name}.{parameter} must be {description}, got "
            f"{bound[parameter]!r}", f"{name}.{parameter}")
  _check_lengths()


def _check_lengths():
  bound = _bound("LogUniformLengthSchedule")
  low, high = bound.get("min_length"), bound.get("max_length")
  if _is_int(low) and _is_int(high) and low > high:
    raise errors.InvalidArgument(
        f"LogUniformLengthSchedule.min_length ({low}) must be <= max_length "
        f"({high})", "LogUniformLengthSchedule.min_length")
