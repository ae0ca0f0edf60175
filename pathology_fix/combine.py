"""Per-coordinate inverse-variance merge of the RP and ES gradient estimates.

Given ``n`` RP samples and ``n`` ES samples of the same gradient (Metz et al.
2019, Sec. 4.3), for every coordinate of theta:

  mean_rp, mean_es   = sample means
  var_rp,  var_es    = unbiased sample variances (divide by n - 1) + eps
  w_rp               = (1 / var_rp) / (1 / var_rp + 1 / var_es)
  g                  = (mean_rp / var_rp + mean_es / var_es)
                       / (1 / var_rp + 1 / var_es)
                     = w_rp * mean_rp + (1 - w_rp) * mean_es

Robustness (all jit-able, no Python branching on values): a sample whose
value is non-finite in ANY coordinate of ANY leaf is dropped from its own
estimator's statistics, so an exploding RP unroll cannot poison ES (and vice
versa). An estimator left with fewer than 2 finite samples has no variance
estimate and gets weight 0; if both do, the merged gradient is 0.
"""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

PyTree = Any


def _leading_size(tree: PyTree) -> int:
  """Static size of the shared leading (sample) axis of ``tree``'s leaves."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("expected a non-empty pytree of sample arrays")
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        "all leaves must share a leading sample axis, got shapes "
        f"{[jnp.shape(leaf) for leaf in leaves]}")
  return sizes.pop()


def per_sample_finite(tree: PyTree) -> jax.Array:
  """Which samples are finite in every coordinate of every leaf.

  Args:
    tree: pytree with leaves of shape ``[n, ...]``.

  Returns:
    Boolean array of shape ``[n]``: ``True`` iff sample ``i`` has no inf/NaN
    in any leaf.
  """
  n = _leading_size(tree)
  finite = jnp.ones((n,), dtype=bool)
  for leaf in jax.tree_util.tree_leaves(tree):
    leaf = jnp.asarray(leaf)
    finite = finite & jnp.all(jnp.isfinite(leaf),
                              axis=tuple(range(1, leaf.ndim)))
  return finite


def masked_mean_and_variance(
    tree: PyTree, mask: jax.Array) -> Tuple[PyTree, PyTree, jax.Array]:
  """Sample mean and unbiased variance over the samples selected by ``mask``.

    c    = sum_i mask_i
    mean = sum_i mask_i x_i / max(c, 1)
    var  = sum_i mask_i (x_i - mean)^2 / max(c - 1, 1)

  Unselected samples are replaced by 0 before any sum, so their inf/NaN
  values never reach the result. With ``c == 0`` the mean and variance are
  0; with ``c == 1`` the variance is 0 (callers must treat ``c < 2`` as "no
  variance estimate").

  Args:
    tree: pytree with floating leaves of shape ``[n, ...]``.
    mask: boolean array of shape ``[n]``.

  Returns:
    ``(mean, var, count)``: ``mean`` and ``var`` are pytrees with leaves of
    shape ``[...]`` (leaf dtypes kept); ``count`` is an int32 scalar ``c``.
  """
  mask = jnp.asarray(mask, dtype=bool)
  count = jnp.sum(mask.astype(jnp.int32))

  def stats(x):
    x = jnp.asarray(x)
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
    c = count.astype(x.dtype)
    mean = jnp.sum(jnp.where(m, x, 0), axis=0) / jnp.maximum(c, 1)
    dev = jnp.where(m, x - mean, 0)
    var = jnp.sum(dev * dev, axis=0) / jnp.maximum(c - 1, 1)
    return mean, var

  pairs = jax.tree_util.tree_map(stats, tree)
  is_pair = lambda p: isinstance(p, tuple) and len(p) == 2
  means = jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
  variances = jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)
  return means, variances, count


def merge_statistics(mean_rp: PyTree, var_rp: PyTree, mean_es: PyTree,
                     var_es: PyTree) -> Tuple[PyTree, PyTree]:
  """The inverse-variance formula, per coordinate.

    w_rp = (1 / var_rp) / (1 / var_rp + 1 / var_es)
    g    = (mean_rp / var_rp + mean_es / var_es) / (1 / var_rp + 1 / var_es)

  A variance of ``+inf`` gives that estimator weight 0 (its mean must then
  still be finite). If both precisions are 0 the result is ``g = 0``,
  ``w_rp = 0``.

  Args:
    mean_rp, var_rp, mean_es, var_es: pytrees of one structure with matching
      leaf shapes ``[...]``; variances must be > 0 (add eps beforehand).

  Returns:
    ``(g, w_rp)``: pytrees shaped like ``mean_rp``.
  """
  def formula(m_rp, v_rp, m_es, v_es):
    p_rp = 1.0 / v_rp
    p_es = 1.0 / v_es
    total = p_rp + p_es
    safe_total = jnp.where(total > 0, total, 1)
    # Guard each term so a zero-precision estimator contributes exactly 0.
    num = (jnp.where(p_rp > 0, m_rp * p_rp, 0) +
           jnp.where(p_es > 0, m_es * p_es, 0))
    return num / safe_total, p_rp / safe_total

  pairs = jax.tree_util.tree_map(formula, mean_rp, var_rp, mean_es, var_es)
  is_pair = lambda p: isinstance(p, tuple) and len(p) == 2
  g = jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
  w_rp = jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)
  return g, w_rp


def _concat_flat(tree: PyTree) -> jax.Array:
  leaves = [jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)]
  dtype = jnp.result_type(*leaves)
  return jnp.concatenate([x.astype(dtype) for x in leaves])


def inverse_variance_merge(
    rp_samples: PyTree,
    es_samples: PyTree,
    eps: float = 1e-8) -> Tuple[PyTree, Dict[str, jax.Array]]:
  """Merges RP and ES gradient samples by per-coordinate inverse variance.

  Per coordinate, over the finite samples of each estimator (see module
  docstring): ``var = unbiased variance + eps`` and
  ``g = (mean_rp / var_rp + mean_es / var_es) / (1 / var_rp + 1 / var_es)``.

  Fallbacks (chosen with ``jnp.where``, so the function stays jit-able):
    * fewer than 2 finite RP samples: ``g = mean_es`` exactly (``w_rp = 0``);
    * fewer than 2 finite ES samples: ``g = mean_rp`` exactly (``w_rp = 1``);
    * both: ``g = 0`` (``w_rp = 0``).
  A coordinate whose statistics still overflow (finite samples so large that
  the sum or square is inf) is set to 0, so the result is always finite.

  Args:
    rp_samples: pytree with leaves ``[n_rp, ...]``; one RP sample per row.
    es_samples: pytree of the same structure, leaves ``[n_es, ...]`` with the
      same trailing shapes (normally ``n_es == n_rp``).
    eps: added to both sample variances.

  Returns:
    ``(g, diagnostics)``. ``g`` is a pytree with leaves ``[...]``.
    ``diagnostics`` maps to scalars:
      ``rp_weight_mean``: mean of ``w_rp`` over all coordinates of all leaves;
      ``rp_log_var_median``, ``es_log_var_median``: median over all
        coordinates of ``log(var)`` (``+inf`` when the estimator had < 2
        finite samples, i.e. it was treated as infinitely noisy);
      ``rp_nonfinite``, ``es_nonfinite``: int32 numbers of dropped samples;
      ``num_samples``: int32 ``n_rp``, the leading size of ``rp_samples``.
  """
  if (jax.tree_util.tree_structure(rp_samples) !=
      jax.tree_util.tree_structure(es_samples)):
    raise ValueError("rp_samples and es_samples must have the same structure")
  n_rp = _leading_size(rp_samples)
  n_es = _leading_size(es_samples)

  rp_mask = per_sample_finite(rp_samples)
  es_mask = per_sample_finite(es_samples)
  mean_rp, var_rp, count_rp = masked_mean_and_variance(rp_samples, rp_mask)
  mean_es, var_es, count_es = masked_mean_and_variance(es_samples, es_mask)
  rp_ok = count_rp >= 2
  es_ok = count_es >= 2

  # An estimator without a variance estimate counts as infinitely noisy.
  def effective_var(v, ok):
    return jnp.where(ok, v + eps, jnp.inf).astype(v.dtype)

  var_rp = jax.tree_util.tree_map(lambda v: effective_var(v, rp_ok), var_rp)
  var_es = jax.tree_util.tree_map(lambda v: effective_var(v, es_ok), var_es)
  merged, w_rp = merge_statistics(mean_rp, var_rp, mean_es, var_es)

  def select(g, m_rp, m_es):
    # Exact single-estimator fallbacks, not g's rounding of them.
    out = jnp.where(rp_ok & es_ok, g,
                    jnp.where(rp_ok, m_rp, jnp.where(es_ok, m_es, 0)))
    return jnp.where(jnp.isfinite(out), out, 0)

  g = jax.tree_util.tree_map(select, merged, mean_rp, mean_es)
  w_rp = jax.tree_util.tree_map(
      lambda w: jnp.where(rp_ok & es_ok, w, jnp.where(rp_ok, 1, 0)
                          ).astype(w.dtype), w_rp)

  diagnostics = {
      "rp_weight_mean": jnp.mean(_concat_flat(w_rp)),
      "rp_log_var_median": jnp.median(jnp.log(_concat_flat(var_rp))),
      "es_log_var_median": jnp.median(jnp.log(_concat_flat(var_es))),
      "rp_nonfinite": (n_rp - count_rp).astype(jnp.int32),
      "es_nonfinite": (n_es - count_es).astype(jnp.int32),
      "num_samples": jnp.asarray(n_rp, dtype=jnp.int32),
  }
  return g, diagnostics
