"""The merge of RP and ES gradient samples: per coordinate, by inverse variance.

The paper (Metz et al. 2019, Sec. 4.3; `docs/method.md` §5) weighs the mean of
each estimator by the inverse of its variance. Over the FINITE samples of each
estimator (``c_rp`` and ``c_es`` of them), per coordinate of theta:

  mean_rp, mean_es    sample means
  v_rp, v_es          the noise of each MEAN that the weights see (below)
  w_rp                = v_es / (v_rp + v_es)
  g                   = w_rp * mean_rp + (1 - w_rp) * mean_es

What the weights see, and why:

* Only each estimator's OWN noise. Sample i's RP and ES values come from the
  same two unrolls, on the same task and batches: both are that sample's
  smoothed gradient s_i plus a noise of their own, rp_i = s_i + x_i and
  es_i = s_i + e_i. The spread of s_i over tasks is in both means alike; no
  weight removes it, and counting it in both variances pulls the weights
  towards 1/2 and lets ES noise in. The minimum-variance weight is
  Var(e) / (Var(x) + Var(e)). RP's own noise is read from the antithetic
  half-difference h_i = (grad L(theta + eps_i) - grad L(theta - eps_i)) / 2,
  which shares sample i's task and batches and so holds no s_i: where the
  unroll is chaotic the two gradients are independent and h_i has exactly
  the variance of x_i; where it is smooth h_i's (first-order) variance is the
  larger, so RP is never over-trusted. RP's noise is
  min(var(rp) / c_rp, mean(h^2) / c_rp) per coordinate (`rp_noise`); without
  half-differences it is var(rp) / c_rp, the paper's rule.
* ES's variance is pooled per tensor by default (`per_tensor`): ES's noise
  is nearly the same for every coordinate of a tensor (about
  |g|^2 + g_j^2 per sample), and averaging the estimate over the tensor
  removes the estimation noise of c samples. RP's noise spans orders of
  magnitude within a tensor, so it stays per coordinate (`per_coordinate`).
  Either pooling can be passed for either estimator.
* No absolute floor: the weights are a ratio of variances, so scaling every
  sample by a gives a * g with identical weights. Only the float's smallest
  normal number is added to each variance, so 0 / 0 cannot occur.
* An estimator gets weight only with at least ``min_samples`` finite samples
  (default `MIN_FINITE_SAMPLES` = 5). Why 5: its variance estimate then has
  c - 1 >= 4 degrees of freedom. When RP is R times noisier than ES on a
  coordinate, a chance-low RP variance estimate lets that noise in with an
  expected excess of order R^(1 - (c - 1) / 2) times ES's variance: for
  c <= 3 it does not vanish as R grows, for c >= 5 it falls at least as 1/R.
  If neither estimator has ``min_samples``, the one with more finite samples
  is used alone (RP on a tie); with none at all the result is 0 and the
  ``skipped`` diagnostic is 1.

A sample whose value is non-finite in ANY coordinate of ANY leaf is dropped
from its own estimator, so an exploding RP unroll cannot poison ES. A
coordinate whose result still overflows is set to 0 and counted. With one
estimator (the other given as None: the RP-only and ES-only ablations,
NoiseReuseES) the same function returns the mean of its finite samples; no
variance is needed, so any finite sample counts.

Known bias: the weights come from the same samples as the means, so the merge
is not exactly unbiased when a sample mean and its variance move together
(e.g. skewed RP samples: a high mean comes with a high variance, hence a low
RP weight). `tests/test_combine.py` measures it against an exact calculation.
"""

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from pathology_fix_core import errors

PyTree = Any
Pooling = Callable[[jax.Array], jax.Array]

MIN_FINITE_SAMPLES = 5


def per_coordinate(variance: jax.Array) -> jax.Array:
  """Pooling that keeps every coordinate's own variance estimate."""
  return variance


def per_tensor(variance: jax.Array) -> jax.Array:
  """Pooling that gives every coordinate of a tensor the tensor's mean.

  The mean is over the finite entries; an entry that overflowed keeps its
  inf/NaN, so one overflowing coordinate cannot spoil the rest of the tensor.
  """
  finite = jnp.isfinite(variance)
  mean = jnp.sum(jnp.where(finite, variance, 0)) / jnp.maximum(
      jnp.sum(finite), 1).astype(variance.dtype)
  return jnp.where(finite, mean, variance)


POOLINGS = {"coordinate": per_coordinate, "tensor": per_tensor}


def pooling(name: str, parameter: str = "pooling") -> Pooling:
  """The pooling function called ``name`` ("coordinate" or "tensor")."""
  if name not in POOLINGS:
    raise errors.InvalidArgument(
        f"{parameter} ({name!r}) must be one of {sorted(POOLINGS)}", parameter)
  return POOLINGS[name]


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


def _pick(pairs: PyTree, index: int) -> PyTree:
  is_pair = lambda p: isinstance(p, tuple) and len(p) == 2
  return jax.tree_util.tree_map(lambda p: p[index], pairs, is_leaf=is_pair)


def _masked_mean(x: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
  """``sum_i mask_i x_i / max(count, 1)`` over axis 0; masked-out rows -> 0."""
  m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
  return jnp.sum(jnp.where(m, x, 0), axis=0) / jnp.maximum(
      count.astype(x.dtype), 1)


def masked_mean_and_variance(
    tree: PyTree, mask: jax.Array) -> Tuple[PyTree, PyTree, jax.Array]:
  """Sample mean and unbiased variance over the samples selected by ``mask``.

    c    = sum_i mask_i
    mean = sum_i mask_i x_i / max(c, 1)
    var  = sum_i mask_i (x_i - mean)^2 / max(c - 1, 1)

  Unselected samples are replaced by 0 before any sum, so their inf/NaN
  values never reach the result. With ``c == 0`` the mean and variance are
  0; with ``c == 1`` the variance is 0.

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
    mean = _masked_mean(x, mask, count)
    dev = x - mean
    var = _masked_mean(dev * dev, mask, jnp.maximum(count - 1, 1))
    return mean, var

  pairs = jax.tree_util.tree_map(stats, tree)
  return _pick(pairs, 0), _pick(pairs, 1), count


def zero_nonfinite(tree: PyTree) -> Tuple[PyTree, jax.Array]:
  """The final guard: non-finite coordinates become 0.

  Returns:
    ``(guarded, num_zeroed)``: ``tree`` with every inf/NaN entry replaced by
    0, and the int32 number of entries replaced (over all leaves).
  """
  guarded = jax.tree_util.tree_map(
      lambda x: jnp.where(jnp.isfinite(x), x, 0).astype(x.dtype), tree)
  num_zeroed = sum(
      jnp.sum(~jnp.isfinite(x)).astype(jnp.int32)
      for x in jax.tree_util.tree_leaves(tree))
  return guarded, jnp.asarray(num_zeroed, jnp.int32)


def merge_statistics(mean_rp: PyTree, var_rp: PyTree, mean_es: PyTree,
                     var_es: PyTree) -> Tuple[PyTree, PyTree]:
  """The inverse-variance formula, per coordinate.

    w_rp = var_es / (var_rp + var_es)
    g    = w_rp * mean_rp + (1 - w_rp) * mean_es

  (the same as weighing each mean by 1 / its variance, written as a ratio so
  it does not depend on the variances' scale). ``var_*`` are the variances of
  the two estimates being merged; the float's tiny is added to each so that
  two zero variances give w_rp = 1/2. A variance of ``+inf`` gives that
  estimator weight 0 (its mean must then still be finite); where both are
  ``+inf``, g is NaN (for the caller's guard) and w_rp 1/2.

  Args:
    mean_rp, var_rp, mean_es, var_es: pytrees of one structure with matching
      leaf shapes ``[...]``; variances >= 0.

  Returns:
    ``(g, w_rp)``: pytrees shaped like ``mean_rp``.
  """
  def formula(m_rp, v_rp, m_es, v_es):
    tiny = jnp.finfo(jnp.result_type(v_rp, v_es)).tiny
    v_rp, v_es = v_rp + tiny, v_es + tiny
    both_inf = jnp.isinf(v_rp) & jnp.isinf(v_es)
    w = jnp.where(both_inf, 0.5, jnp.where(jnp.isinf(v_es), 1.0,
                                           v_es / (v_rp + v_es)))
    # Exactly one mean where the other has weight 0 (inf * 0 would be NaN);
    # NaN where neither variance is finite, for the caller's guard.
    g = jnp.where(w == 1, m_rp, jnp.where(w == 0, m_es,
                                          w * m_rp + (1 - w) * m_es))
    return jnp.where(both_inf, jnp.nan, g), w

  pairs = jax.tree_util.tree_map(formula, mean_rp, var_rp, mean_es, var_es)
  return _pick(pairs, 0), _pick(pairs, 1)


def _concat_flat(tree: PyTree) -> jax.Array:
  leaves = [jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)]
  dtype = jnp.result_type(*leaves)
  return jnp.concatenate([x.astype(dtype) for x in leaves])


def rp_noise(rp_var: jax.Array, rp_half_difference_sq: Optional[jax.Array],
             count: jax.Array) -> jax.Array:
  """RP's own noise in its mean: min(var(rp), mean(h^2)) / c (module doc)."""
  own = rp_var if rp_half_difference_sq is None else jnp.minimum(
      rp_var, rp_half_difference_sq)
  return own / jnp.maximum(count, 1).astype(own.dtype)


def _check_trees(rp_samples, es_samples, rp_half_differences):
  if rp_samples is None and es_samples is None:
    raise ValueError("inverse_variance_merge needs rp_samples, es_samples "
                     "or both")
  trees = [t for t in (rp_samples, es_samples, rp_half_differences)
           if t is not None]
  structures = {jax.tree_util.tree_structure(t) for t in trees}
  if len(structures) != 1:
    raise ValueError("rp_samples, es_samples and rp_half_differences must "
                     "have the same structure")
  for t in trees:
    _leading_size(t)
  if rp_half_differences is not None and (
      rp_samples is None or
      _leading_size(rp_half_differences) != _leading_size(rp_samples)):
    raise ValueError("rp_half_differences needs rp_samples with the same "
                     "number of samples")


def _estimator_stats(samples, extra=None):
  """(mean, var, mean of extra^2 or None, count, dropped) over finite rows."""
  mask = per_sample_finite(samples)
  if extra is not None:
    mask = mask & per_sample_finite(extra)
  mean, var, count = masked_mean_and_variance(samples, mask)
  extra_sq = None if extra is None else jax.tree_util.tree_map(
      lambda h: _masked_mean(jnp.asarray(h) ** 2, mask, count), extra)
  dropped = (_leading_size(samples) - count).astype(jnp.int32)
  return mean, var, extra_sq, count, dropped


def _absent(like):
  """The statistics of an estimator that was not given: no finite sample."""
  zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x)[1:],
                                                      jnp.asarray(x).dtype),
                                 like)
  return zeros, zeros, None, jnp.asarray(0, jnp.int32), jnp.asarray(
      0, jnp.int32)


def inverse_variance_merge(
    rp_samples: Optional[PyTree],
    es_samples: Optional[PyTree],
    rp_half_differences: Optional[PyTree] = None,
    *,
    rp_pooling: Pooling = per_coordinate,
    es_pooling: Pooling = per_tensor,
    min_samples: int = MIN_FINITE_SAMPLES,
) -> Tuple[PyTree, Dict[str, jax.Array]]:
  """Merges RP and ES gradient samples by per-coordinate inverse variance.

  See the module docstring for the rule. Jit-able; no Python branching on
  values.

  Args:
    rp_samples: pytree with leaves ``[n_rp, ...]``, one RP sample per row, or
      None (ES alone).
    es_samples: pytree of the same structure, leaves ``[n_es, ...]``, or None
      (RP alone).
    rp_half_differences: optional, shaped like ``rp_samples``: each sample's
      (grad L(theta + eps) - grad L(theta - eps)) / 2, from which RP's own
      noise is read (`rp_noise`); None weighs RP by its whole variance.
    rp_pooling, es_pooling: how each estimator's per-coordinate variance is
      pooled within a tensor: `per_coordinate` (RP's default) or
      `per_tensor` (ES's default).
    min_samples: finite samples an estimator needs to get weight when both
      are given (>= 2).

  Returns:
    ``(g, diagnostics)``. ``g`` is a pytree with leaves ``[...]``.
    ``diagnostics`` maps to scalars:
      ``rp_weight_mean``: mean of ``w_rp`` over all coordinates of all leaves;
      ``rp_log_var_median``, ``es_log_var_median``: median over coordinates
        of the log of the variance each mean was weighted by (``+inf`` for
        an estimator without weight);
      ``rp_nonfinite``, ``es_nonfinite``: int32 numbers of dropped samples;
      ``num_samples_rp``, ``num_samples_es``: int32 finite samples kept;
      ``overflow_zeroed``: int32 coordinates of ``g`` set to 0 because they
        overflowed;
      ``skipped``: int32, 1 when no sample of any estimator was finite (``g``
        is then 0 and carries no information).
  """
  if int(min_samples) < 2:
    raise errors.InvalidArgument(
        f"min_samples ({min_samples!r}) must be >= 2: a variance needs two "
        "samples", "min_samples")
  _check_trees(rp_samples, es_samples, rp_half_differences)
  rp = (_absent(es_samples) if rp_samples is None else
        _estimator_stats(rp_samples, rp_half_differences))
  es = (_absent(rp_samples) if es_samples is None else
        _estimator_stats(es_samples))
  (mean_rp, var_rp, h_sq, count_rp, dropped_rp) = rp
  (mean_es, var_es, _, count_es, dropped_es) = es

  both = rp_samples is not None and es_samples is not None
  rp_ok = count_rp >= min_samples
  es_ok = count_es >= min_samples
  # Who carries the gradient: both (merge), or one alone.
  rp_alone = ~es_ok & (rp_ok | (count_rp >= jnp.maximum(count_es, 1)))
  es_alone = ~rp_ok & ~rp_alone & (count_es >= 1)
  if not both:
    rp_alone = jnp.asarray(rp_samples is not None) & (count_rp >= 1)
    es_alone = jnp.asarray(es_samples is not None) & (count_es >= 1)
  merged_ok = both & rp_ok & es_ok

  if h_sq is None:
    noise_rp = jax.tree_util.tree_map(
        lambda v: rp_pooling(rp_noise(v, None, count_rp)), var_rp)
  else:
    noise_rp = jax.tree_util.tree_map(
        lambda v, h: rp_pooling(rp_noise(v, h, count_rp)), var_rp, h_sq)
  noise_es = jax.tree_util.tree_map(
      lambda v: es_pooling(v / jnp.maximum(count_es, 1).astype(v.dtype)),
      var_es)
  merged, w_merge = merge_statistics(mean_rp, noise_rp, mean_es, noise_es)

  def select(g, m_rp, m_es):
    return jnp.where(merged_ok, g, jnp.where(
        rp_alone, m_rp, jnp.where(es_alone, m_es, 0))).astype(m_rp.dtype)

  g, overflow_zeroed = zero_nonfinite(
      jax.tree_util.tree_map(select, merged, mean_rp, mean_es))
  w_rp = jax.tree_util.tree_map(
      lambda w: jnp.where(merged_ok, w, jnp.where(rp_alone, 1, 0)
                          ).astype(w.dtype), w_merge)

  def log_median(noise, weighted):
    logs = jnp.log(_concat_flat(noise))
    return jnp.where(weighted, jnp.median(logs), jnp.inf)

  diagnostics = {
      "rp_weight_mean": jnp.mean(_concat_flat(w_rp)),
      "rp_log_var_median": log_median(noise_rp, merged_ok | rp_alone),
      "es_log_var_median": log_median(noise_es, merged_ok | es_alone),
      "rp_nonfinite": dropped_rp,
      "es_nonfinite": dropped_es,
      "num_samples_rp": count_rp.astype(jnp.int32),
      "num_samples_es": count_es.astype(jnp.int32),
      "overflow_zeroed": overflow_zeroed,
      "skipped": (~(merged_ok | rp_alone | es_alone)).astype(jnp.int32),
  }
  return g, diagnostics
