"""Meta-test: optimizers train fresh inner problems from scratch.

The training run's `mean_loss` is read at wherever the truncated unrolls of
that step happen to be in their inner runs, so it mostly tracks inner
progress. Whether meta-training helped is answered here instead: whole inner
runs with fixed data and keys, for several optimizers side by side (e.g.
params_0 and the latest params of a run, and hand-designed baselines such as
Adam at a grid of learning rates). One compilation per task and learned
optimizer (all thetas share it); one per task and hand-designed optimizer.

`meta_test` returns the means over tasks (a dict), with the per-task rows
(`.per_task`) and the loss curves (`.curves`) attached.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
from learned_optimization.optimizers import base as opt_base
import numpy as np
import optax

EVAL_SPLITS = ("train", "outer_valid", "test")


def _batches(task, split: str, count: int):
  """`count` batches of `task`'s split stacked on a leading axis (or ())."""
  if task.datasets is None:
    return ()
  it = task.datasets.split(split)
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                *[next(it) for _ in range(count)])


def _inner_run(task, make_opt: Callable[[Any], opt_base.Optimizer],
               num_steps: int, eval_every: Optional[int]):
  """jit(theta, key, train_batches, eval_batches) -> (losses [T], evals).

  evals: {split: final loss}, or with eval_every {split: [T // eval_every + 1]}
  losses at steps 0, eval_every, 2 eval_every, ... (same draws as the final).
  """

  def run(theta, key, train_batches, eval_batches):
    opt = make_opt(theta)
    init_key, key = jax.random.split(key)
    params, model_state = task.init_with_state(init_key)
    opt_state = opt.init(params, model_state, num_steps=num_steps)

    def step(opt_state, xs):
      key, batch = xs
      params, model_state = opt.get_params_state(opt_state)
      (loss, model_state), grad = jax.value_and_grad(
          task.loss_with_state, has_aux=True)(params, model_state, key, batch)
      return opt.update(opt_state, grad, loss=loss,
                        model_state=model_state), loss

    keys = jax.random.split(key, num_steps + 1)

    def final_loss(params, model_state, batches):
      if not jax.tree_util.tree_leaves(batches):  # the task draws its own data
        return task.normalizer(
            task.loss_with_state(params, model_state, keys[-1], ())[0])
      count = jax.tree_util.tree_leaves(batches)[0].shape[0]
      per_batch = jax.vmap(lambda k, b: task.loss_with_state(
          params, model_state, k, b)[0])(jax.random.split(keys[-1], count),
                                         batches)
      return jnp.mean(task.normalizer(per_batch))

    def evaluate(opt_state):
      params, model_state = opt.get_params_state(opt_state)
      return {s: final_loss(params, model_state, b)
              for s, b in eval_batches.items()}

    if eval_every is None:
      opt_state, losses = jax.lax.scan(step, opt_state,
                                       (keys[:-1], train_batches))
      return losses, evaluate(opt_state)

    def segment(opt_state, xs):
      opt_state, losses = jax.lax.scan(step, opt_state, xs)
      return opt_state, (losses, evaluate(opt_state))

    num_segments = num_steps // eval_every
    by_segment = jax.tree_util.tree_map(
        lambda a: a.reshape((num_segments, eval_every) + a.shape[1:]),
        (keys[:-1], train_batches))
    first = evaluate(opt_state)
    _, (losses, evals) = jax.lax.scan(segment, opt_state, by_segment)
    evals = jax.tree_util.tree_map(
        lambda a, b: jnp.concatenate([a[None], b]), first, evals)
    return losses.reshape(-1), evals

  return jax.jit(run)


class MetaTestResult(dict):
  """{name: {metric: mean over tasks}}, plus `.per_task` and `.curves`.

  per_task: one row per (task, name): {"task", "name", metric: value}.
  curves: {name: {"step_loss": float [tasks, num_steps] normalized training
    loss of every inner step (on its batch), and with eval_every
    "<split>_loss": float [tasks, num_steps // eval_every + 1], the split's
    loss (as in "final_<split>_loss") at steps 0, eval_every, ...}}.
  """

  def __init__(self, means, per_task, curves):
    super().__init__(means)
    self.per_task: List[Dict[str, Any]] = per_task
    self.curves: Dict[str, Dict[str, np.ndarray]] = curves


def as_optimizer(entry: Any) -> Optional[opt_base.Optimizer]:
  """An LO Optimizer for a hand-designed `meta_test` entry; None for a theta."""
  if isinstance(entry, opt_base.Optimizer):
    return entry
  if isinstance(entry, optax.GradientTransformation):
    return opt_base.OptaxOptimizer(entry)
  return None


def meta_test(tasks: Sequence[Any], lopt, thetas: Dict[str, Any],
              num_steps: int, key, num_eval_batches: int = 5,
              eval_every: Optional[int] = None) -> MetaTestResult:
  """Trains every task from scratch with each entry; same data and keys for all.

  Args:
    tasks: LO Tasks (any mix; each is compiled once per optimizer).
    lopt: the LearnedOptimizer whose `opt_fn(theta)` trains them (may be None
      when every entry is hand-designed).
    thetas: {name: entry} to compare; an entry is a theta of `lopt`, an LO
      `Optimizer` (e.g. `optimizers.base.Adam(1e-3)`) or an optax
      GradientTransformation.
    num_steps: inner steps per run.
    key: randomness of initializations and inner steps, split per task.
    num_eval_batches: batches of each split averaged for the split losses.
    eval_every: also evaluate the splits every this many steps (must divide
      num_steps) into `.curves`; None: only after the run.

  Returns:
    MetaTestResult: {name: {"train_loss_mean": mean inner training loss over
    the run, "final_<split>_loss": normalized loss after the run}} averaged
    over tasks, for split in `EVAL_SPLITS` (only "train" without datasets);
    `.per_task` and `.curves` as documented there.
  """
  if num_steps < 1:
    raise ValueError(f"meta_test.num_steps ({num_steps}) must be >= 1")
  if not tasks:
    raise ValueError("meta_test.tasks must not be empty")
  if eval_every is not None and (eval_every < 1 or num_steps % eval_every):
    raise ValueError(f"meta_test.eval_every ({eval_every}) must be >= 1 and "
                     f"divide num_steps ({num_steps})")
  fixed = {name: as_optimizer(entry) for name, entry in thetas.items()}
  if lopt is None and any(opt is None for opt in fixed.values()):
    raise ValueError("meta_test.lopt is None but thetas has learned-optimizer "
                     f"entries: {[n for n, o in fixed.items() if o is None]}")
  rows = []
  curves = {name: {} for name in thetas}
  for task, task_key in zip(tasks, jax.random.split(key, len(tasks))):
    runs = {}
    splits = EVAL_SPLITS if task.datasets is not None else ("train",)
    train = _batches(task, "train", num_steps)
    evals = {s: _batches(task, s, num_eval_batches) for s in splits}
    for name, entry in thetas.items():
      opt = fixed[name]
      run_key = "lopt" if opt is None else name
      if run_key not in runs:
        make_opt = lopt.opt_fn if opt is None else (lambda _, o=opt: o)
        runs[run_key] = _inner_run(task, make_opt, num_steps, eval_every)
      losses, split_losses = runs[run_key](
          entry if opt is None else (), task_key, train, evals)
      losses = task.normalizer(losses)
      row = {"task": task.name, "name": name,
             "train_loss_mean": float(jnp.mean(losses))}
      curves[name].setdefault("step_loss", []).append(np.asarray(losses))
      for s, v in split_losses.items():
        v = np.asarray(v)
        row[f"final_{s}_loss"] = float(v if eval_every is None else v[-1])
        if eval_every is not None:
          curves[name].setdefault(f"{s}_loss", []).append(v)
      rows.append(row)
  means = {}
  for name in thetas:
    mine = [r for r in rows if r["name"] == name]
    means[name] = {k: float(np.mean([r[k] for r in mine]))
                   for k in mine[0] if k not in ("task", "name")}
  curves = {name: {k: np.stack(v) for k, v in c.items()}
            for name, c in curves.items()}
  return MetaTestResult(means, rows, curves)
