"""When to meta-validate, and which theta is best: pure, checkpointable logic.

Two small states, both `flax.struct.dataclass`es (checkpoint them with
`flax.serialization.to_bytes` / `from_bytes(template, data)`, or as dicts
with `to_state_dict` / `from_state_dict`):

* `ValidationClock`: the cost bound. Meta-validation is due every
  `every_n_steps` outer steps, but runs only while the time it takes stays
  within `max_time_fraction` of the wall time; a due validation that would
  break the bound is postponed (it stays due) until training has run long
  enough. `decide` is the rule, `record` books a validation's seconds.
* `BestTheta`: the argmin of the meta-validation score over the (step, kind)
  entries seen so far (kind: which theta, e.g. "latest" or "ema"). A
  non-finite score (NaN from a diverged inner run, or inf) never becomes
  best; on ties the earlier entry stays best.

Times: `train_seconds` is the training time so far, NOT counting the time
spent validating; wall time = train_seconds + validation seconds.
"""

import dataclasses
import math
from typing import Tuple

import flax

from pathology_fix_core import errors


@dataclasses.dataclass(frozen=True)
class Decision:
  """validate: run it now; due: the schedule asks for it (maybe postponed);
  fraction: validation seconds / wall seconds so far; projected: the
  fraction after one more validation as long as the last one."""
  validate: bool
  due: bool
  fraction: float
  projected: float


def _fraction(validation_seconds: float, train_seconds: float) -> float:
  wall = validation_seconds + train_seconds
  return validation_seconds / wall if wall > 0 else 0.0


def check_budget(every_n_steps: int, max_time_fraction: float,
                 prefix: str = "MetaValidation."):
  """Raises ValueError naming the bad parameter and its allowed values."""
  if not (isinstance(every_n_steps, int) and not isinstance(every_n_steps, bool)
          and every_n_steps >= 1):
    raise errors.InvalidArgument(
        f"{prefix}every_n_steps={every_n_steps!r}; allowed: an "
        "integer >= 1", f"{prefix}every_n_steps")
  if not (isinstance(max_time_fraction, (int, float)) and
          0.0 < max_time_fraction <= 1.0):
    raise errors.InvalidArgument(
        f"{prefix}max_time_fraction={max_time_fraction!r}; "
        "allowed: a float in (0, 1]", f"{prefix}max_time_fraction")


@flax.struct.dataclass
class ValidationClock:
  """Validations so far.

  last_step: outer step of the last validation (-1: none yet).
  seconds: total seconds spent validating (compilation included).
  last_seconds: the last validation's seconds without compilation: the
    estimate of the next one's cost.
  count: number of validations.
  """
  last_step: int = -1
  seconds: float = 0.0
  last_seconds: float = 0.0
  count: int = 0

  def decide(self, step: int, train_seconds: float, every_n_steps: int,
             max_time_fraction: float) -> Decision:
    """Whether to validate at outer step `step`.

    Due when there has been no validation yet or step - last_step >=
    every_n_steps. A due validation runs if it is the first (its cost is
    unknown) or if (seconds + last_seconds) / (train_seconds + seconds +
    last_seconds) <= max_time_fraction, i.e. the bound still holds after it.
    """
    check_budget(every_n_steps, max_time_fraction)
    if train_seconds < 0:
      raise ValueError(f"train_seconds={train_seconds!r}; allowed: >= 0")
    count, last_step = int(self.count), int(self.last_step)
    seconds, last = float(self.seconds), float(self.last_seconds)
    due = count == 0 or step - last_step >= every_n_steps
    projected = _fraction(seconds + last, train_seconds)
    validate = due and (count == 0 or projected <= max_time_fraction)
    return Decision(validate, due, _fraction(seconds, train_seconds),
                    projected)

  def record(self, step: int, seconds: float,
             compile_seconds: float = 0.0) -> "ValidationClock":
    """Books a validation at `step` that took `seconds` (of which
    `compile_seconds` compiling: counted, but not in the next estimate)."""
    if not (seconds >= 0 and 0 <= compile_seconds <= seconds):
      raise ValueError(f"seconds={seconds!r}, compile_seconds="
                       f"{compile_seconds!r}; allowed: 0 <= compile_seconds "
                       "<= seconds")
    return ValidationClock(
        last_step=int(step), seconds=float(self.seconds) + float(seconds),
        last_seconds=float(seconds) - float(compile_seconds),
        count=int(self.count) + 1)

  def fraction(self, train_seconds: float) -> float:
    """Validation seconds / wall seconds."""
    return _fraction(float(self.seconds), train_seconds)


@flax.struct.dataclass
class BestTheta:
  """The best (lowest) meta-validation score seen and where it came from.

  score: its meta_valid (inf while none is finite); step, kind: the outer
  step and kind of theta that scored it (-1, "" while none);
  num_entries: entries offered so far (finite or not).
  """
  score: float = math.inf
  step: int = -1
  kind: str = ""
  num_entries: int = 0

  @property
  def found(self) -> bool:
    return int(self.step) >= 0

  def update(self, step: int, kind: str,
             score: float) -> Tuple["BestTheta", bool]:
    """(tracker after the entry, whether it became the best).

    Strictly lower finite scores replace the best (ties keep the earlier).
    """
    score = float(score)
    n = int(self.num_entries) + 1
    if math.isfinite(score) and score < float(self.score):
      return BestTheta(score, int(step), str(kind), n), True
    return self.replace(num_entries=n), False

  def to_dict(self) -> dict:
    return {"score": float(self.score), "step": int(self.step),
            "kind": str(self.kind), "num_entries": int(self.num_entries)}

  @classmethod
  def from_dict(cls, d) -> "BestTheta":
    return cls(float(d["score"]), int(d["step"]), str(d["kind"]),
               int(d["num_entries"]))

