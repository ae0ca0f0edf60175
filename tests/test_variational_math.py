"""Statistical and algebraic properties of pathology_fix_core.variational."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathology_fix_core import variational as var


def _theta():
  return {
      "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7.0,
      "b": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32),
      "c": jnp.zeros((4,), jnp.float32),  # same shape as "b": must differ
      "h": jnp.ones((2,), jnp.bfloat16),
  }


def test_perturbation_shapes_dtypes_and_determinism():
  theta = _theta()
  key = jax.random.PRNGKey(0)
  eps = var.sample_perturbation(key, theta, 0.1)
  assert jax.tree_util.tree_structure(eps) == jax.tree_util.tree_structure(
      theta)
  for e, t in zip(jax.tree_util.tree_leaves(eps),
                  jax.tree_util.tree_leaves(theta)):
    assert e.shape == t.shape and e.dtype == t.dtype
  again = var.sample_perturbation(key, theta, 0.1)
  for a, b in zip(jax.tree_util.tree_leaves(eps),
                  jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)
  other = var.sample_perturbation(jax.random.PRNGKey(1), theta, 0.1)
  assert not np.allclose(eps["w"], other["w"])
  # Leaves of equal shape get independent keys.
  assert not np.allclose(eps["b"], eps["c"])


@pytest.mark.parametrize("sigma", [0.01, 0.1, 2.0])
def test_perturbations_mean_zero_std_sigma(sigma):
  theta = {k: v for k, v in _theta().items() if k != "h"}
  n = 4000
  eps = jax.jit(var.sample_perturbations, static_argnums=3)(
      jax.random.PRNGKey(42), theta, sigma, n)
  for name, leaf in eps.items():
    leaf = np.asarray(leaf, dtype=np.float64)
    assert leaf.shape == (n,) + theta[name].shape
    # Per-coordinate mean within 5 standard errors of 0.
    se = sigma / np.sqrt(n)
    assert np.all(np.abs(leaf.mean(axis=0)) < 5 * se), name
    # Std of a Gaussian estimated from n draws: relative SE ~ 1/sqrt(2n).
    std = leaf.std(axis=0, ddof=1)
    assert np.all(np.abs(std / sigma - 1) < 5 / np.sqrt(2 * n)), name
    assert eps[name].dtype == theta[name].dtype
  # Samples are independent across the sample axis and across leaves.
  flat_b = np.asarray(eps["b"]).ravel()
  flat_c = np.asarray(eps["c"]).ravel()
  corr = np.corrcoef(flat_b, flat_c)[0, 1]
  assert abs(corr) < 5 / np.sqrt(flat_b.size)
  rows = np.asarray(eps["w"]).reshape(n, -1)
  lag1 = np.corrcoef(rows[:-1].ravel(), rows[1:].ravel())[0, 1]
  assert abs(lag1) < 5 / np.sqrt(rows[1:].size)


def test_antithetic_pair_sums_to_two_theta():
  theta = _theta()
  eps = var.sample_perturbation(jax.random.PRNGKey(3), theta, 0.3)
  pair = var.antithetic_thetas(theta, eps)
  for name in theta:
    t = np.asarray(theta[name], np.float64)
    p = np.asarray(pair[name], np.float64)
    assert p.shape == (2,) + t.shape
    np.testing.assert_allclose(p[0] + p[1], 2 * t, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(p[0] - p[1], 2 * np.asarray(eps[name],
                                                           np.float64),
                               rtol=1e-2, atol=1e-2)
  f32 = {k: v for k, v in theta.items() if k != "h"}
  eps32 = {k: v for k, v in eps.items() if k != "h"}
  pair32 = var.antithetic_thetas(f32, eps32)
  for name in f32:
    np.testing.assert_allclose(pair32[name][0] + pair32[name][1],
                               2 * f32[name], rtol=1e-6, atol=1e-6)


def test_antithetic_broadcasts_sample_axis():
  theta = {k: v for k, v in _theta().items() if k != "h"}
  n = 5
  eps = var.sample_perturbations(jax.random.PRNGKey(4), theta, 0.5, n)
  pair = var.antithetic_thetas(theta, eps)
  for name in theta:
    assert pair[name].shape == (2, n) + theta[name].shape
    p, t, e = (np.asarray(x) for x in (pair[name], theta[name], eps[name]))
    for i in range(n):
      np.testing.assert_allclose(p[0, i], t + e[i], rtol=1e-6)
      np.testing.assert_allclose(p[1, i], t - e[i], rtol=1e-6)


def _quadratic_problem():
  rng = np.random.default_rng(0)
  d_a, d_b = 3, 2
  d = d_a + d_b
  m = rng.normal(size=(d, d))
  a = m @ m.T / d + np.eye(d)
  b = rng.normal(size=d)
  theta = {"a": jnp.asarray(rng.normal(size=d_a), jnp.float32),
           "b": jnp.asarray(rng.normal(size=d_b), jnp.float32)}
  a_j = jnp.asarray(a, jnp.float32)
  b_j = jnp.asarray(b, jnp.float32)

  def flat(t):
    return jnp.concatenate([t["a"], t["b"]])

  def f(t):
    x = flat(t)
    return 0.5 * x @ a_j @ x + b_j @ x

  true_grad = a @ np.asarray(flat(theta), np.float64) + b
  return theta, f, flat, true_grad


@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_es_sample_unbiased_on_quadratic(sigma):
  theta, f, flat, true_grad = _quadratic_problem()
  n = 20000
  eps = var.sample_perturbations(jax.random.PRNGKey(7), theta, sigma, n)
  pair = var.antithetic_thetas(theta, eps)  # leaves [2, n, ...]
  losses = jax.vmap(jax.vmap(f))(pair)  # [2, n]
  g = var.es_gradient_sample(losses[0], losses[1], eps, sigma)
  samples = np.asarray(jax.vmap(flat)(g), np.float64)  # [n, d]
  mean = samples.mean(axis=0)
  se = samples.std(axis=0, ddof=1) / np.sqrt(n)
  assert np.all(np.abs(mean - true_grad) < 4 * se), (mean, true_grad, se)
  # Scalar losses with unbatched eps give the same per-sample values.
  one = {k: v[0] for k, v in eps.items()}
  g0 = var.es_gradient_sample(losses[0, 0], losses[1, 0], one, sigma)
  np.testing.assert_allclose(flat(g0), samples[0], rtol=1e-5, atol=1e-6)
  # Matches the formula (L+ - L-) / 2 * eps / sigma^2 for one sample.
  expected = (float(losses[0, 0]) - float(losses[1, 0])) / 2 * np.asarray(
      flat(one), np.float64) / sigma**2
  np.testing.assert_allclose(flat(g0), expected, rtol=1e-4, atol=1e-5)


def test_rp_sample_exact_on_quadratic():
  # For a quadratic, (grad f(t + e) + grad f(t - e)) / 2 == grad f(t).
  theta, f, flat, true_grad = _quadratic_problem()
  eps = var.sample_perturbations(jax.random.PRNGKey(8), theta, 0.5, 16)
  pair = var.antithetic_thetas(theta, eps)
  grads = jax.vmap(jax.vmap(jax.grad(f)))(pair)
  g_pos = jax.tree_util.tree_map(lambda x: x[0], grads)
  g_neg = jax.tree_util.tree_map(lambda x: x[1], grads)
  g = var.rp_gradient_sample(g_pos, g_neg)
  rows = np.asarray(jax.vmap(flat)(g), np.float64)
  np.testing.assert_allclose(rows, np.broadcast_to(true_grad, rows.shape),
                             rtol=1e-4, atol=1e-4)


def test_es_and_rp_jit():
  theta, f, flat, _ = _quadratic_problem()

  @jax.jit
  def both(key, t):
    e = var.sample_perturbations(key, t, 0.1, 8)
    pair = var.antithetic_thetas(t, e)
    losses, grads = jax.vmap(jax.vmap(jax.value_and_grad(f)))(pair)
    es = var.es_gradient_sample(losses[0], losses[1], e, 0.1)
    rp = var.rp_gradient_sample(
        jax.tree_util.tree_map(lambda x: x[0], grads),
        jax.tree_util.tree_map(lambda x: x[1], grads))
    return es, rp

  es, rp = both(jax.random.PRNGKey(0), theta)
  assert es["a"].shape == (8, 3) and rp["b"].shape == (8, 2)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(
      (es, rp)))


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"),
                                 -float("inf")])
def test_validate_sigma_rejects(bad):
  with pytest.raises(ValueError, match="sigma must be > 0"):
    var.validate_sigma(bad)


def test_validate_sigma_accepts():
  assert var.validate_sigma(0.01) == 0.01
  assert var.validate_sigma(np.float32(0.5)) == 0.5
