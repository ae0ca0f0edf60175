"""Truncation-length schedules: how many inner steps one truncation unrolls.

LO's `TruncationSchedule` decides when an inner run ends (its total length);
these decide the length k of each truncated unroll within it. Our estimators
take one as `truncation_length`; the math lives in `curriculum.py`.
"""

from typing import Optional, Tuple

import gin
import numpy as np

from pathology_fix_core import curriculum


class TruncationLength:
  """Interface: `sample(rng, outer_iteration, steps_per_jit, steps_left)`."""

  def validate(self, steps_per_jit: int) -> None:
    raise NotImplementedError

  def sample(self, rng: np.random.Generator, outer_iteration: int,
             steps_per_jit: int, steps_left: Optional[int]) -> int:
    raise NotImplementedError

  def max_chunks(self, steps_per_jit: int) -> Optional[int]:
    """Most chunks of steps_per_jit steps a truncation can take; None: unknown."""
    del steps_per_jit
    return None


@gin.configurable
class ConstantTruncationLength(TruncationLength):
  """k = `length` every outer step, clipped to the steps left in the run."""

  def __init__(self, length: int):
    self.length = length

  def validate(self, steps_per_jit: int) -> None:
    curriculum.check_unroll_length(self.length, steps_per_jit,
                                   name=f"{type(self).__name__}.length")

  def sample(self, rng, outer_iteration, steps_per_jit, steps_left):
    del rng, outer_iteration, steps_per_jit
    if steps_left is None:
      return int(self.length)
    return int(min(self.length, steps_left))

  def max_chunks(self, steps_per_jit: int) -> int:
    return -(-int(self.length) // int(steps_per_jit))


@gin.configurable
class LinearTruncationCurriculum(TruncationLength):
  """k grows linearly from k_min to k_max over num_iterations outer steps.

  Each draw is jittered by U(jitter), rounded to a multiple of steps_per_jit
  and clipped to the steps left in the inner run (the paper, Sec. 4.4, 50 ->
  10,000 over 5,000 outer iterations; docs/method.md §6).
  """

  def __init__(self,
               k_min: int = 50,
               k_max: int = 10000,
               num_iterations: int = 5000,
               jitter: Tuple[float, float] = (0.8, 1.2)):
    self.k_min = k_min
    self.k_max = k_max
    self.num_iterations = num_iterations
    # validate() names a jitter that is no pair.
    self.jitter = tuple(jitter) if isinstance(jitter, (tuple, list)) else jitter

  def validate(self, steps_per_jit: int) -> None:
    prefix = f"{type(self).__name__}."
    curriculum.validate_curriculum(self.k_min, self.k_max, self.num_iterations,
                                   steps_per_jit, prefix=prefix)
    curriculum.check_jitter(self.jitter, prefix=prefix)

  def sample(self, rng, outer_iteration, steps_per_jit, steps_left):
    return curriculum.sample_truncation_length(
        rng,
        outer_iteration,
        self.k_min,
        self.k_max,
        self.num_iterations,
        steps_per_jit,
        steps_left=steps_left,
        jitter=self.jitter)

  def max_chunks(self, steps_per_jit: int) -> int:
    return curriculum.max_curriculum_chunks(self.k_max, self.jitter,
                                            steps_per_jit)
