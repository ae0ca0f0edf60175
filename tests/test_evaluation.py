"""pathology_fix.runtime.evaluation.meta_test: whole inner runs with fixed keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pathology_fix  # pylint: disable=unused-import  # compat before LO
from learned_optimization.learned_optimizers import base as lopt_base  # pylint: disable=g-bad-import-order
from learned_optimization.optimizers import base as opt_base  # pylint: disable=g-bad-import-order
from learned_optimization.tasks import quadratics  # pylint: disable=g-bad-import-order
from pathology_fix.runtime import evaluation
from pathology_fix import tasks


def _sgd_theta(lr):
  return {"log_lr": jnp.log(jnp.asarray(lr, jnp.float32))}


def test_sgd_on_a_quadratic_matches_the_closed_form():
  # loss(p) = |c - p|^2 and SGD(lr): loss_t = (1 - 2 lr)^(2t) loss_0, where
  # t counts updates; the run records loss_0 .. loss_{T-1}, then loss_T.
  family = quadratics.FixedDimQuadraticFamily(10)
  task = family.task_fn(family.sample(jax.random.PRNGKey(0)))
  num_steps = 25
  lrs = {"slow": 0.02, "fast": 0.1}
  out = evaluation.meta_test([task], lopt_base.LearnableSGD(),
                             {n: _sgd_theta(lr) for n, lr in lrs.items()},
                             num_steps, jax.random.PRNGKey(1))
  decay = {n: (1 - 2 * lr)**(2 * np.arange(num_steps + 1))
           for n, lr in lrs.items()}
  for name in lrs:
    ratio = out[name]["final_train_loss"] / out[name]["train_loss_mean"]
    np.testing.assert_allclose(ratio, decay[name][-1] / decay[name][:-1].mean(),
                               rtol=1e-4)
  # Same initialization for every theta, hence the same loss_0.
  np.testing.assert_allclose(
      out["slow"]["train_loss_mean"] / out["fast"]["train_loss_mean"],
      decay["slow"][:-1].mean() / decay["fast"][:-1].mean(), rtol=1e-4)


def _quadratic(seed=0, dim=10):
  family = quadratics.FixedDimQuadraticFamily(dim)
  return family.task_fn(family.sample(jax.random.PRNGKey(seed)))


def test_curves_and_rows_follow_the_closed_form():
  # SGD(lr) on |c - p|^2: loss_t = (1 - 2 lr)^(2t) loss_0. The step curve
  # holds loss_0 .. loss_{T-1}; the eval curve loss_0, loss_e, ..., loss_T.
  num_steps, every, lr = 20, 5, 0.05
  quads = [_quadratic(0), _quadratic(1)]
  out = evaluation.meta_test(quads, lopt_base.LearnableSGD(),
                             {"sgd": _sgd_theta(lr)}, num_steps,
                             jax.random.PRNGKey(3), eval_every=every)
  steps = out.curves["sgd"]["step_loss"]
  evals = out.curves["sgd"]["train_loss"]
  assert steps.shape == (2, num_steps)
  assert evals.shape == (2, num_steps // every + 1)
  decay = (1 - 2 * lr)**(2 * np.arange(num_steps + 1))
  for t in range(2):
    np.testing.assert_allclose(steps[t] / steps[t, 0], decay[:-1], rtol=1e-4)
    np.testing.assert_allclose(evals[t] / steps[t, 0], decay[::every],
                               rtol=1e-4)
  # One row per (task, name); the means are over those rows.
  assert [(r["task"], r["name"]) for r in out.per_task] == [
      (q.name, "sgd") for q in quads]
  for metric, mean in out["sgd"].items():
    assert mean == pytest.approx(
        np.mean([r[metric] for r in out.per_task]), rel=1e-6)
  np.testing.assert_allclose([r["final_train_loss"] for r in out.per_task],
                             evals[:, -1], rtol=1e-6)


def test_hand_designed_optimizers_train_like_the_closed_form():
  # LO Optimizers and optax transforms are entries beside thetas; plain SGD
  # at lr follows the same closed form as the learned SGD at lr.
  num_steps = 15
  entries = {"learned": _sgd_theta(0.1), "lo_sgd": opt_base.SGD(0.03),
             "optax_sgd": optax.sgd(0.07)}
  lrs = {"learned": 0.1, "lo_sgd": 0.03, "optax_sgd": 0.07}
  out = evaluation.meta_test([_quadratic(4)], lopt_base.LearnableSGD(),
                             entries, num_steps, jax.random.PRNGKey(5))
  for name, lr in lrs.items():
    curve = out.curves[name]["step_loss"][0]
    decay = (1 - 2 * lr)**(2 * np.arange(num_steps + 1))
    np.testing.assert_allclose(curve / curve[0], decay[:-1], rtol=1e-4)
    np.testing.assert_allclose(out[name]["final_train_loss"] / curve[0],
                               decay[-1], rtol=1e-4)
  # Hand-designed entries alone need no learned optimizer.
  alone = evaluation.meta_test([_quadratic(4)], None,
                               {"lo_sgd": opt_base.SGD(0.03)}, num_steps,
                               jax.random.PRNGKey(5))
  assert alone["lo_sgd"] == out["lo_sgd"]


def test_dataset_tasks_report_every_split_and_equal_thetas_agree():
  family = tasks.DigitsClassSubsetFamily(
      architecture="mlp2x32", image_size=8, batch_size=32, seed=3)
  task = family.task_fn(family.sample(jax.random.PRNGKey(0)))
  theta = _sgd_theta(0.1)
  out = evaluation.meta_test([task, task], lopt_base.LearnableSGD(),
                             {"a": theta, "b": theta, "frozen": _sgd_theta(0.)},
                             num_steps=30, key=jax.random.PRNGKey(2))
  assert set(out["a"]) == {"train_loss_mean", "final_train_loss",
                           "final_outer_valid_loss", "final_test_loss"}
  assert out["a"] == out["b"]
  assert all(np.isfinite(v) for row in out.values() for v in row.values())
  # Chance level is log 3; 30 SGD steps move below it, lr 0 stays at init.
  assert out["a"]["final_test_loss"] < out["frozen"]["final_test_loss"]
  assert out["frozen"]["final_test_loss"] == pytest.approx(
      np.log(3), rel=0.3)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_steps": 0}, "num_steps"),
    ({"tasks": []}, "tasks"),
    ({"eval_every": 2}, "eval_every"),
    ({"eval_every": 0}, "eval_every"),
    ({"lopt": None}, "lopt"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
  family = quadratics.FixedDimQuadraticFamily(2)
  args = dict(tasks=[family.task_fn(family.sample(jax.random.PRNGKey(0)))],
              lopt=lopt_base.LearnableSGD(), thetas={"a": _sgd_theta(0.1)},
              num_steps=5, key=jax.random.PRNGKey(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    evaluation.meta_test(**args)
