"""pathology_fix.runtime.evaluation.meta_test: whole inner runs with fixed keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pathology_fix  # pylint: disable=unused-import  # compat before LO
from learned_optimization.learned_optimizers import base as lopt_base  # pylint: disable=g-bad-import-order
from learned_optimization.optimizers import base as opt_base  # pylint: disable=g-bad-import-order
from learned_optimization.tasks import base as task_base  # pylint: disable=g-bad-import-order
from learned_optimization.tasks import quadratics  # pylint: disable=g-bad-import-order
from pathology_fix.runtime import evaluation
from pathology_fix.tasks_and_data import tasks


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


def test_sweep_entries_follow_the_closed_form_and_equal_separate_runs():
  # A Sweep runs vmapped in one compilation; each of its entries must equal
  # the same optimizer evaluated alone, and follow SGD's closed form.
  num_steps, every = 12, 4
  lrs = (0.02, 0.05, 0.1)
  lopt = lopt_base.LearnableSGD()
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                   *[_sgd_theta(lr) for lr in lrs])
  entries = {
      "sgd": evaluation.learning_rate_sweep(optax.sgd, lrs),
      "alone": optax.sgd(0.05),
      "learned": evaluation.Sweep(lopt.opt_fn, stacked, ("a", "b", "c")),
      "theta b": _sgd_theta(0.05),
  }
  quads = [_quadratic(6), _quadratic(7)]
  out = evaluation.meta_test(quads, lopt, entries, num_steps,
                             jax.random.PRNGKey(8), eval_every=every)
  sgd_names = evaluation.sweep_names("sgd", entries["sgd"])
  assert sgd_names == ["sgd lr=0.02", "sgd lr=0.05", "sgd lr=0.1"]
  assert list(out) == sgd_names + ["alone", "learned a", "learned b",
                                   "learned c", "theta b"]
  for name, lr in zip(sgd_names, lrs):
    decay = (1 - 2 * lr)**(2 * np.arange(num_steps + 1))
    c = out.curves[name]
    np.testing.assert_allclose(c["step_loss"] / c["step_loss"][:, :1],
                               np.tile(decay[:-1], (2, 1)), rtol=1e-4)
    np.testing.assert_allclose(c["train_loss"] / c["step_loss"][:, :1],
                               np.tile(decay[::every], (2, 1)), rtol=1e-4)
  for one, other in (("sgd lr=0.05", "alone"), ("learned b", "theta b"),
                     ("learned b", "alone")):
    for metric, value in out[one].items():
      assert value == pytest.approx(out[other][metric], rel=1e-5), metric
    np.testing.assert_allclose(out.curves[one]["step_loss"],
                               out.curves[other]["step_loss"], rtol=1e-5)


class _ArrayDatasets:
  """Splits held as arrays; the "train" iterator yields the whole split."""

  def __init__(self, splits):
    self.splits = splits

  def split(self, name):
    while True:
      yield self.splits[name]

  def split_arrays(self, name):
    return self.splits[name]


class _LinearRegression(task_base.Task):
  """mean_i (x_i . w - y_i)^2 from w = 1 (the key is not used)."""

  def __init__(self, splits):
    self.datasets = _ArrayDatasets(splits)

  def init(self, key):
    del key
    return {"w": jnp.ones(4)}

  def loss(self, params, key, batch):
    del key
    return jnp.mean((batch["x"] @ params["w"] - batch["y"])**2)


def _regression_splits(n_test=37, seed=0):
  rng = np.random.default_rng(seed)
  return {
      # One-hot rows: the loss is |w - y|^2 / 4, a quadratic with known decay.
      "train": {"x": np.eye(4, dtype=np.float32),
                "y": rng.normal(size=4).astype(np.float32)},
      "test": {"x": rng.normal(size=(n_test, 4)).astype(np.float32),
               "y": rng.normal(size=n_test).astype(np.float32)},
  }


def _numpy_mean_loss(split, w):
  return np.mean((split["x"].astype(np.float64) @ w - split["y"])**2)


def test_whole_split_losses_are_exact_means_over_all_examples():
  splits = _regression_splits()
  num_steps, every, lr = 10, 5, 0.3
  kwargs = dict(splits=("train", "test"), whole_splits=True,
                eval_every=every)
  entries = {"sgd": optax.sgd(lr), "frozen": optax.sgd(0.)}
  # 37 test examples in chunks of 8: four full chunks and a remainder of 5.
  out = evaluation.meta_test([_LinearRegression(splits)], None, entries,
                             num_steps, jax.random.PRNGKey(0),
                             eval_chunk_size=8, **kwargs)
  at_init = {s: _numpy_mean_loss(splits[s], np.ones(4)) for s in splits}
  for name in entries:
    for s in splits:
      assert out.curves[name][f"{s}_loss"][0, 0] == pytest.approx(
          at_init[s], rel=1e-5)
  assert out["frozen"]["final_test_loss"] == pytest.approx(at_init["test"],
                                                           rel=1e-5)
  # Full-batch SGD on |w - y|^2 / 4: loss_t = (1 - lr / 2)^(2t) loss_0.
  decay = (1 - lr / 2)**(2 * np.arange(0, num_steps + 1, every))
  np.testing.assert_allclose(out.curves["sgd"]["train_loss"][0],
                             at_init["train"] * decay, rtol=1e-5)
  # The chunking does not change the value.
  whole = evaluation.meta_test([_LinearRegression(splits)], None, entries,
                               num_steps, jax.random.PRNGKey(0), **kwargs)
  for name in entries:
    for metric, value in out[name].items():
      assert whole[name][metric] == pytest.approx(value, rel=1e-5)


def test_max_eval_examples_evaluates_a_subset_of_the_split():
  splits = _regression_splits(n_test=10, seed=1)
  per_example = ((splits["test"]["x"].astype(np.float64) @ np.ones(4)
                  - splits["test"]["y"])**2)

  def final_test(cap):
    out = evaluation.meta_test(
        [_LinearRegression(splits)], None, {"frozen": optax.sgd(0.)}, 2,
        jax.random.PRNGKey(0), splits=("test",), whole_splits=True,
        max_eval_examples={"test": cap})
    return out["frozen"]["final_test_loss"]

  assert final_test(10) == pytest.approx(per_example.mean(), rel=1e-5)
  one = final_test(1)
  assert np.min(np.abs(per_example - one) / per_example) < 1e-5
  assert final_test(1) == one  # the same subset every call


def test_same_model_compiles_once_and_changes_nothing():
  # Two tasks that differ only in their data (same shapes): with same_model
  # the sweep is traced once for both, and every number stays the same.
  traces = []

  def make(lr):
    traces.append(lr)
    return optax.sgd(lr)

  # Test splits of 37 and 20 examples: padded to one shape, exact for both.
  two = [_LinearRegression(_regression_splits(n, seed=s))
         for n, s in ((37, 2), (20, 3))]
  entries = {"sgd": evaluation.Sweep(make, jnp.asarray([0.1, 0.2]),
                                     ("a", "b"))}
  kwargs = dict(splits=("train", "test"), whole_splits=True, eval_every=2)
  shared = evaluation.meta_test(two, None, entries, 4, jax.random.PRNGKey(0),
                                same_model=True, **kwargs)
  assert len(traces) == 1
  separate = evaluation.meta_test(two, None, entries, 4,
                                  jax.random.PRNGKey(0), **kwargs)
  assert len(traces) == 3
  for one, other in zip(shared.per_task, separate.per_task):
    assert one.keys() == other.keys()
    for k, v in one.items():
      assert v == (other[k] if isinstance(v, str) else pytest.approx(
          other[k], rel=1e-5)), k
  for i, task in enumerate(two):  # padding left the exact mean at init
    test = task.datasets.split_arrays("test")
    assert shared.curves["sgd a"]["test_loss"][i, 0] == pytest.approx(
        _numpy_mean_loss(test, np.ones(4)), rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_steps": 0}, "num_steps"),
    ({"tasks": []}, "tasks"),
    ({"eval_every": 2}, "eval_every"),
    ({"eval_every": 0}, "eval_every"),
    ({"lopt": None}, "lopt"),
    ({"eval_chunk_size": 0}, "eval_chunk_size"),
    ({"whole_splits": True}, "whole_splits"),
    ({"thetas": {"a": evaluation.learning_rate_sweep(optax.sgd, [0.1]),
                 "a lr=0.1": optax.sgd(0.1)}}, "distinct"),
    ({"thetas": {"a": evaluation.Sweep(optax.sgd, jnp.ones(2), ("x",))}},
     "labels"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
  family = quadratics.FixedDimQuadraticFamily(2)
  args = dict(tasks=[family.task_fn(family.sample(jax.random.PRNGKey(0)))],
              lopt=lopt_base.LearnableSGD(), thetas={"a": _sgd_theta(0.1)},
              num_steps=5, key=jax.random.PRNGKey(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    evaluation.meta_test(**args)
