"""Which split each part of an unroll reads: train for inner steps, outer_valid for L."""

import collections

import numpy as np
import pytest

import jax
import estimator_fixtures as fx
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import base as tasks_base
from learned_optimization.tasks.datasets import base as datasets_base
from pathology_fix import estimators

TARGETS = {"train": 1.0, "inner_valid": 50.0, "outer_valid": -1.0, "test": 1000.0}
LR = 0.1


def _tagged_family(reads):
  """Batches {"target": c} with c fixed per split; counts reads per split."""

  def iterator(split):
    while True:
      reads[split] += 1
      yield {"target": np.float32(TARGETS[split])}

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


def _estimator(family, split, steps=10):
  return estimators.HybridRPES(
      family, lopt_base.LearnableSGD(initial_lr=LR),
      truncation_schedule.ConstantTruncationSchedule(100),
      num_tasks=2, unroll_length=steps, steps_per_jit=5,
      meta_loss_split=split, meta_loss_evals=3, max_loss=1e9)


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
