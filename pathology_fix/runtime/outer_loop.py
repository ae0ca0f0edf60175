"""The outer-training loop: one for the CLI, experiments and benchmarks.

One outer step, as LO's single-process `outer_train.local_train` does it:

  1. every gradient estimator unrolls its inner problems from its state and
     returns a gradient estimate of the meta-loss with respect to theta
     (`gradient_learner.gradient_worker_compute` averages them);
  2. the GradientLearner applies its outer optimizer to that gradient
     (`GradientLearner.update`; one worker, so nothing to aggregate), unless
     no sample of any estimator was finite: then only the step count moves
     (theta and the optimizer's moments stay) and the step is reported as
     skipped (`SKIPPED_METRIC`, see `has_finite_sample`);
  3. an estimator is replaced by a freshly sampled one with probability
     1 / stochastic_resample_frequency (`maybe_resample_gradient_estimators`,
     which samples from the gin-configured task families; 0 turns it off).

`outer_step` is one such step; `run` iterates them from a learner state and
yields every step's `OuterStep` (metrics, theta, estimator states), so the
caller's loop body is its per-step callback: logging, checkpoints, early
stopping (`break`). Keys are derived from the outer step (`step_keys`), so a
run resumed at step s draws what the uninterrupted run drew.

`learner` builds the GradientLearner with the paper's outer optimizer
(`optimizers.outer_optimizer`) unless given another.
"""

import dataclasses
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.optimizers import base as opt_base
from learned_optimization.outer_trainers import gradient_learner
from pathology_fix.lo_boundary import lo_api
from pathology_fix.optimizers.outer_optimizer import paper_outer_optimizer

PRNGKey = jnp.ndarray

@dataclasses.dataclass(frozen=True)
class StepKeys:
  """The three keys of one outer step (estimators, learner, resampling)."""
  worker: PRNGKey
  learner: PRNGKey
  resample: PRNGKey


def step_keys(base_key: PRNGKey, step: int) -> StepKeys:
  """Keys of outer step `step`: split(fold_in(base_key, step), 3)."""
  worker, learner, resample = jax.random.split(
      jax.random.fold_in(base_key, step), 3)
  return StepKeys(worker, learner, resample)


@dataclasses.dataclass
class OuterStep:
  """What one outer step produced.

  Attributes:
    step: outer step reached (the learner's iteration after the update).
    learner_state: GradientLearnerState after the update.
    unroll_states: the estimators' states after their unrolls.
    gradient_estimators: the estimators to use next (some may be resampled).
    worker_out: LO's WorkerComputeOut (to_put.mean_loss, to_put.theta_grads).
    learner_metrics: GradientLearner.update's metrics.
    with_metrics: whether the slower metrics were asked for this step.
  """
  step: int
  learner_state: gradient_learner.GradientLearnerState
  unroll_states: List[Any]
  gradient_estimators: List[Any]
  worker_out: gradient_learner.WorkerComputeOut
  learner_metrics: Mapping[str, Any]
  with_metrics: bool = False

  @property
  def metrics(self) -> Dict[str, Any]:
    """The estimators' metrics (e.g. "mean||meta_loss") and the learner's."""
    return {**self.worker_out.metrics, **self.learner_metrics}

  @property
  def mean_loss(self) -> float:
    return float(self.worker_out.to_put.mean_loss)

  @property
  def skipped(self) -> bool:
    """Whether no sample was finite, so theta and the optimizer did not move."""
    return bool(self.learner_metrics.get(SKIPPED_METRIC, 0.0))


# 1.0 on a step whose update was skipped (see `no_finite_sample`), else 0.0.
SKIPPED_METRIC = "mean||skipped"


def has_finite_sample(estimator_out) -> bool:
  """Whether an estimate carries anything: a finite loss or gradient entry.

  With no finite sample our estimators return a NaN mean loss and an exact
  zero gradient; LO's return NaNs, which its worker then zeroes (and sets
  the mean loss to 20), so this is checked on each estimator's own output.
  """
  if bool(jnp.isfinite(estimator_out.mean_loss)):
    return True
  return any(bool(jnp.any(jnp.isfinite(g) & (g != 0)))
             for g in jax.tree_util.tree_leaves(estimator_out.grad))


class _Watched:
  """An estimator whose estimates are checked by `has_finite_sample`."""

  def __init__(self, estimator):
    self._estimator = estimator
    self.had_finite_sample = False

  def compute_gradient_estimate(self, *args, **kwargs):
    out, metrics = self._estimator.compute_gradient_estimate(*args, **kwargs)
    self.had_finite_sample |= has_finite_sample(out)
    return out, metrics

  def __getattr__(self, name):
    return getattr(self._estimator, name)


def skipped_update(before: gradient_learner.GradientLearnerState,
                   after: gradient_learner.GradientLearnerState
                   ) -> gradient_learner.GradientLearnerState:
  """`before` with only the step count of `after`: theta and momentum kept.

  Adam's moments would otherwise move theta on a zero gradient.
  """
  opt_state = _with_field(before.theta_opt_state, "iteration",
                          after.theta_opt_state.iteration)
  return _with_field(before, "theta_opt_state", opt_state)


def _with_field(state, name, value):
  """A copy of a NamedTuple or (flax) dataclass state with one field set."""
  if hasattr(state, "_replace"):
    return state._replace(**{name: value})
  if hasattr(state, "replace"):
    return state.replace(**{name: value})
  return dataclasses.replace(state, **{name: value})


def init_unroll_states(outer_learner: gradient_learner.GradientLearner,
                       learner_state: gradient_learner.GradientLearnerState,
                       gradient_estimators: Sequence[Any],
                       key: PRNGKey) -> List[Any]:
  """Every estimator's initial state; key split once per estimator."""
  weights = outer_learner.get_state_for_worker(learner_state)
  keys = jax.random.split(key, len(gradient_estimators))
  return [est.init_worker_state(weights, k)
          for est, k in zip(gradient_estimators, keys)]


def outer_step(outer_learner: gradient_learner.GradientLearner,
               gradient_estimators: Sequence[Any],
               unroll_states: Sequence[Any],
               learner_state: gradient_learner.GradientLearnerState,
               keys: StepKeys,
               with_metrics: bool = False,
               lopt: Optional[lopt_base.LearnedOptimizer] = None,
               stochastic_resample_frequency: int = 0,
               group: Optional[Sequence[int]] = None,
               sample_estimators_fn: Optional[Any] = None,
               worker_id: int = 0) -> OuterStep:
  """One outer step: estimate the meta-gradient, update theta, maybe resample.

  Args:
    outer_learner: LO GradientLearner (theta and its outer optimizer).
    gradient_estimators: LO GradientEstimators; their gradients are averaged.
    unroll_states: one state per estimator.
    learner_state: the learner's state before the step.
    keys: this step's keys (see `step_keys`).
    with_metrics: ask estimators and learner for their slower metrics.
    lopt: the learned optimizer; only needed to resample estimators.
    stochastic_resample_frequency: resample each estimator with probability
      1 / this (0: never; LO's numpy global RNG decides).

    group: indices of the estimators that run this step (LO main's
      `run_num_estimators_per_gradient`); None: all of them.
    sample_estimators_fn, worker_id: how LO main resamples estimators
      (see `lo_api.maybe_resample_gradient_estimators`).

  Returns:
    The step's `OuterStep`.
  """
  if stochastic_resample_frequency and lopt is None:
    raise ValueError("outer_step.lopt is None; resampling estimators "
                     f"(stochastic_resample_frequency="
                     f"{stochastic_resample_frequency}) needs it")
  worker_weights = outer_learner.get_state_for_worker(learner_state)
  group = range(len(gradient_estimators)) if group is None else group
  watched = [_Watched(gradient_estimators[i]) for i in group]
  worker_out = gradient_learner.gradient_worker_compute(
      worker_weights, watched, [unroll_states[i] for i in group], keys.worker,
      with_metrics)
  unroll_states = list(unroll_states)
  for i, state in zip(group, worker_out.unroll_states):
    unroll_states[i] = state
  next_state, learner_metrics = outer_learner.update(
      learner_state, [worker_out.to_put], with_metrics=with_metrics,
      key=keys.learner)
  skipped = not any(w.had_finite_sample for w in watched)
  if skipped:
    next_state = skipped_update(learner_state, next_state)
  learner_metrics = {**learner_metrics, SKIPPED_METRIC: float(skipped)}
  estimators_out, states_out = lo_api.maybe_resample_gradient_estimators(
      sample_estimators_fn, lopt, gradient_estimators, unroll_states,
      worker_weights=worker_weights, key=keys.resample,
      stochastic_resample_frequency=stochastic_resample_frequency,
      worker_id=worker_id)
  return OuterStep(
      step=int(next_state.theta_opt_state.iteration),
      learner_state=next_state, unroll_states=list(states_out),
      gradient_estimators=list(estimators_out), worker_out=worker_out,
      learner_metrics=learner_metrics, with_metrics=with_metrics)


def run(outer_learner: gradient_learner.GradientLearner,
        gradient_estimators: Sequence[Any],
        learner_state: gradient_learner.GradientLearnerState,
        num_steps: int,
        base_key: PRNGKey,
        unroll_states: Optional[Sequence[Any]] = None,
        unroll_key: Optional[PRNGKey] = None,
        summary_every_n: int = 0,
        lopt: Optional[lopt_base.LearnedOptimizer] = None,
        stochastic_resample_frequency: int = 0,
        estimator_groups: Optional[Sequence[Sequence[int]]] = None,
        sample_estimators_fn: Optional[Any] = None,
        worker_id: int = 0) -> Iterator[OuterStep]:
  """Outer steps from `learner_state` until the learner's step is num_steps.

  Yields each step's `OuterStep`; the caller's loop body is the per-step
  callback, and `break` stops training.

  Args:
    outer_learner, gradient_estimators, lopt, stochastic_resample_frequency:
      as in `outer_step`.
    learner_state: start (e.g. `outer_learner.init(key)` or a checkpoint's).
    num_steps: the outer step to stop at (counting earlier steps).
    base_key: step s uses `step_keys(base_key, s)`.
    unroll_states: the estimators' states; None initializes them with
      `unroll_key`.
    unroll_key: key for `init_unroll_states` (needed when unroll_states is None).
    summary_every_n: metrics on steps s with s % n == 0 (0: never).
    estimator_groups: step s runs the estimators in
      estimator_groups[s % len(estimator_groups)] (LO main's
      `run_num_estimators_per_gradient`); None: all of them every step.
    sample_estimators_fn, worker_id: as in `outer_step`.
  """
  if unroll_states is None:
    if unroll_key is None:
      raise ValueError("run.unroll_key is None and so is run.unroll_states; "
                       "pass one of them")
    unroll_states = init_unroll_states(outer_learner, learner_state,
                                       gradient_estimators, unroll_key)
  step = int(learner_state.theta_opt_state.iteration)
  while step < num_steps:
    out = outer_step(
        outer_learner, gradient_estimators, unroll_states, learner_state,
        step_keys(base_key, step),
        with_metrics=bool(summary_every_n) and step % summary_every_n == 0,
        lopt=lopt, stochastic_resample_frequency=stochastic_resample_frequency,
        group=(None if estimator_groups is None else
               estimator_groups[step % len(estimator_groups)]),
        sample_estimators_fn=sample_estimators_fn, worker_id=worker_id)
    yield out
    learner_state, unroll_states = out.learner_state, out.unroll_states
    gradient_estimators, step = out.gradient_estimators, out.step


def learner(lopt: lopt_base.LearnedOptimizer,
            outer_optimizer: Optional[opt_base.Optimizer] = None
            ) -> gradient_learner.GradientLearner:
  """GradientLearner training `lopt` with `outer_optimizer` (default: paper's)."""
  return gradient_learner.GradientLearner(
      lopt, outer_optimizer if outer_optimizer is not None
      else paper_outer_optimizer())


def theta(outer_learner: gradient_learner.GradientLearner,
          learner_state: gradient_learner.GradientLearnerState) -> Any:
  """The learned optimizer's parameters held by `learner_state`."""
  return lo_api.get_meta_params(outer_learner, learner_state)

