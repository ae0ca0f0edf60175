"""NoiseReuseES (NRES) against references written without our code."""

import numpy as np
import pytest

import jax
import estimator_fixtures as fx
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import truncation_schedule
from pathology_fix.meta_gradient import estimators

SIGMA = 0.1
RUN = 30  # inner-run length T
K = 10  # truncation length: three truncations per run


def _nres(num_tasks=16, run=RUN, k=K, sigma=SIGMA, **kwargs):
  return estimators.NoiseReuseES(
      fx.fixed_quadratic_family(), lopt_base.LearnableSGDM(),
      truncation_schedule.ConstantTruncationSchedule(run),
      num_tasks=num_tasks, unroll_length=k, steps_per_jit=5, sigma=sigma,
      **kwargs)


def _sgdm_w_after(theta, num_steps):
  """Inner parameters after SGD+momentum on the fixed quadratic, from scratch."""
  lr = np.exp(float(theta["log_lr"]))
  mu = 1.0 - np.exp(float(theta["one_minus_momentum"]))
  w = np.asarray(fx.W0, np.float64)
  m = np.zeros_like(w)
  for _ in range(num_steps):
    m = fx.CURVATURE * w + mu * m
    w = w - lr * m
  return w


def _branch_params(est, theta, opt_states):
  opt = est.learned_opt.opt_fn(theta)
  return np.asarray(jax.vmap(opt.get_params)(opt_states)["w"])


def test_eps_is_kept_for_the_run_and_branches_continue_their_own_runs():
  est = _nres(num_tasks=2)
  theta = fx.sgdm_theta()
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(0))
  eps = state.eps
  for t in range(3):
    out, metrics = est.compute_gradient_estimate(
        weights, jax.random.PRNGKey(10 + t), state)
    state = out.unroll_state
    for a, b in zip(jax.tree_util.tree_leaves(eps),
                    jax.tree_util.tree_leaves(state.eps)):
      np.testing.assert_array_equal(a, b)
    steps = K * (t + 1)
    np.testing.assert_array_equal(state.problems.inner_step, [steps, steps])
    pos = _branch_params(est, theta, state.problems.inner_opt_state)
    neg = _branch_params(est, theta, state.neg_inner_opt_state)
    for i in range(2):
      shifted = {n: {s: theta[n] + s * eps[n][i] for s in (1, -1)}
                 for n in theta}
      for got, sign in ((pos[i], 1), (neg[i], -1)):
        expected = _sgdm_w_after({n: shifted[n][sign] for n in theta}, steps)
        np.testing.assert_allclose(got, expected, rtol=1e-4)
  # The run is over: the next call restarts it with a fresh eps.
  out, metrics = est.compute_gradient_estimate(weights, jax.random.PRNGKey(20),
                                               state)
  assert float(metrics["mean||runs_restarted"]) == 1.0
  np.testing.assert_array_equal(out.unroll_state.problems.inner_step, [K, K])
  assert np.all(np.asarray(out.unroll_state.eps["log_lr"]) !=
                np.asarray(eps["log_lr"]))


def _run_estimates(est, theta, num_runs, seed=0):
  """Per inner run: its samples summed and scaled by K / RUN."""
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(seed))
  return _run_estimates_from(est, weights, state, num_runs, seed)


def _run_estimates_from(est, weights, state, num_runs, seed=0):
  theta = weights.theta
  runs = []
  for r in range(num_runs):
    total = {n: 0.0 for n in theta}
    for t in range(RUN // K):
      out, _ = est.compute_gradient_estimate(
          weights, jax.random.PRNGKey(1000 * seed + 10 * r + t), state)
      state = out.unroll_state
      for n in theta:
        total[n] += float(out.grad[n]) * K / RUN
    runs.append(total)
  return runs


@pytest.mark.parametrize("sigma, max_loss", [(SIGMA, 10.0), (0.5, 10.0)])
def test_sum_over_a_run_is_unbiased_for_the_full_horizon_smoothed_gradient(
    sigma, max_loss):
  """Gauss-Hermite reference of grad E_eps[L_30(theta + eps)].

  At sigma = 0.5 the full-horizon smoothed gradient differs from the
  per-truncation-resynchronized ES objective (what VariationalES estimates
  on the same schedule), so a wrong branch continuation fails here.
  """
  theta = fx.sgdm_theta()
  reference = fx.reference_smoothed_gradient(theta, sigma, RUN,
                                             max_loss=max_loss)
  runs = _run_estimates(_nres(num_tasks=256, sigma=sigma, max_loss=max_loss),
                        theta, num_runs=30)
  for name, ref in reference.items():
    values = np.array([r[name] for r in runs])
    stderr = values.std(ddof=1) / np.sqrt(len(values))
    print(f"sigma {sigma} {name}: NRES {values.mean():.5f} +- {stderr:.5f}, "
          f"reference {ref:.5f}")
    assert abs(values.mean() - ref) <= 4 * stderr + 1e-4 * abs(ref), name


def test_a_runs_samples_add_up_to_the_full_horizon_es_sample():
  """Exact, per run: K / T * sum_t g_t == ES sample of the whole T-step run.

  The reference evaluates L_T(theta +- eps_i) with the SGD+momentum
  definition (fx.reference_meta_loss), not with the unroll.
  """
  est = _nres(num_tasks=4, sigma=0.3)
  theta = fx.sgdm_theta()
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(3))
  eps = state.eps
  (run,) = _run_estimates_from(est, weights, state, num_runs=1)
  expected = {n: 0.0 for n in theta}
  for i in range(4):
    losses = [
        float(fx.reference_meta_loss(theta["log_lr"] + s * eps["log_lr"][i],
                                     theta["one_minus_momentum"] +
                                     s * eps["one_minus_momentum"][i], RUN))
        for s in (1, -1)
    ]
    for n in theta:
      expected[n] += ((losses[0] - losses[1]) / (2 * 0.3**2) *
                      float(eps[n][i]) / 4)
  for n in theta:
    np.testing.assert_allclose(run[n], expected[n], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["inf", "nan", "huge"])
def test_bad_samples_are_dropped_and_overflow_zeroed(kind):
  from test_finite_gradients import SIGMA as FSIGMA, N, _inject, _np_samples, _np_finite_mean  # pylint: disable=g-import-not-at-top
  losses, pair, eps, _, es_dropped, zeroed = _inject(kind)
  weight = np.ones(N, np.float32)
  grad, diag = estimators.noise_reuse_gradient(
      jax.numpy.asarray(losses), eps, FSIGMA, weight)
  _, es, _ = _np_samples(losses, pair, eps)
  want = _np_finite_mean(es)
  for k, v in want.items():
    got = np.asarray(grad[k], np.float64)
    assert np.all(np.isfinite(got)), (kind, k)
    ok = np.isfinite(v)
    if zeroed and k == zeroed[0]:
      ok[zeroed[1]] = False
      assert got[zeroed[1]] == 0.0
    np.testing.assert_allclose(got[ok], v[ok], rtol=2e-4, atol=1e-5)
  assert int(diag["es_nonfinite"]) == len(es_dropped)
  assert int(diag["overflow_zeroed"]) == (1 if zeroed else 0)
