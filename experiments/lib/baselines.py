"""Hand-designed baselines and their learning-rate grid (E5's tuning).

E5's baselines: LO's Adam, RMSProp and SGD+momentum with LO's defaults
(optimizers/base.py), at 11 learning rates log-spaced 1e-4 .. 10, tuned per
task. The second baseline set: Adam with linear warmup and cosine decay
(`COSINE_ADAM`), tuned over the same 11 peak rates: a learned optimizer that
can learn a schedule must beat a tuned schedule, not only constant rates.
"""

from typing import Callable, Dict, Sequence

import numpy as np
import optax

from pathology_fix.runtime import evaluation

LRS = tuple(float(x) for x in np.logspace(-4, 1, 11))
BASELINES = ("Adam", "RMSProp", "SGDM")  # E5's baselines
COSINE_ADAM = "AdamCosine"  # Adam, linear warmup then cosine decay to 0
WARMUP_FRACTION = 0.05  # of the run: 50 of E5's 1,000 inner steps
ADAM_1E3 = ("Adam", 1e-3)  # the untuned reference: LO's Adam(1e-3)


def optax_transform(name: str, lr) -> optax.GradientTransformation:
  """LO's Adam / RMSProp / SGDM (optimizers/base.py defaults) as optax.

  Built from optax directly so the learning rate can be a vmapped array.
  """
  if name not in BASELINES:
    raise ValueError(f"baselines.optax_transform.name ({name!r}) must be one "
                     f"of {BASELINES}")
  return {
      "Adam": lambda: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-8),
      "RMSProp": lambda: optax.rmsprop(lr, decay=0.9, eps=1e-8),
      "SGDM": lambda: optax.sgd(lr, momentum=0.9),
  }[name]()


def warmup_steps(num_steps: int,
                 warmup_fraction: float = WARMUP_FRACTION) -> int:
  """Warmup length: round(fraction * num_steps), at least 1 and below
  num_steps (optax needs a non-empty cosine part)."""
  if num_steps < 2:
    raise ValueError(f"baselines.warmup_steps.num_steps ({num_steps}) must be "
                     ">= 2")
  return int(min(max(round(warmup_fraction * num_steps), 1), num_steps - 1))


def unit_cosine_schedule(num_steps: int,
                         warmup_fraction: float = WARMUP_FRACTION
                        ) -> Callable[[int], float]:
  """optax's warmup_cosine_decay_schedule from 0 up to 1, down to 0 at the
  end of the run: the learning-rate multiplier at update count t."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1.0,
      warmup_steps=warmup_steps(num_steps, warmup_fraction),
      decay_steps=num_steps, end_value=0.0)


def cosine_adam(lr, num_steps: int,
                warmup_fraction: float = WARMUP_FRACTION
               ) -> optax.GradientTransformation:
  """E5's Adam (LO's defaults) whose rate at update t is
  lr * unit_cosine_schedule(num_steps)(t); lr (the peak) may be a traced
  array (optax's schedule takes the peak as a Python number)."""
  unit = unit_cosine_schedule(num_steps, warmup_fraction)
  return optax.adam(lambda count: lr * unit(count), b1=0.9, b2=0.999,
                    eps=1e-8, eps_root=1e-8)


def sweeps(names: Sequence[str] = BASELINES,
           lrs: Sequence[float] = LRS,
           num_steps: int = 0) -> Dict[str, evaluation.Sweep]:
  """{name: Sweep over lrs} for `meta_test`: one compile per task and name.

  names may include COSINE_ADAM (its schedule spans num_steps, the inner
  run's length). Entries are reported as `evaluation.sweep_names(name,
  sweep)`.
  """
  out = {}
  for n in names:
    if n == COSINE_ADAM:
      out[n] = evaluation.learning_rate_sweep(
          lambda lr: cosine_adam(lr, num_steps), lrs)
    else:
      out[n] = evaluation.learning_rate_sweep(
          lambda lr, n=n: optax_transform(n, lr), lrs)
  return out


def adam_1e3_index(lrs: Sequence[float] = LRS) -> int:
  """Position of 1e-3 in the grid (Adam(1e-3) is the Adam sweep's entry)."""
  i = int(np.argmin(np.abs(np.log(np.asarray(lrs)) - np.log(ADAM_1E3[1]))))
  if not np.isclose(lrs[i], ADAM_1E3[1], rtol=1e-6):
    raise ValueError(f"the learning-rate grid {tuple(lrs)} lacks 1e-3")
  return i
