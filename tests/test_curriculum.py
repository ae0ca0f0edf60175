"""pathology_fix_core.curriculum: schedule, jitter, rounding, clipping, errors."""

import numpy as np
import pytest

from pathology_fix_core import curriculum as cur

K_MIN, K_MAX, ITERS, CHUNK = 50, 10_000, 5_000, 10


def test_mean_is_linear_then_constant():
  assert cur.curriculum_mean(0, K_MIN, K_MAX, ITERS) == K_MIN
  assert cur.curriculum_mean(ITERS, K_MIN, K_MAX, ITERS) == K_MAX
  assert cur.curriculum_mean(3 * ITERS, K_MIN, K_MAX, ITERS) == K_MAX
  ts = np.arange(0, ITERS + 1, 250)
  means = np.array([cur.curriculum_mean(t, K_MIN, K_MAX, ITERS) for t in ts])
  # Constant increments: linear in t.
  np.testing.assert_allclose(np.diff(means), (K_MAX - K_MIN) * 250 / ITERS)
  with pytest.raises(ValueError, match="outer_iteration"):
    cur.curriculum_mean(-1, K_MIN, K_MAX, ITERS)


@pytest.mark.parametrize("t", [0, ITERS // 2, ITERS, 2 * ITERS])
def test_draws_jittered_rounded_and_unbiased(t):
  rng = np.random.default_rng(t)
  mean = cur.curriculum_mean(t, K_MIN, K_MAX, ITERS)
  draws = np.array([cur.sample_truncation_length(rng, t, K_MIN, K_MAX, ITERS,
                                                 CHUNK) for _ in range(4000)])
  assert draws.dtype.kind == "i"
  assert np.all(draws % CHUNK == 0) and np.all(draws >= CHUNK)
  # Rounding to the nearest multiple moves a draw by at most CHUNK / 2.
  assert draws.min() >= 0.8 * mean - CHUNK / 2
  assert draws.max() <= 1.2 * mean + CHUNK / 2
  # The jitter covers its range: draws near both ends appear.
  assert draws.min() <= 0.82 * mean + CHUNK / 2
  assert draws.max() >= 1.18 * mean - CHUNK / 2
  # E[u] = 1, so the average is near the mean; sd of U(0.8, 1.2) is
  # 0.4 / sqrt(12) times the mean.
  se = mean * 0.4 / np.sqrt(12) / np.sqrt(len(draws))
  assert abs(draws.mean() - mean) < 4 * se + CHUNK / 4


def test_reproducible_with_same_generator_seed():
  a = [cur.sample_truncation_length(np.random.default_rng(5), 100, K_MIN,
                                    K_MAX, ITERS, CHUNK) for _ in range(3)]
  assert len(set(a)) == 1


def test_never_below_one_chunk():
  rng = np.random.default_rng(0)
  draws = [cur.sample_truncation_length(rng, 0, 1, 2, 10, 50)
           for _ in range(200)]
  assert set(draws) == {50}


def test_clip_to_steps_left_wins():
  rng = np.random.default_rng(1)
  for steps_left in (1, 7, 33, 5_000, 100_000):
    draws = [cur.sample_truncation_length(rng, ITERS, K_MIN, K_MAX, ITERS,
                                          CHUNK, steps_left=steps_left)
             for _ in range(200)]
    assert max(draws) <= steps_left and min(draws) >= 1
    if steps_left < 0.8 * K_MAX:
      # Every unclipped draw is >= 0.8 * K_MAX, so all are clipped.
      assert set(draws) == {steps_left}
    else:
      assert all(d % CHUNK == 0 for d in draws)
  with pytest.raises(ValueError, match="steps_left"):
    cur.sample_truncation_length(rng, 0, K_MIN, K_MAX, ITERS, CHUNK,
                                 steps_left=0)


def test_custom_jitter():
  rng = np.random.default_rng(2)
  draws = {cur.sample_truncation_length(rng, 0, 100, 100, 10, 1,
                                        jitter=(1.0, 1.0)) for _ in range(20)}
  assert draws == {100}
  with pytest.raises(ValueError, match="jitter"):
    cur.sample_truncation_length(rng, 0, 100, 100, 10, 1, jitter=(1.2, 0.8))


@pytest.mark.parametrize("args,match", [
    ((100, 50, 10, 1), r"k_min \(100\) must be <= k_max \(50\)"),
    ((0, 50, 10, 1), r"k_min \(0\) must be >= 1"),
    ((1, 50, 0, 1), r"num_iterations \(0\) must be an integer >= 1"),
    ((1, 50, 10, 0), r"steps_per_jit \(0\) must be an integer >= 1"),
    ((1, 50, 10, 2.5), r"steps_per_jit"),
])
def test_validate_curriculum_errors(args, match):
  with pytest.raises(ValueError, match=match):
    cur.validate_curriculum(*args)
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=match):
    cur.sample_truncation_length(rng, 0, *args)


def test_validate_curriculum_accepts_paper_and_release_settings():
  cur.validate_curriculum(50, 10_000, 5_000, 10)
  cur.validate_curriculum(10, 10_000, 20_000, 10)
  cur.validate_curriculum(7, 7, 1, 1)


def test_check_unroll_length():
  cur.check_unroll_length(100, 10)
  cur.check_unroll_length(10, 10)
  for bad in (0, -10, 15, 5):
    with pytest.raises(ValueError,
                       match=r"unroll_length .* steps_per_jit \(10\)"):
      cur.check_unroll_length(bad, 10)
  with pytest.raises(ValueError, match="steps_per_jit"):
    cur.check_unroll_length(10, 0)


@pytest.mark.parametrize("k_max, jitter, chunk", [
    (1000, (0.8, 1.2), 10), (95, (1.0, 1.0), 10), (7, (0.5, 1.5), 3),
    (50, (1.0, 1.3), 50)])
def test_max_chunks_is_the_longest_draw(k_max, jitter, chunk):
  # Brute force: past num_iterations the mean is k_max, and draws with u at
  # the top of the jitter range reach the most chunks.
  rng = np.random.default_rng(3)
  draws = [cur.sample_truncation_length(rng, 10, 1, k_max, 10, chunk,
                                        jitter=jitter) for _ in range(3000)]
  top = [cur.sample_truncation_length(rng, 10, 1, k_max, 10, chunk,
                                      jitter=(jitter[1], jitter[1]))
         for _ in range(3)]
  max_chunks = cur.max_curriculum_chunks(k_max, jitter, chunk)
  assert max(draws) <= max_chunks * chunk
  assert set(top) == {max_chunks * chunk}
  # k_max * high = 1200, 95, 10.5 (rounds up to 4 chunks of 3), 65 -> 1.
  assert max_chunks == {1000: 120, 95: 10, 7: 4, 50: 1}[k_max]


def test_round_to_chunks_rounds_half_up_and_keeps_one():
  assert [cur.round_to_chunks(x, 10) for x in (0, 4.9, 5, 14.9, 15, 25)] == [
      1, 1, 1, 1, 2, 3]


def test_bad_jitter_names_it():
  for bad in ((1.2, 0.8), (0.0, 1.0), 1.2, ("a", "b"), (0.8, 1.0, 1.2)):
    with pytest.raises(ValueError, match=r"^C\.jitter "):
      cur.check_jitter(bad, prefix="C.")


# --- how the estimators take a schedule --------------------------------------


def _estimator(**kwargs):
  from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncation_schedule  # pylint: disable=g-import-not-at-top
  from learned_optimization.tasks import quadratics  # pylint: disable=g-import-not-at-top
  from pathology_fix.meta_gradient import estimators  # pylint: disable=g-import-not-at-top
  return estimators.HybridRPES(
      quadratics.FixedDimQuadraticFamily(4), mlp_lopt.MLPLOpt(),
      truncation_schedule.ConstantTruncationSchedule(10_000), num_tasks=5,
      **kwargs)


def _lengths(est, outer_iteration=0, n=20):
  import jax  # pylint: disable=g-import-not-at-top
  return {est.draw_truncation_length(jax.random.PRNGKey(i), outer_iteration,
                                     10_000) for i in range(n)}


def test_a_schedule_replaces_unroll_length():
  from pathology_fix.meta_gradient import schedules  # pylint: disable=g-import-not-at-top
  # unroll_length (default 20, or given) is no multiple of 50, and unused.
  for extra in ({}, {"unroll_length": 20}):
    est = _estimator(steps_per_jit=50, **extra,
                     truncation_length=schedules.LinearTruncationCurriculum(
                         k_min=100, k_max=200, num_iterations=10))
    assert est.unroll_length is None
    assert _lengths(est) <= {50, 100, 150} and 100 in _lengths(est)
  # Without a schedule it is still checked, under the estimator's name.
  with pytest.raises(ValueError, match=r"HybridRPES\.unroll_length \(20\) .* "
                     r"HybridRPES\.steps_per_jit \(50\)"):
    _estimator(steps_per_jit=50)
  with pytest.raises(ValueError, match=r"HybridRPES\.steps_per_jit \(0\)"):
    _estimator(steps_per_jit=0, truncation_length=schedules.
               LinearTruncationCurriculum())
  with pytest.raises(TypeError, match=r"HybridRPES\.truncation_length \(100\)"):
    _estimator(truncation_length=100)


def test_trunc_length_is_an_alias_of_unroll_length():
  assert _lengths(_estimator(trunc_length=40)) == {40}
  assert _estimator(trunc_length=40).unroll_length == 40
  assert _lengths(_estimator(trunc_length=40, unroll_length=40)) == {40}
  assert _lengths(_estimator()) == {20}
  with pytest.raises(ValueError, match=r"HybridRPES\.unroll_length \(20\) and "
                     r"HybridRPES\.trunc_length \(40\)"):
    _estimator(unroll_length=20, trunc_length=40)
  with pytest.raises(ValueError, match=r"HybridRPES\.trunc_length.*multiple|"
                     r"HybridRPES\.unroll_length \(45\)"):
    _estimator(trunc_length=45)
