"""Meta-training on the E5 task distribution (E5, E6), on the library loop.

Task distribution: mlp2x32 on 8x8 Fashion-MNIST, every 3-class subset of a
class pool (one subset per sample, random inits). Outer training is
`pathology_fix.runtime.outer_loop.run` with the paper's outer optimizer
(`outer_optimizer.paper_outer_optimizer`) at the experiment's learning rate.
"""

import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
from tqdm import tqdm

import pathology_fix  # noqa: F401  (compat layer before any LO import)
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.outer_trainers import truncation_schedule
from pathology_fix.optimizers import outer_optimizer
from pathology_fix.runtime import outer_loop
from pathology_fix.tasks_and_data import tasks

ARCH = "mlp2x32"
IMAGE_SIZE = 8
NUM_CLASSES = 3


def meta_train_family(pool: str = "train", batch_size: int = 128,
                      image_size: int = IMAGE_SIZE, arch: str = ARCH,
                      seed: int = 0) -> Tuple[tasks.ClassSubsetFamily, int]:
  """A family whose sample i trains on the i-th 3-class subset of `pool`
  (`tasks.every_subset_family`); returns (family, number of subsets m). The
  estimator's n must be a multiple of m."""
  family = tasks.every_subset_family(pool, NUM_CLASSES, architecture=arch,
                                     image_size=image_size,
                                     batch_size=batch_size, seed=seed)
  return family, family.num_subsets


def make_lopt():
  # The paper's variant: one hidden layer of 32; summaries are no-ops anyway.
  return mlp_lopt.MLPLOpt(hidden_size=32, hidden_layers=1,
                          compute_summary=False)

# One learner per outer learning rate: its jitted update compiles once.
_LEARNERS = {}


def _learner(outer_lr: float):
  if outer_lr not in _LEARNERS:
    _LEARNERS[outer_lr] = outer_loop.learner(
        make_lopt(), outer_optimizer.paper_outer_optimizer(outer_lr))
  return _LEARNERS[outer_lr]


def meta_train(estimator_cls, family, *, num_tasks: int, inner_steps: int,
               truncation_length, outer_lr: float, meta_loss_split: str,
               meta_loss_evals: int = 1, max_outer_steps: int = 10**9,
               inner_step_budget: Optional[int] = None,
               sigma: float = 0.1, seed: int = 0,
               checkpoint_at: Sequence[int] = (),
               unroller=None,
               desc: str = "meta-train") -> Dict[str, Any]:
  """Meta-trains MLPLOpt with one of our estimators (`outer_loop.run`).

  Stops after `max_outer_steps`, or once every sample has unrolled
  `inner_step_budget` inner steps (equal-compute ablations). Outer optimizer:
  the paper's, Adam(beta1 = 0.5) on gradients clipped by value at 0.1
  (`docs/method.md` §8), at learning rate `outer_lr`.

  `unroller`: an AntitheticUnroller to reuse (same family, split, n): its
  compiled chunk functions are then shared, which saves ~30 s per run here.

  Returns dict: theta, lopt, estimator, history (per outer step: meta_loss,
  k, inner_steps (cumulative per sample), seconds (cumulative, training
  only), rp_weight), checkpoints [(inner steps done, seconds, outer step,
  theta)] taken at the first step where the inner steps done reach each value
  of `checkpoint_at` (plus the initial theta at 0).
  """
  learner = _learner(outer_lr)
  lopt = learner.learned_optimizer
  est = estimator_cls(
      family, lopt,
      truncation_schedule.ConstantTruncationSchedule(inner_steps),
      num_tasks=num_tasks, steps_per_jit=10, sigma=sigma,
      truncation_length=truncation_length, meta_loss_split=meta_loss_split,
      meta_loss_evals=meta_loss_evals, max_loss=10.0,
      # Staggered starts: the samples see all phases of an inner run.
      random_initial_iteration_offset=inner_steps)
  if unroller is not None:
    est.unroller = unroller
  base_key, k_init, k_state = jax.random.split(jax.random.PRNGKey(seed), 3)
  state = learner.init(k_init)
  theta = outer_loop.theta(learner, state)
  pending = sorted(c for c in checkpoint_at if c > 0)
  checkpoints = [(0, 0.0, 0, theta)]
  history = {k: [] for k in ("meta_loss", "k", "inner_steps", "seconds",
                             "rp_weight")}
  done, seconds, step = 0, 0.0, 0
  bar = tqdm(total=inner_step_budget or max_outer_steps, desc=desc,
             unit=" inner steps" if inner_step_budget else " outer steps",
             leave=False)
  t0 = time.perf_counter()
  for out in outer_loop.run(learner, [est], state, max_outer_steps, base_key,
                            unroll_key=k_state):
    theta = jax.block_until_ready(outer_loop.theta(learner, out.learner_state))
    seconds += time.perf_counter() - t0
    metrics = out.metrics
    k = int(metrics["mean||truncation_length"])
    done += k
    step = out.step
    history["meta_loss"].append(float(metrics["mean||meta_loss"]))
    history["k"].append(k)
    history["inner_steps"].append(done)
    history["seconds"].append(seconds)
    history["rp_weight"].append(float(metrics["mean||rp_weight_mean"]))
    while pending and done >= pending[0]:
      checkpoints.append((done, seconds, step, theta))
      pending.pop(0)
    bar.update(k if inner_step_budget else 1)
    bar.set_postfix(meta_loss=f"{history['meta_loss'][-1]:.3f}", k=k)
    if inner_step_budget is not None and done >= inner_step_budget:
      break
    t0 = time.perf_counter()
  bar.close()
  if checkpoints[-1][2] != step:
    checkpoints.append((done, seconds, step, theta))
  return dict(theta=theta, history=history, checkpoints=checkpoints,
              lopt=lopt, estimator=est)
