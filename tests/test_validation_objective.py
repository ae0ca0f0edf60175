"""Which split each part of an unroll reads: train for inner steps, outer_valid for L."""

import collections

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import estimator_fixtures as fx
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import base as tasks_base
from learned_optimization.tasks.datasets import base as datasets_base
from pathology_fix.meta_gradient import estimators

TARGETS = {"train": 1.0, "inner_valid": 50.0, "outer_valid": -1.0, "test": 1000.0}
LR = 0.1


def _tagged_family(reads, outer_valid_targets=None):
  """Batches {"target": c} with c fixed per split; counts reads per split.

  outer_valid_targets: a cycle of targets for the outer_valid batches
  (default: TARGETS["outer_valid"] every time).
  """

  def iterator(split):
    targets = [TARGETS[split]]
    if split == "outer_valid" and outer_valid_targets is not None:
      targets = list(outer_valid_targets)
    i = 0
    while True:
      reads[split] += 1
      yield {"target": np.float32(targets[i % len(targets)])}
      i += 1

  datasets = datasets_base.Datasets(
      train=iterator("train"), inner_valid=iterator("inner_valid"),
      outer_valid=iterator("outer_valid"), test=iterator("test"))

  class PullToTarget(tasks_base.Task):

    def loss(self, params, key, data):
      return (params["w"] - data["target"])**2

    def init(self, key):
      return {"w": jax.numpy.zeros(())}

  task = PullToTarget()
  task.datasets = datasets
  return tasks_base.single_task_to_family(task, name="tagged")


def _estimator(family, split, steps=10, max_loss=1e9, **kwargs):
  # The objective is every variant's; VariationalRP keeps two samples legal.
  return estimators.VariationalRP(
      family, lopt_base.LearnableSGD(initial_lr=LR),
      truncation_schedule.ConstantTruncationSchedule(100),
      num_tasks=2, unroll_length=steps, steps_per_jit=5,
      meta_loss_split=split, meta_loss_evals=3 if split == "outer_valid" else 1,
      max_loss=max_loss, **kwargs)


def _closed_form(split, steps=10):
  """SGD on (w - 1)^2 from w = 0; meta-loss on the split's target."""
  w, losses = 0.0, []
  for _ in range(steps):
    before = w
    w = w - LR * 2 * (w - TARGETS["train"])
    if split == "train":
      losses.append((before - TARGETS["train"])**2)
    else:
      losses.append((w - TARGETS["outer_valid"])**2)
  return np.mean(losses)


@pytest.mark.parametrize("split", ["train", "outer_valid"])
def test_inner_steps_read_train_and_meta_loss_reads_its_split(split):
  reads = collections.Counter()
  est = _estimator(_tagged_family(reads), split)
  theta = lopt_base.LearnableSGD(initial_lr=LR).init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  zeros = jax.tree_util.tree_map(lambda t: jax.numpy.zeros((2,) + t.shape),
                                 theta)
  reads.clear()
  out = est.unroller.unroll(theta, zeros, state, jax.random.PRNGKey(2), 10,
                            with_rp_grads=True)
  np.testing.assert_allclose(out.losses, _closed_form(split), rtol=1e-5)
  assert reads["train"] == 10 * 2  # one batch per step per sample
  assert reads["outer_valid"] == (10 * 2 * 3 if split == "outer_valid" else 0)
  assert reads["test"] == 0 and reads["inner_valid"] == 0


def test_training_and_validation_objectives_differ_when_the_task_overfits():
  # The inner problem fits the train target (+1); validation wants -1.
  values = {}
  for split in ("train", "outer_valid"):
    reads = collections.Counter()
    est = _estimator(_tagged_family(reads), split)
    theta = lopt_base.LearnableSGD(initial_lr=LR).init(jax.random.PRNGKey(0))
    weights = fx.worker_weights(theta)
    state = est.init_worker_state(weights, jax.random.PRNGKey(1))
    out, metrics = est.compute_gradient_estimate(weights,
                                                 jax.random.PRNGKey(2), state)
    values[split] = (float(out.mean_loss), float(out.grad["log_lr"]))
    assert reads["test"] == 0
  # Training loss falls with a larger step; validation loss rises with it.
  assert values["train"][0] < values["outer_valid"][0]
  assert values["train"][1] < 0 < values["outer_valid"][1]


def _sgd_after_steps(log_lr, steps=10):
  """w after each SGD step on (w - 1)^2 from w = 0, lr = exp(log_lr)."""
  w, ws = 0.0, []
  for _ in range(steps):
    w = w - jnp.exp(log_lr) * 2 * (w - TARGETS["train"])
    ws.append(w)
  return jnp.stack(ws)


def _unperturbed_truncation(est, theta, steps=10):
  """Losses [2, n] and dL/dtheta [2, n] of one truncation at eps = 0."""
  state = est.init_worker_state(fx.worker_weights(theta), jax.random.PRNGKey(1))
  zeros = jax.tree_util.tree_map(lambda t: jnp.zeros((2,) + t.shape), theta)
  out = est.unroller.unroll(theta, zeros, state, jax.random.PRNGKey(2), steps,
                            with_rp_grads=True)
  return np.asarray(out.losses), np.asarray(out.rp_grads["log_lr"])


def test_validation_loss_averages_distinct_batches():
  # Each step's 3 evaluation batches have targets -1, -2 and -3 (a cycle of 3
  # over blocks of 10 reads), so the meta-loss is mean_c (w - c)^2.
  targets = (-1.0, -2.0, -3.0)
  est = _estimator(_tagged_family(collections.Counter(), targets),
                   "outer_valid")
  theta = lopt_base.LearnableSGD(initial_lr=LR).init(jax.random.PRNGKey(0))
  losses, _ = _unperturbed_truncation(est, theta)
  ws = np.asarray(_sgd_after_steps(np.log(LR)))
  expected = np.mean([(ws - c)**2 for c in targets])
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  # Not the loss of any single target: the batches really differ.
  for c in targets:
    assert abs(np.mean((ws - c)**2) - expected) > 0.1


def _one_diverged_batch(clip_mode):
  # Targets 0, 0, 10: w stays in [0, 1), so (w - 10)^2 > 81 > max_loss = 25
  # while w^2 < 1. The mean of the three is > 27, also above the clip.
  est = _estimator(_tagged_family(collections.Counter(), (0.0, 0.0, 10.0)),
                   "outer_valid", max_loss=25.0, meta_loss_clip_mode=clip_mode)
  theta = lopt_base.LearnableSGD(initial_lr=LR).init(jax.random.PRNGKey(0))
  return _unperturbed_truncation(est, theta)


def test_clipped_batch_counts_max_loss_and_passes_no_gradient():
  losses, grads = _one_diverged_batch("per_batch")

  def reference(log_lr):
    ws = _sgd_after_steps(log_lr)
    return jnp.mean((2 * ws**2 + 25.0) / 3)  # the diverged batch is a constant

  value, grad = jax.value_and_grad(reference)(jnp.log(LR))
  np.testing.assert_allclose(losses, float(value), rtol=1e-5)
  np.testing.assert_allclose(grads, float(grad), rtol=1e-4)
  assert float(grad) != 0.0


def test_clip_of_the_mean_is_kept_behind_its_option():
  losses, grads = _one_diverged_batch("mean")
  np.testing.assert_allclose(losses, 25.0)  # the mean is clipped...
  np.testing.assert_array_equal(grads, 0.0)  # ...so no batch passes gradient


@pytest.mark.parametrize("kwargs, match", [
    (dict(meta_loss_clip_mode="batch"), "meta_loss_clip_mode.*per_batch"),
    (dict(meta_loss_split="train", meta_loss_evals=2), "meta_loss_evals"),
])
def test_bad_meta_loss_options_name_the_parameter(kwargs, match):
  base = dict(num_tasks=5, unroll_length=10, steps_per_jit=5,
              meta_loss_split="outer_valid", meta_loss_evals=3)
  base.update(kwargs)
  with pytest.raises(ValueError, match=match):
    estimators.HybridRPES(
        _tagged_family(collections.Counter()), lopt_base.LearnableSGD(),
        truncation_schedule.ConstantTruncationSchedule(100), **base)
