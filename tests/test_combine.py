"""pathology_fix_core.combine against a NumPy reference and in simulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathology_fix_core import combine

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

  Written from the formula (METHOD.md section 4), not from our code: drop the
  samples with any non-finite value (in any leaf); weigh each estimator's
  mean by the inverse variance of that MEAN, np.var(ddof=1) / count + eps;
  fall back to the estimator that has >= 2 finite samples.
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
    vr = np.var(r, axis=0, ddof=1) / len(r) + eps if len(r) >= 2 else np.full(
        shape, np.inf)
    ve = np.var(e, axis=0, ddof=1) / len(e) + eps if len(e) >= 2 else np.full(
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
  assert int(diag["num_samples_rp"]) == 7
  assert int(diag["num_samples_es"]) == 7
  assert int(diag["overflow_zeroed"]) == 0
  assert set(diag) == {"rp_weight_mean", "rp_log_var_median",
                       "es_log_var_median", "rp_nonfinite", "es_nonfinite",
                       "num_samples_rp", "num_samples_es", "overflow_zeroed"}
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
  g_ref, w_ref, vr, _ = np_merge(bad, es)
  _assert_tree_close(g, g_ref, rtol=1e-6)
  np.testing.assert_allclose(diag["rp_weight_mean"], _cat(w_ref).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(diag["rp_log_var_median"],
                             np.median(np.log(_cat(vr))), rtol=1e-6)
  # 5 RP samples left against 7 ES: weighing per-sample variances (ignoring
  # the counts) would move the result well outside the tolerance above.
  gap = 0.0
  for k in rp:
    r, e = rp[k][[0, 1, 3, 4, 6]], es[k]
    p_r, p_e = 1 / r.var(0, ddof=1), 1 / e.var(0, ddof=1)
    per_sample = (p_r * r.mean(0) + p_e * e.mean(0)) / (p_r + p_e)
    gap = max(gap, np.max(np.abs(per_sample - g_ref[k]) / np.abs(g_ref[k])))
  assert gap > 1e-3
  assert int(diag["rp_nonfinite"]) == 2 and int(diag["es_nonfinite"]) == 0
  assert int(diag["num_samples_rp"]) == 5
  assert int(diag["num_samples_es"]) == 7
  assert all(np.all(np.isfinite(v)) for v in g.values())


def test_nonfinite_es_samples_dropped(x64):
  rp, es = _batch(4)
  bad = _inject(es, [("b", (0, 0), np.nan), ("b", (6, 4), np.inf)])
  g, diag = combine.inverse_variance_merge(_j(rp), _j(bad))
  g_ref, _, _, _ = np_merge(rp, bad)
  _assert_tree_close(g, g_ref, rtol=1e-6)
  assert int(diag["es_nonfinite"]) == 2 and int(diag["rp_nonfinite"]) == 0
  assert int(diag["num_samples_es"]) == 5
  assert int(diag["num_samples_rp"]) == 7


@pytest.mark.parametrize("num_finite", [0, 1])
def test_too_few_finite_rp_uses_es_alone(x64, num_finite):
  rp, es = _batch(5)
  rows = range(num_finite, 7)
  bad = _inject(rp, [("a", (i, 0, 0), np.nan) for i in rows])
  g, diag = jax.jit(combine.inverse_variance_merge)(_j(bad), _j(es))
  for k in es:
    # To float64 round-off: no trace of the RP mean mixed in.
    np.testing.assert_allclose(g[k], es[k].mean(0), rtol=1e-13)
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
  assert int(diag["overflow_zeroed"]) == 0  # a fallback, not a zeroing


def test_overflowing_mean_in_both_is_zeroed_and_counted():
  # 16 finite float32 samples of 3e37 sum to inf in both estimators.
  rp, es = _batch(9, n=16, dtype=np.float32)
  rp["a"][:, 1, 2] = 3e37
  es["a"][:, 1, 2] = 3e37
  g, diag = jax.jit(combine.inverse_variance_merge)(_j(rp), _j(es))
  assert float(g["a"][1, 2]) == 0.0
  assert int(diag["overflow_zeroed"]) == 1
  assert int(diag["rp_nonfinite"]) == 0 and int(diag["es_nonfinite"]) == 0
  g_ref, _, _, _ = np_merge({k: v.astype(np.float64) for k, v in rp.items()},
                            {k: v.astype(np.float64) for k, v in es.items()})
  others = np.ones((3, 4), bool)
  others[1, 2] = False
  np.testing.assert_allclose(np.asarray(g["a"])[others], g_ref["a"][others],
                             rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(g["b"], g_ref["b"], rtol=2e-4, atol=1e-6)


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


def _np_merge_batched(rp, es, rp_finite, eps=EPS):
  """The formula over repetitions: rp, es [reps, n, d]; rp_finite [n] bool.

  Written from METHOD.md section 4 with numpy, independently of `np_merge`'s
  loops: each mean is weighted by 1 / (var(ddof=1) / count + eps).
  """
  r, e = rp[:, rp_finite], es
  v_r = r.var(axis=1, ddof=1) / r.shape[1] + eps
  v_e = e.var(axis=1, ddof=1) / e.shape[1] + eps
  w = (1 / v_r) / (1 / v_r + 1 / v_e)
  return w * r.mean(axis=1) + (1 - w) * e.mean(axis=1), w


@pytest.mark.parametrize("rp_kept", [8, 32])
def test_unequal_counts_merge_is_no_noisier_than_the_better_mean(rp_kept):
  """RP keeps rp_kept of 128 samples (the rest are NaN), ES keeps all 128.

  Per coordinate the RP spread relative to ES varies, so either estimator can
  be the better one; the merge must be within 1.2x of the better MEAN's
  variance, var / count. Weighing per-sample variances (ignoring the counts)
  gives 5x the ES variance for 8 equal-spread RP samples.
  """
  n, reps = 128, 4000
  rng = np.random.default_rng(rp_kept)
  # RP per-sample std relative to ES: RP clearly worse, equal spread,
  # comparable means (std ratio sqrt(rp_kept / n)), RP clearly better.
  rp_std = np.array([10.0, 1.0, np.sqrt(rp_kept / n), 0.1, 0.01])
  d = rp_std.size
  mu = rng.normal(size=d)
  rp = mu + rp_std * rng.normal(size=(reps, n, d))
  es = mu + rng.normal(size=(reps, n, d))
  rp_finite = np.arange(n) < rp_kept
  rp[:, ~rp_finite, 0] = np.nan  # drops the whole sample
  g, diag = jax.jit(jax.vmap(combine.inverse_variance_merge))(
      {"x": jnp.asarray(rp, jnp.float32)}, {"x": jnp.asarray(es, jnp.float32)})
  g = np.asarray(g["x"], np.float64)

  best = np.minimum(rp_std**2 / rp_kept, 1.0 / n)  # true variances of means
  ratio = g.var(axis=0, ddof=1) / best
  print(f"{rp_kept} of {n} RP samples: var(merged) / var(better mean) = "
        f"{np.array2string(ratio, precision=3)}")
  assert np.all(ratio <= 1.2), ratio
  g_ref, w_ref = _np_merge_batched(rp, es, rp_finite)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(diag["rp_weight_mean"]),
                             w_ref.mean(axis=1), rtol=1e-3, atol=1e-5)
  assert np.all(np.asarray(diag["num_samples_rp"]) == rp_kept)
  assert np.all(np.asarray(diag["num_samples_es"]) == n)
  assert np.all(np.asarray(diag["rp_nonfinite"]) == n - rp_kept)

  # Unbiased here (symmetric samples): within 4 standard errors of mu.
  se = np.sqrt(g.var(axis=0, ddof=1) / reps)
  assert np.all(np.abs(g.mean(axis=0) - mu) <= 4 * se)
  # Equal spread: the weight is about rp_kept / (rp_kept + n), not 0.5.
  w_equal = float(np.mean(w_ref[:, 1]))
  assert abs(w_equal - rp_kept / (rp_kept + n)) < 0.05, w_equal


def test_documented_bias_on_skewed_rp():
  """Re-measures the bias figure in combine's docstring (and the README).

  RP samples exp(N(0, 1)) (skewed; mean e^0.5, variance (e - 1) e), ES
  samples normal with the same mean and variance, n = 128 each. The weights
  use the same samples as the means; a lognormal sample mean and its sample
  variance rise together, so the RP weight is low exactly when its mean is
  high: documented bias -0.018.
  """
  n, reps = 128, 20000
  rng = np.random.default_rng(2024)
  mu, var = np.exp(0.5), (np.e - 1) * np.e
  rp = np.exp(rng.normal(size=(reps, n, 1)))
  es = mu + np.sqrt(var) * rng.normal(size=(reps, n, 1))
  g, _ = jax.jit(jax.vmap(combine.inverse_variance_merge))(
      {"x": jnp.asarray(rp, jnp.float32)}, {"x": jnp.asarray(es, jnp.float32)})
  g = np.asarray(g["x"], np.float64)[:, 0]
  bias = g.mean() - mu
  se = g.std(ddof=1) / np.sqrt(reps)
  print(f"bias {bias:.4f} +- {se:.4f} (sd of merged {g.std(ddof=1):.3f})")
  assert abs(bias - (-0.018)) <= 4 * se + 0.001
  assert bias < -5 * se  # a real, documented bias, not noise
