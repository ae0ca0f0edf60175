"""Gradient estimators of the Gaussian-smoothed meta-objective (Metz et al. 2019).

  L~(theta) = E_{eps ~ N(0, sigma^2 I)} [ L(theta + eps) ]

Per outer step each of n samples draws eps_i and runs an antithetic pair of
truncated unrolls (theta + eps_i, theta - eps_i) from its inner state, on the
same data and inner randomness (`unroll.AntitheticUnroller.truncate`). From
the same two unrolls:

  RP sample  g_rp_i = grad_theta (L+_i + L-_i) / 2    (backprop through both)
  ES sample  g_es_i = (L+_i - L-_i) / 2 * eps_i / sigma^2

`HybridRPES` merges them per coordinate by inverse variance (`combine.py`);
`VariationalRP` and `VariationalES` use one of them alone (the paper's
ablations). A variant is its merge function (`merge_hybrid`,
`merge_rp_only`, `merge_es_only`) and the estimators it merges. `NoiseReuseES` (NRES, Li et al. 2023) instead keeps eps_i for a
whole inner run and lets each branch continue its own run. All four are LO
`GradientEstimator`s with the framework's constructor arguments (0.0.1's and
GitHub main's), so they drop into `build_gradient_estimators`.
"""

import functools
from typing import Any, Mapping, Optional, Tuple

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np

from learned_optimization.outer_trainers import gradient_learner
from pathology_fix_core import errors
from pathology_fix_core import combine
from pathology_fix_core import curriculum
from pathology_fix.meta_gradient import inner_problems
from pathology_fix.lo_boundary import lo_api
from pathology_fix.meta_gradient import schedules
from pathology_fix.meta_gradient import sharding
from pathology_fix.meta_gradient import unroll
from pathology_fix_core import variational

DEFAULT_UNROLL_LENGTH = 20


def max_truncation_chunks(truncation_length, steps_per_jit: int):
  """Most chunks one truncation can take under this schedule; None if unknown."""
  max_chunks = getattr(truncation_length, "max_chunks", None)
  return None if max_chunks is None else max_chunks(steps_per_jit)


def _resolve_unroll_length(name: str, unroll_length: Optional[int],
                           trunc_length: Optional[int]) -> int:
  """unroll_length (LO TruncatedGrad's name) or trunc_length (TruncatedPES's)."""
  if trunc_length is None:
    return DEFAULT_UNROLL_LENGTH if unroll_length is None else unroll_length
  if unroll_length is not None and unroll_length != trunc_length:
    raise errors.InvalidArgument(
        f"{name}.unroll_length ({unroll_length!r}) and {name}.trunc_length "
        f"({trunc_length!r}) differ: they are the same parameter (LO's "
        "TruncatedGrad and TruncatedPES spellings); give one",
        f"{name}.unroll_length", f"{name}.trunc_length")
  return trunc_length


def _rp_and_half_difference(rp_pair_grads):
  """RP samples and their antithetic half-differences from dL[s, i]/dtheta."""
  pos = jax.tree_util.tree_map(lambda g: g[0], rp_pair_grads)
  neg = jax.tree_util.tree_map(lambda g: g[1], rp_pair_grads)
  return (variational.rp_gradient_sample(pos, neg),
          variational.rp_half_difference(pos, neg))


def merge_hybrid(losses, rp_pair_grads, eps, sigma, **merge_options):
  """The paper's estimator: RP and ES samples merged by inverse variance."""
  rp, half = _rp_and_half_difference(rp_pair_grads)
  es = variational.es_gradient_sample(losses[0], losses[1], eps, sigma)
  return combine.inverse_variance_merge(rp, es, half, **merge_options)


def merge_rp_only(losses, rp_pair_grads, eps, sigma, **merge_options):
  """Reparameterization alone: the mean of the finite RP samples."""
  del losses, eps, sigma
  rp, half = _rp_and_half_difference(rp_pair_grads)
  return combine.inverse_variance_merge(rp, None, half, **merge_options)


def merge_es_only(losses, rp_pair_grads, eps, sigma, **merge_options):
  """Antithetic ES alone: the mean of the finite ES samples."""
  del rp_pair_grads
  es = variational.es_gradient_sample(losses[0], losses[1], eps, sigma)
  return combine.inverse_variance_merge(None, es, **merge_options)


# The variants by name (experiments and tests replay all three on one unroll).
MERGES = {"hybrid": merge_hybrid, "rp": merge_rp_only, "es": merge_es_only}


@functools.partial(jax.jit, static_argnames=("merge_fn", "rp_pooling",
                                             "es_pooling", "min_samples"))
def combine_samples(losses, rp_pair_grads, eps, sigma, merge_fn,
                    rp_pooling=combine.per_coordinate,
                    es_pooling=combine.per_tensor,
                    min_samples: int = combine.MIN_FINITE_SAMPLES):
  """One truncation's per-sample gradients, merged by ``merge_fn``.

  Every variant goes through `combine.inverse_variance_merge`: samples
  non-finite anywhere are dropped and coordinates that still overflow are
  zeroed, so the gradient is always finite.

  Args:
    losses: [2, n] mean meta-losses of the theta+eps (row 0) and theta-eps
      (row 1) unrolls.
    rp_pair_grads: theta-shaped leaves [2, n, ...], dL[s, i]/dtheta (None
      when the variant needs no reverse pass).
    eps: theta-shaped leaves [n, ...].
    sigma: perturbation scale.
    merge_fn: `merge_hybrid`, `merge_rp_only`, `merge_es_only` or a function
      with their signature.
    rp_pooling, es_pooling, min_samples: passed to the merge.

  Returns:
    (gradient shaped like theta, dict of scalar diagnostics; see
    `combine.inverse_variance_merge`).
  """
  return merge_fn(losses, rp_pair_grads, eps, sigma, rp_pooling=rp_pooling,
                  es_pooling=es_pooling, min_samples=min_samples)


def _combine_as_theta(theta, losses, rp_pair_grads, eps, sigma, **options):
  """`combine_samples` on theta's leaves; the gradient has theta's treedef.

  Learned optimizers keep namedtuples (haiku's LSTMState) and custom nodes
  (haiku's FlatMap) in theta; the merge sees a flat list of leaves and the
  result is rebuilt with theta's exact structure, so LO's learner can add it
  to other estimators' gradients.
  """
  treedef = jax.tree_util.tree_structure(theta)
  eps_leaves = treedef.flatten_up_to(eps)
  rp_leaves = (None if rp_pair_grads is None else
               treedef.flatten_up_to(rp_pair_grads))
  grad_leaves, diagnostics = combine_samples(losses, rp_leaves, eps_leaves,
                                             sigma, **options)
  return jax.tree_util.tree_unflatten(treedef, grad_leaves), diagnostics


@gin.configurable
class VariationalEstimator(gradient_learner.GradientEstimator):
  """Shared body of HybridRPES / VariationalRP / VariationalES.

  Gin bindings on `VariationalEstimator.<arg>` apply to all three (a binding
  on a subclass wins), so an ablation config only swaps the class.

  Constructor arguments follow LO's TruncatedGrad (task_family, learned_opt,
  trunc_sched, num_tasks, unroll_length, steps_per_jit, in this order); LO
  main's `(truncated_step, ...)` works too, taking `trunc_sched` / `num_tasks`
  from the step unless bound here. Plus:
    trunc_length: LO TruncatedPES's name for unroll_length (keyword only);
      giving both with different values is an error.
    sigma: std of the Gaussian smoothing (paper 0.1; released code 0.01).
    truncation_length: a `schedules.TruncationLength` (e.g.
      `LinearTruncationCurriculum`); None means `unroll_length` (default 20)
      every step. A schedule replaces unroll_length, which is then ignored.
    meta_loss_split: "train" or "outer_valid" (validation meta-objective).
    meta_loss_evals: batches the validation meta-loss averages per step
      (must be 1 with meta_loss_split="train": an error otherwise).
    max_loss: each step's meta-loss is clipped at this value.
    meta_loss_clip_mode: "per_batch" (default, the authors' code): each of
      the meta_loss_evals batches is clipped at max_loss, then averaged;
      "mean": their mean is clipped (a diverged batch can zero the step's
      gradient). See `objectives.batch_averaged_meta_loss`.
    rp_variance_pooling, es_variance_pooling: "coordinate" or "tensor":
      whether the merge weighs each coordinate by its own variance estimate
      or by its tensor's mean (defaults: RP per coordinate, since its
      variance spans orders of magnitude within a tensor; ES per tensor,
      since its variance is nearly uniform there and n samples estimate it
      poorly per coordinate). See `combine.py`.
    min_finite_samples: finite samples an estimator needs for weight in the
      merge (default 5, see `combine.MIN_FINITE_SAMPLES`); HybridRPES needs
      num_tasks >= it.
    rematerialize: True, False or "auto" (see `vjp_engine.ChunkedVJP`):
      recompute each chunk's forward in the backward pass, or keep residuals.
    remat_chunk_threshold: with "auto", rematerialize truncations of more
      than this many chunks of steps_per_jit steps...
    remat_memory_budget_mb: ...or whose stored residuals would exceed this
      (None: a quarter of the device memory; 4096 MiB on CPU).
    shard_samples: split the samples across local devices when several.
  """
  # The variant: how per-sample values become the gradient, and which
  # estimators it merges (a reverse pass runs only when "rp" is among them).
  merge_fn = staticmethod(merge_hybrid)
  merged = ("rp", "es")

  def __init__(self,
               task_family,
               learned_opt=None,
               trunc_sched=None,
               num_tasks: Optional[int] = None,
               unroll_length: Optional[int] = None,
               steps_per_jit: int = 10,
               sigma: float = 0.1,
               truncation_length: Optional[schedules.TruncationLength] = None,
               meta_loss_split: str = "train",
               meta_loss_evals: int = 1,
               max_loss: float = 10.0,
               meta_loss_clip_mode: str = "per_batch",
               random_initial_iteration_offset: int = 0,
               rp_variance_pooling: str = "coordinate",
               es_variance_pooling: str = "tensor",
               min_finite_samples: int = combine.MIN_FINITE_SAMPLES,
               rematerialize: Any = "auto",
               remat_chunk_threshold: int = 10,
               remat_memory_budget_mb: Optional[float] = None,
               shard_samples: bool = True,
               trunc_length: Optional[int] = None):
    name = type(self).__name__
    # LO 0.0.1 passes (task_family, learned_opt); main passes a truncated step,
    # whose trunc_sched and num_tasks apply unless bound here.
    given = lo_api.estimator_inputs(name, task_family, learned_opt)
    task_family, learned_opt = given.task_family, given.learned_opt
    trunc_sched = given.trunc_sched if trunc_sched is None else trunc_sched
    num_tasks = given.num_tasks if num_tasks is None else num_tasks
    _require_bound(name, trunc_sched=trunc_sched, num_tasks=num_tasks)
    _check_run_options(name, trunc_sched, random_initial_iteration_offset,
                       max_loss)
    self.sigma = variational.validate_sigma(sigma, name=f"{name}.sigma")
    unroll_length = _resolve_unroll_length(name, unroll_length, trunc_length)
    curriculum.check_steps_per_jit(steps_per_jit, f"{name}.steps_per_jit")
    if truncation_length is None:
      curriculum.check_unroll_length(
          unroll_length, steps_per_jit, name=f"{name}.unroll_length",
          steps_per_jit_name=f"{name}.steps_per_jit")
      truncation_length = schedules.ConstantTruncationLength(unroll_length)
    elif isinstance(truncation_length, schedules.TruncationLength):
      unroll_length = None  # the schedule replaces it
    else:
      raise errors.InvalidArgumentType(
          f"{name}.truncation_length ({truncation_length!r}) must be a "
          "schedules.TruncationLength (e.g. @LinearTruncationCurriculum()) or "
          "None for unroll_length steps every truncation",
          f"{name}.truncation_length")
    truncation_length.validate(steps_per_jit)
    if meta_loss_split == "outer_valid" and task_family.datasets is None:
      raise errors.InvalidArgument(
          f"{name}.meta_loss_split='outer_valid' needs a task family with "
          f"datasets; {task_family.name} has none (use 'train')",
          f"{name}.meta_loss_split")
    self.merge_options = dict(
        rp_pooling=combine.pooling(rp_variance_pooling,
                                   f"{name}.rp_variance_pooling"),
        es_pooling=combine.pooling(es_variance_pooling,
                                   f"{name}.es_variance_pooling"),
        min_samples=_check_min_finite_samples(name, min_finite_samples))
    # The one name and the one check of the samples per outer step (LO's
    # and gin's name for it is num_tasks); passed down from here.
    self.num_samples = _checked_num_samples(
        name, num_tasks, task_family,
        min_finite_samples if len(self.merged) == 2 else 2, shard_samples)
    # The estimator places its samples; the unroller gets the same sharding.
    self.sharding = sharding.SampleSharding(self.num_samples,
                                            enabled=shard_samples)

    self.task_family = task_family
    self.learned_opt = learned_opt
    self.trunc_sched = trunc_sched
    self.unroll_length = None if unroll_length is None else int(unroll_length)
    self.steps_per_jit = int(steps_per_jit)
    self.truncation_length = truncation_length
    self.random_initial_iteration_offset = int(random_initial_iteration_offset)
    self.unroller = unroll.AntitheticUnroller(
        task_family,
        learned_opt,
        trunc_sched,
        num_samples=self.num_samples,
        sample_sharding=self.sharding,
        steps_per_jit=steps_per_jit,
        meta_loss_split=meta_loss_split,
        meta_loss_evals=meta_loss_evals,
        max_loss=max_loss,
        meta_loss_clip_mode=meta_loss_clip_mode,
        rematerialize=rematerialize,
        remat_chunk_threshold=remat_chunk_threshold,
        remat_memory_budget_mb=remat_memory_budget_mb,
        max_num_chunks=max_truncation_chunks(truncation_length, steps_per_jit))
    self._sample_eps = jax.jit(self._sample_split_eps)
    self._finish = jax.jit(self._finish_step)

  def task_name(self):  # LO main names metrics with these
    return self.task_family.name

  def cfg_name(self):
    return self.learned_opt.name or type(self.learned_opt).__name__

  def init_worker_state(self, worker_weights, key):
    return self.unroller.init_state(worker_weights.theta,
                                    worker_weights.outer_state, key,
                                    self.random_initial_iteration_offset)

  def perturbations(self, key, theta):
    """eps [n, ...] that `compute_gradient_estimate(.., key, ..)` applies.

    A fresh draw every truncation (every call), also between truncations of
    the same inner run; `VariationalLearnedOptimizer` instead keeps one eps
    per inner run (see variational_lopt.py for the two objectives).
    """
    key_eps = jax.random.split(key, 4)[2]
    theta, key_eps = self.sharding.replicate((theta, key_eps))
    return self._sample_eps(key_eps, theta)

  def _sample_split_eps(self, key, theta):
    # Split like the samples: each device draws only its own eps_i (jax's
    # partitionable threefry gives the same values on any device count).
    eps = variational.sample_perturbations(key, theta, self.sigma,
                                           num_samples=self.num_samples)
    return self.sharding.constrain(eps, axis=0)

  def draw_truncation_length(self, key, outer_iteration: int,
                             steps_left: int) -> int:
    seed = np.asarray(jax.random.randint(key, (2,), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    return self.truncation_length.sample(rng, int(outer_iteration),
                                         self.steps_per_jit, steps_left)

  def compute_gradient_estimate(
      self,
      worker_weights,
      key,
      state,
      with_summary: Optional[bool] = False
  ) -> Tuple[gradient_learner.GradientEstimatorOut, Mapping[str, jnp.ndarray]]:
    del with_summary  # metrics are cheap and LO's in-graph summaries are off
    theta = worker_weights.theta
    outer_state = worker_weights.outer_state
    # The third key is the one `perturbations` draws eps from.
    key_reset, key_length, _, key_unroll = jax.random.split(key, 4)
    unroller = self.unroller

    state, steps_left = unroller.prepare(theta, state, outer_state, key_reset)
    k = self.draw_truncation_length(key_length, outer_state.outer_iteration,
                                    int(steps_left.max()))
    eps = self.perturbations(key, theta)
    theta = self.sharding.replicate(theta)
    losses, rp_grads, next_state = unroller.truncate(
        theta, eps, state, key_unroll, k, with_rp_grads="rp" in self.merged,
        steps_left=steps_left)
    grad, diagnostics = _combine_as_theta(theta, losses, rp_grads, eps,
                                          self.sigma, merge_fn=self.merge_fn,
                                          **self.merge_options)
    mean_loss, metrics, unroll_info = self._finish(state, next_state, losses,
                                                   diagnostics)
    metrics["mean||truncation_length"] = jnp.asarray(k, jnp.float32)
    metrics["mean||sigma"] = jnp.asarray(self.sigma, jnp.float32)
    # LO's outer loop adds gradients on one device.
    grad, mean_loss, metrics, unroll_info = self.sharding.to_default_device(
        (grad, mean_loss, metrics, unroll_info))
    return gradient_learner.GradientEstimatorOut(
        mean_loss=mean_loss,
        grad=grad,
        unroll_state=next_state,
        unroll_info=unroll_info), metrics

  def _finish_step(self, state, next_state, losses, diagnostics):
    """Mean loss, metrics and LO's UnrollInfo in one jitted call."""
    pair_mean = jnp.mean(losses, axis=0)
    finite = jnp.isfinite(pair_mean)
    # Over the finite pairs; NaN when there is none (never a silent 0).
    mean_loss = jnp.where(
        jnp.any(finite),
        jnp.sum(jnp.where(finite, pair_mean, 0)) / jnp.maximum(
            jnp.sum(finite), 1), jnp.nan)
    finished = self.unroller.finished(next_state)
    metrics = {f"mean||{name}": value for name, value in diagnostics.items()}
    metrics["mean||meta_loss"] = mean_loss
    metrics["mean||inner_runs_finished"] = jnp.mean(finished.astype(jnp.float32))
    unroll_info = gradient_learner.UnrollInfo(
        loss=losses[:1],
        iteration=next_state.inner_step[None],
        task_param=jax.tree_util.tree_map(lambda x: x[None], state.task_param),
        is_done=finished[None])
    return mean_loss, metrics, unroll_info


@gin.configurable
class HybridRPES(VariationalEstimator):
  """The paper's estimator: RP and ES merged per coordinate by inverse variance."""
  merge_fn = staticmethod(merge_hybrid)
  merged = ("rp", "es")


@gin.configurable
class VariationalRP(VariationalEstimator):
  """Reparameterization (backprop through the perturbed unrolls) only."""
  merge_fn = staticmethod(merge_rp_only)
  merged = ("rp",)


@gin.configurable
class VariationalES(VariationalEstimator):
  """Antithetic evolution strategies only; no reverse pass is run."""
  merge_fn = staticmethod(merge_es_only)
  merged = ("es",)


def _require_bound(owner: str, **values):
  for name, value in values.items():
    if value is None:
      raise errors.InvalidArgumentType(
          f"{owner}.{name} is missing: bind it in gin, e.g. "
          f"VariationalEstimator.{name} = ...", f"{owner}.{name}")


def _checked_num_samples(owner: str, num_tasks, task_family,
                         min_samples: int, shard_samples: bool) -> int:
  """num_tasks (samples per outer step), checked once for everything below."""
  if (isinstance(num_tasks, bool) or
      not isinstance(num_tasks, (int, np.integer)) or num_tasks < 2):
    raise errors.InvalidArgument(
        f"{owner}.num_tasks ({num_tasks!r}) must be an integer >= 2: the "
        "per-coordinate variance over samples divides by n - 1",
        f"{owner}.num_tasks")
  num_subsets = getattr(task_family, "num_subsets", 1)
  if num_tasks % num_subsets:
    raise errors.InvalidArgument(
        f"{owner}.num_tasks ({num_tasks}) must be a multiple of the task "
        f"family's {num_subsets} class subsets (every_subset_family): "
        f"sample i reads subset i mod {num_subsets}", f"{owner}.num_tasks")
  if num_tasks < min_samples:
    raise errors.InvalidArgument(
        f"{owner}.num_tasks ({num_tasks}) must be >= {owner}."
        f"min_finite_samples ({min_samples}): the merge weighs each "
        "estimator by a variance estimated from its finite samples",
        f"{owner}.num_tasks", f"{owner}.min_finite_samples")
  devices = jax.device_count()
  if shard_samples and jax.process_count() > 1 and num_tasks % devices:
    example = devices * max(1, num_tasks // devices)
    raise errors.InvalidArgument(
        f"{owner}.num_tasks ({num_tasks}) must be a multiple of the "
        f"{devices} devices of the {jax.process_count()} processes to split "
        f"the samples across them (e.g. {example})", f"{owner}.num_tasks")
  return int(num_tasks)


def _trunc_sched_lengths(trunc_sched):
  """(binding, length) of LO's truncation schedules' inner-run lengths."""
  for attribute in ("total_length", "min_length", "max_length"):
    value = getattr(trunc_sched, "_" + attribute, None)
    if value is not None:
      yield f"{type(trunc_sched).__name__}.{attribute}", value


def _check_run_options(name: str, trunc_sched, offset, max_loss):
  """Values that would crash an unroll or train on nothing; checked up front."""
  for binding, length in _trunc_sched_lengths(trunc_sched):
    if isinstance(length, bool) or not isinstance(
        length, (int, np.integer)) or length < 1:
      raise errors.InvalidArgument(
          f"{binding} ({length!r}) must be an integer >= 1: an inner run of "
          f"{name} needs a step", binding)
  if isinstance(offset, bool) or not isinstance(
      offset, (int, np.integer)) or offset < 0:
    raise errors.InvalidArgument(
        f"{name}.random_initial_iteration_offset ({offset!r}) must be an "
        "integer >= 0 (0: every inner run starts at step 0)",
        f"{name}.random_initial_iteration_offset")
  if (isinstance(max_loss, bool) or not isinstance(max_loss, (int, float)) or
      not max_loss > 0):  # inf: no clip
    raise errors.InvalidArgument(
        f"{name}.max_loss ({max_loss!r}) must be a number > 0 (inf: no clip)",
        f"{name}.max_loss")


def _check_min_finite_samples(name: str, value) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or
      value < 2):
    raise errors.InvalidArgument(
        f"{name}.min_finite_samples ({value!r}) must be an "
        "integer >= 2: a variance needs two samples",
        f"{name}.min_finite_samples")
  return int(value)


@jax.jit
def noise_reuse_gradient(losses, eps, sigma, weight):
  """NRES samples of one truncation (`variational.noise_reuse_es_sample`), averaged.

  The ES-alone path of `combine.inverse_variance_merge`: samples non-finite
  anywhere are dropped and coordinates whose mean still overflows are zeroed.

  Args:
    losses: [2, n] mean losses of the theta + eps (row 0) and theta - eps
      branches over this truncation.
    eps: leaves [n, ...], each run's kept perturbation.
    sigma: perturbation scale.
    weight: [n], this truncation's steps over the nominal length.

  Returns:
    (gradient shaped like one eps row, the merge's diagnostics).
  """
  samples = variational.noise_reuse_es_sample(losses[0], losses[1], eps,
                                              sigma, weight)
  return combine.inverse_variance_merge(None, samples)


@flax.struct.dataclass
class NoiseReuseState(gradient_learner.GradientEstimatorState):
  """NoiseReuseES's inner runs: the theta + eps branch, the other, and eps.

  problems: the theta + eps branch with the runs' steps, tasks and schedule
    state (what the other estimators carry); leaves [n, ...].
  neg_inner_opt_state: the theta - eps branch's inner optimizer states.
  eps: each run's perturbation, leaves [n, ...] shaped like theta.
  """
  problems: unroll.VariationalUnrollState
  neg_inner_opt_state: Any
  eps: Any


@gin.configurable
class NoiseReuseES(VariationalEstimator):
  """Noise-reuse ES (Li et al. 2023) on the shared antithetic unroll.

  Sample i draws eps_i ~ N(0, sigma^2 I) when its inner run starts and keeps
  it for every truncation of that run; the theta + eps_i and theta - eps_i
  unrolls each continue their own inner run (same task, data and inner keys),
  and truncation t gives the sample
  `variational.noise_reuse_es_sample`: (k_t / k)(L+_t - L-_t)/2 eps_i/sigma^2.

  Unbiased for: the gradient of the full-horizon smoothed objective
  E_eps[L_T(theta + eps)] (L_T the mean per-step meta-loss of a whole T-step
  inner run) -- the samples of one inner run, summed and scaled by k / T,
  when theta and the truncation length k stay fixed during the run and the
  run starts at step 0 (random_initial_iteration_offset=0; a staggered first
  run covers only its last steps). One truncation's sample alone is not, and
  online training (theta changes every truncation) carries PES-like
  staleness. The same constructor arguments as the other estimators; no
  reverse pass is run.
  """
  merge_fn = staticmethod(merge_es_only)
  merged = ("es",)

  def init_worker_state(self, worker_weights, key):
    key_problems, key_eps = jax.random.split(key)
    problems = super().init_worker_state(worker_weights, key_problems)
    return NoiseReuseState(
        problems=problems,
        neg_inner_opt_state=problems.inner_opt_state,
        eps=self.perturbations(key_eps, worker_weights.theta))

  @functools.partial(jax.jit, static_argnums=0)
  def _restart_finished(self, restarted, fresh_eps, eps, pos_opt, neg_opt):
    """Fresh eps, and both branches at the new start, where a run restarted."""
    eps = inner_problems.tree_where(restarted, fresh_eps, eps)
    neg_opt = inner_problems.tree_where(restarted, pos_opt, neg_opt)
    return eps, neg_opt

  def _nres_gradient(self, theta, losses, eps, weight):
    treedef = jax.tree_util.tree_structure(theta)
    grad, diagnostics = noise_reuse_gradient(
        losses, treedef.flatten_up_to(eps), self.sigma, weight)
    return jax.tree_util.tree_unflatten(treedef, grad), diagnostics

  def compute_gradient_estimate(self, worker_weights, key, state,
                                with_summary: Optional[bool] = False):
    del with_summary
    theta = worker_weights.theta
    outer_state = worker_weights.outer_state
    key_reset, key_length, _, key_unroll = jax.random.split(key, 4)
    unroller = self.unroller

    restarted = unroller.finished(state.problems)
    problems, steps_left = unroller.prepare(theta, state.problems, outer_state,
                                            key_reset)
    eps, neg_opt = self._restart_finished(
        restarted, self.perturbations(key, theta), state.eps,
        problems.inner_opt_state, state.neg_inner_opt_state)
    k = self.draw_truncation_length(key_length, outer_state.outer_iteration,
                                    int(steps_left.max()))
    branches = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                      problems.inner_opt_state, neg_opt)
    theta = self.sharding.replicate(theta)
    out = unroller.unroll(theta, eps, problems, key_unroll, k,
                          with_rp_grads=False, steps_left=steps_left,
                          branch_opt_states=branches)
    next_problems = unroller.next_state(problems, out)
    weight = jnp.asarray(out.num_steps / k, jnp.float32)
    grad, diagnostics = self._nres_gradient(theta, out.losses, eps, weight)
    mean_loss, metrics, unroll_info = self._finish(problems, next_problems,
                                                   out.losses, diagnostics)
    metrics["mean||truncation_length"] = jnp.asarray(k, jnp.float32)
    metrics["mean||sigma"] = jnp.asarray(self.sigma, jnp.float32)
    metrics["mean||runs_restarted"] = jnp.mean(restarted.astype(jnp.float32))
    next_state = NoiseReuseState(
        problems=next_problems,
        neg_inner_opt_state=jax.tree_util.tree_map(lambda x: x[1],
                                                   out.final_opt_states),
        eps=eps)
    grad, mean_loss, metrics, unroll_info = self.sharding.to_default_device(
        (grad, mean_loss, metrics, unroll_info))
    return gradient_learner.GradientEstimatorOut(
        mean_loss=mean_loss, grad=grad, unroll_state=next_state,
        unroll_info=unroll_info), metrics
