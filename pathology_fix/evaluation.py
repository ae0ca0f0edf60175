"""Meta-test: a learned optimizer trains fresh inner problems from scratch.

The training run's `mean_loss` is read at wherever the truncated unrolls of
that step happen to be in their inner runs, so it mostly tracks inner
progress. Whether meta-training helped is answered here instead: whole inner
runs with fixed data and keys, for several thetas side by side (e.g. params_0
and the latest params of a run). One compilation per task.
"""

from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EVAL_SPLITS = ("train", "outer_valid", "test")


def _batches(task, split: str, count: int):
  """`count` batches of `task`'s split stacked on a leading axis (or ())."""
  if task.datasets is None:
    return ()
  it = task.datasets.split(split)
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                *[next(it) for _ in range(count)])


def _inner_run(task, lopt, num_steps: int):
  """jit(theta, key, train_batches, eval_batches) -> (losses [T], evals)."""

  def run(theta, key, train_batches, eval_batches):
    opt = lopt.opt_fn(theta)
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
    opt_state, losses = jax.lax.scan(step, opt_state,
                                     (keys[:-1], train_batches))
    params, model_state = opt.get_params_state(opt_state)

    def final_loss(batches):
      if not jax.tree_util.tree_leaves(batches):  # the task draws its own data
        return task.normalizer(
            task.loss_with_state(params, model_state, keys[-1], ())[0])
      count = jax.tree_util.tree_leaves(batches)[0].shape[0]
      per_batch = jax.vmap(lambda k, b: task.loss_with_state(
          params, model_state, k, b)[0])(jax.random.split(keys[-1], count),
                                         batches)
      return jnp.mean(task.normalizer(per_batch))

    return losses, {s: final_loss(b) for s, b in eval_batches.items()}

  return jax.jit(run)


def meta_test(tasks: Sequence[Any], lopt, thetas: Dict[str, Any],
              num_steps: int, key, num_eval_batches: int = 5
              ) -> Dict[str, Dict[str, float]]:
  """Trains every task from scratch with each theta; same data and keys for all.

  Args:
    tasks: LO Tasks (any mix; each is compiled once, for all thetas).
    lopt: the LearnedOptimizer whose `opt_fn(theta)` trains them.
    thetas: {name: theta} to compare.
    num_steps: inner steps per run.
    key: randomness of initializations and inner steps, split per task.
    num_eval_batches: batches of each split averaged for the final losses.

  Returns:
    {name: {"train_loss_mean": mean inner training loss over the run,
            "final_<split>_loss": normalized loss after the run}} averaged
    over tasks, for split in `EVAL_SPLITS` (only "train" without datasets).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps ({num_steps}) must be >= 1")
  if not tasks:
    raise ValueError("tasks must not be empty")
  per_theta = {name: [] for name in thetas}
  for task, task_key in zip(tasks, jax.random.split(key, len(tasks))):
    run = _inner_run(task, lopt, num_steps)
    splits = EVAL_SPLITS if task.datasets is not None else ("train",)
    train = _batches(task, "train", num_steps)
    evals = {s: _batches(task, s, num_eval_batches) for s in splits}
    for name, theta in thetas.items():
      losses, finals = run(theta, task_key, train, evals)
      row = {"train_loss_mean": float(jnp.mean(task.normalizer(losses)))}
      row.update({f"final_{s}_loss": float(v) for s, v in finals.items()})
      per_theta[name].append(row)
  return {name: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
          for name, rows in per_theta.items()}
