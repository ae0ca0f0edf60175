"""HybridRPES / VariationalRP / VariationalES against independent references."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import estimator_fixtures as fx
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.outer_trainers import truncated_grad
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import quadratics
from pathology_fix import estimators
from pathology_fix import lo_api
from pathology_fix import schedules
from pathology_fix import variational_lopt

SIGMA = 0.1
STEPS = 10


def _sgdm_estimator(cls, num_tasks=16):
  # Inner runs last one truncation, so every call starts a fresh problem.
  return cls(
      fx.fixed_quadratic_family(),
      lopt_base.LearnableSGDM(),
      truncation_schedule.ConstantTruncationSchedule(STEPS),
      num_tasks=num_tasks,
      unroll_length=STEPS,
      steps_per_jit=5,
      sigma=SIGMA)


def _gradient_draws(estimator, theta, num_draws, seed=0):
  weights = fx.worker_weights(theta)
  state = estimator.init_worker_state(weights, jax.random.PRNGKey(seed))
  draws = []
  for i in range(num_draws):
    out, _ = estimator.compute_gradient_estimate(
        weights, jax.random.PRNGKey(1000 * seed + i), state)
    state = out.unroll_state
    draws.append({k: float(v) for k, v in out.grad.items()})
  return draws


@pytest.mark.parametrize(
    "cls", [estimators.VariationalRP, estimators.VariationalES,
            estimators.HybridRPES])
def test_estimators_are_unbiased_for_the_smoothed_gradient(cls):
  theta = fx.sgdm_theta()
  reference = fx.reference_smoothed_gradient(theta, SIGMA, STEPS)
  draws = _gradient_draws(_sgdm_estimator(cls), theta, num_draws=40)
  for name, ref in reference.items():
    values = np.array([d[name] for d in draws])
    mean = values.mean()
    stderr = values.std(ddof=1) / np.sqrt(len(values))
    # 1e-4 relative: float32 round-off of the unroll, far below any bias.
    assert abs(mean - ref) <= 4 * stderr + 1e-4 * abs(ref), (
        f"{cls.__name__} {name}: mean {mean:.6g} vs reference {ref:.6g} "
        f"(stderr {stderr:.3g})")


def test_gradient_differs_from_unsmoothed_gradient():
  # Guards the reference above: smoothing must matter at this sigma.
  theta = fx.sgdm_theta()
  smoothed = fx.reference_smoothed_gradient(theta, SIGMA, STEPS)
  plain = jax.grad(fx.reference_meta_loss, argnums=(0, 1))(
      theta["log_lr"], theta["one_minus_momentum"], STEPS)
  assert abs(float(plain[0]) - smoothed["log_lr"]) > 1e-4


def _mlp_hybrid(mode_cls, num_tasks, unroll_length=20, steps_per_jit=10,
                family=None, sigma=SIGMA):
  return mode_cls(
      family or quadratics.FixedDimQuadraticFamilyData(4),
      mlp_lopt.MLPLOpt(),
      truncation_schedule.ConstantTruncationSchedule(200),
      num_tasks=num_tasks,
      unroll_length=unroll_length,
      steps_per_jit=steps_per_jit,
      sigma=sigma)


def test_chunked_reverse_pass_matches_direct_backprop():
  est = _mlp_hybrid(estimators.HybridRPES, num_tasks=3, unroll_length=20,
                    steps_per_jit=5)
  unroller = est.unroller
  theta = mlp_lopt.MLPLOpt().init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  eps = est._sample_eps(jax.random.PRNGKey(2), theta, SIGMA, num_samples=3)
  datas = []
  unroller._chunk_data = lambda real=unroller._chunk_data: datas.append(
      real()) or datas[-1]
  out = unroller.unroll(theta, eps, state, jax.random.PRNGKey(3), 20, True)

  # Same data and keys, differentiated in one piece without rematerialization.
  from pathology_fix import variational  # pylint: disable=g-import-not-at-top

  def total_loss(theta_pair):
    states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]),
                                    state.inner_opt_state)
    total = 0.
    for c in range(4):
      active = np.ones((5, 3), bool)
      states, t = unroller._chunk(theta_pair, states, state.task_param,
                                  datas[c], unroller._chunk_keys(
                                      jax.random.PRNGKey(3), c), active)
      total = total + t
    return jnp.sum(total / 20.), total / 20.

  pair = variational.antithetic_thetas(theta, eps)
  (_, losses), direct = jax.value_and_grad(total_loss, has_aux=True)(pair)
  np.testing.assert_allclose(out.losses, losses, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(out.rp_grads),
                  jax.tree_util.tree_leaves(direct)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


def test_antithetic_unrolls_share_data_and_randomness():
  est = _mlp_hybrid(estimators.HybridRPES, num_tasks=4)
  theta = mlp_lopt.MLPLOpt().init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  zeros = jax.tree_util.tree_map(lambda t: jnp.zeros((4,) + t.shape), theta)
  out = est.unroller.unroll(theta, zeros, state, jax.random.PRNGKey(2), 20,
                            with_rp_grads=False)
  np.testing.assert_array_equal(out.losses[0], out.losses[1])
  for leaf in jax.tree_util.tree_leaves(out.final_opt_states):
    np.testing.assert_array_equal(leaf[0], leaf[1])
  # The same call with real perturbations does separate the two branches.
  eps = est._sample_eps(jax.random.PRNGKey(3), theta, SIGMA, num_samples=4)
  out = est.unroller.unroll(theta, eps, state, jax.random.PRNGKey(2), 20,
                            with_rp_grads=False)
  assert np.all(np.asarray(out.losses[0]) != np.asarray(out.losses[1]))


def test_next_state_continues_from_positive_branch_and_resets_at_the_end():
  family = quadratics.FixedDimQuadraticFamilyData(4)
  est = estimators.HybridRPES(
      family, mlp_lopt.MLPLOpt(),
      truncation_schedule.ConstantTruncationSchedule(30),
      num_tasks=2, unroll_length=20, steps_per_jit=10)
  theta = mlp_lopt.MLPLOpt().init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  out, metrics = est.compute_gradient_estimate(weights, jax.random.PRNGKey(2),
                                               state)
  np.testing.assert_array_equal(out.unroll_state.inner_step, [20, 20])
  # Second truncation is clipped to the 10 steps left in the 30-step run.
  out, metrics = est.compute_gradient_estimate(weights, jax.random.PRNGKey(3),
                                               out.unroll_state)
  assert float(metrics["mean||truncation_length"]) == 10
  np.testing.assert_array_equal(out.unroll_state.inner_step, [30, 30])
  assert float(metrics["mean||inner_runs_finished"]) == 1.0
  # Third starts new inner problems.
  out, _ = est.compute_gradient_estimate(weights, jax.random.PRNGKey(4),
                                         out.unroll_state)
  np.testing.assert_array_equal(out.unroll_state.inner_step, [20, 20])


def test_merged_variance_is_at_most_the_better_estimator():
  """Repeated draws from one state: per-coordinate variance of each estimator."""
  est = _mlp_hybrid(estimators.HybridRPES, num_tasks=16)
  theta = mlp_lopt.MLPLOpt().init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  grads = {mode: [] for mode in estimators.MODES}
  for i in range(40):
    key_eps, key_unroll = jax.random.split(jax.random.PRNGKey(100 + i))
    eps = est._sample_eps(key_eps, theta, SIGMA, num_samples=16)
    out = est.unroller.unroll(theta, eps, state, key_unroll, 20, True)
    for mode in estimators.MODES:
      g, _ = estimators.combine_samples(out.losses, out.rp_grads, eps, SIGMA,
                                        mode=mode)
      grads[mode].append(
          np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
  var = {m: np.var(np.stack(v), axis=0, ddof=1) for m, v in grads.items()}
  informative = np.minimum(var["rp"], var["es"]) > 0
  ratio = var["hybrid"][informative] / np.minimum(var["rp"],
                                                  var["es"])[informative]
  fraction = float(np.mean(ratio <= 1.2))
  print(f"fraction of coordinates with var(hybrid) <= 1.2 min(var rp, var es):"
        f" {fraction:.3f} of {ratio.size}")
  assert fraction >= 0.8


def test_truncated_grad_on_variational_lopt_matches_variational_rp():
  """LO's own TruncatedGrad on the wrapped optimizer estimates the same L~ grad."""
  theta = fx.sgdm_theta()
  weights = fx.worker_weights(theta)
  wrapped = variational_lopt.VariationalLearnedOptimizer(
      lopt_base.LearnableSGDM(), sigma=SIGMA)
  lo_estimator = lo_api.build_lo_estimator(
      truncated_grad.TruncatedGrad, fx.fixed_quadratic_family(), wrapped,
      trunc_sched=truncation_schedule.ConstantTruncationSchedule(STEPS),
      num_tasks=64, unroll_length=STEPS, steps_per_jit=5)
  lo_draws = []
  for i in range(40):
    # Fresh inner problems (and eps) each draw: one truncation = one run.
    state = lo_estimator.init_worker_state(weights, jax.random.PRNGKey(i))
    out, _ = lo_estimator.compute_gradient_estimate(
        weights, jax.random.PRNGKey(10_000 + i), state)
    lo_draws.append({k: float(v) for k, v in out.grad.items()})
  ours = _gradient_draws(
      _sgdm_estimator(estimators.VariationalRP), theta, num_draws=40, seed=7)
  for name in theta:
    a = np.array([d[name] for d in lo_draws])
    b = np.array([d[name] for d in ours])
    stderr = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) <= 4 * stderr + 1e-4 * abs(b.mean()), (
        name, a.mean(), b.mean(), stderr)
  # Both also match the independent reference, which is far (in standard
  # errors) from the unsmoothed gradient: an unperturbed wrapper would fail.
  reference = fx.reference_smoothed_gradient(theta, SIGMA, STEPS)
  plain = jax.grad(fx.reference_meta_loss, argnums=0)(
      theta["log_lr"], theta["one_minus_momentum"], STEPS)
  a = np.array([d["log_lr"] for d in lo_draws])
  stderr = a.std(ddof=1) / np.sqrt(len(a))
  assert abs(a.mean() - reference["log_lr"]) <= 4 * stderr
  assert abs(float(plain) - reference["log_lr"]) > 4 * stderr


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_tasks=1), "num_tasks"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=-1.0), "sigma"),
    (dict(unroll_length=15, steps_per_jit=10), "unroll_length"),
    (dict(max_loss=0.0), "max_loss"),
    (dict(meta_loss_split="test"), "meta_loss_split"),
    (dict(truncation_length=schedules.LinearTruncationCurriculum(
        k_min=100, k_max=10)), "k_min"),
])
def test_bad_config_names_the_parameter(kwargs, match):
  base = dict(num_tasks=4, unroll_length=20, steps_per_jit=10)
  base.update(kwargs)
  with pytest.raises(ValueError, match=match):
    estimators.HybridRPES(
        quadratics.FixedDimQuadraticFamily(4), mlp_lopt.MLPLOpt(),
        truncation_schedule.ConstantTruncationSchedule(100), **base)


def test_curriculum_lengths_in_the_estimator():
  est = estimators.HybridRPES(
      quadratics.FixedDimQuadraticFamily(4), mlp_lopt.MLPLOpt(),
      truncation_schedule.ConstantTruncationSchedule(10_000), num_tasks=2,
      steps_per_jit=10,
      truncation_length=schedules.LinearTruncationCurriculum(
          k_min=50, k_max=1000, num_iterations=100))
  for outer_iteration, mean in [(0, 50), (50, 525), (100, 1000), (500, 1000)]:
    ks = np.array([
        est.draw_truncation_length(jax.random.PRNGKey(i), outer_iteration,
                                   steps_left=10_000) for i in range(200)
    ])
    assert np.all(ks % 10 == 0)
    assert np.all(ks >= 10 * np.floor(0.8 * mean / 10 + 0.5) - 10)
    assert np.all(ks <= 10 * np.floor(1.2 * mean / 10 + 0.5))
    assert abs(ks.mean() - mean) < 0.05 * mean + 5
    clipped = est.draw_truncation_length(jax.random.PRNGKey(0), outer_iteration,
                                         steps_left=7)
    assert clipped == 7
