"""The rematerialized and the stored-residual reverse passes agree."""

import gin
import jax
import numpy as np
import pytest

import estimator_fixtures as fx
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import quadratics
from pathology_fix import estimators
from pathology_fix import schedules

SIGMA = 0.1


def _hybrid(lopt=None, **kwargs):
  # LearnableSGDM compiles fast; its state mixes float and int leaves.
  return estimators.HybridRPES(
      quadratics.FixedDimQuadraticFamilyData(4),
      lopt or lopt_base.LearnableSGDM(),
      truncation_schedule.ConstantTruncationSchedule(200), num_tasks=3,
      unroll_length=30, steps_per_jit=10, sigma=SIGMA, **kwargs)


@pytest.mark.parametrize("lopt", [
    lopt_base.LearnableSGDM,
    pytest.param(mlp_lopt.MLPLOpt, marks=pytest.mark.slow),
])
def test_rematerialized_and_stored_gradients_are_equal(lopt):
  est = _hybrid(lopt(), rematerialize=True)
  unroller = est.unroller
  theta = lopt().init(jax.random.PRNGKey(0))
  state = est.init_worker_state(fx.worker_weights(theta), jax.random.PRNGKey(1))
  eps = est._sample_eps(jax.random.PRNGKey(2), theta, SIGMA, num_samples=3)  # pylint: disable=protected-access
  # Both passes must see the same batches: replay the first pass's data.
  datas, replay = [], []
  real = unroller._chunk_data  # pylint: disable=protected-access

  def record():
    datas.append(real())
    return datas[-1]

  outs = {}
  for remat in (True, False):
    unroller._chunk_data = record if remat else replay.pop  # pylint: disable=protected-access
    unroller.rematerialize = remat
    outs[remat] = unroller.unroll(theta, eps, state, jax.random.PRNGKey(3), 30,
                                  with_rp_grads=True)
    replay = datas[::-1]
  assert len(datas) == 3  # k = 30 in chunks of 10: a real multi-chunk pass

  np.testing.assert_array_equal(outs[True].losses, outs[False].losses)
  for a, b in zip(jax.tree_util.tree_leaves(outs[True].final_opt_states),
                  jax.tree_util.tree_leaves(outs[False].final_opt_states)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(outs[True].rp_grads),
                  jax.tree_util.tree_leaves(outs[False].rp_grads)):
    assert np.any(np.asarray(a) != 0)
    # Same math, differently fused by XLA: equal to float32 round-off.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_auto_rematerializes_above_the_chunk_threshold():
  unroller = _hybrid(rematerialize="auto", remat_chunk_threshold=4).unroller
  assert [unroller.uses_remat(c) for c in (1, 4, 5, 100)] == [
      False, False, True, True]
  assert _hybrid(rematerialize=True).unroller.uses_remat(1)
  assert not _hybrid(rematerialize=False).unroller.uses_remat(100)


def test_auto_rematerializes_when_residuals_exceed_the_memory_budget():
  est = _hybrid(rematerialize="auto", remat_memory_budget_mb=1e-6)
  unroller = est.unroller
  theta = lopt_base.LearnableSGDM().init(jax.random.PRNGKey(0))
  state = est.init_worker_state(fx.worker_weights(theta), jax.random.PRNGKey(1))
  eps = est._sample_eps(jax.random.PRNGKey(2), theta, SIGMA, num_samples=3)  # pylint: disable=protected-access
  assert not unroller.uses_remat(1)  # residual size not known yet
  unroller.unroll(theta, eps, state, jax.random.PRNGKey(3), 10,
                  with_rp_grads=True)
  assert unroller.residual_bytes_per_chunk > 0
  assert unroller.uses_remat(1)  # one chunk already exceeds ~1 byte


def test_max_chunks_of_each_schedule():
  assert estimators.max_truncation_chunks(
      schedules.ConstantTruncationLength(95), 10) == 10
  # k_max 1000 jittered up to 1.2x, rounded to chunks of 10.
  assert estimators.max_truncation_chunks(
      schedules.LinearTruncationCurriculum(k_min=50, k_max=1000), 10) == 120
  assert estimators.max_truncation_chunks(object(), 10) is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(rematerialize="sometimes"), "rematerialize"),
    (dict(remat_chunk_threshold=-1), "remat_chunk_threshold"),
    (dict(remat_memory_budget_mb=0), "remat_memory_budget_mb"),
])
def test_bad_remat_config_names_the_parameter(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _hybrid(**kwargs)


def test_remat_options_are_gin_configurable():
  with gin.unlock_config():
    gin.parse_config(["HybridRPES.rematerialize = False",
                      "HybridRPES.remat_chunk_threshold = 7"])
  try:
    est = estimators.HybridRPES(
        quadratics.FixedDimQuadraticFamily(4), mlp_lopt.MLPLOpt(),
        truncation_schedule.ConstantTruncationSchedule(100), num_tasks=2)
  finally:
    gin.clear_config()
  assert est.unroller.rematerialize is False
  assert est.unroller.remat_chunk_threshold == 7
