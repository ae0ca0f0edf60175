"""pathology_fix.curriculum: schedule, jitter, rounding, clipping, errors."""

import numpy as np
import pytest

from pathology_fix import curriculum as cur

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
