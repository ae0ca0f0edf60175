"""E7's building blocks: every estimator on one validation objective.

The task distribution is E5's (mlp2x32 on 8x8 Fashion-MNIST, the 3-class
subsets of a class pool, sample i on subset i % m), wrapped in a
`validation_task.ValidationMetaLossFamily`: each meta-loss averages
`meta_loss_evals` outer_valid batches of the sample's own subset, each clipped
at `max_loss`. Our estimators read it with meta_loss_evals=1 (the wrapper
averages), LO's with train_and_meta=True; all use the same sigma (LO's std).
"""

import itertools
import time
from typing import Any, Dict, Iterator, List, Sequence

import jax
import numpy as np

import pathology_fix  # noqa: F401  (compat layer before any LO import)
from experiments.lib import meta_training
from learned_optimization.outer_trainers import truncated_es
from learned_optimization.outer_trainers import truncated_grad
from learned_optimization.outer_trainers import truncated_pes
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks.datasets import base as datasets_base
from pathology_fix.tasks_and_data import data
from pathology_fix.meta_gradient import estimators
from pathology_fix.lo_boundary import lo_api
from pathology_fix.tasks_and_data import tasks
from pathology_fix.tasks_and_data import validation_task
from pathology_fix_core import combine
from pathology_fix.optimizers import outer_optimizer
from pathology_fix.runtime import outer_loop

OURS = {"HybridRPES": estimators.HybridRPES,
        "VariationalRP": estimators.VariationalRP,
        "VariationalES": estimators.VariationalES,
        "NoiseReuseES": estimators.NoiseReuseES}
LO_ESTIMATORS = {"TruncatedPES": truncated_pes.TruncatedPES,
                 "TruncatedES": truncated_es.TruncatedES,
                 "TruncatedGrad": truncated_grad.TruncatedGrad}
ESTIMATOR_NAMES = tuple(OURS) + tuple(LO_ESTIMATORS)


def validation_family(cfg: Dict[str, Any], seed: int = 0):
  """(wrapped family, number of subsets m) on the meta-training classes.

  Each subset's outer_valid batches are stacked before the round robin, so
  one meta-loss never mixes two subsets' label meanings.
  """
  subsets = list(itertools.combinations(tasks.CLASS_POOLS["train"],
                                        meta_training.NUM_CLASSES))
  families = [
      tasks.ClassSubsetFamily(c, architecture=meta_training.ARCH,
                              image_size=meta_training.IMAGE_SIZE,
                              batch_size=cfg["batch_size"], seed=seed + i)
      for i, c in enumerate(subsets)
  ]
  stacked = [validation_task.wrap_datasets(f.datasets, cfg["meta_loss_evals"])
             for f in families]
  datasets = datasets_base.Datasets(
      **{s: tasks.RoundRobin(d.split(s) for d in stacked)
         for s in data.SPLITS},
      extra_info=families[0].datasets.extra_info)
  family = validation_task.ValidationMetaLossFamily(
      families[0], cfg["meta_loss_evals"], cfg["max_loss"], datasets=datasets)
  return family, len(subsets)


def heldout_tasks(cfg: Dict[str, Any], seed: int = 0) -> List[Any]:
  """`cfg["eval_tasks"]` fixed tasks on 3-class subsets of classes 5-9."""
  pool = list(itertools.combinations(tasks.HELDOUT_CLASSES,
                                     meta_training.NUM_CLASSES))
  picks = np.random.default_rng(seed + 7).choice(len(pool), cfg["eval_tasks"],
                                                 replace=False)
  return [tasks.ClassSubsetFamily(
      pool[i], architecture=meta_training.ARCH,
      image_size=meta_training.IMAGE_SIZE, batch_size=cfg["batch_size"],
      seed=seed + 500 + j).task for j, i in enumerate(picks)]


def build(name: str, family, lopt, cfg: Dict[str, Any], k: int,
          staggered: bool = True, **ours):
  """Estimator `name` with truncations of k steps on `family`; `ours`:
  more arguments of our estimators (e.g. remat_memory_budget_mb)."""
  sched = truncation_schedule.ConstantTruncationSchedule(cfg["inner_steps"])
  shared = dict(num_tasks=cfg["num_tasks"], steps_per_jit=cfg["steps_per_jit"],
                random_initial_iteration_offset=(cfg["inner_steps"]
                                                 if staggered else 0))
  if name in OURS:
    return OURS[name](family, lopt, sched, unroll_length=k,
                      sigma=cfg["sigma"], meta_loss_split="outer_valid",
                      meta_loss_evals=1, max_loss=cfg["max_loss"], **shared,
                      **ours)
  kwargs = dict(trunc_sched=sched, train_and_meta=True, **shared)
  if name == "TruncatedPES":
    kwargs.update(trunc_length=k, std=cfg["sigma"])
  elif name == "TruncatedES":
    kwargs.update(unroll_length=k, std=cfg["sigma"])
  else:
    kwargs.update(unroll_length=k)
  return lo_api.build_lo_estimator(LO_ESTIMATORS[name], family, lopt, **kwargs)


def inner_steps_per_estimate(name: str, num_tasks: int, k: int) -> int:
  """Inner steps one estimate unrolls: 2 per antithetic pair, 1 for TruncatedGrad."""
  return num_tasks * k * (1 if name == "TruncatedGrad" else 2)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


def _weights(theta):
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  return gradient_learner.WorkerWeights(
      theta=theta, theta_model_state=None,
      outer_state=gradient_learner.OuterState(0))


def advance(est, theta, state, truncations: int, key):
  """The estimator's own state after `truncations` more truncations."""
  weights = _weights(theta)
  for t in range(truncations):
    out, _ = est.compute_gradient_estimate(weights, jax.random.fold_in(key, t),
                                           state)
    state = out.unroll_state
  return state


def gradient_draws(est, theta, truncations: int, num_draws: int, key):
  """`num_draws` independent estimates: (grads [R, d], seconds [R]).

  Each draw starts its own inner problems (fresh init), runs `truncations`
  truncations of the estimator itself to reach inner step p = truncations *
  k, then times one estimate. Independent runs, not one fixed state: the
  estimator's own state is part of its randomness (NoiseReuseES's eps, PES's
  accumulated perturbation), so a fixed state would understate their
  variance. A first, untimed draw compiles everything.
  """
  weights = _weights(theta)
  grads, seconds = [], []
  for r in range(num_draws + 1):
    key_r = jax.random.fold_in(key, r)
    state = est.init_worker_state(weights, jax.random.fold_in(key_r, 0))
    state = advance(est, theta, state, truncations,
                    jax.random.fold_in(key_r, 1))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    out, _ = est.compute_gradient_estimate(
        weights, jax.random.fold_in(key_r, 2), state)
    grad = jax.block_until_ready(out.grad)
    if r:
      seconds.append(time.perf_counter() - t0)
      grads.append(_flat(grad))
  return np.stack(grads), np.asarray(seconds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
  norm = np.linalg.norm(a) * np.linalg.norm(b)
  return float(a @ b / norm) if norm > 0 else 0.0


def merged_reference(es_draws: np.ndarray, rp_draws: np.ndarray):
  """One reference gradient from ES and RP draws of the same objective.

  es_draws [R_es, d], rp_draws [R_rp, d]: independent estimates of one
  gradient g. Each side's mean m and the variance of that mean v (per
  coordinate, from its draws: var / R) are merged per coordinate by inverse
  variance (`combine.merge_statistics`). Why both: ES alone is noise-bound
  at these sample counts; RP is orders less noisy where backprop behaves,
  and ES keeps the merge honest where it does not (RP draws with a
  non-finite coordinate are dropped; with fewer than 2 left, ES alone).

  Returns (mean [d], account): relative standard errors ||sqrt(v)|| / ||m||
  of the merge, ES and RP, and `consistency`: the observed cos(m_es, m_rp)
  beside the value expected if both are unbiased with independent noise,
  sqrt(1 - r_es^2) * sqrt(1 - r_rp^2) (||m||^2 ~ ||g||^2 + ||noise||^2).
  """
  def stats(draws):
    return draws.mean(axis=0), draws.var(axis=0, ddof=1) / len(draws)

  m_es, v_es = stats(es_draws)
  finite = np.isfinite(rp_draws).all(axis=1)
  if finite.sum() >= 2:
    m_rp, v_rp = stats(rp_draws[finite])
  else:
    m_rp, v_rp = np.zeros_like(m_es), np.full_like(m_es, np.inf)
  eps = 1e-30
  mean, _ = combine.merge_statistics(m_rp, v_rp + eps, m_es, v_es + eps)
  mean = np.asarray(mean, np.float64)
  var = 1.0 / (1.0 / (v_rp + eps) + 1.0 / (v_es + eps))

  def rel(m, v):
    return float(np.sqrt(v.sum()) / max(np.linalg.norm(m), 1e-30))

  def signal(r):
    return float(np.sqrt(max(0.0, 1.0 - r**2)))

  rel_es, rel_rp = rel(m_es, v_es), rel(m_rp, v_rp)
  return mean, dict(
      relative_stderr=rel(mean, var), es_relative_stderr=rel_es,
      rp_relative_stderr=rel_rp, rp_finite_draws=int(finite.sum()),
      consistency=dict(cosine_es_rp=cosine(m_es, m_rp),
                       expected_if_unbiased=signal(rel_es) * signal(rel_rp)))


def init_theta(cfg: Dict[str, Any], lopt):
  """The initial theta of the first seed's runs (as in meta_train_timed)."""
  learner = outer_loop.learner(
      lopt, outer_optimizer.paper_outer_optimizer(cfg["outer_lr"]))
  k_init = jax.random.split(jax.random.PRNGKey(cfg["seeds"][0]), 3)[1]
  return outer_loop.theta(learner, learner.init(k_init))


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def meta_train_timed(est, lopt, cfg: Dict[str, Any], seed: int,
                     checkpoint_seconds: Sequence[float]) -> Dict[str, Any]:
  """Meta-trains for cfg["train_seconds"] (`outer_loop.run`).

  Seconds are read from cfg["clock"] (`CLOCKS`): "wall" (the default) or
  "process", this process's CPU seconds, which other jobs on the machine do
  not inflate; pinned to one core (taskset) they equal wall-clock seconds
  on an idle core.

  The first cfg["untimed_steps"] outer steps (compilation; LO's
  TruncatedGrad compiles again at its second step) are run but not counted,
  nor are their inner steps (a head start every estimator gets). Checkpoints
  [(seconds, outer step, inner steps per sample, theta)] at 0 and at the
  first step past each of `checkpoint_seconds`.
  """
  learner = outer_loop.learner(
      lopt, outer_optimizer.paper_outer_optimizer(cfg["outer_lr"]))
  base_key, k_init, k_state = jax.random.split(jax.random.PRNGKey(seed), 3)
  state = learner.init(k_init)
  checkpoints = [(0.0, 0, 0, outer_loop.theta(learner, state))]
  pending = sorted(checkpoint_seconds)
  seconds, inner, losses = 0.0, 0, []
  k = cfg["train_k"]
  clock = CLOCKS[cfg.get("clock", "wall")]
  t0 = clock()
  for out in outer_loop.run(learner, [est], state, 10**9, base_key,
                            unroll_key=k_state):
    theta = jax.block_until_ready(outer_loop.theta(learner, out.learner_state))
    if out.step > cfg["untimed_steps"]:
      seconds += clock() - t0
      inner += k
    losses.append(out.mean_loss)
    while pending and seconds >= pending[0]:
      checkpoints.append((seconds, out.step, inner, theta))
      pending.pop(0)
    if seconds >= cfg["train_seconds"]:
      break
    t0 = clock()
  return dict(checkpoints=checkpoints, outer_steps=len(losses),
              inner_steps=inner, seconds=seconds, train_meta_loss=losses)


def median_final(runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, float]:
  """Per estimator, the median over seeds of its last meta-test loss."""
  return {name: float(np.nanmedian([r["meta_test"][-1] for r in seeds]))
          for name, seeds in runs.items()}


def budget_table(runs: Dict[str, List[Dict[str, Any]]],
                 budgets: Sequence[float]) -> List[Dict[str, Any]]:
  """Part 3: per wall-clock budget, estimators ranked by meta-test loss.

  runs: {estimator: [per seed: {"meta_test": [...]}]}, checkpoint j >= 1
  taken at the first outer step past budgets[j - 1] (`meta_train_timed`).
  """
  rows = []
  for j, budget in enumerate(budgets, start=1):
    scores, medians = {}, {}
    for name, seeds in runs.items():
      vals = [r["meta_test"][j] if j < len(r["meta_test"]) else np.nan
              for r in seeds]
      scores[name] = (float(np.nanmean(vals)), float(np.nanstd(vals)))
      medians[name] = float(np.nanmedian(vals))
    ranked = sorted(scores, key=lambda n: scores[n][0])
    best, second = ranked[0], ranked[min(1, len(ranked) - 1)]
    rows.append(dict(minutes=budget, best=best, best_loss=scores[best][0],
                     best_spread=scores[best][1], runner_up=second,
                     margin=scores[second][0] - scores[best][0],
                     losses={n: s[0] for n, s in scores.items()},
                     spreads={n: s[1] for n, s in scores.items()},
                     medians=medians,
                     best_by_median=min(medians, key=medians.get)))
  return rows


def progress(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
  for i in range(0, len(seq), size):
    yield seq[i:i + size]
