r"""E5: the paper's Fig. 1 (headline result) at a CPU budget.

  python -m experiments.e5_headline [--quick] [--out DIR] [--seed S]

1. Meta-trains LO's MLPLOpt (1 hidden layer of 32, as in the paper) with
   HybridRPES and a linear truncation curriculum, twice: against the inner
   VALIDATION loss (outer_valid split) and against the inner TRAINING loss.
   Task distribution: mlp2x32 on 8x8 Fashion-MNIST, every 3-class subset of
   the meta-training classes 0-4 (one subset per sample, random inits).
   Why mlp2x32 / 8x8 and not the paper's conv3 / 32x32: one outer step of
   n = 10 antithetic pairs already costs ~1-3 s here at k = 10-50 (2 shared
   cores), so ~100 outer steps fit in 5 minutes; a conv3 step at 28x28 costs
   ~16 ms (tasks.py) against ~0.5 ms for mlp2x32 at 8x8.
2. Evaluates both learned optimizers and Adam, RMSProp, SGD+momentum (LO's
   defaults; learning rate over 11 values log-spaced 1e-4 .. 10) on held-out
   tasks: every 3-class subset of the held-out classes 5-9 (Fashion-MNIST) plus
   3-class subsets of scikit-learn's digits, each with its own random init.
   Every optimizer sees the same init and the same batch sequence per task.
   Baseline learning rates are tuned per task and optimizer: for training
   loss by the lowest training loss reached; for test loss by the lowest
   inner_valid loss reached (its test curve is reported).
3. Measures inner steps per second (jitted single steps, interleaved repeats)
   of each optimizer; the wall-clock axis is inner step / that rate, so
   evaluation passes are not counted and the comparison is not disturbed by
   other jobs sharing the CPU at different moments.

Writes results.json, summary.md and three plots to experiments/results/
e5_headline/ (or --out). Other experiments (e6) reuse `meta_train`,
`TaskBundle` and `train_curves` from here.
"""

import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments import common
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.optimizers import base as opt_base
from learned_optimization.outer_trainers import gradient_learner
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks.datasets import base as datasets_base
from pathology_fix import data
from pathology_fix import estimators
from pathology_fix import schedules
from pathology_fix import tasks

NAME = "e5_headline"
LRS = tuple(float(x) for x in np.logspace(-4, 1, 11))
BASELINES = ("Adam", "RMSProp", "SGDM")
SPLITS = ("train", "inner_valid", "test")  # evaluation splits, in this order
ARCH = "mlp2x32"
IMAGE_SIZE = 8
NUM_CLASSES = 3

FULL = dict(
    batch_size=128,
    inner_steps=1000,  # length of every inner run, meta-training and eval
    num_tasks=10,  # antithetic pairs per outer step (one per class subset)
    outer_steps=120,
    k_min=10, k_max=50,  # curriculum over the outer steps
    # Paper: 3e-4 (valid) / 3e-3 (train) over 5k outer steps. With ~150 steps
    # 1e-2 is needed to move MLPLOpt off its init (probe: 3e-3 lagged).
    outer_lr=1e-2,
    meta_loss_evals=1,
    num_fmnist_tasks=10,  # all C(5, 3) held-out subsets
    num_digits_tasks=6,
    eval_every=50,
    train_eval_examples=3000,
    timing_steps=300, timing_repeats=5,
)
QUICK = dict(FULL,
             inner_steps=200, outer_steps=15, k_min=10, k_max=20,
             num_fmnist_tasks=3, num_digits_tasks=1,
             eval_every=20, train_eval_examples=1000,
             timing_steps=100, timing_repeats=2)


# ---------------------------------------------------------------------------
# Meta-training task distribution: one class subset per sample.


class _RoundRobin:
  """Iterator cycling over several iterators, one `next` each.

  LO's `vec_get_batch` calls `next` once per sample in sample order, so with
  n a multiple of the number of subsets, sample i always reads subset
  i % m: every inner run keeps one label meaning.
  """

  def __init__(self, iterators):
    self._its = list(iterators)
    self._i = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._its[self._i])
    self._i = (self._i + 1) % len(self._its)
    return batch


def meta_train_family(pool: str = "train", batch_size: int = 128,
                      image_size: int = IMAGE_SIZE, arch: str = ARCH,
                      seed: int = 0) -> Tuple[tasks.ClassSubsetFamily, int]:
  """A family whose sample i trains on the i-th 3-class subset of `pool`.

  Returns (family, number of subsets m); the estimator's n must be a
  multiple of m. All subsets share the architecture and batch shapes, so one
  family object (one compiled unroll) serves them all.
  """
  subsets = list(itertools.combinations(tasks.CLASS_POOLS[pool], NUM_CLASSES))
  families = [
      tasks.ClassSubsetFamily(c, architecture=arch, image_size=image_size,
                              batch_size=batch_size, seed=seed + i)
      for i, c in enumerate(subsets)
  ]
  first = families[0]
  first.datasets = datasets_base.Datasets(
      **{s: _RoundRobin(f.datasets.split(s) for f in families)
         for s in data.SPLITS},
      extra_info=first.datasets.extra_info,
      abstract_batch=first.datasets.abstract_batch)
  return first, len(subsets)


def make_lopt():
  # The paper's variant: one hidden layer of 32; summaries are no-ops anyway.
  return mlp_lopt.MLPLOpt(hidden_size=32, hidden_layers=1,
                          compute_summary=False)


# ---------------------------------------------------------------------------
# In-process meta-training (LO's GradientLearner loop, minus the threads).


def meta_train(estimator_cls, family, *, num_tasks: int, inner_steps: int,
               truncation_length, outer_lr: float, meta_loss_split: str,
               meta_loss_evals: int = 1, max_outer_steps: int = 10**9,
               inner_step_budget: Optional[int] = None,
               sigma: float = 0.1, seed: int = 0,
               checkpoint_at: Sequence[int] = (),
               unroller=None,
               desc: str = "meta-train") -> Dict[str, Any]:
  """Meta-trains MLPLOpt with one of our estimators.

  Stops after `max_outer_steps`, or once every sample has unrolled
  `inner_step_budget` inner steps (equal-compute ablations). Outer optimizer:
  Adam(beta1 = 0.5) on gradients clipped by value at 0.1 (METHOD.md sec. 5).

  `unroller`: an AntitheticUnroller to reuse (same family, split, n): its
  compiled chunk functions are then shared, which saves ~30 s per run here.

  Returns dict: theta, estimator, history (per outer step: meta_loss, k, inner_steps
  (cumulative per sample), seconds (cumulative, training only), rp_weight),
  checkpoints [(inner steps done, seconds, outer step, theta)] taken at the
  first step where the inner steps done reach each value of `checkpoint_at`
  (plus the initial theta at 0).
  """
  lopt = make_lopt()
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
  key = jax.random.PRNGKey(seed)
  key, k_init, k_state = jax.random.split(key, 3)
  theta = lopt.init(k_init)
  outer_opt, apply = _outer_optimizer(outer_lr)
  opt_state = outer_opt.init(theta)

  def weights(i):
    return gradient_learner.WorkerWeights(
        theta, None, gradient_learner.OuterState(jnp.asarray(i)))

  state = est.init_worker_state(weights(0), k_state)
  pending = sorted(c for c in checkpoint_at if c > 0)
  checkpoints = [(0, 0.0, 0, theta)]
  history = {k: [] for k in ("meta_loss", "k", "inner_steps", "seconds",
                             "rp_weight")}
  done, seconds = 0, 0.0
  total = inner_step_budget or max_outer_steps
  bar = tqdm(total=total, desc=desc, unit=" inner steps" if inner_step_budget
             else " outer steps", leave=False)
  step = 0
  while step < max_outer_steps and (inner_step_budget is None or
                                    done < inner_step_budget):
    t0 = time.perf_counter()
    key, k_step = jax.random.split(key)
    out, metrics = est.compute_gradient_estimate(weights(step), k_step, state)
    state = out.unroll_state
    theta, opt_state = apply(out.grad, opt_state, theta)
    jax.block_until_ready(theta)
    seconds += time.perf_counter() - t0
    k = int(metrics["mean||truncation_length"])
    done += k
    step += 1
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
  bar.close()
  if checkpoints[-1][2] != step:
    checkpoints.append((done, seconds, step, theta))
  return dict(theta=theta, history=history, checkpoints=checkpoints,
              lopt=lopt, estimator=est)


_OUTER_OPTIMIZERS = {}


def _outer_optimizer(lr: float):
  """(optax optimizer, jitted update), cached so reruns skip compiling."""
  if lr not in _OUTER_OPTIMIZERS:
    outer_opt = optax.chain(optax.clip(0.1), optax.adam(lr, b1=0.5))
    _OUTER_OPTIMIZERS[lr] = (outer_opt, jax.jit(
        lambda g, s, p: _outer_update(outer_opt, g, s, p)))
  return _OUTER_OPTIMIZERS[lr]


def _outer_update(outer_opt, grad, opt_state, theta):
  grad = jax.tree_util.tree_map(lambda g: jnp.nan_to_num(g), grad)
  updates, opt_state = outer_opt.update(grad, opt_state, theta)
  return optax.apply_updates(theta, updates), opt_state


# ---------------------------------------------------------------------------
# Evaluation tasks: fixed inits, fixed batch sequences, exact split losses.


@dataclasses.dataclass
class TaskBundle:
  """Several same-architecture tasks stacked on a leading [tasks] axis.

  Splits of different sizes are zero-padded; `eval_w` weights each example
  1 / (real size) so the weighted sum is the exact mean over the split.
  """
  names: List[str]
  task: Any  # the LO Task (architecture) shared by all
  init: Any  # params, leaves [T, ...]
  train_x: np.ndarray  # [T, N, S, S, 1]
  train_y: np.ndarray  # [T, N]
  batch_idx: np.ndarray  # int32 [T, steps, B] rows of train_x per step
  eval_x: Tuple[np.ndarray, ...]  # per split in `eval_splits`: [T, M, ...]
  eval_y: Tuple[np.ndarray, ...]
  eval_w: Tuple[np.ndarray, ...]
  eval_splits: Tuple[str, ...]


def _pad(arrays: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
  n = max(a.shape[0] for a in arrays)
  out = np.zeros((len(arrays), n) + arrays[0].shape[1:], arrays[0].dtype)
  mask = np.zeros((len(arrays), n), np.float32)
  for i, a in enumerate(arrays):
    out[i, :a.shape[0]] = a
    mask[i, :a.shape[0]] = 1.0 / a.shape[0]
  return out, mask


def _batch_indices(n: int, steps: int, batch: int, rng) -> np.ndarray:
  # Epoch-wise permutations, as the datasets' own iterators draw them.
  epochs = -(-steps * batch // n) + 1
  order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
  return order[:steps * batch].reshape(steps, batch).astype(np.int32)


def build_bundle(specs: Sequence[Tuple[str, Sequence[int], int]], *,
                 steps: int, batch_size: int,
                 eval_splits: Sequence[str] = SPLITS,
                 train_eval_examples: Optional[int] = None,
                 image_size: int = IMAGE_SIZE, arch: str = ARCH
                 ) -> TaskBundle:
  """specs: (dataset "fashion_mnist" | "digits", classes, seed) per task.

  The "train" evaluation split is a fixed random subset of at most
  `train_eval_examples` training examples (cost); the others are whole.
  """
  names, inits, tx, ty, idx = [], [], [], [], []
  ev = {s: ([], []) for s in eval_splits}
  task = None
  for dataset, classes, seed in specs:
    ds = data.DATASET_FNS[dataset](batch_size=batch_size,
                                   image_size=image_size, classes=classes,
                                   seed=seed)
    task = task or tasks.make_task(arch, ds)
    names.append(f"{'FMNIST' if dataset == 'fashion_mnist' else 'digits'}"
                 f"{''.join(map(str, classes))}")
    rng = np.random.default_rng(seed)
    inits.append(task.init(jax.random.PRNGKey(seed)))
    train = ds.split_arrays("train")
    tx.append(train["image"])
    ty.append(train["label"])
    idx.append(_batch_indices(train["label"].shape[0], steps, batch_size, rng))
    for s in eval_splits:
      arr = ds.split_arrays(s)
      x, y = arr["image"], arr["label"]
      if s == "train" and train_eval_examples and x.shape[0] > train_eval_examples:
        keep = np.sort(rng.choice(x.shape[0], train_eval_examples, False))
        x, y = x[keep], y[keep]
      ev[s][0].append(x)
      ev[s][1].append(y)
  train_x, _ = _pad(tx)
  train_y, _ = _pad(ty)
  eval_x, eval_y, eval_w = [], [], []
  for s in eval_splits:
    x, w = _pad(ev[s][0])
    y, _ = _pad(ev[s][1])
    eval_x.append(x)
    eval_y.append(y)
    eval_w.append(w)
  init = jax.tree_util.tree_map(lambda *a: np.stack(a), *inits)
  return TaskBundle(names, task, init, train_x, train_y, np.stack(idx),
                    tuple(eval_x), tuple(eval_y), tuple(eval_w),
                    tuple(eval_splits))


def _per_example_ce(task, params, x, y):
  # No dropout in these MLPs, but haiku asks for a key all the same.
  logits = task._mod.apply(params, jax.random.PRNGKey(0), x)  # pylint: disable=protected-access
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


# Optimizers as (init(params), step(state, grad, loss), params(state)).


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


def learned_optimizer(lopt, theta, num_steps: int):
  opt = lopt.opt_fn(theta)
  return ((lambda p: opt.init(p, num_steps=num_steps)),
          (lambda s, g, l: opt.update(s, g, loss=l)), opt.get_params)


def train_curves(bundle: TaskBundle, make_opt: Callable[[Any], Tuple],
                 hypers, steps: int, eval_every: int) -> np.ndarray:
  """Trains every task with every hyper-parameter; exact split losses.

  make_opt(hyper) -> (init, step, params). hypers: pytree with a leading
  [H] axis (learning rates, or stacked thetas).

  Returns:
    float [tasks, H, steps // eval_every + 1, len(eval_splits)]: loss on each
    evaluation split at steps 0, eval_every, 2 eval_every, ... (NaN if the run
    diverged).
  """
  task = bundle.task
  key = jax.random.PRNGKey(0)  # the MLPs here have no randomness (no dropout)
  num_evals = steps // eval_every

  def evaluate(params, ex, ey, ew):
    return jnp.stack([jnp.sum(_per_example_ce(task, params, x, y) * w)
                      for x, y, w in zip(ex, ey, ew)])

  def run(hyper, params0, tx, ty, idx, ex, ey, ew):
    init, step, get = make_opt(hyper)

    def inner(state, rows):
      loss, grad = jax.value_and_grad(task.loss)(
          get(state), key, {"image": tx[rows], "label": ty[rows]})
      return step(state, grad, loss), None

    def segment(state, rows):
      state, _ = jax.lax.scan(inner, state, rows)
      return state, evaluate(get(state), ex, ey, ew)

    rows = idx[:num_evals * eval_every].reshape(num_evals, eval_every, -1)
    _, losses = jax.lax.scan(segment, init(params0), rows)
    return jnp.concatenate([evaluate(params0, ex, ey, ew)[None], losses])

  per_hyper = jax.vmap(run, in_axes=(0,) + (None,) * 7)
  fn = jax.jit(per_hyper)
  out = []
  for t in range(len(bundle.names)):  # one task at a time bounds memory
    pick = lambda a: a[t]  # pylint: disable=cell-var-from-loop
    out.append(np.asarray(fn(
        hypers, jax.tree_util.tree_map(pick, bundle.init), bundle.train_x[t],
        bundle.train_y[t], bundle.batch_idx[t],
        tuple(map(pick, bundle.eval_x)), tuple(map(pick, bundle.eval_y)),
        tuple(map(pick, bundle.eval_w)))))
  return np.stack(out)


# ---------------------------------------------------------------------------
# Per-step speed: jitted single steps, the way a training loop runs.


def measure_steps_per_second(bundle: TaskBundle, optimizers: Dict[str, Any],
                             steps: int, repeats: int) -> Dict[str, float]:
  """Median inner steps/s per optimizer; repeats interleave the optimizers.

  optimizers: name -> LO Optimizer instance. One Python-level call of a
  jitted (batch gather + gradient + update) function per step.
  """
  task = bundle.task
  key = jax.random.PRNGKey(0)
  params0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), bundle.init)
  tx, ty = jnp.asarray(bundle.train_x[0]), jnp.asarray(bundle.train_y[0])
  idx = jnp.asarray(bundle.batch_idx[0])
  fns, states = {}, {}
  for name, opt in optimizers.items():

    def one(state, rows, opt=opt):
      params = opt.get_params(state)
      loss, grad = jax.value_and_grad(task.loss)(
          params, key, {"image": tx[rows], "label": ty[rows]})
      return opt.update(state, grad, loss=loss)

    fns[name] = jax.jit(one)
    states[name] = opt.init(params0, num_steps=steps)
    jax.block_until_ready(fns[name](states[name], idx[0]))  # compile
  rates = {name: [] for name in optimizers}
  for _ in tqdm(range(repeats), desc="timing", leave=False):
    for name, fn in fns.items():
      state = states[name]
      t0 = time.perf_counter()
      for i in range(steps):
        state = fn(state, idx[i % idx.shape[0]])
      jax.block_until_ready(state)
      rates[name].append(steps / (time.perf_counter() - t0))
  return {name: float(np.median(r)) for name, r in rates.items()}


# ---------------------------------------------------------------------------
# Analysis.


def _nan_to_inf(a):
  return np.where(np.isfinite(a), a, np.inf)


def tune(curves: np.ndarray, select_split: int) -> np.ndarray:
  """Index of the best hyper per task: lowest loss reached on a split.

  curves: [tasks, H, evals, splits] -> int [tasks].
  """
  return np.argmin(_nan_to_inf(curves[..., select_split]).min(axis=2), axis=1)


def time_to_reach(curve: np.ndarray, times: np.ndarray,
                  target: float) -> Optional[float]:
  """First time at which `curve` <= target (None if never)."""
  hit = np.nonzero(_nan_to_inf(curve) <= target)[0]
  return float(times[hit[0]]) if hit.size else None


def wallclock_ratio(lopt_curve, lopt_times, base_curve, base_times):
  """(learned time to reach the baseline's best loss) / (baseline's time)."""
  base = _nan_to_inf(base_curve)
  best = float(base.min())
  t_base = float(base_times[int(np.argmin(base))])
  t_lopt = time_to_reach(lopt_curve, lopt_times, best)
  if t_lopt is None or t_base <= 0:
    return None, best, t_base, t_lopt
  return t_lopt / t_base, best, t_base, t_lopt


def _cap(a, cap):
  return np.where(np.isfinite(a), np.minimum(a, cap), cap)


def analyse(curves: Dict[str, np.ndarray], lopt_names: Sequence[str],
            steps_axis: np.ndarray, rates: Dict[str, float],
            task_names: Sequence[str]) -> Dict[str, Any]:
  """Tuned baselines, wall-clock ratios, final losses and win rates.

  curves: optimizer -> [tasks, H, evals, splits] (H = 11 learning rates for
  baselines, 1 for a learned optimizer).
  """
  i_train, i_valid, i_test = (SPLITS.index(s) for s in SPLITS)
  cap = 2.0 * math.log(NUM_CLASSES)  # for plots/means: diverged runs
  tuned = {}  # (objective, optimizer) -> [tasks, evals] curve
  chosen_lr = {}
  for name in BASELINES:
    c = curves[name]
    for objective, select, report in (("train", i_train, i_train),
                                      ("test", i_valid, i_test)):
      best = tune(c, select)
      chosen_lr[f"{name}/{objective}"] = [LRS[b] for b in best]
      tuned[(objective, name)] = np.stack(
          [c[t, best[t], :, report] for t in range(c.shape[0])])
  for name in lopt_names:
    for objective, report in (("train", i_train), ("test", i_test)):
      tuned[(objective, name)] = curves[name][:, 0, :, report]

  times = {name: steps_axis / rates[name if name in BASELINES else "learned"]
           for name in list(BASELINES) + list(lopt_names)}
  out = {"chosen_lr": chosen_lr, "per_task": {}, "mean_curves": {},
         "ratio": {}, "final": {}, "best": {}, "win_rate": {}}
  num_tasks = len(task_names)
  for objective in ("train", "test"):
    # Best baseline per task: lowest loss reached by its tuned curve.
    best_base = []
    for t in range(num_tasks):
      mins = [_nan_to_inf(tuned[(objective, b)][t]).min() for b in BASELINES]
      best_base.append(BASELINES[int(np.argmin(mins))])
    mean_curves = {name: _cap(tuned[(objective, name)], cap).mean(0)
                   for name in list(BASELINES) + list(lopt_names)}
    out["mean_curves"][objective] = mean_curves
    mean_best = BASELINES[int(np.argmin([mean_curves[b].min()
                                         for b in BASELINES]))]
    for name in lopt_names:
      lc = tuned[(objective, name)]
      ratios, reached, wins_final, wins_best, rows = [], 0, 0, 0, []
      for t in range(num_tasks):
        b = best_base[t]
        bc = tuned[(objective, b)][t]
        r, target, t_base, t_lopt = wallclock_ratio(lc[t], times[name], bc,
                                                    times[b])
        final_l, final_b = float(_cap(lc[t, -1], cap)), float(_cap(bc[-1], cap))
        best_l = float(_nan_to_inf(lc[t]).min())
        best_b = float(_nan_to_inf(bc).min())
        wins_final += final_l < final_b
        wins_best += best_l < best_b
        if r is not None:
          ratios.append(r)
          reached += 1
        rows.append(dict(task=task_names[t], best_baseline=b,
                         lopt_final=final_l, baseline_final=final_b,
                         lopt_best=best_l, baseline_best=best_b,
                         baseline_best_seconds=t_base,
                         lopt_seconds_to_baseline_best=t_lopt,
                         wallclock_ratio=r))
      r_mean, target, t_base, t_lopt = wallclock_ratio(
          mean_curves[name], times[name], mean_curves[mean_best],
          times[mean_best])
      # The same in inner steps: what the ratio would be at equal step cost.
      s_mean = wallclock_ratio(mean_curves[name], steps_axis,
                               mean_curves[mean_best], steps_axis)[0]
      s_task = [wallclock_ratio(lc[t], steps_axis,
                                tuned[(objective, best_base[t])][t],
                                steps_axis)[0] for t in range(num_tasks)]
      s_task = [x for x in s_task if x is not None]
      key = f"{objective}/{name}"
      out["per_task"][key] = rows
      out["ratio"][key] = dict(
          mean_curve_ratio=r_mean, mean_curve_reached=r_mean is not None,
          mean_curve_best_baseline=mean_best, mean_curve_target=target,
          mean_curve_baseline_seconds=t_base,
          mean_curve_lopt_seconds=t_lopt,
          per_task_reached_fraction=reached / num_tasks,
          per_task_median_ratio=(float(np.median(ratios)) if ratios else None),
          mean_curve_step_ratio=s_mean,
          per_task_median_step_ratio=(float(np.median(s_task)) if s_task
                                      else None))
      out["final"][key] = dict(
          lopt=float(mean_curves[name][-1]),
          best_baseline_per_task=float(np.mean([r["baseline_final"]
                                                for r in rows])),
          **{b: float(mean_curves[b][-1]) for b in BASELINES})
      out["best"][key] = dict(
          lopt=float(np.mean([r["lopt_best"] for r in rows])),
          best_baseline_per_task=float(np.mean([r["baseline_best"]
                                                for r in rows])))
      out["win_rate"][key] = dict(final=wins_final / num_tasks,
                                  best=wins_best / num_tasks)
  out["times"] = times
  return out


# ---------------------------------------------------------------------------
# Plots.

COLORS = {"Adam": "tab:blue", "RMSProp": "tab:orange", "SGDM": "tab:green",
          "learned (valid obj.)": "tab:red",
          "learned (train obj.)": "tab:purple"}


def plot_curves(out_dir, analysis, steps_axis, lopt_names, x_kind):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, objective in zip(axes, ("train", "test")):
    for name in list(BASELINES) + list(lopt_names):
      x = (steps_axis if x_kind == "steps" else analysis["times"][name])
      # Log time axis: leave out t = 0 (the shared initial loss).
      ax.plot(x[1:], analysis["mean_curves"][objective][name][1:],
              color=COLORS.get(name), label=name,
              lw=2 if name in lopt_names else 1.2,
              ls="-" if name in lopt_names else "--")
    ax.set_xlabel("inner steps (log)" if x_kind == "steps"
                  else "wall-clock seconds (steps / measured steps per s)")
    ax.set_ylabel(f"{objective} loss (mean over held-out tasks)")
    ax.set_title(f"{objective} loss; baselines tuned for "
                 f"{'train' if objective == 'train' else 'inner_valid'} loss",
                 fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=8)
  return common.save_figure(fig, out_dir, f"loss_vs_{x_kind}.png")


def plot_wins(out_dir, analysis, task_names, lopt_name):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, objective in zip(axes, ("train", "test")):
    rows = analysis["per_task"][f"{objective}/{lopt_name}"]
    diff = np.array([r["lopt_final"] - r["baseline_final"] for r in rows])
    ax.bar(range(len(rows)), diff,
           color=["tab:green" if d < 0 else "tab:red" for d in diff])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(task_names, rotation=70, fontsize=7)
    wr = analysis["win_rate"][f"{objective}/{lopt_name}"]["final"]
    ax.set_title(f"final {objective} loss: learned - best tuned baseline\n"
                 f"(< 0 = learned wins; win rate {wr:.0%})", fontsize=9)
  return common.save_figure(fig, out_dir, "win_bars.png")


# ---------------------------------------------------------------------------


def heldout_specs(cfg, seed):
  """Every held-out 3-class Fashion-MNIST subset (first N), plus digits."""
  fm = list(itertools.combinations(tasks.HELDOUT_CLASSES, NUM_CLASSES))
  rng = np.random.default_rng(seed + 1000)
  specs = [("fashion_mnist", c, seed + 100 + i)
           for i, c in enumerate(fm[:cfg["num_fmnist_tasks"]])]
  for i in range(cfg["num_digits_tasks"]):
    c = tuple(sorted(int(x) for x in rng.choice(10, NUM_CLASSES, False)))
    specs.append(("digits", c, seed + 200 + i))
  return specs


NOT_REACHED = "not reached"


def _fmt(x, spec=".2f"):
  return "n/a" if x is None or isinstance(x, str) else format(x, spec)


def mark_unreached(tree):
  """None (a loss never reached) -> NOT_REACHED, so that in results.json a
  null can only mean a non-finite number (common._jsonable's mapping)."""
  if isinstance(tree, dict):
    return {k: mark_unreached(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [mark_unreached(v) for v in tree]
  return NOT_REACHED if tree is None else tree


def main(argv=None):
  args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
  cfg = QUICK if args.quick else FULL
  mode = "quick" if args.quick else "full"
  out_dir = common.results_dir(NAME, args.out)
  t_start = time.perf_counter()
  steps = cfg["inner_steps"]

  # 1. Meta-train against validation loss and against training loss.
  family, m = meta_train_family("train", cfg["batch_size"], seed=args.seed)
  assert cfg["num_tasks"] % m == 0, (cfg["num_tasks"], m)
  runs = {}
  for label, split in (("learned (valid obj.)", "outer_valid"),
                       ("learned (train obj.)", "train")):
    runs[label] = meta_train(
        estimators.HybridRPES, family, num_tasks=cfg["num_tasks"],
        inner_steps=steps,
        truncation_length=schedules.LinearTruncationCurriculum(
            cfg["k_min"], cfg["k_max"], cfg["outer_steps"]),
        outer_lr=cfg["outer_lr"], meta_loss_split=split,
        meta_loss_evals=cfg["meta_loss_evals"],
        max_outer_steps=cfg["outer_steps"], seed=args.seed, desc=label)
  lopt_names = list(runs)
  t_meta = time.perf_counter() - t_start

  # 2. Held-out evaluation.
  bundle = build_bundle(heldout_specs(cfg, args.seed), steps=steps,
                        batch_size=cfg["batch_size"],
                        train_eval_examples=cfg["train_eval_examples"])
  lopt = runs[lopt_names[0]]["lopt"]
  thetas = jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                  *[runs[n]["theta"] for n in lopt_names])
  curves = {}
  for name in tqdm(BASELINES, desc="baselines", leave=False):
    curves[name] = train_curves(
        bundle, lambda lr, name=name: optax_optimizer(name, lr),
        jnp.asarray(LRS), steps, cfg["eval_every"])
  both = train_curves(bundle, lambda th: learned_optimizer(lopt, th, steps),
                      thetas, steps, cfg["eval_every"])
  for i, name in enumerate(lopt_names):
    curves[name] = both[:, i:i + 1]
  t_eval = time.perf_counter() - t_start - t_meta

  # 3. Speed: inner steps per second.
  rates = measure_steps_per_second(
      bundle,
      {"learned": lopt.opt_fn(runs[lopt_names[0]]["theta"]),
       "Adam": opt_base.Adam(1e-3), "RMSProp": opt_base.RMSProp(1e-3),
       "SGDM": opt_base.SGDM(1e-2)},
      cfg["timing_steps"], cfg["timing_repeats"])
  steps_axis = np.arange(curves["Adam"].shape[2]) * cfg["eval_every"]
  analysis = analyse(curves, lopt_names, steps_axis, rates, bundle.names)

  for kind in ("steps", "time"):
    plot_curves(out_dir, analysis, steps_axis, lopt_names, kind)
  plot_wins(out_dir, analysis, bundle.names, lopt_names[0])
  t_total = time.perf_counter() - t_start

  numbers = dict(
      config=cfg, seed=args.seed, task_names=bundle.names,
      learning_rates=list(LRS), steps_axis=steps_axis,
      steps_per_second=rates,
      overhead_ratio_learned_vs_adam=rates["learned"] / rates["Adam"],
      meta_training={n: dict(
          outer_steps=len(r["history"]["meta_loss"]),
          seconds=r["history"]["seconds"][-1],
          meta_loss_first10=float(np.mean(r["history"]["meta_loss"][:10])),
          meta_loss_last10=float(np.mean(r["history"]["meta_loss"][-10:])),
          meta_loss=r["history"]["meta_loss"], k=r["history"]["k"])
                     for n, r in runs.items()},
      wallclock_ratio=analysis["ratio"], final_loss=analysis["final"],
      best_loss=analysis["best"], win_rate=analysis["win_rate"],
      per_task=analysis["per_task"], chosen_lr=analysis["chosen_lr"],
      mean_curves=analysis["mean_curves"],
      seconds=dict(meta_training=t_meta, evaluation=t_eval, total=t_total))
  common.write_results(out_dir, mark_unreached(numbers),
                       summary(numbers, lopt_names, mode), mode)
  print(f"wrote {out_dir} in {t_total:.0f} s")
  return 0


def fastest_baseline_to_lopt_final(n, objective, name):
  """(baseline, its time to reach the learned optimizer's final mean loss /
  the learned optimizer's total time), or None: the reverse of the paper's
  ratio, finite when the learned optimizer is the slower one."""
  steps = np.asarray(n["steps_axis"], float)
  curves = n["mean_curves"][objective]
  target = curves[name][-1]
  t_lopt = steps[-1] / n["steps_per_second"]["learned"]
  best = None
  for b in BASELINES:
    t = time_to_reach(np.asarray(curves[b]),
                      steps / n["steps_per_second"][b], target)
    if t is not None and (best is None or t < best[1]):
      best = (b, t)
  return None if best is None else (best[0], best[1] / t_lopt)


def _verdict(ok_full, ok_part):
  return "held" if ok_full else ("partly held" if ok_part else "did not hold")


def verdicts(n, lopt_names):
  """Lines: each headline claim of the paper against our numbers."""
  v, tr = lopt_names
  r, w, f = n["wallclock_ratio"], n["win_rate"], n["final_loss"]
  out = []
  for obj, bound in (("train", 0.25), ("test", 1 / 3)):
    ratio = r[f"{obj}/{v}"]["mean_curve_ratio"]
    reached = not (ratio is None or isinstance(ratio, str))
    rev = fastest_baseline_to_lopt_final(n, obj, v)
    rev_txt = (f"; the fastest tuned baseline ({rev[0]}) reaches the learned "
               f"optimizer's final {obj} loss in {rev[1]:.2f}x the learned "
               "optimizer's wall-clock" if rev else "")
    out.append(
        f"- Wall-clock to the best tuned baseline's {obj} loss (paper: < "
        f"{bound:.2f}x): " + _verdict(reached and ratio <= bound,
                                       reached and ratio < 1) +
        f" -- ratio {_fmt(ratio)} on the mean curves{rev_txt}.")
  wf = w[f"test/{v}"]["final"]
  out.append(f"- Beats the best tuned baseline on 98% of held-out tasks: "
             f"{_verdict(wf >= 0.9, wf >= 0.5)} -- {wf:.0%} on final test "
             f"loss, {w[f'train/{v}']['final']:.0%} on final training loss.")
  tv, tt = f[f"test/{v}"]["lopt"], f[f"test/{tr}"]["lopt"]
  rv, rt = f[f"train/{v}"]["lopt"], f[f"train/{tr}"]["lopt"]
  out.append(
      "- Validation objective generalizes better; training objective is "
      "faster on training loss but overfits: "
      f"{_verdict(tv < tt and rt < rv, tv < tt)} -- mean test loss "
      f"{tv:.4f} (valid obj.) vs {tt:.4f} (train obj.); mean training loss "
      f"{rv:.4f} vs {rt:.4f}.")
  o = n["overhead_ratio_learned_vs_adam"]
  out.append(f"- Small per-step overhead (paper CPU: 0.87x Adam's steps/s): "
             f"{_verdict(o >= 0.8, o >= 0.5)} -- {o:.2f}x here (the "
             "per-parameter MLP costs more than this 3.3k-parameter network's "
             "own step).")
  return out


def summary(n, lopt_names, mode) -> str:
  v, tr = lopt_names
  cfg = n["config"]
  r = n["wallclock_ratio"]
  f = n["final_loss"]
  w = n["win_rate"]
  lines = [
      f"# E5: headline (paper Fig. 1) at our budget ({mode} mode)", "",
      f"Held-out tasks: {len(n['task_names'])} ({', '.join(n['task_names'])}); "
      f"{ARCH} on {IMAGE_SIZE}x{IMAGE_SIZE} images, batch {cfg['batch_size']}, "
      f"{cfg['inner_steps']} inner steps. Meta-training: HybridRPES, n = "
      f"{cfg['num_tasks']}, {cfg['outer_steps']} outer steps, curriculum "
      f"{cfg['k_min']} -> {cfg['k_max']}, outer Adam {cfg['outer_lr']} "
      f"(beta1 0.5, clip 0.1), on every 3-class subset of Fashion-MNIST "
      f"classes 0-4.", "",
      "| | learned (valid obj.) | learned (train obj.) | best tuned baseline "
      "(per task) | Adam | RMSProp | SGDM |", "|---|---|---|---|---|---|---|"]
  for obj in ("train", "test"):
    fv, ft = f[f"{obj}/{v}"], f[f"{obj}/{tr}"]
    lines.append(
        f"| final {obj} loss (mean) | {fv['lopt']:.4f} | {ft['lopt']:.4f} | "
        f"{fv['best_baseline_per_task']:.4f} | {fv['Adam']:.4f} | "
        f"{fv['RMSProp']:.4f} | {fv['SGDM']:.4f} |")
  lines += ["", "| learned optimizer | objective | wall-clock ratio (mean "
            "curves) | same in inner steps | tasks reaching best baseline's "
            "loss | median per-task ratio (wall-clock / steps) | win rate "
            "(final) | win rate (best along run) |",
            "|---|---|---|---|---|---|---|---|"]
  for name in lopt_names:
    for obj in ("train", "test"):
      rr, ww = r[f"{obj}/{name}"], w[f"{obj}/{name}"]
      lines.append(
          f"| {name} | {obj} loss | {_fmt(rr['mean_curve_ratio'])} (vs "
          f"{rr['mean_curve_best_baseline']}) | "
          f"{_fmt(rr['mean_curve_step_ratio'])} | "
          f"{rr['per_task_reached_fraction']:.0%} | "
          f"{_fmt(rr['per_task_median_ratio'])} / "
          f"{_fmt(rr['per_task_median_step_ratio'])} | {ww['final']:.0%} | "
          f"{ww['best']:.0%} |")
  lines += ["", "## The paper's claims against these numbers", ""]
  lines += verdicts(n, lopt_names)
  s = n["steps_per_second"]
  lines += [
      "", f"Inner steps per second (jitted single steps, CPU, shared): "
      + ", ".join(f"{k} {x:.0f}" for k, x in s.items())
      + f"; learned / Adam = {n['overhead_ratio_learned_vs_adam']:.2f} "
      "(paper, CPU: 80 / 92 = 0.87).", "",
      "Wall-clock ratio = time for the learned optimizer to first reach the "
      "best tuned baseline's lowest loss, divided by the time that baseline "
      "took to reach it (paper: < 1/4 on training loss, ~1/3 on test loss). "
      "'n/a' = never reached within the run.", "",
      f"Run time: meta-training {n['seconds']['meta_training']:.0f} s, "
      f"evaluation {n['seconds']['evaluation']:.0f} s, total "
      f"{n['seconds']['total']:.0f} s.", "",
      "Budget vs the paper: the paper meta-trains a 3-layer CNN on 32x32 "
      "ImageNet class subsets with 10k-step inner runs, n = 128 and ~5k outer "
      f"steps; here an MLP 2x32 on 8x8 Fashion-MNIST 3-class subsets, "
      f"{cfg['inner_steps']}-step inner runs, n = {cfg['num_tasks']}, "
      f"{cfg['outer_steps']} outer steps (about "
      f"{cfg['num_tasks'] * cfg['outer_steps'] / (128 * 5000):.2%} of the "
      "paper's sample budget before counting the shorter unrolls)."]
  return "\n".join(lines)


if __name__ == "__main__":
  raise SystemExit(main())
