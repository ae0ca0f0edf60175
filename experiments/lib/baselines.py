"""Hand-designed baselines and their learning-rate grid (E5's tuning).

LO's Adam, RMSProp and SGD+momentum with LO's defaults (optimizers/base.py),
at 11 learning rates log-spaced 1e-4 .. 10, tuned per task.
"""

from typing import Dict, Sequence

import numpy as np
import optax

from pathology_fix.runtime import evaluation

LRS = tuple(float(x) for x in np.logspace(-4, 1, 11))
BASELINES = ("Adam", "RMSProp", "SGDM")


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


def sweeps(names: Sequence[str] = BASELINES,
           lrs: Sequence[float] = LRS) -> Dict[str, evaluation.Sweep]:
  """{name: Sweep over lrs} for `meta_test`: one compile per task and name.

  Entries are reported as `evaluation.sweep_names(name, sweep)`.
  """
  return {n: evaluation.learning_rate_sweep(
      lambda lr, n=n: optax_transform(n, lr), lrs) for n in names}
