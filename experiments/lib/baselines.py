"""Hand-designed baselines and their learning-rate grid (E5's tuning).

LO's Adam, RMSProp and SGD+momentum with LO's defaults (optimizers/base.py),
at 11 learning rates log-spaced 1e-4 .. 10, tuned per task.
"""

import numpy as np
import optax

import pathology_fix  # noqa: F401  (compat layer before any LO import)
from learned_optimization.optimizers import base as opt_base

LRS = tuple(float(x) for x in np.logspace(-4, 1, 11))
BASELINES = ("Adam", "RMSProp", "SGDM")


def optax_optimizer(name: str, lr):
  """LO's Adam / RMSProp / SGDM (optimizers/base.py defaults) as optax.

  Built from optax directly so the learning rate can be a vmapped array.
  """
  tx = {
      "Adam": lambda: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-8),
      "RMSProp": lambda: optax.rmsprop(lr, decay=0.9, eps=1e-8),
      "SGDM": lambda: optax.sgd(lr, momentum=0.9),
  }[name]()

  def step(state, grad, loss):
    del loss
    params, s = state
    updates, s = tx.update(grad, s, params)
    return optax.apply_updates(params, updates), s

  return (lambda p: (p, tx.init(p))), step, (lambda state: state[0])



def lo_optimizer(name: str, lr: float) -> opt_base.Optimizer:
  """The same baseline as an LO Optimizer (e.g. a `meta_test` entry)."""
  return {"Adam": opt_base.Adam, "RMSProp": opt_base.RMSProp,
          "SGDM": opt_base.SGDM}[name](lr)


def grid(names=BASELINES, lrs=LRS):
  """{"<name> lr=<lr>": LO Optimizer} over the grid, for `meta_test`."""
  return {f"{n} lr={lr:.3g}": lo_optimizer(n, lr) for n in names for lr in lrs}
