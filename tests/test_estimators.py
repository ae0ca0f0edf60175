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
from pathology_fix.meta_gradient import estimators
from pathology_fix.lo_boundary import lo_api
from pathology_fix.meta_gradient import schedules
from pathology_fix.optimizers import variational_lopt

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


@pytest.mark.parametrize(
    "cls", [estimators.VariationalES, estimators.VariationalRP,
            estimators.HybridRPES])
def test_estimates_the_smoothed_not_the_plain_gradient(cls):
  """The mean matches grad L~, and is many standard errors from grad L.

  At SIGMA = 0.1 the smoothed and plain gradients of this problem differ by
  far less than a standard error, so the unbiasedness test above cannot tell
  them apart. Here sigma = 0.5 separates them (log_lr: -0.146 vs -0.128)
  while the per-step clip at max_loss = 10 keeps the Gauss-Hermite reference
  exact (no divergent tail); 1024 samples per draw make the standard errors
  about 0.001.
  """
  sigma, max_loss = 0.5, 10.0
  theta = fx.sgdm_theta()
  smoothed = fx.reference_smoothed_gradient(theta, sigma, STEPS,
                                            max_loss=max_loss)
  plain = jax.grad(fx.reference_meta_loss, argnums=(0, 1))(
      theta["log_lr"], theta["one_minus_momentum"], STEPS, max_loss)
  estimator = cls(
      fx.fixed_quadratic_family(), lopt_base.LearnableSGDM(),
      truncation_schedule.ConstantTruncationSchedule(STEPS), num_tasks=1024,
      unroll_length=STEPS, steps_per_jit=5, sigma=sigma, max_loss=max_loss)
  draws = _gradient_draws(estimator, theta, num_draws=40)
  for name, plain_value in zip(("log_lr", "one_minus_momentum"), plain):
    values = np.array([d[name] for d in draws])
    stderr = values.std(ddof=1) / np.sqrt(len(values))
    gap = abs(float(plain_value) - smoothed[name]) / stderr
    print(f"{name}: {cls.__name__} {values.mean():.5f} +- {stderr:.5f}, smoothed "
          f"{smoothed[name]:.5f}, plain {float(plain_value):.5f} ({gap:.1f} SE)")
    assert abs(values.mean() - smoothed[name]) <= 4 * stderr, name
    assert gap >= 6, name
    assert abs(values.mean() - float(plain_value)) >= 4 * stderr, name


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
  est = _mlp_hybrid(estimators.HybridRPES, num_tasks=5, unroll_length=20,
                    steps_per_jit=5, family=fx.seeded_quadratic_family(4))
  theta = mlp_lopt.MLPLOpt().init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  eps = est.perturbations(jax.random.PRNGKey(2), theta)
  losses, grads, _ = est.unroller.truncate(theta, eps, state,
                                           jax.random.PRNGKey(3), 20)
  # The same batches, from a twin family, and the same keys, differentiated
  # in one piece through InnerProblems.chunk without the chunked VJP.
  problems = est.unroller.problems
  twin = _mlp_hybrid(estimators.HybridRPES, num_tasks=5, unroll_length=20,
                     steps_per_jit=5, family=fx.seeded_quadratic_family(4))
  datas = [twin.unroller.problems.chunk_data() for _ in range(4)]
  from pathology_fix_core import variational  # pylint: disable=g-import-not-at-top

  def total_loss(theta_pair):
    states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]),
                                    state.inner_opt_state)
    total = 0.
    for c in range(4):
      active = np.ones((5, 5), bool)
      states, t = problems.chunk(theta_pair, states, state.task_param,
                                 datas[c], problems.chunk_keys(
                                     jax.random.PRNGKey(3), c), active)
      total = total + t
    return jnp.sum(total / 20.), total / 20.

  pair = variational.antithetic_thetas(theta, eps)
  (_, direct_losses), direct = jax.value_and_grad(total_loss,
                                                  has_aux=True)(pair)
  np.testing.assert_allclose(losses, direct_losses, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads),
                  jax.tree_util.tree_leaves(direct)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


def test_antithetic_unrolls_share_data_and_randomness():
  est = _mlp_hybrid(estimators.VariationalRP, num_tasks=4)
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
  eps = est.perturbations(jax.random.PRNGKey(3), theta)
  out = est.unroller.unroll(theta, eps, state, jax.random.PRNGKey(2), 20,
                            with_rp_grads=False)
  assert np.all(np.asarray(out.losses[0]) != np.asarray(out.losses[1]))


def _sgdm_params_after(theta, num_steps, w=fx.W0, m=None):
  """(w, momentum) after `num_steps` SGD+momentum steps on the fixed quadratic.

  Written from the optimizer's definition (see fx.reference_meta_loss).
  """
  lr = np.exp(float(theta["log_lr"]))
  mu = 1.0 - np.exp(float(theta["one_minus_momentum"]))
  w = np.asarray(w, np.float64)
  m = np.zeros_like(w) if m is None else m
  for _ in range(num_steps):
    m = fx.CURVATURE * w + mu * m
    w = w - lr * m
  return w, m


def _inner_params(est, theta, state):
  opt = est.learned_opt.opt_fn(theta)
  return np.asarray(jax.vmap(opt.get_params)(state.inner_opt_state)["w"])


def _shifted(theta, eps, i, sign):
  return {k: theta[k] + sign * eps[k][i] for k in theta}


def test_next_state_continues_from_positive_branch_and_resets_at_the_end():
  # 30-step inner runs, truncations of 20: 20 steps, then the 10 left, then a
  # reset. Fixed start and no data: the inner trajectory is known exactly.
  # The unroll is every variant's; VariationalRP keeps two samples legal.
  est = estimators.VariationalRP(
      fx.fixed_quadratic_family(), lopt_base.LearnableSGDM(),
      truncation_schedule.ConstantTruncationSchedule(30),
      num_tasks=2, unroll_length=20, steps_per_jit=10, sigma=SIGMA)
  theta = fx.sgdm_theta()
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  keys = [jax.random.PRNGKey(2), jax.random.PRNGKey(3)]
  eps = [est.perturbations(k, theta) for k in keys]
  out, _ = est.compute_gradient_estimate(weights, keys[0], state)
  np.testing.assert_array_equal(out.unroll_state.inner_step, [20, 20])
  got = _inner_params(est, theta, out.unroll_state)
  momenta = []
  for i in range(2):
    plus, m = _sgdm_params_after(_shifted(theta, eps[0], i, +1), 20)
    momenta.append((plus, m))
    np.testing.assert_allclose(got[i], plus, rtol=1e-4)
    # theta and theta - eps end elsewhere, by far more than the tolerance.
    for sign in (0, -1):
      other, _ = _sgdm_params_after(_shifted(theta, eps[0], i, sign), 20)
      assert np.max(np.abs(other - plus) / np.abs(plus)) > 1e-2

  # Second truncation: clipped to the 10 steps left, with a FRESH eps
  # (one eps per truncation, not per inner run).
  out, metrics = est.compute_gradient_estimate(weights, keys[1],
                                               out.unroll_state)
  assert float(metrics["mean||truncation_length"]) == 10
  np.testing.assert_array_equal(out.unroll_state.inner_step, [30, 30])
  assert float(metrics["mean||inner_runs_finished"]) == 1.0
  got = _inner_params(est, theta, out.unroll_state)
  for i in range(2):
    assert np.all(np.asarray(eps[1]["log_lr"][i]) !=
                  np.asarray(eps[0]["log_lr"][i]))
    w, m = momenta[i]
    fresh, _ = _sgdm_params_after(_shifted(theta, eps[1], i, +1), 10, w, m)
    kept, _ = _sgdm_params_after(_shifted(theta, eps[0], i, +1), 10, w, m)
    np.testing.assert_allclose(got[i], fresh, rtol=1e-4)
    assert np.max(np.abs(kept - fresh) / np.abs(fresh)) > 1e-2

  # Third starts new inner problems.
  out, _ = est.compute_gradient_estimate(weights, jax.random.PRNGKey(4),
                                         out.unroll_state)
  np.testing.assert_array_equal(out.unroll_state.inner_step, [20, 20])


def test_variational_lopt_keeps_one_eps_for_the_whole_inner_run():
  """The wrapper's objective: eps drawn at init, kept across truncations."""
  theta = fx.sgdm_theta()
  weights = fx.worker_weights(theta)
  wrapped = variational_lopt.VariationalLearnedOptimizer(
      lopt_base.LearnableSGDM(), sigma=SIGMA)
  lo_estimator = truncated_grad.TruncatedGrad(
      fx.fixed_quadratic_family(), wrapped,
      truncation_schedule.ConstantTruncationSchedule(30),
      num_tasks=2, unroll_length=10, steps_per_jit=5)
  state = lo_estimator.init_worker_state(weights, jax.random.PRNGKey(0))
  eps = state.inner_opt_state.eps
  for i in range(2):  # two truncations of the same 30-step inner run
    out, _ = lo_estimator.compute_gradient_estimate(
        weights, jax.random.PRNGKey(10 + i), state)
    state = out.unroll_state
    for a, b in zip(jax.tree_util.tree_leaves(eps),
                    jax.tree_util.tree_leaves(state.inner_opt_state.eps)):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(state.inner_step, [20, 20])
  opt = lopt_base.LearnableSGDM().opt_fn(theta)
  got = np.asarray(jax.vmap(opt.get_params)(
      state.inner_opt_state.inner_opt_state)["w"])
  for i in range(2):
    expected, _ = _sgdm_params_after(_shifted(theta, eps, i, +1), 20)
    np.testing.assert_allclose(got[i], expected, rtol=1e-4)


def test_merged_variance_is_at_most_the_better_estimator():
  """Repeated draws from one state: per-coordinate variance of each estimator."""
  est = _mlp_hybrid(estimators.HybridRPES, num_tasks=16)
  theta = mlp_lopt.MLPLOpt().init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  grads = {mode: [] for mode in estimators.MERGES}
  for i in range(40):
    key_eps, key_unroll = jax.random.split(jax.random.PRNGKey(100 + i))
    eps = est.perturbations(key_eps, theta)
    out = est.unroller.unroll(theta, eps, state, key_unroll, 20, True)
    for mode in estimators.MERGES:
      g, _ = estimators.combine_samples(out.losses, out.rp_grads, eps, SIGMA,
                                        merge_fn=estimators.MERGES[mode])
      grads[mode].append(
          np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
  var = {m: np.var(np.stack(v), axis=0, ddof=1) for m, v in grads.items()}
  informative = np.minimum(var["rp"], var["es"]) > 0
  ratio = var["hybrid"][informative] / np.minimum(var["rp"],
                                                  var["es"])[informative]
  fraction = float(np.mean(ratio <= 1.2))
  total = {m: float(v.sum()) for m, v in var.items()}
  print(f"fraction of coordinates with var(hybrid) <= 1.2 min(var rp, var es):"
        f" {fraction:.3f} of {ratio.size}; total variance hybrid / better "
        f"{total['hybrid'] / min(total['rp'], total['es']):.3f}")
  assert fraction >= 0.8
  # Over all coordinates together: the merge costs at most 10% over the
  # better estimator (a few noisy coordinates can dominate a total).
  assert total["hybrid"] <= 1.1 * min(total["rp"], total["es"])


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
  base = dict(num_tasks=5, unroll_length=20, steps_per_jit=10)
  base.update(kwargs)
  with pytest.raises(ValueError, match=match):
    estimators.HybridRPES(
        quadratics.FixedDimQuadraticFamily(4), mlp_lopt.MLPLOpt(),
        truncation_schedule.ConstantTruncationSchedule(100), **base)


def test_curriculum_lengths_in_the_estimator():
  est = estimators.HybridRPES(
      quadratics.FixedDimQuadraticFamily(4), mlp_lopt.MLPLOpt(),
      truncation_schedule.ConstantTruncationSchedule(10_000), num_tasks=5,
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
