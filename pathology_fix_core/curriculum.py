"""Truncation-length curriculum (the paper, Sec. 4.4; docs/method.md §6).

The number of inner steps per truncation grows linearly over outer training,

  mean(t) = k_min + (k_max - k_min) * min(t / num_iterations, 1),

and every draw is jittered by a factor ``u ~ U(0.8, 1.2)``. Inner steps run in
jitted chunks of ``steps_per_jit``, so a draw is rounded to a multiple of it,
then clipped to the steps left in the current inner run.

This runs at Python level once per outer step: plain Python and NumPy only.
"""

import math
from typing import Optional, Tuple

import numpy as np

from pathology_fix_core import errors


def _is_int(x) -> bool:
  return (isinstance(x, (int, np.integer)) and not isinstance(x, bool)) or (
      isinstance(x, (float, np.floating)) and math.isfinite(x) and
      float(x).is_integer())


def check_steps_per_jit(steps_per_jit: int, name: str = "steps_per_jit"
                       ) -> None:
  """Raises ValueError unless ``steps_per_jit`` is an integer ``>= 1``."""
  if not (_is_int(steps_per_jit) and steps_per_jit >= 1):
    raise errors.InvalidArgument(
        f"{name} ({steps_per_jit!r}) must be an integer >= 1", name)


def check_jitter(jitter: Tuple[float, float], prefix: str = "") -> None:
  """Raises ValueError unless ``jitter`` is ``(low, high)``, ``0 < low <= high``."""
  try:
    low, high = (float(j) for j in jitter)
  except (TypeError, ValueError) as e:
    raise errors.InvalidArgument(
        f"{prefix}jitter ({jitter!r}) must be a pair (low, high) with "
        "0 < low <= high", f"{prefix}jitter") from e
  if not (0.0 < low <= high and math.isfinite(high)):
    raise errors.InvalidArgument(
        f"{prefix}jitter ({jitter!r}) must satisfy 0 < low <= high",
        f"{prefix}jitter")


def validate_curriculum(k_min: float, k_max: float, num_iterations: int,
                        steps_per_jit: int, prefix: str = "") -> None:
  """Checks a curriculum configuration.

  Args:
    k_min: mean truncation length at outer iteration 0, ``>= 1``.
    k_max: mean truncation length from ``num_iterations`` on, ``>= k_min``.
    num_iterations: outer iterations over which the mean grows, ``>= 1``.
    steps_per_jit: inner steps per jitted chunk, an integer ``>= 1``.
    prefix: qualifies k_min, k_max and num_iterations in messages, e.g.
      ``"LinearTruncationCurriculum."``.

  Raises:
    ValueError: naming the offending parameter and its allowed range.
  """
  if not (isinstance(k_min, (int, float, np.integer, np.floating)) and
          not isinstance(k_min, bool) and k_min >= 1):
    raise errors.InvalidArgument(f"{prefix}k_min ({k_min!r}) must be >= 1",
                                 f"{prefix}k_min")
  if not (isinstance(k_max, (int, float, np.integer, np.floating)) and
          not isinstance(k_max, bool) and math.isfinite(k_max)):
    raise errors.InvalidArgument(
        f"{prefix}k_max ({k_max!r}) must be a finite number >= k_min",
        f"{prefix}k_max")
  if k_min > k_max:
    raise errors.InvalidArgument(
        f"{prefix}k_min ({k_min!r}) must be <= {prefix}k_max ({k_max!r})",
        f"{prefix}k_min", f"{prefix}k_max")
  if not (_is_int(num_iterations) and num_iterations >= 1):
    raise errors.InvalidArgument(
        f"{prefix}num_iterations ({num_iterations!r}) must be an integer >= 1",
        f"{prefix}num_iterations")
  check_steps_per_jit(steps_per_jit)


def check_unroll_length(unroll_length: int, steps_per_jit: int,
                        name: str = "unroll_length",
                        steps_per_jit_name: str = "steps_per_jit") -> None:
  """Checks that a fixed unroll length is made of whole jitted chunks.

  Args:
    unroll_length: inner steps of every truncation.
    steps_per_jit: inner steps per jitted chunk.
    name, steps_per_jit_name: how messages call the two, e.g.
      ``"HybridRPES.unroll_length"``.

  Raises:
    ValueError: unless ``unroll_length`` is a positive integer multiple of
      ``steps_per_jit`` (itself a positive integer).
  """
  check_steps_per_jit(steps_per_jit, steps_per_jit_name)
  if not (_is_int(unroll_length) and unroll_length >= 1 and
          int(unroll_length) % int(steps_per_jit) == 0):
    raise errors.InvalidArgument(
        f"{name} ({unroll_length!r}) must be a positive multiple of "
        f"{steps_per_jit_name} ({steps_per_jit!r})", name, steps_per_jit_name)


def round_to_chunks(length: float, steps_per_jit: int) -> int:
  """Whole chunks nearest to ``length`` steps, at least one.

    chunks = max(1, floor(length / steps_per_jit + 1/2))

  Rounds half up (Python's ``round`` rounds half to even). Monotone in
  ``length``, so the longest length a schedule draws gives its most chunks.
  """
  return max(1, int(math.floor(float(length) / int(steps_per_jit) + 0.5)))


def max_curriculum_chunks(k_max: float, jitter: Tuple[float, float],
                          steps_per_jit: int) -> int:
  """Most chunks of ``steps_per_jit`` that one curriculum draw can take.

    round_to_chunks(k_max * jitter[1], steps_per_jit)

  since mean(t) <= k_max, u <= jitter[1] and the rounding is monotone
  (arguments as in ``validate_curriculum`` and ``sample_truncation_length``).
  """
  return round_to_chunks(float(k_max) * float(jitter[1]), steps_per_jit)


def curriculum_mean(outer_iteration: int, k_min: float, k_max: float,
                    num_iterations: int) -> float:
  """Mean truncation length at an outer iteration.

    mean(t) = k_min + (k_max - k_min) * min(t / num_iterations, 1)

  Args:
    outer_iteration: ``t >= 0``.
    k_min, k_max, num_iterations: see ``validate_curriculum``.

  Returns:
    The mean as a Python float: ``k_min`` at 0, ``k_max`` from
    ``num_iterations`` on.
  """
  if outer_iteration < 0:
    raise ValueError(f"outer_iteration ({outer_iteration!r}) must be >= 0")
  if num_iterations < 1:
    raise ValueError(
        f"num_iterations ({num_iterations!r}) must be an integer >= 1")
  frac = min(float(outer_iteration) / float(num_iterations), 1.0)
  return float(k_min) + (float(k_max) - float(k_min)) * frac


def sample_truncation_length(rng: np.random.Generator,
                             outer_iteration: int,
                             k_min: float,
                             k_max: float,
                             num_iterations: int,
                             steps_per_jit: int,
                             steps_left: Optional[int] = None,
                             jitter: Tuple[float, float] = (0.8, 1.2)) -> int:
  """Draws the number of inner steps for the next truncation.

    k = steps_per_jit * max(1, round(mean(t) * u / steps_per_jit)),
    u ~ U(jitter[0], jitter[1]);  then  k = min(k, steps_left).

  The clip to ``steps_left`` wins over the rounding: the inner run ends there,
  so the last truncation of a run may not be a multiple of ``steps_per_jit``.

  Args:
    rng: NumPy ``Generator`` (the only source of randomness).
    outer_iteration: ``t >= 0``.
    k_min, k_max, num_iterations, steps_per_jit: see ``validate_curriculum``.
    steps_left: inner steps left in the current inner run (``>= 1``), or None
      for no clip.
    jitter: ``(low, high)`` with ``0 < low <= high``.

  Returns:
    A Python int ``>= 1``.
  """
  validate_curriculum(k_min, k_max, num_iterations, steps_per_jit)
  check_jitter(jitter)
  low, high = (float(j) for j in jitter)
  if steps_left is not None and steps_left < 1:
    raise ValueError(
        f"steps_left ({steps_left!r}) must be >= 1; reset the inner run "
        "before drawing a truncation")
  steps_per_jit = int(steps_per_jit)
  target = curriculum_mean(outer_iteration, k_min, k_max, num_iterations)
  target *= rng.uniform(low, high)
  length = round_to_chunks(target, steps_per_jit) * steps_per_jit
  if steps_left is not None:
    length = min(length, int(steps_left))
  return int(length)
