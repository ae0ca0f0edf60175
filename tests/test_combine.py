"""pathology_fix_core.combine against a NumPy reference and in simulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathology_fix_core import combine

MIN = combine.MIN_FINITE_SAMPLES


@pytest.fixture
def x64():
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


def np_merge(rp, es, half=None, rp_pool="coordinate", es_pool="tensor",
             min_samples=MIN):
  """Independent reference: dicts of float64 arrays [n, ...] -> (g, w, vr, ve).

  Written from the rule (combine's docstring, docs/method.md), not from our
  code: drop the samples with any non-finite value (in any leaf; for RP also
  in its half-differences); RP's noise of the mean is
  min(var(ddof=1), mean(h^2)) / count per coordinate (var / count without
  half-differences), ES's var(ddof=1) / count; "tensor" pooling replaces a
  leaf's values by their mean; w_rp = v_es / (v_rp + v_es). An estimator
  needs min_samples finite samples for weight; if neither has them the one
  with more finite samples (RP on a tie) is used alone.
  """
  def finite_rows(*trees):
    n = next(iter(trees[0].values())).shape[0]
    ok = np.ones(n, bool)
    for tree in trees:
      for x in tree.values():
        ok &= np.isfinite(x.reshape(n, -1)).all(axis=1)
    return ok

  rp_rows = finite_rows(rp, half) if half is not None else finite_rows(rp)
  es_rows = finite_rows(es)
  c_rp, c_es = rp_rows.sum(), es_rows.sum()
  if c_rp >= min_samples and c_es >= min_samples:
    use = "both"
  elif c_rp >= min_samples or (c_es < min_samples and c_rp >= max(c_es, 1)):
    use = "rp"
  elif c_es >= 1:
    use = "es"
  else:
    use = "none"
  pool = {"coordinate": lambda v: v,
          "tensor": lambda v: np.full_like(v, v.mean())}
  g, w, vr_all, ve_all = {}, {}, {}, {}
  for k in rp:
    r, e = rp[k][rp_rows], es[k][es_rows]
    shape = rp[k].shape[1:]
    vr = np.full(shape, np.inf)
    ve = np.full(shape, np.inf)
    if c_rp >= 2:
      own = r.var(axis=0, ddof=1)
      if half is not None:
        own = np.minimum(own, (half[k][rp_rows] ** 2).mean(axis=0))
      vr = pool[rp_pool](own / c_rp)
    if c_es >= 2:
      ve = pool[es_pool](e.var(axis=0, ddof=1) / c_es)
    if use == "both":
      w[k] = ve / (vr + ve)
      g[k] = w[k] * r.mean(0) + (1 - w[k]) * e.mean(0)
    elif use == "rp":
      g[k], w[k] = r.mean(0), np.ones(shape)
    elif use == "es":
      g[k], w[k] = e.mean(0), np.zeros(shape)
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


def _half(seed, like, scale=0.3):
  rng = np.random.default_rng(seed)
  return {k: scale * rng.normal(size=v.shape) * np.abs(v) for k, v in like.items()}


@pytest.mark.parametrize("with_half", [False, True])
@pytest.mark.parametrize("rp_pool, es_pool", [("coordinate", "tensor"),
                                              ("tensor", "coordinate")])
def test_merge_matches_numpy_reference(x64, with_half, rp_pool, es_pool):
  rp, es = _batch(0)
  half = _half(10, rp) if with_half else None
  g, diag = combine.inverse_variance_merge(
      _j(rp), _j(es), None if half is None else _j(half),
      rp_pooling=combine.pooling(rp_pool), es_pooling=combine.pooling(es_pool))
  assert g["a"].dtype == jnp.float64
  g_ref, w_ref, vr, ve = np_merge(rp, es, half, rp_pool, es_pool)
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
  assert int(diag["skipped"]) == 0
  assert set(diag) == {"rp_weight_mean", "rp_log_var_median",
                       "es_log_var_median", "rp_nonfinite", "es_nonfinite",
                       "num_samples_rp", "num_samples_es", "overflow_zeroed",
                       "skipped"}
  for v in diag.values():
    assert jnp.shape(v) == ()


def test_half_differences_lower_rp_noise_only_where_smaller(x64):
  """RP's noise is min(var, mean h^2) / c: with h = 0 RP gets all the weight."""
  rp, es = _batch(12)
  zero = {k: np.zeros_like(v) for k, v in rp.items()}
  g, diag = combine.inverse_variance_merge(_j(rp), _j(es), _j(zero))
  _assert_tree_close(g, {k: v.mean(0) for k, v in rp.items()}, rtol=1e-12)
  assert float(diag["rp_weight_mean"]) == 1.0
  huge = {k: 1e6 * np.ones_like(v) for k, v in rp.items()}
  g_huge, _ = combine.inverse_variance_merge(_j(rp), _j(es), _j(huge))
  g_plain, _ = combine.inverse_variance_merge(_j(rp), _j(es))
  _assert_tree_close(g_huge, {k: np.asarray(v) for k, v in g_plain.items()},
                     rtol=1e-12)


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
  np.testing.assert_array_equal(g_inf, m_es)
  # Zero variances: defined (an equal split), never 0 / 0.
  g_zero, w_zero = combine.merge_statistics(
      jnp.asarray(m_rp), jnp.zeros(6), jnp.asarray(m_es), jnp.zeros(6))
  np.testing.assert_allclose(w_zero, 0.5)
  np.testing.assert_allclose(g_zero, (m_rp + m_es) / 2, rtol=1e-12)
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


@pytest.mark.parametrize("num_finite", [0, 1, MIN - 1])
def test_too_few_finite_rp_uses_es_alone(x64, num_finite):
  """Below MIN_FINITE_SAMPLES finite RP samples, ES carries the gradient."""
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
  assert int(diag["num_samples_rp"]) == num_finite


def test_min_finite_samples_rp_get_weight(x64):
  """Exactly MIN_FINITE_SAMPLES finite RP samples: both are merged."""
  rp, es = _batch(5)
  bad = _inject(rp, [("a", (i, 0, 0), np.nan) for i in range(MIN, 7)])
  g, diag = combine.inverse_variance_merge(_j(bad), _j(es))
  g_ref, w_ref, _, _ = np_merge(bad, es)
  _assert_tree_close(g, g_ref, rtol=1e-6)
  assert 0.0 < float(diag["rp_weight_mean"]) < 1.0
  np.testing.assert_allclose(diag["rp_weight_mean"], _cat(w_ref).mean(),
                             rtol=1e-6)


def test_all_es_nonfinite_uses_rp_alone(x64):
  rp, es = _batch(6)
  bad = _inject(es, [("b", (i, 1), -np.inf) for i in range(7)])
  g, diag = combine.inverse_variance_merge(_j(rp), _j(bad))
  for k in rp:
    np.testing.assert_allclose(g[k], rp[k].mean(0), rtol=1e-12)
  assert float(diag["rp_weight_mean"]) == 1.0
  assert int(diag["es_nonfinite"]) == 7


@pytest.mark.parametrize("rp_finite, es_finite, carrier", [
    (3, 2, "rp"), (2, 3, "es"), (2, 2, "rp"), (0, 1, "es"), (1, 0, "rp")])
def test_neither_with_enough_samples_uses_the_one_with_more(
    x64, rp_finite, es_finite, carrier):
  rp, es = _batch(13)
  bad_rp = _inject(rp, [("b", (i, 0), np.nan) for i in range(rp_finite, 7)])
  bad_es = _inject(es, [("a", (i, 1, 1), np.inf) for i in range(es_finite, 7)])
  g, diag = combine.inverse_variance_merge(_j(bad_rp), _j(bad_es))
  source = {"rp": rp, "es": es}[carrier]
  count = {"rp": rp_finite, "es": es_finite}[carrier]
  for k in source:
    np.testing.assert_allclose(g[k], source[k][:count].mean(0), rtol=1e-12)
  _assert_tree_close(g, np_merge(bad_rp, bad_es)[0], rtol=1e-12)
  assert float(diag["rp_weight_mean"]) == (1.0 if carrier == "rp" else 0.0)
  assert int(diag["skipped"]) == 0


def test_no_finite_sample_gives_zeros_and_says_skipped():
  rp, es = _batch(7, dtype=np.float32)
  bad_rp = _inject(rp, [("a", (i, 0, 0), np.nan) for i in range(7)])
  bad_es = _inject(es, [("b", (i, 0), np.inf) for i in range(7)])
  g, diag = jax.jit(combine.inverse_variance_merge)(_j(bad_rp), _j(bad_es))
  for k in rp:
    np.testing.assert_array_equal(g[k], np.zeros_like(rp[k][0]))
    assert g[k].dtype == jnp.float32
  assert int(diag["rp_nonfinite"]) == 7 and int(diag["es_nonfinite"]) == 7
  assert int(diag["skipped"]) == 1
  for alone in ((bad_rp, None), (None, bad_es)):
    g, diag = combine.inverse_variance_merge(*map(
        lambda t: None if t is None else _j(t), alone))
    assert int(diag["skipped"]) == 1
    assert all(np.all(np.asarray(v) == 0) for v in g.values())


def test_one_estimator_is_the_mean_of_its_finite_samples(x64):
  """RP alone and ES alone: any finite sample counts (no variance needed)."""
  rp, es = _batch(14)
  bad = _inject(rp, [("a", (i, 2, 0), np.nan) for i in range(1, 7)])
  g, diag = combine.inverse_variance_merge(_j(bad), None)
  _assert_tree_close(g, {k: v[:1].mean(0) for k, v in rp.items()}, rtol=1e-12)
  assert int(diag["num_samples_rp"]) == 1 and int(diag["skipped"]) == 0
  assert float(diag["rp_weight_mean"]) == 1.0
  g, diag = combine.inverse_variance_merge(None, _j(es))
  _assert_tree_close(g, {k: v.mean(0) for k, v in es.items()}, rtol=1e-12)
  assert float(diag["rp_weight_mean"]) == 0.0
  assert int(diag["num_samples_rp"]) == 0


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
  # Per coordinate, so the float64 reference (where nothing overflows) pools
  # nothing differently; `test_tensor_pooling_skips_overflowed_entries`
  # covers the pooling.
  merge = functools.partial(combine.inverse_variance_merge,
                            es_pooling=combine.per_coordinate)
  g, diag = jax.jit(merge)(_j(rp), _j(es))
  assert float(g["a"][1, 2]) == 0.0
  assert int(diag["overflow_zeroed"]) == 1
  assert int(diag["rp_nonfinite"]) == 0 and int(diag["es_nonfinite"]) == 0
  g_ref, _, _, _ = np_merge({k: v.astype(np.float64) for k, v in rp.items()},
                            {k: v.astype(np.float64) for k, v in es.items()},
                            es_pool="coordinate")
  others = np.ones((3, 4), bool)
  others[1, 2] = False
  np.testing.assert_allclose(np.asarray(g["a"])[others], g_ref["a"][others],
                             rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(g["b"], g_ref["b"], rtol=2e-4, atol=1e-6)


def test_tensor_pooling_skips_overflowed_entries():
  v = jnp.asarray([[1.0, 3.0], [jnp.inf, jnp.nan]], jnp.float32)
  pooled = np.asarray(combine.per_tensor(v))
  np.testing.assert_array_equal(pooled[0], [2.0, 2.0])
  assert np.isinf(pooled[1, 0]) and np.isnan(pooled[1, 1])
  np.testing.assert_array_equal(combine.per_coordinate(v), v)
  with pytest.raises(ValueError, match=r"x \('mean'\) must be one of "
                     r"\['coordinate', 'tensor'\]"):
    combine.pooling("mean", "x")


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
  # ES's variance differs per coordinate here, so it is not pooled.
  merge = functools.partial(combine.inverse_variance_merge,
                            es_pooling=combine.per_coordinate)
  g, diag = jax.jit(jax.vmap(merge))(rp, es)

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


def _np_merge_batched(rp, es, rp_finite):
  """The rule over repetitions: rp, es [reps, n, d]; rp_finite [n] bool.

  Written with numpy from the rule, independently of `np_merge`'s loops: RP
  weighed by var(ddof=1) / count per coordinate, ES by var(ddof=1) / count
  averaged over its d coordinates (one tensor).
  """
  r, e = rp[:, rp_finite], es
  v_r = r.var(axis=1, ddof=1) / r.shape[1]
  v_e = (e.var(axis=1, ddof=1) / e.shape[1]).mean(axis=1, keepdims=True)
  w = v_e / (v_r + v_e)
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


def _total_variance(g_tree, reps):
  """Sum over coordinates of the variance over repetitions (float64)."""
  return sum(np.asarray(v, np.float64).reshape(reps, -1).var(axis=0, ddof=1).sum()
             for v in jax.tree_util.tree_leaves(g_tree))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_merge_does_not_depend_on_the_units(scale, dtype):
  """merge(a rp, a es) = a merge(rp, es), with identical weights.

  Gradients of learned optimizers are often small (per-sample RP std ~1e-6
  below): an absolute floor on the variances would change the weights with
  the units. In float64 the identity holds to round-off; in float32 to the
  rounding of the scaled inputs.
  """
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", dtype == np.float64)
  try:
    rng = np.random.default_rng(21)
    rp = {"w": rng.normal(size=(10, 6, 5)), "b": rng.normal(size=(10, 5))}
    es = {k: 30 * rng.normal(size=v.shape) + 0.5 for k, v in rp.items()}
    half = {k: 0.5 * rng.normal(size=v.shape) for k, v in rp.items()}
    cast = lambda t, a: {k: jnp.asarray(a * v, dtype) for k, v in t.items()}
    merge = jax.jit(combine.inverse_variance_merge)
    g1, d1 = merge(cast(rp, 1.0), cast(es, 1.0), cast(half, 1.0))
    ga, da = merge(cast(rp, scale), cast(es, scale), cast(half, scale))
  finally:
    jax.config.update("jax_enable_x64", old)
  rtol = 1e-10 if dtype == np.float64 else 1e-4
  for k in g1:
    np.testing.assert_allclose(np.asarray(ga[k]) / scale, g1[k], rtol=rtol,
                               atol=rtol * float(np.abs(g1[k]).max()))
  np.testing.assert_allclose(da["rp_weight_mean"], d1["rp_weight_mean"],
                             rtol=rtol)
  shift = 2 * np.log(scale)  # log variances move by exactly log(a^2)
  for name in ("rp_log_var_median", "es_log_var_median"):
    np.testing.assert_allclose(float(da[name]) - shift, float(d1[name]),
                               rtol=rtol, atol=rtol)


def test_realistic_magnitudes_total_variance_within_1_1x_of_the_better():
  """RP per-sample std 1e-6, ES 1e-4 (the scale of real learned-optimizer
  gradients), n = 10: the merge's total variance over all coordinates stays
  within 1.1x of RP alone (the better). A floor of 1e-8 on the variance of
  each mean made it hundreds of times noisier."""
  n, reps, d = 10, 3000, 64
  rng = np.random.default_rng(5)
  mu = 1e-5 * rng.normal(size=d)
  rp = mu + 1e-6 * rng.normal(size=(reps, n, d))
  es = mu + 1e-4 * rng.normal(size=(reps, n, d))
  g, diag = jax.jit(jax.vmap(combine.inverse_variance_merge))(
      {"x": jnp.asarray(rp, jnp.float32)}, {"x": jnp.asarray(es, jnp.float32)})
  merged = _total_variance(g, reps)
  best = min(rp.mean(axis=1).var(axis=0, ddof=1).sum(),
             es.mean(axis=1).var(axis=0, ddof=1).sum())
  print(f"total variance merged / better: {merged / best:.4f}")
  assert merged <= 1.1 * best
  assert float(np.mean(diag["rp_weight_mean"])) > 0.99


def _chaotic_samples(reps, n, rng):
  """One tensor of 200 coordinates; on 10% of them RP is 100x noisier than
  ES (chaotic unrolls), elsewhere 1e4x quieter. Samples independent given
  the truth, so RP's half-differences share its own noise's variance."""
  d = 200
  chaotic = np.arange(d) < d // 10
  rp_std = np.where(chaotic, 10.0, 0.01)  # ES std is 1
  mu = rng.normal(size=d)
  rp = mu + rp_std * rng.normal(size=(reps, n, d))
  es = mu + rng.normal(size=(reps, n, d))
  half = rp_std * rng.normal(size=(reps, n, d))
  return rp, es, half, rp_std, chaotic


@pytest.mark.parametrize("scale", [1.0, 1e-5])
@pytest.mark.parametrize("with_half", [False, True])
def test_chaotic_subset_within_1_1x_of_oracle_weights(with_half, scale):
  """The regime the merge exists for: RP 100x worse on 10% of one tensor.

  Oracle: per-coordinate weights from the true variances. Pooling RP over the
  tensor would put ES noise on the 90% where RP is nearly exact (about 7x);
  per-coordinate ES would weigh by noisy per-coordinate estimates. At 1e-5
  (ES per-sample std 1e-5, a real gradient's scale) an absolute floor on the
  variances would make RP and ES look equally noisy everywhere.
  """
  n, reps = 10, 3000
  rp, es, half, rp_std, _ = _chaotic_samples(reps, n, np.random.default_rng(8))
  rp, es, half, rp_std = (scale * x for x in (rp, es, half, rp_std))
  as32 = lambda x: {"x": jnp.asarray(x, jnp.float32)}
  if with_half:
    g, _ = jax.jit(jax.vmap(combine.inverse_variance_merge))(
        as32(rp), as32(es), as32(half))
  else:
    g, _ = jax.jit(jax.vmap(combine.inverse_variance_merge))(as32(rp),
                                                              as32(es))
  merged = _total_variance(g, reps)
  v_rp, v_es = rp_std**2 / n, np.full_like(rp_std, scale**2) / n
  w = v_es / (v_rp + v_es)
  oracle = (w * rp.mean(axis=1) + (1 - w) * es.mean(axis=1))
  oracle_total = oracle.var(axis=0, ddof=1).sum()
  print(f"chaotic subset: merged / oracle = {merged / oracle_total:.3f}")
  assert merged <= 1.1 * oracle_total


def test_shared_spread_does_not_pull_weight_to_es():
  """rp_i = s_i + x_i, es_i = s_i + e_i with a large shared s_i (the task's
  own gradient, the same in both): only the own noises x, e matter for the
  weights. With the half-differences (which carry x's spread, not s's) the
  merge is as good as RP; without them the shared spread makes RP look as
  noisy as ES and lets ES's own noise in."""
  n, reps, d = 10, 2000, 50
  rng = np.random.default_rng(9)
  s = 3.0 * rng.normal(size=(reps, n, d))  # fixed within a repetition's sample
  x_std, e_std = 0.01, 3.0
  rp = s + x_std * rng.normal(size=(reps, n, d))
  es = s + e_std * rng.normal(size=(reps, n, d))
  half = x_std * rng.normal(size=(reps, n, d))
  as32 = lambda v: {"x": jnp.asarray(v, jnp.float32)}
  merge = jax.jit(jax.vmap(combine.inverse_variance_merge))
  with_half, _ = merge(as32(rp), as32(es), as32(half))
  without, _ = merge(as32(rp), as32(es))
  # Conditional on the tasks (s fixed): the variance the weights can change.
  excess = lambda g: np.var(np.asarray(g["x"], np.float64) - rp.mean(axis=1),
                            axis=0).sum()
  rp_own = (x_std**2 / n) * d
  print(f"ES noise let in: with h {excess(with_half) / rp_own:.3g}, "
        f"without {excess(without) / rp_own:.3g} (x RP's own variance)")
  assert excess(with_half) <= 0.1 * rp_own
  assert excess(without) >= 10 * rp_own


def _np_inverse_variance_rule(rp, es):
  """The rule for one coordinate, repetitions [reps, n], float64, written
  from the formula: w = v_es / (v_rp + v_es) with v = var(ddof=1) / n."""
  n = rp.shape[1]
  v_rp = rp.var(axis=1, ddof=1) / n
  v_es = es.var(axis=1, ddof=1) / n
  w = v_es / (v_rp + v_es)
  return w * rp.mean(axis=1) + (1 - w) * es.mean(axis=1)


def test_bias_on_skewed_rp_matches_an_independent_calculation():
  """The weights come from the same samples as the means, so skewed samples
  bias the merge (combine's docstring). RP samples exp(N(0, 1)) (mean e^0.5,
  variance (e - 1) e), ES normal with the same mean and variance, n = 128.
  The bias of our float32 merge matches that of a float64 numpy
  implementation of the rule on independent draws, and is real (far from 0).
  """
  n, reps = 128, 20000
  mu, var = np.exp(0.5), (np.e - 1) * np.e

  def draw(seed):
    rng = np.random.default_rng(seed)
    return (np.exp(rng.normal(size=(reps, n))),
            mu + np.sqrt(var) * rng.normal(size=(reps, n)))

  rp, es = draw(2024)
  g, _ = jax.jit(jax.vmap(combine.inverse_variance_merge))(
      {"x": jnp.asarray(rp[..., None], jnp.float32)},
      {"x": jnp.asarray(es[..., None], jnp.float32)})
  g = np.asarray(g["x"], np.float64)[:, 0]
  ref = _np_inverse_variance_rule(*draw(7))
  bias, ref_bias = g.mean() - mu, ref.mean() - mu
  se = np.hypot(g.std(ddof=1), ref.std(ddof=1)) / np.sqrt(reps)
  print(f"bias {bias:.4f}, independent reference {ref_bias:.4f} (+- {se:.4f})")
  assert abs(bias - ref_bias) <= 4 * se
  assert bias < -5 * g.std(ddof=1) / np.sqrt(reps)
