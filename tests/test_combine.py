"""pathology_fix.combine against a NumPy reference and in simulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathology_fix import combine

EPS = 1e-8


@pytest.fixture
def x64():
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


def np_merge(rp, es, eps=EPS):
  """Independent reference: dicts of float64 arrays [n, ...] -> (g, w, vr, ve).

  Drops samples with any non-finite value (in any leaf), then applies the
  inverse-variance formula with np.var(ddof=1) + eps, falling back to the
  estimator that has >= 2 finite samples.
  """
  def finite_rows(tree):
    n = next(iter(tree.values())).shape[0]
    ok = np.ones(n, bool)
    for x in tree.values():
      ok &= np.isfinite(x.reshape(n, -1)).all(axis=1)
    return ok

  rp_ok_rows, es_ok_rows = finite_rows(rp), finite_rows(es)
  g, w, vr_all, ve_all = {}, {}, {}, {}
  for k in rp:
    r, e = rp[k][rp_ok_rows], es[k][es_ok_rows]
    shape = rp[k].shape[1:]
    vr = np.var(r, axis=0, ddof=1) + eps if len(r) >= 2 else np.full(
        shape, np.inf)
    ve = np.var(e, axis=0, ddof=1) + eps if len(e) >= 2 else np.full(
        shape, np.inf)
    if len(r) >= 2 and len(e) >= 2:
      g[k] = (r.mean(0) / vr + e.mean(0) / ve) / (1 / vr + 1 / ve)
      w[k] = (1 / vr) / (1 / vr + 1 / ve)
    elif len(e) >= 2:
      g[k], w[k] = e.mean(0), np.zeros(shape)
    elif len(r) >= 2:
      g[k], w[k] = r.mean(0), np.ones(shape)
    else:
      g[k], w[k] = np.zeros(shape), np.zeros(shape)
    vr_all[k], ve_all[k] = vr, ve
  return g, w, vr_all, ve_all


def _batch(seed, n=7, dtype=np.float64):
  """Two leaves of different shapes, coordinates with very different scales."""
  rng = np.random.default_rng(seed)
  def leaf(shape):
    scale = 10.0 ** rng.uniform(-3, 3, size=shape)
    return (rng.normal(size=shape) + rng.normal(size=(n,) + shape) * scale
            ).astype(dtype)
  rp = {"a": leaf((3, 4)), "b": leaf((5,))}
  es = {"a": leaf((3, 4)), "b": leaf((5,))}
  return rp, es


def _cat(tree):
  return np.concatenate([np.ravel(tree[k]) for k in sorted(tree)])


def _assert_tree_close(got, want, rtol, atol=0.0):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=rtol,
                               atol=atol, err_msg=k)


def test_merge_matches_numpy_reference(x64):
  rp, es = _batch(0)
  g, diag = combine.inverse_variance_merge(
      jax.tree_util.tree_map(jnp.asarray, rp),
      jax.tree_util.tree_map(jnp.asarray, es))
  assert g["a"].dtype == jnp.float64
  g_ref, w_ref, vr, ve = np_merge(rp, es)
  _assert_tree_close(g, g_ref, rtol=1e-6)
  np.testing.assert_allclose(diag["rp_weight_mean"], _cat(w_ref).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(diag["rp_log_var_median"],
                             np.median(np.log(_cat(vr))), rtol=1e-6)
  np.testing.assert_allclose(diag["es_log_var_median"],
                             np.median(np.log(_cat(ve))), rtol=1e-6)
  assert int(diag["rp_nonfinite"]) == 0 and int(diag["es_nonfinite"]) == 0
  assert int(diag["num_samples"]) == 7
  assert set(diag) == {"rp_weight_mean", "rp_log_var_median",
                       "es_log_var_median", "rp_nonfinite", "es_nonfinite",
                       "num_samples"}
  for v in diag.values():
    assert jnp.shape(v) == ()


def test_merge_statistics_formula(x64):
  rng = np.random.default_rng(1)
  m_rp, m_es = rng.normal(size=6), rng.normal(size=6)
  v_rp, v_es = 10.0 ** rng.uniform(-8, 8, 6), 10.0 ** rng.uniform(-8, 8, 6)
  g, w = combine.merge_statistics(*(jnp.asarray(x) for x in
                                    (m_rp, v_rp, m_es, v_es)))
  want = (m_rp / v_rp + m_es / v_es) / (1 / v_rp + 1 / v_es)
  np.testing.assert_allclose(g, want, rtol=1e-12)
  np.testing.assert_allclose(w, (1 / v_rp) / (1 / v_rp + 1 / v_es),
                             rtol=1e-12)
  # Equal variances -> plain average; infinite variance -> zero weight.
  g_eq, w_eq = combine.merge_statistics(jnp.asarray(m_rp), jnp.ones(6),
                                        jnp.asarray(m_es), jnp.ones(6))
  np.testing.assert_allclose(g_eq, (m_rp + m_es) / 2, rtol=1e-12)
  np.testing.assert_allclose(w_eq, 0.5)
  g_inf, w_inf = combine.merge_statistics(
      jnp.asarray(m_rp), jnp.full(6, jnp.inf), jnp.asarray(m_es), jnp.ones(6))
  np.testing.assert_array_equal(w_inf, 0.0)
  np.testing.assert_allclose(g_inf, m_es, rtol=1e-15)
  # Works on pytrees.
  tree = combine.merge_statistics({"x": jnp.ones(2)}, {"x": jnp.ones(2)},
                                  {"x": jnp.zeros(2)}, {"x": jnp.ones(2)})
  np.testing.assert_allclose(tree[0]["x"], 0.5)


def test_per_sample_finite_and_masked_stats(x64):
  rp, _ = _batch(2)
  rp["a"][1, 2, 3] = np.inf
  rp["b"][4, 0] = np.nan
  finite = combine.per_sample_finite(rp)
  np.testing.assert_array_equal(finite, [1, 0, 1, 1, 0, 1, 1])
  mean, variance, count = combine.masked_mean_and_variance(
      jax.tree_util.tree_map(jnp.asarray, rp), finite)
  assert int(count) == 5
  keep = np.asarray(finite)
  for k in rp:
    np.testing.assert_allclose(mean[k], rp[k][keep].mean(0), rtol=1e-12)
    np.testing.assert_allclose(variance[k], rp[k][keep].var(0, ddof=1),
                               rtol=1e-12)
    assert np.all(np.isfinite(mean[k])) and np.all(np.isfinite(variance[k]))


def _inject(tree, where):
  out = {k: v.copy() for k, v in tree.items()}
  for leaf, idx, value in where:
    out[leaf][idx] = value
  return out


def _j(tree):
  return jax.tree_util.tree_map(jnp.asarray, tree)


@pytest.mark.parametrize("use_jit", [False, True])
def test_nonfinite_rp_samples_dropped(x64, use_jit):
  rp, es = _batch(3)
  bad = _inject(rp, [("a", (2, 0, 1), np.inf), ("b", (5, 3), np.nan),
                     ("a", (5, 2, 2), -np.inf)])  # sample 5 counted once
  merge = jax.jit(combine.inverse_variance_merge) if use_jit else (
      combine.inverse_variance_merge)
  g, diag = merge(_j(bad), _j(es))
  keep = np.array([i not in (2, 5) for i in range(7)])
  filtered = {k: v[keep] for k, v in rp.items()}
  g_filt, _ = combine.inverse_variance_merge(_j(filtered), _j(es))
  _assert_tree_close(g, {k: np.asarray(v) for k, v in g_filt.items()},
                     rtol=1e-12)
  g_ref, w_ref, _, _ = np_merge(bad, es)
  _assert_tree_close(g, g_ref, rtol=1e-6)
  np.testing.assert_allclose(diag["rp_weight_mean"], _cat(w_ref).mean(),
                             rtol=1e-6)
  assert int(diag["rp_nonfinite"]) == 2 and int(diag["es_nonfinite"]) == 0
  assert int(diag["num_samples"]) == 7
  assert all(np.all(np.isfinite(v)) for v in g.values())


def test_nonfinite_es_samples_dropped(x64):
  rp, es = _batch(4)
  bad = _inject(es, [("b", (0, 0), np.nan), ("b", (6, 4), np.inf)])
  g, diag = combine.inverse_variance_merge(_j(rp), _j(bad))
  g_ref, _, _, _ = np_merge(rp, bad)
  _assert_tree_close(g, g_ref, rtol=1e-6)
  keep = np.array([i not in (0, 6) for i in range(7)])
  g_filt, _ = combine.inverse_variance_merge(
      _j(rp), _j({k: v[keep] for k, v in es.items()}))
  _assert_tree_close(g, {k: np.asarray(v) for k, v in g_filt.items()},
                     rtol=1e-12)
  assert int(diag["es_nonfinite"]) == 2 and int(diag["rp_nonfinite"]) == 0


@pytest.mark.parametrize("num_finite", [0, 1])
def test_too_few_finite_rp_uses_es_alone(x64, num_finite):
  rp, es = _batch(5)
  rows = range(num_finite, 7)
  bad = _inject(rp, [("a", (i, 0, 0), np.nan) for i in rows])
  g, diag = jax.jit(combine.inverse_variance_merge)(_j(bad), _j(es))
  es_mean, _, _ = combine.masked_mean_and_variance(_j(es), jnp.ones(7, bool))
  for k in es:
    np.testing.assert_array_equal(g[k], es_mean[k])  # exact, no mixing
    np.testing.assert_allclose(g[k], es[k].mean(0), rtol=1e-12)
  assert float(diag["rp_weight_mean"]) == 0.0
  assert float(diag["rp_log_var_median"]) == np.inf
  assert np.isfinite(float(diag["es_log_var_median"]))
  assert int(diag["rp_nonfinite"]) == 7 - num_finite


def test_all_es_nonfinite_uses_rp_alone(x64):
  rp, es = _batch(6)
  bad = _inject(es, [("b", (i, 1), -np.inf) for i in range(7)])
  g, diag = combine.inverse_variance_merge(_j(rp), _j(bad))
  for k in rp:
    np.testing.assert_allclose(g[k], rp[k].mean(0), rtol=1e-12)
  assert float(diag["rp_weight_mean"]) == 1.0
  assert int(diag["es_nonfinite"]) == 7


def test_both_nonfinite_gives_zeros():
  rp, es = _batch(7, dtype=np.float32)
  bad_rp = _inject(rp, [("a", (i, 0, 0), np.nan) for i in range(7)])
  bad_es = _inject(es, [("b", (i, 0), np.inf) for i in range(6)])
  g, diag = jax.jit(combine.inverse_variance_merge)(_j(bad_rp), _j(bad_es))
  for k in rp:
    np.testing.assert_array_equal(g[k], np.zeros_like(rp[k][0]))
    assert g[k].dtype == jnp.float32
  assert int(diag["rp_nonfinite"]) == 7 and int(diag["es_nonfinite"]) == 6


def test_overflowing_rp_variance_falls_back_to_es():
  # Finite but huge RP samples: the float32 variance overflows to inf.
  rp, es = _batch(8, dtype=np.float32)
  rp["a"] = rp["a"] * np.float32(1e25)
  g, diag = combine.inverse_variance_merge(_j(rp), _j(es))
  assert all(np.all(np.isfinite(v)) for v in g.values())
  np.testing.assert_allclose(g["a"], es["a"].mean(0), rtol=1e-4, atol=1e-5)
  assert int(diag["rp_nonfinite"]) == 0


def test_merge_variance_at_most_best_estimator():
  """Merged variance <= 1.2 * min(Var mean_rp, Var mean_es) per coordinate."""
  n, reps = 16, 2000
  rng = np.random.default_rng(11)
  shapes = {"a": (128,), "b": (8, 16)}
  mu = {k: rng.normal(size=s) for k, s in shapes.items()}
  # Per-coordinate variances spanning 1e-6 .. 1e6; RP wins on some
  # coordinates, ES on others, and "b"'s first row has equal variances.
  v_rp = {k: 10.0 ** rng.uniform(-6, 6, size=s) for k, s in shapes.items()}
  v_es = {k: 10.0 ** rng.uniform(-6, 6, size=s) for k, s in shapes.items()}
  v_es["b"][0] = v_rp["b"][0]

  def draw(v):
    return {k: jnp.asarray(mu[k] + np.sqrt(v[k]) * rng.normal(
        size=(reps, n) + shapes[k]), jnp.float32) for k in shapes}

  rp, es = draw(v_rp), draw(v_es)
  g, diag = jax.jit(jax.vmap(combine.inverse_variance_merge))(rp, es)

  def cat(tree):  # -> [reps, coords] float64
    return np.concatenate([np.asarray(tree[k], np.float64).reshape(reps, -1)
                           for k in sorted(tree)], axis=1)

  g_all = cat(g)
  mean_rp = cat({k: np.asarray(v, np.float64).mean(1) for k, v in rp.items()})
  mean_es = cat({k: np.asarray(v, np.float64).mean(1) for k, v in es.items()})
  var_g = g_all.var(axis=0, ddof=1)
  best = np.minimum(mean_rp.var(axis=0, ddof=1), mean_es.var(axis=0, ddof=1))
  frac = float(np.mean(var_g <= 1.2 * best))
  print(f"fraction of coordinates with merged var <= 1.2 * best: {frac:.4f}"
        f" (median ratio {np.median(var_g / best):.3f})")
  assert frac >= 0.9
  # With equal variances the merge averages two independent estimates, so it
  # beats both (ideal ratio 0.5; the weights are noisy with n = 16).
  equal = np.concatenate([np.zeros(128, bool), np.arange(128) < 16])
  eq_ratio = np.mean(var_g[equal] / best[equal])
  print(f"equal-variance coordinates: mean ratio {eq_ratio:.3f}")
  assert eq_ratio < 0.75
  # Both estimators are unbiased for mu, so the merge is too.
  mu_all = np.concatenate([mu[k].ravel() for k in sorted(mu)])
  se = np.sqrt(var_g / reps)
  assert np.all(np.abs(g_all.mean(axis=0) - mu_all) <= 4 * se)
  # Where one estimator is >= 100x more precise, the merge tracks it.
  ratio = np.concatenate([(v_rp[k] / v_es[k]).ravel() for k in sorted(v_rp)])
  for sel, m in ((ratio < 1e-2, mean_rp), (ratio > 1e2, mean_es)):
    assert sel.sum() > 10
    gap = (g_all - m)[:, sel].var(axis=0, ddof=1)
    assert np.all(gap <= 0.1 * m[:, sel].var(axis=0, ddof=1))
  assert np.all(np.asarray(diag["rp_nonfinite"]) == 0)
  w_mean = np.asarray(diag["rp_weight_mean"])
  assert abs(w_mean.mean() - np.mean(ratio < 1)) < 0.1


def test_rejects_mismatched_trees():
  with pytest.raises(ValueError):
    combine.inverse_variance_merge({"a": jnp.ones((3, 2))},
                                   {"b": jnp.ones((3, 2))})
  with pytest.raises(ValueError):
    combine.inverse_variance_merge({"a": jnp.ones((3, 2)),
                                    "b": jnp.ones((4,))},
                                   {"a": jnp.ones((3, 2)),
                                    "b": jnp.ones((3,))})
