"""Small problems whose smoothed meta-gradient is known without our code."""

import numpy as np

import jax
import jax.numpy as jnp
import pathology_fix  # noqa: F401  (applies the compatibility layer first)
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import gradient_learner
from learned_optimization.tasks import base as tasks_base

CURVATURE = np.array([1.0, 0.3], np.float32)
W0 = np.array([1.0, -2.0], np.float32)


class FixedQuadraticTask(tasks_base.Task):
  """0.5 * sum(a * w^2) from a fixed start; no data, no randomness."""

  def loss(self, params, key, data):
    del key, data
    return 0.5 * jnp.sum(CURVATURE * params["w"]**2)

  def init(self, key):
    del key
    return {"w": jnp.asarray(W0)}


def fixed_quadratic_family():
  return tasks_base.single_task_to_family(FixedQuadraticTask(), name="fixed_quad")


def sgdm_theta(lr=0.1, momentum=0.9):
  return lopt_base.LearnableSGDM(lr, momentum).init(jax.random.PRNGKey(0))


def reference_meta_loss(log_lr, one_minus_momentum, num_steps,
                        max_loss=float("inf")):
  """Mean over steps of the loss before each SGD+momentum step (LO's convention).

  Written from the optimizer's definition: m <- g + mu m; w <- w - lr m, with
  lr = exp(log_lr) and mu = 1 - exp(one_minus_momentum). Each step's loss is
  clipped at ``max_loss`` (the estimators' ``max_loss``; inf: no clip).
  """
  lr = jnp.exp(log_lr)
  mu = 1.0 - jnp.exp(one_minus_momentum)
  w = jnp.asarray(W0)
  m = jnp.zeros_like(w)
  total = 0.0
  for _ in range(num_steps):
    total = total + jnp.minimum(0.5 * jnp.sum(CURVATURE * w**2), max_loss)
    m = CURVATURE * w + mu * m
    w = w - lr * m
  return total / num_steps


def reference_smoothed_gradient(theta, sigma, num_steps, nodes=24,
                                max_loss=float("inf")):
  """E_eps[grad L(theta + eps)], eps ~ N(0, sigma^2 I_2), by Gauss-Hermite."""
  x, w = np.polynomial.hermite.hermgauss(nodes)
  grad_fn = jax.jit(jax.grad(reference_meta_loss, argnums=(0, 1)),
                    static_argnums=(2, 3))
  a0 = float(theta["log_lr"])
  b0 = float(theta["one_minus_momentum"])
  g = np.zeros(2)
  for xi, wi in zip(x, w):
    for xj, wj in zip(x, w):
      da, db = grad_fn(a0 + np.sqrt(2) * sigma * xi,
                       b0 + np.sqrt(2) * sigma * xj, num_steps, max_loss)
      g += wi * wj * np.array([float(da), float(db)])
  return {"log_lr": g[0] / np.pi, "one_minus_momentum": g[1] / np.pi}


def worker_weights(theta, outer_iteration=0):
  return gradient_learner.WorkerWeights(
      theta=theta,
      theta_model_state=None,
      outer_state=gradient_learner.OuterState(outer_iteration))


def seeded_quadratic_family(dim=4, seed=0):
  """LO's FixedDimQuadraticFamilyData with reproducible batches.

  Two families built with the same seed yield the same batches, so a test
  can replay exactly what an unroll read. `family.reads` counts batches read
  per split.
  """
  import collections  # pylint: disable=g-import-not-at-top
  from learned_optimization.tasks import quadratics  # pylint: disable=g-import-not-at-top
  from learned_optimization.tasks.datasets import base as datasets_base  # pylint: disable=g-import-not-at-top

  family = quadratics.FixedDimQuadraticFamilyData(dim)
  reads = collections.Counter()

  def batches(split, offset):
    rng = np.random.default_rng(seed * 10 + offset)
    while True:
      reads[split] += 1
      yield np.float32(rng.standard_normal())

  family.datasets = datasets_base.Datasets(
      train=batches("train", 0), inner_valid=batches("inner_valid", 1),
      outer_valid=batches("outer_valid", 2), test=batches("test", 3))
  family.reads = reads
  return family
