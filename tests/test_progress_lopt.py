"""ProgressAdam: Adam with a learned learning-rate schedule over t / T.

The update is checked against a numpy implementation written from the
formulas in `pathology_fix/optimizers/progress_lopt.py`'s docstring, its initial theta
against LO's own Adam, and every estimator (ours and LO's) against the
gradient of the meta-loss computed by differentiating a direct unroll.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import estimator_fixtures as fx  # noqa: F401  (compat layer first)
from learned_optimization.optimizers import base as opt_base
from learned_optimization.outer_trainers import truncated_es
from learned_optimization.outer_trainers import truncated_grad
from learned_optimization.outer_trainers import truncated_pes
from learned_optimization.outer_trainers import truncation_schedule
from pathology_fix.meta_gradient import estimators
from pathology_fix.lo_boundary import lo_api
from pathology_fix.optimizers import progress_lopt

SHAPES = {"a": (3, 4), "b": (5,)}


def _params_and_grads(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  # Gradients of very different scales per step, as Adam normalizes them.
  grads = [{k: (rng.normal(size=s) * 10.0**rng.uniform(-3, 1)).astype(
      np.float32) for k, s in SHAPES.items()} for _ in range(num_steps)]
  return params, grads


def _random_theta(num_knots, seed=1):
  rng = np.random.default_rng(seed)
  return {"log_lr": jnp.asarray(rng.normal(0.0, 0.1, num_knots), jnp.float32),
          "beta1": jnp.asarray(0.05, jnp.float32),
          "beta2": jnp.asarray(-0.1, jnp.float32),
          "weight_decay": jnp.asarray(0.3, jnp.float32)}


def _numpy_reference(theta, params, grads, num_steps, knots, lr0=1e-2,
                     lr_scale=10.0, beta10=0.9, beta20=0.999, beta_scale=10.0,
                     wd_scale=1.0, eps=1e-8, eps_root=1e-8):
  """The module docstring's update, in float64 numpy; returns (w, m, v)."""
  s = np.asarray(theta["log_lr"], np.float64)
  q1 = np.clip((1 - beta10) * np.exp(beta_scale * float(theta["beta1"])),
               1e-5, 0.999)
  q2 = np.clip((1 - beta20) * np.exp(beta_scale * float(theta["beta2"])),
               1e-5, 0.999)
  b1, b2 = 1 - q1, 1 - q2
  lam = wd_scale * float(theta["weight_decay"])
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for t, g in enumerate(grads):
    p = min(max(t / num_steps, 0.0), 1.0)
    lr = lr0 * np.exp(np.clip(lr_scale * np.interp(p, knots, s), -20, 20))
    n = t + 1
    for k in w:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k].astype(np.float64)**2
      m_hat = m[k] / (1 - b1**n)
      v_hat = v[k] / (1 - b2**n)
      w[k] = w[k] - lr * (m_hat / (np.sqrt(v_hat + eps_root) + eps)
                          + lam * w[k])
  return w, m, v


def _run(lopt, theta, params, grads, num_steps):
  opt = lopt.opt_fn(theta)
  state = opt.init(params, num_steps=num_steps)
  update = jax.jit(lambda s, g: opt.update(s, g, loss=jnp.float32(0.0)))
  for g in grads:
    state = update(state, g)
  return state


@pytest.mark.parametrize("knots", [progress_lopt.DEFAULT_KNOTS,
                                   (0.0, 0.25, 0.6, 1.0)])
def test_updates_match_the_numpy_reference(knots):
  # T = 6 and 8 steps: the last two steps are past the run's end (p clamped).
  params, grads = _params_and_grads(8)
  theta = _random_theta(len(knots))
  lopt = progress_lopt.ProgressAdam(knots=knots)
  state = _run(lopt, theta, params, grads, num_steps=6)
  w, m, v = _numpy_reference(theta, params, grads, 6, knots)
  for k in SHAPES:
    np.testing.assert_allclose(state.params[k], w[k], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(state.m[k], m[k], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(state.v[k], v[k], rtol=2e-5, atol=1e-9)
  assert int(state.iteration) == 8
  # The schedule, betas and weight decay all moved the result away from Adam.
  adam, _, _ = _numpy_reference(lopt.init(jax.random.PRNGKey(0)), params,
                                grads, 6, knots)
  assert not np.allclose(w["a"], adam["a"], rtol=1e-3)


def test_non_default_scales_and_rates_match_the_numpy_reference():
  params, grads = _params_and_grads(5, seed=3)
  knots = (0.0, 1.0)
  cfg = dict(lr0=3e-3, lr_scale=2.0, beta10=0.5, beta20=0.99, beta_scale=3.0,
             wd_scale=0.5, eps=1e-6, eps_root=0.0)
  theta = _random_theta(2, seed=4)
  lopt = progress_lopt.ProgressAdam(
      initial_learning_rate=3e-3, knots=knots, lr_scale=2.0,
      initial_beta1=0.5, initial_beta2=0.99, beta_scale=3.0,
      weight_decay_scale=0.5, epsilon=1e-6, epsilon_root=0.0)
  state = _run(lopt, theta, params, grads, num_steps=4)
  w, _, _ = _numpy_reference(theta, params, grads, 4, knots, **cfg)
  for k in SHAPES:
    np.testing.assert_allclose(state.params[k], w[k], rtol=2e-5, atol=1e-6)


def test_initial_theta_is_los_adam_at_the_initial_rate():
  params, grads = _params_and_grads(30, seed=5)
  lopt = progress_lopt.ProgressAdam(initial_learning_rate=3e-2)
  theta = lopt.init(jax.random.PRNGKey(0))
  assert not any(np.any(x) for x in jax.tree_util.tree_leaves(theta))
  ours = _run(lopt, theta, params, grads, num_steps=30)
  adam = opt_base.Adam(3e-2)
  state = adam.init(params, num_steps=30)
  for g in grads:
    state = adam.update(state, g, loss=0.0)
  for k in SHAPES:
    np.testing.assert_allclose(ours.params[k], adam.get_params(state)[k],
                               rtol=1e-5, atol=1e-6)
  hp = lopt.hyperparameters(theta)
  np.testing.assert_allclose([hp["beta1"], hp["beta2"], hp["weight_decay"]],
                             [0.9, 0.999, 0.0], rtol=1e-6, atol=0)


def test_knot_weights_interpolate_linearly_between_knots():
  knots = (0.0, 0.05, 0.3, 0.31, 1.0)
  rng = np.random.default_rng(0)
  values = rng.normal(size=len(knots))
  for p in np.concatenate([rng.uniform(0, 1, 50), knots]):
    phi = np.asarray(progress_lopt.knot_weights(p, knots))
    assert np.all(phi >= 0) and abs(phi.sum() - 1) < 1e-6, (p, phi)
    assert np.count_nonzero(phi) <= 2
    np.testing.assert_allclose(phi @ values, np.interp(p, knots, values),
                               rtol=1e-5, atol=1e-6)
  # Outside [0, 1]: the end values.
  np.testing.assert_allclose(progress_lopt.knot_weights(-0.5, knots),
                             np.eye(len(knots))[0])
  np.testing.assert_allclose(progress_lopt.knot_weights(1.5, knots),
                             np.eye(len(knots))[-1])


def test_learning_rate_curve_can_express_warmup_and_decay():
  lopt = progress_lopt.ProgressAdam()
  theta = lopt.init(jax.random.PRNGKey(0))
  p = np.linspace(0, 1, 101)
  np.testing.assert_allclose(lopt.learning_rate(theta, p), 1e-2, rtol=1e-6)
  # Warmup from lr_0 / 10 to lr_0 at x_1, then cosine decay to about 0.
  x = np.asarray(lopt.knots)
  target = np.log(np.maximum(
      0.5 * (1 + np.cos(np.pi * np.clip((x - 0.05) / 0.95, 0, 1))), 1e-3))
  target[0] = np.log(0.1)
  theta = dict(theta, log_lr=jnp.asarray(target / 10.0, jnp.float32))
  lr = np.asarray(lopt.learning_rate(theta, x))
  np.testing.assert_allclose(lr, 1e-2 * np.exp(target), rtol=1e-5)
  curve = np.asarray(lopt.learning_rate(theta, p))
  assert np.argmax(curve) == 5 and curve[-1] < 1e-2 * 2e-3


def test_progress_comes_from_init_num_steps():
  params, grads = _params_and_grads(20, seed=6)
  lopt = progress_lopt.ProgressAdam()
  decaying = dict(lopt.init(jax.random.PRNGKey(0)),
                  log_lr=-jnp.linspace(0.0, 0.5, len(lopt.knots)))
  short = _run(lopt, decaying, params, grads, num_steps=10)
  long = _run(lopt, decaying, params, grads, num_steps=20)
  assert not np.allclose(short.params["a"], long.params["a"], rtol=1e-4)
  # The constructor's num_steps is the fallback when init gets none.
  fallback = progress_lopt.ProgressAdam(num_steps=10)
  opt = fallback.opt_fn(decaying)
  state = opt.init(params)
  assert float(state.num_steps) == 10.0
  state = opt.init(params, num_steps=20)  # init's value wins
  assert float(state.num_steps) == 20.0
  with pytest.raises(ValueError, match="num_steps"):
    lopt.opt_fn(decaying).init(params)
  with pytest.raises(ValueError, match="num_steps"):
    lopt.opt_fn(decaying).init(params, num_steps=0)


def test_traced_num_steps_gives_each_sample_its_own_progress():
  params, grads = _params_and_grads(12, seed=7)
  lopt = progress_lopt.ProgressAdam()
  theta = dict(lopt.init(jax.random.PRNGKey(0)),
               log_lr=-jnp.linspace(0.0, 0.5, len(lopt.knots)))
  opt = lopt.opt_fn(theta)

  @jax.jit
  @jax.vmap
  def run(num_steps):
    state = opt.init(params, num_steps=num_steps)
    for g in grads:
      state = opt.update(state, g, loss=0.0)
    return state.params

  both = run(jnp.asarray([6, 12]))
  for i, n in enumerate((6, 12)):
    alone = _run(lopt, theta, params, grads, num_steps=n)
    np.testing.assert_allclose(both["a"][i], alone.params["a"], rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("kwargs, name", [
    (dict(initial_learning_rate=0.0), "initial_learning_rate"),
    (dict(initial_learning_rate=float("nan")), "initial_learning_rate"),
    (dict(knots=(0.0,)), "knots"),
    (dict(knots=(0.1, 1.0)), "knots"),
    (dict(knots=(0.0, 0.5, 0.5, 1.0)), "knots"),
    (dict(knots="abc"), "knots"),
    (dict(lr_scale=-1.0), "lr_scale"),
    (dict(initial_beta1=1.0), "initial_beta1"),
    (dict(initial_beta2=-0.1), "initial_beta2"),
    (dict(beta_scale=0.0), "beta_scale"),
    (dict(weight_decay_scale=-1.0), "weight_decay_scale"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon_root=-1.0), "epsilon_root"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
])
def test_bad_constructor_values_name_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=rf"ProgressAdam\.{name} must"):
    progress_lopt.ProgressAdam(**kwargs)


# ------------------------------------------------------ every estimator

STEPS = 25  # p reaches 24 / 25: every default knot gets some weight
NUM_TASKS = 32


def _lopt():
  return progress_lopt.ProgressAdam(initial_learning_rate=0.05)


def _direct_meta_loss(theta):
  """Mean over the run of the fixed quadratic's loss before each step."""
  opt = _lopt().opt_fn(theta)
  state = opt.init({"w": jnp.asarray(fx.W0)}, num_steps=STEPS)
  total = 0.0
  for _ in range(STEPS):
    w = opt.get_params(state)["w"]
    loss = 0.5 * jnp.sum(fx.CURVATURE * w**2)
    total = total + loss
    state = opt.update(state, {"w": fx.CURVATURE * w}, loss=loss)
  return total / STEPS


def _ours(cls):
  return cls(fx.fixed_quadratic_family(), _lopt(),
             truncation_schedule.ConstantTruncationSchedule(STEPS),
             num_tasks=NUM_TASKS, unroll_length=STEPS, steps_per_jit=5,
             sigma=1e-3)


def _los(cls):
  kwargs = dict(trunc_sched=truncation_schedule.ConstantTruncationSchedule(
      STEPS), num_tasks=NUM_TASKS, steps_per_jit=5)
  if cls is truncated_pes.TruncatedPES:
    kwargs.update(trunc_length=STEPS, std=1e-3)
  else:
    kwargs["unroll_length"] = STEPS
    if cls is truncated_es.TruncatedES:
      kwargs["std"] = 1e-3
  return lo_api.build_lo_estimator(cls, fx.fixed_quadratic_family(), _lopt(),
                                   **kwargs)


ESTIMATORS = {
    "HybridRPES": lambda: _ours(estimators.HybridRPES),
    "VariationalRP": lambda: _ours(estimators.VariationalRP),
    "VariationalES": lambda: _ours(estimators.VariationalES),
    "NoiseReuseES": lambda: _ours(estimators.NoiseReuseES),
    "TruncatedGrad": lambda: _los(truncated_grad.TruncatedGrad),
    "TruncatedES": lambda: _los(truncated_es.TruncatedES),
    "TruncatedPES": lambda: _los(truncated_pes.TruncatedPES),
}
# Reverse-mode estimators see the exact gradient (up to sigma = 1e-3
# smoothing); ES-type ones a 32-pair estimate of it in 12 dimensions.
MIN_COSINE = {"HybridRPES": 0.99, "VariationalRP": 0.99, "TruncatedGrad": 0.99,
              "VariationalES": 0.5, "NoiseReuseES": 0.5, "TruncatedES": 0.5,
              "TruncatedPES": 0.5}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_gives_a_finite_gradient_along_the_true_one(name):
  """One whole-run truncation from fresh inner problems, at a non-zero theta."""
  lopt = _lopt()
  theta = dict(lopt.init(jax.random.PRNGKey(0)),
               log_lr=-jnp.linspace(0.0, 0.1, len(lopt.knots)),
               weight_decay=jnp.asarray(0.1, jnp.float32))
  exact = _flat(jax.grad(_direct_meta_loss)(theta))
  assert np.all(np.isfinite(exact)) and np.count_nonzero(exact) >= 10
  est = ESTIMATORS[name]()
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  out, _ = est.compute_gradient_estimate(weights, jax.random.PRNGKey(2), state)
  assert (jax.tree_util.tree_structure(out.grad)
          == jax.tree_util.tree_structure(theta))
  got = _flat(out.grad)
  assert np.all(np.isfinite(got)) and np.any(got != 0), got
  cosine = got @ exact / (np.linalg.norm(got) * np.linalg.norm(exact))
  assert cosine >= MIN_COSINE[name], (name, cosine, got, exact)
  if MIN_COSINE[name] > 0.9:
    np.testing.assert_allclose(got, exact, rtol=0.02,
                               atol=1e-3 * np.linalg.norm(exact))


def test_a_staggered_first_run_is_told_its_own_length():
  """With random_initial_iteration_offset, sample i's first run starts at
  step s_i of a T-step schedule: the optimizer must see T - s_i steps so its
  progress reaches 1 when the run ends, and later runs see T again."""
  est = estimators.VariationalRP(
      fx.fixed_quadratic_family(), _lopt(),
      truncation_schedule.ConstantTruncationSchedule(STEPS), num_tasks=8,
      unroll_length=5, steps_per_jit=5, sigma=1e-3,
      random_initial_iteration_offset=STEPS)
  theta = _lopt().init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(4))
  offsets = np.asarray(state.inner_step)
  assert len(set(offsets.tolist())) > 1  # really staggered
  told = np.asarray(state.inner_opt_state.num_steps)
  np.testing.assert_array_equal(told, STEPS - offsets)
  # Six truncations of 5 steps end every first run (at most 25 steps) and
  # start a second one, which is told the whole T.
  for i in range(STEPS // 5 + 1):
    out, _ = est.compute_gradient_estimate(weights, jax.random.PRNGKey(10 + i),
                                           state)
    state = out.unroll_state
  np.testing.assert_array_equal(np.asarray(state.inner_opt_state.num_steps),
                                STEPS)
