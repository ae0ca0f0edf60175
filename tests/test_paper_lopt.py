"""PaperMLPLOpt: feature math against numpy written from the paper's text."""

import gin
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import pathology_fix  # noqa: F401  (applies the compatibility layer first)
from learned_optimization.optimizers import base as opt_base  # pylint: disable=g-bad-import-order
from learned_optimization.outer_trainers import gradient_learner
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import quadratics
from pathology_fix.meta_gradient import estimators
from pathology_fix.optimizers import paper_lopt

DECAYS = np.array([0.5, 0.9, 0.99, 0.999, 0.9999])
GRADIENT_COLUMN = 20  # after m (5), v (5), 1/sqrt(v+eps) (5), m/sqrt (5)


def _np_normalize(x):
  return x / np.sqrt(np.mean(x**2, axis=0, keepdims=True) + 1e-5)


def _np_features(w, g, m, v, t, eps=1e-8):
  """The paper's 31 inputs per parameter, from its description (float64)."""
  n = w.size
  m, v = m.reshape(n, 5), v.reshape(n, 5)
  tensor = np.concatenate([m, v, 1 / np.sqrt(v + eps), m / np.sqrt(v + eps),
                           g.reshape(n, 1), w.reshape(n, 1)], axis=1)
  etas = 3.0 * 10.0**(5.0 * np.arange(9) / 8.0)  # 3 .. 300,000, log-spaced
  time = np.tile(np.tanh(t / etas - 1.0), (n, 1))
  return np.concatenate([_np_normalize(tensor), time], axis=1)


def _np_train(theta, params, grads, step_mult=1e-3, exp_mult=1e-3):
  """Runs the optimizer's definition over a list of gradient trees."""
  theta = {k: np.asarray(v, np.float64) for k, v in theta.items()}
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros(p.shape + (5,)) for k, p in params.items()}
  v = {k: np.zeros(p.shape + (5,)) for k, p in params.items()}
  for t, grad in enumerate(grads):
    for k in params:
      g = np.asarray(grad[k], np.float64)
      m[k] = DECAYS * m[k] + (1 - DECAYS) * g[..., None]
      v[k] = DECAYS * v[k] + (1 - DECAYS) * g[..., None]**2
      x = _np_features(params[k], g, m[k], v[k], t)
      hidden = np.maximum(x @ theta["w1"] + theta["b1"], 0)
      out = hidden @ theta["w2"] + theta["b2"]
      step = step_mult * out[:, 0] * np.exp(exp_mult * out[:, 1])
      params[k] = params[k] - step.reshape(params[k].shape)
  return params


def test_timescales_and_time_features_follow_the_formula():
  np.testing.assert_allclose(paper_lopt.PAPER_TIMESCALES,
                             3.0 * 10.0**(5.0 * np.arange(9) / 8.0), rtol=1e-12)
  for t in (0, 1, 7, 250, 12_345):
    etas = 3.0 * 10.0**(5.0 * np.arange(9) / 8.0)
    np.testing.assert_allclose(
        paper_lopt.time_features(jnp.int32(t), paper_lopt.PAPER_TIMESCALES),
        np.tanh(t / etas - 1.0), rtol=1e-5, atol=1e-6)


def test_rms_normalize_matches_numpy_and_gives_unit_rms():
  x = np.random.default_rng(0).normal(size=(50, 4)) * [1e3, 1.0, 1e-1, 10.0]
  got = np.asarray(paper_lopt.rms_normalize(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, _np_normalize(x), rtol=1e-5)
  # eps 1e-5 only matters when the mean square is near it.
  np.testing.assert_allclose(np.sqrt(np.mean(got**2, axis=0))[[0, 1, 3]], 1.0,
                             rtol=1e-4)


def test_accumulators_match_a_numpy_loop():
  rng = np.random.default_rng(1)
  grads = rng.normal(size=(30, 3, 2))
  m = jnp.zeros((3, 2, 5))
  v = jnp.zeros((3, 2, 5))
  ref_m, ref_v = np.zeros((3, 2, 5)), np.zeros((3, 2, 5))
  for g in grads:
    m, v = paper_lopt.update_moments(m, v, jnp.asarray(g, jnp.float32),
                                     jnp.asarray(DECAYS, jnp.float32))
    for j, b in enumerate(DECAYS):
      ref_m[..., j] = b * ref_m[..., j] + (1 - b) * g
      ref_v[..., j] = b * ref_v[..., j] + (1 - b) * g * g
  # float32 1 - 0.9999 is off by 1.7e-4 relative, hence rtol 5e-4.
  np.testing.assert_allclose(m, ref_m, rtol=5e-4, atol=1e-7)
  np.testing.assert_allclose(v, ref_v, rtol=5e-4, atol=1e-7)


def test_paper_features_match_numpy():
  rng = np.random.default_rng(2)
  w, g = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) * 1e-2
  m = rng.normal(size=(4, 3, 5)) * 1e-2
  v = rng.uniform(1e-6, 1e-3, size=(4, 3, 5))
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  got = paper_lopt.paper_features(as32(w), as32(g), as32(m), as32(v), 17)
  assert got.shape == (12, 31)
  np.testing.assert_allclose(got, _np_features(w, g, m, v, 17), rtol=2e-4,
                             atol=1e-5)


def test_update_matches_the_definition_over_several_steps():
  """Folded first layer == the explicit 31-feature MLP (scalar leaf too)."""
  lopt = paper_lopt.PaperMLPLOpt()
  theta = lopt.init(jax.random.PRNGKey(0))
  theta = dict(theta, b1=jnp.linspace(-0.5, 0.5, 32),
               b2=jnp.asarray([0.3, -2.0]))
  rng = np.random.default_rng(3)
  params = {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "scale": jnp.asarray(1.5, jnp.float32)}
  grads = [{"kernel": rng.normal(size=(5, 4)) * 0.1,
            "scale": rng.normal() * 0.1} for _ in range(6)]
  opt = lopt.opt_fn(theta)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for grad in grads:
    state = update(state, jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float32), grad), loss=0.0)
  reference = _np_train(theta, params, grads)
  got = opt.get_params(state)
  assert int(state.iteration) == len(grads)
  for k in params:
    assert got[k].shape == params[k].shape and got[k].dtype == jnp.float32
    np.testing.assert_allclose(got[k], reference[k], rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(got[k] - params[k])) > 1e-4  # the steps were taken


def _gradient_descent_theta(lopt, scale):
  """o_dir = scale * (RMS-normalized gradient), o_mag = 0."""
  theta = jax.tree_util.tree_map(jnp.zeros_like,
                                 lopt.init(jax.random.PRNGKey(0)))
  w1 = theta["w1"].at[GRADIENT_COLUMN, 0].set(1.0)
  w1 = w1.at[GRADIENT_COLUMN, 1].set(-1.0)  # relu(g) - relu(-g) = g
  w2 = theta["w2"].at[0, 0].set(scale).at[1, 0].set(-scale)
  return dict(theta, w1=w1, w2=w2)


@pytest.mark.parametrize("scale, lowers", [(10.0, True), (-10.0, False)])
def test_hand_set_theta_descends_a_quadratic(scale, lowers):
  family = quadratics.FixedDimQuadraticFamily(10)
  task = family.task_fn(family.sample(jax.random.PRNGKey(0)))
  params = task.init(jax.random.PRNGKey(1))
  lopt = paper_lopt.PaperMLPLOpt()
  opt = lopt.opt_fn(_gradient_descent_theta(lopt, scale))

  def step(state, _):
    loss, grad = jax.value_and_grad(task.loss)(opt.get_params(state), None,
                                               None)
    return opt.update(state, grad, loss=loss), loss

  state, _ = jax.lax.scan(step, opt.init(params), None, length=100)
  before = float(task.loss(params, None, None))
  after = float(task.loss(opt.get_params(state), None, None))
  if lowers:
    assert after < 0.3 * before, (before, after)
  else:  # the negated theta ascends: the test can tell the sign apart
    assert after > before, (before, after)


def test_one_hybrid_rpes_outer_step_on_quadratics():
  lopt = paper_lopt.PaperMLPLOpt()
  estimator = estimators.HybridRPES(
      quadratics.FixedDimQuadraticFamily(10), lopt,
      truncation_schedule.ConstantTruncationSchedule(40),
      num_tasks=5, unroll_length=5, steps_per_jit=5,
      max_loss=1e4)  # these quadratics start near 20: the default 10 clips
  learner = gradient_learner.SingleMachineGradientLearner(
      lopt, [estimator], opt_base.Adam(1e-2))
  state = learner.init(jax.random.PRNGKey(0))
  theta = learner.get_lopt_params(state)
  weights = learner.gradient_learner.get_state_for_worker(
      state.gradient_learner_state)
  out, _ = estimator.compute_gradient_estimate(
      weights, jax.random.PRNGKey(1), state.gradient_estimator_states[0])
  assert (jax.tree_util.tree_structure(out.grad) ==
          jax.tree_util.tree_structure(theta))
  for g, t in zip(jax.tree_util.tree_leaves(out.grad),
                  jax.tree_util.tree_leaves(theta)):
    assert g.shape == t.shape and np.all(np.isfinite(g))
  assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(out.grad))

  state, loss, _ = learner.update(state, jax.random.PRNGKey(2))
  new_theta = learner.get_lopt_params(state)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(x))
             for x in jax.tree_util.tree_leaves(new_theta))
  assert any(np.any(a != b) for a, b in zip(
      jax.tree_util.tree_leaves(new_theta), jax.tree_util.tree_leaves(theta)))


def test_gin_configures_the_architecture():
  gin.clear_config()
  try:
    gin.parse_config(["PaperMLPLOpt.hidden_size = 8",
                      "PaperMLPLOpt.decays = (0.9, 0.99)"])
    lopt = paper_lopt.PaperMLPLOpt()
  finally:
    gin.clear_config()
  theta = lopt.init(jax.random.PRNGKey(0))
  assert theta["w1"].shape == (4 * 2 + 2 + 9, 8)
  assert theta["w2"].shape == (8, 2)
  defaults = paper_lopt.PaperMLPLOpt()
  assert (defaults.step_mult, defaults.exp_mult, defaults.hidden_size,
          defaults.num_inputs) == (1e-3, 1e-3, 32, 31)


@pytest.mark.parametrize("kwargs, name", [
    (dict(step_mult=0.0), "step_mult"),
    (dict(exp_mult=-1.0), "exp_mult"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(decays=(0.9, 1.0)), "decays"),
    (dict(decays=()), "decays"),
    (dict(timescales=(3.0, -1.0)), "timescales"),
    (dict(moment_eps=float("nan")), "moment_eps"),
])
def test_bad_config_names_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=f"PaperMLPLOpt.{name}"):
    paper_lopt.PaperMLPLOpt(**kwargs)
