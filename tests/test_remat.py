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
from pathology_fix.meta_gradient import estimators
from pathology_fix.meta_gradient import inner_problems
from pathology_fix.meta_gradient import schedules

SIGMA = 0.1


def _hybrid(lopt=None, family=None, **kwargs):
  # LearnableSGDM compiles fast; its state mixes float and int leaves. The
  # reverse pass is the same for VariationalRP, which allows three samples.
  return estimators.VariationalRP(
      family or quadratics.FixedDimQuadraticFamilyData(4),
      lopt or lopt_base.LearnableSGDM(),
      truncation_schedule.ConstantTruncationSchedule(200), num_tasks=3,
      unroll_length=30, steps_per_jit=10, sigma=SIGMA, **kwargs)


@pytest.mark.parametrize("lopt", [
    lopt_base.LearnableSGDM,
    pytest.param(mlp_lopt.MLPLOpt, marks=pytest.mark.slow),
])
def test_rematerialized_and_stored_gradients_are_equal(lopt):
  theta = lopt().init(jax.random.PRNGKey(0))
  outs = {}
  for remat in (True, False):
    # Twin families with one seed: both passes read the same batches.
    family = fx.seeded_quadratic_family(4)
    est = _hybrid(lopt(), family=family, rematerialize=remat)
    state = est.init_worker_state(fx.worker_weights(theta),
                                  jax.random.PRNGKey(1))
    eps = est.perturbations(jax.random.PRNGKey(2), theta)
    outs[remat] = est.unroller.unroll(theta, eps, state, jax.random.PRNGKey(3),
                                      30, with_rp_grads=True)
    # k = 30 in chunks of 10 for 3 samples: a real multi-chunk pass.
    assert family.reads["train"] == 30 * 3

  np.testing.assert_array_equal(outs[True].losses, outs[False].losses)
  for a, b in zip(jax.tree_util.tree_leaves(outs[True].final_opt_states),
                  jax.tree_util.tree_leaves(outs[False].final_opt_states)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(outs[True].rp_grads),
                  jax.tree_util.tree_leaves(outs[False].rp_grads)):
    assert np.any(np.asarray(a) != 0)
    # Same math, differently fused by XLA: equal to float32 round-off.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lopt, data", [
    (lopt_base.LearnableSGDM, False),
    pytest.param(mlp_lopt.MLPLOpt, True, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("remat", [True, False])
def test_step_checkpoints_leave_the_gradient_unchanged(lopt, data, remat):
  """What the reverse pass keeps per inner step is memory, not math."""
  theta = lopt().init(jax.random.PRNGKey(0))
  outs = {}
  for checkpoint in inner_problems.STEP_CHECKPOINTS:
    family = (fx.seeded_quadratic_family(4) if data else
              quadratics.FixedDimQuadraticFamily(4))
    est = _hybrid(lopt(), family=family, rematerialize=remat)
    est.unroller.problems.step_checkpoint = checkpoint
    state = est.init_worker_state(fx.worker_weights(theta),
                                  jax.random.PRNGKey(1))
    eps = est.perturbations(jax.random.PRNGKey(2), theta)
    outs[checkpoint] = est.unroller.unroll(
        theta, eps, state, jax.random.PRNGKey(3), 30, with_rp_grads=True)
  plain = outs.pop(None)
  for out in outs.values():
    np.testing.assert_array_equal(out.losses, plain.losses)
    for a, b in zip(jax.tree_util.tree_leaves(out.final_opt_states),
                    jax.tree_util.tree_leaves(plain.final_opt_states)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(out.rp_grads),
                    jax.tree_util.tree_leaves(plain.rp_grads)):
      assert np.any(np.asarray(b) != 0)
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_step_checkpoint_default_is_a_known_policy():
  assert inner_problems.DEFAULT_STEP_CHECKPOINT in inner_problems.STEP_CHECKPOINTS
  assert (_hybrid().unroller.problems.step_checkpoint ==
          inner_problems.DEFAULT_STEP_CHECKPOINT)


def test_auto_rematerializes_above_the_chunk_threshold():
  engine = _hybrid(rematerialize="auto", remat_chunk_threshold=4).unroller.engine
  assert [engine.uses_remat(c) for c in (1, 4, 5, 100)] == [
      False, False, True, True]
  assert _hybrid(rematerialize=True).unroller.engine.uses_remat(1)
  assert not _hybrid(rematerialize=False).unroller.engine.uses_remat(100)


def test_auto_rematerializes_when_residuals_exceed_the_memory_budget():
  est = _hybrid(rematerialize="auto", remat_memory_budget_mb=1e-6)
  engine = est.unroller.engine
  theta = lopt_base.LearnableSGDM().init(jax.random.PRNGKey(0))
  state = est.init_worker_state(fx.worker_weights(theta), jax.random.PRNGKey(1))
  eps = est.perturbations(jax.random.PRNGKey(2), theta)
  assert not engine.uses_remat(1)  # residual size not known yet
  est.unroller.truncate(theta, eps, state, jax.random.PRNGKey(3), 10)
  assert engine.residual_bytes_per_chunk > 0
  assert engine.uses_remat(1)  # one chunk already exceeds ~1 byte


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
        truncation_schedule.ConstantTruncationSchedule(100), num_tasks=5)
  finally:
    gin.clear_config()
  assert est.unroller.engine.rematerialize is False
  assert est.unroller.engine.remat_chunk_threshold == 7
