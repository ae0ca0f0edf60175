"""A task family whose every inner loss is NaN, for tests of skipped steps."""

import gin
import jax.numpy as jnp
from learned_optimization.tasks import quadratics


@gin.configurable
class DivergingQuadraticFamily(quadratics.FixedDimQuadraticFamily):
  """FixedDimQuadraticFamily with NaN losses: no sample is ever finite."""

  def task_fn(self, task_params):
    task = super().task_fn(task_params)
    loss = task.loss
    task.loss = lambda params, rng, data: loss(params, rng, data) * jnp.nan
    return task
