"""Every learned optimizer LO ships, and ours, x our estimators: one outer step.

theta may hold namedtuples (haiku's LSTMState in NNAdam), haiku
FlatMaps (RNNMLPLOpt), frozen dicts and scalars; the gradient must come back
with exactly theta's pytree structure, or LO's learner cannot add it up.
Both lists are discovered, so a learned optimizer or an estimator added later
is covered without editing this file (our own learned optimizers are listed in
OURS).
"""

import importlib
import inspect
import pkgutil

import jax
import numpy as np
import pytest

import estimator_fixtures as fx  # noqa: F401  (compat layer first)
import learned_optimization.learned_optimizers as lo_lopts
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.optimizers import base as opt_base
from learned_optimization.outer_trainers import gradient_learner
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import quadratics
from pathology_fix.meta_gradient import estimators
from pathology_fix.optimizers import progress_lopt

# Cases whose compile takes > 15 s on 2 busy CPU cores (measured): -m slow.
# The default run keeps NNAdam with VariationalES (haiku's LSTMState in
# theta); RNNMLPLOpt (haiku FlatMap) runs with -m slow.
SLOW = {("AdafacMLPLOpt", "*"), ("RNNMLPLOpt", "*"), ("MLPLOpt", "*"),
        ("NNAdam", "HybridRPES"), ("NNAdam", "VariationalRP")}


def _shipped_learned_optimizers():
  classes = {}
  for info in pkgutil.iter_modules(lo_lopts.__path__):
    if info.name.endswith("_test") or info.name == "test_utils":
      continue
    module = importlib.import_module(f"{lo_lopts.__name__}.{info.name}")
    for name, obj in vars(module).items():
      if (inspect.isclass(obj) and issubclass(obj, lopt_base.LearnedOptimizer)
          and obj.__module__ == module.__name__
          and not inspect.isabstract(obj)):
        classes[name] = obj
  return [classes[name] for name in sorted(classes)]


def _our_estimators():
  found, todo = [], [estimators.VariationalEstimator]
  while todo:
    cls = todo.pop()
    todo.extend(cls.__subclasses__())
    if cls is not estimators.VariationalEstimator:
      found.append(cls)
  return sorted(found, key=lambda c: c.__name__)


# Ours, next to LO's (ProgressAdam reads the run length from init's num_steps).
OURS = [progress_lopt.ProgressAdam]
LOPTS = _shipped_learned_optimizers() + OURS
ESTIMATORS = _our_estimators()


def test_discovery_finds_what_lo_0_0_1_and_we_ship():
  names = {c.__name__ for c in LOPTS}
  assert {"MLPLOpt", "AdafacMLPLOpt", "LearnableAdam", "NNAdam",
          "RNNMLPLOpt"} <= names, names
  assert {"HybridRPES", "VariationalRP", "VariationalES",
          "NoiseReuseES"} <= {c.__name__ for c in ESTIMATORS}


def _cases():
  for lopt in LOPTS:
    for est in ESTIMATORS:
      slow = {(lopt.__name__, "*"), (lopt.__name__, est.__name__)} & SLOW
      marks = [pytest.mark.slow] if slow else []
      yield pytest.param(lopt, est, marks=marks,
                         id=f"{lopt.__name__}-{est.__name__}")


def _assert_finite_like(tree, reference):
  assert (jax.tree_util.tree_structure(tree) ==
          jax.tree_util.tree_structure(reference))
  for a, b in zip(jax.tree_util.tree_leaves(tree),
                  jax.tree_util.tree_leaves(reference)):
    assert np.shape(a) == np.shape(b)
    assert np.all(np.isfinite(a))


@pytest.mark.parametrize("lopt_cls, estimator_cls", list(_cases()))
def test_one_outer_step_through_lo_learner(lopt_cls, estimator_cls):
  lopt = lopt_cls()
  est = estimator_cls(
      quadratics.FixedDimQuadraticFamily(10), lopt,
      truncation_schedule.ConstantTruncationSchedule(8), num_tasks=5,
      unroll_length=4, steps_per_jit=2)
  learner = gradient_learner.SingleMachineGradientLearner(
      lopt, [est], opt_base.Adam(1e-3))
  state = learner.init(jax.random.PRNGKey(0))
  theta = learner.get_lopt_params(state)
  # SingleMachineGradientLearner.update, opened up to see the gradient.
  weights = learner.gradient_learner.get_state_for_worker(
      state.gradient_learner_state)
  out = gradient_learner.gradient_worker_compute(
      weights, [est], state.gradient_estimator_states,
      key=jax.random.PRNGKey(1), with_metrics=False)
  _assert_finite_like(out.to_put.theta_grads, theta)
  next_learner_state, _ = learner.gradient_learner.update(
      state.gradient_learner_state, [out.to_put], key=jax.random.PRNGKey(2))
  _assert_finite_like(
      learner.gradient_learner.get_lopt_params(next_learner_state), theta)
