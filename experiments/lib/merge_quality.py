"""How close the hybrid's merge comes to the better of RP and ES (E7 part 1).

From one fixed inner state (n inner problems advanced to inner step p by the
estimator's own truncations), `collect_draws` runs D independent antithetic
truncations of k steps (fresh perturbations, batches and inner keys each) and
keeps every per-sample RP and ES gradient: arrays [D, n, d]. `replay` then
applies merge rules to each draw and compares the total variance over draws
(summed over the d coordinates) with that of RP's mean and ES's mean alone,
and with two oracles that know the per-coordinate statistics of all D x n
samples, and with the paper's formula under its fixed floor:

  oracle_independent  inverse-variance weights w = V_es / (V_rp + V_es),
                      the paper's rule with the true variances of the means;
  oracle_paired       the minimum-variance weights of two correlated
                      estimates, w = (V_es - C) / (V_rp + V_es - 2 C),
                      clipped to [0, 1] (C: covariance of the two means).
"""

import time
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from pathology_fix_core import variational


def _flat_samples(tree) -> np.ndarray:
  """Leaves [n, ...] -> [n, d] float64, leaves in tree order."""
  leaves = jax.tree_util.tree_leaves(tree)
  n = np.shape(leaves[0])[0]
  return np.concatenate([np.asarray(x, np.float64).reshape(n, -1)
                         for x in leaves], axis=1)


def collect_draws(est, theta, point: int, k: int, num_draws: int, key,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Per-sample RP and ES gradients of `num_draws` truncations from one state.

  est: one of our estimators (its unroller runs the truncations) built with
  truncations of k steps and no stagger. The inner problems are initialized
  once and advanced `point // k` truncations; every draw then starts from
  that same state. Returns dict(rp_pos, rp_neg, es, seconds): the backprop
  gradients of the theta + eps and theta - eps unrolls (RP's sample is their
  mean) and the ES samples, each [D, n, d] float64.
  """
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  weights = gradient_learner.WorkerWeights(
      theta=theta, theta_model_state=None,
      outer_state=gradient_learner.OuterState(0))
  unroller = est.unroller
  state = est.init_worker_state(weights, jax.random.fold_in(key, 0))
  for t in range(point // k):
    out, _ = est.compute_gradient_estimate(
        weights, jax.random.fold_in(jax.random.fold_in(key, 1), t), state)
    state = out.unroll_state
  state, steps_left = unroller.prepare(theta, state, weights.outer_state,
                                       jax.random.fold_in(key, 2))
  treedef = jax.tree_util.tree_structure(theta)
  pos_all, neg_all, es_all = [], [], []
  t0 = time.perf_counter()
  for r in range(num_draws):
    key_r = jax.random.fold_in(jax.random.fold_in(key, 3), r)
    eps = est.perturbations(key_r, theta)
    losses, rp_pairs, _ = unroller.truncate(
        theta, eps, state, jax.random.fold_in(key_r, 1), k,
        with_rp_grads=True, steps_left=steps_left)
    es = variational.es_gradient_sample(losses[0], losses[1], eps, est.sigma)
    for sign, out in ((0, pos_all), (1, neg_all)):
      out.append(_flat_samples(treedef.flatten_up_to(
          jax.tree_util.tree_map(lambda g, s=sign: g[s], rp_pairs))))
    es_all.append(_flat_samples(treedef.flatten_up_to(es)))
    if (r + 1) % 10 == 0:
      log(f"    draw {r + 1}/{num_draws} "
          f"({time.perf_counter() - t0:.0f} s)")
  return dict(rp_pos=np.stack(pos_all), rp_neg=np.stack(neg_all),
              es=np.stack(es_all),
              seconds=time.perf_counter() - t0)


def leaf_sizes(theta) -> np.ndarray:
  """Sizes of theta's leaves in tree order (tensor boundaries of [d])."""
  return np.asarray([np.size(x) for x in jax.tree_util.tree_leaves(theta)])


def _oracle_weights(rp: np.ndarray, es: np.ndarray):
  """(independent, paired) per-coordinate RP weights from all D x n samples."""
  n = rp.shape[1]
  r = rp.reshape(-1, rp.shape[-1])
  e = es.reshape(-1, es.shape[-1])
  v_rp = r.var(axis=0, ddof=1) / n
  v_es = e.var(axis=0, ddof=1) / n
  c = np.mean((r - r.mean(0)) * (e - e.mean(0)), axis=0) / n
  tiny = np.finfo(np.float64).tiny
  independent = (v_es + tiny) / (v_rp + v_es + 2 * tiny)
  paired = np.clip((v_es - c) / np.maximum(v_rp + v_es - 2 * c, tiny), 0, 1)
  return independent, paired


def fixed_floor_merge(rp: np.ndarray, es: np.ndarray,
                      floor: float = 1e-8) -> np.ndarray:
  """The paper's formula with its absolute floor (Sec. 4.3; the released
  code adds 1e-8), per coordinate: [D, n, d] -> [D, d]. What this project
  merged with before the scale-invariant rule, for comparison."""
  n = rp.shape[1]
  v_rp = rp.var(axis=1, ddof=1) / n + floor
  v_es = es.var(axis=1, ddof=1) / n + floor
  w = v_es / (v_rp + v_es)
  return w * rp.mean(axis=1) + (1 - w) * es.mean(axis=1)


def replay(rp_pos: np.ndarray, rp_neg: np.ndarray, es: np.ndarray,
           sizes: np.ndarray, merge: Callable) -> Dict[str, float]:
  """Total variance over draws of each rule, over min(RP alone, ES alone).

  rp_pos, rp_neg, es: [D, n, d]. merge: fn(rp_leaves, es_leaves,
  half_leaves) -> (g_leaves, diagnostics), each a list of [n, size] arrays
  (one per tensor; `combine.inverse_variance_merge`). Returns the ratios of
  the merge ("hybrid"), the fixed-floor rule, both oracles and RP and ES
  alone, each to the better of RP and ES alone.
  """
  rp, half = (rp_pos + rp_neg) / 2, (rp_pos - rp_neg) / 2
  mean_rp, mean_es = rp.mean(axis=1), es.mean(axis=1)
  total = lambda g: float(g.var(axis=0, ddof=1).sum())
  best = min(total(mean_rp), total(mean_es))
  w_ind, w_pair = _oracle_weights(rp, es)
  bounds = np.cumsum(sizes)[:-1]
  leaves = lambda x: [jnp.asarray(a, jnp.float32)
                      for a in np.split(x, bounds, axis=2)]
  g, _ = jax.jit(jax.vmap(merge))(leaves(rp), leaves(es), leaves(half))
  g = np.concatenate([np.asarray(x, np.float64) for x in g], axis=1)
  return dict(
      hybrid_over_best=total(g) / best,
      oracle_over_best=total(w_ind * mean_rp + (1 - w_ind) * mean_es) / best,
      oracle_paired_over_best=total(w_pair * mean_rp +
                                    (1 - w_pair) * mean_es) / best,
      fixed_floor_over_best=total(fixed_floor_merge(rp, es)) / best,
      rp_over_best=total(mean_rp) / best, es_over_best=total(mean_es) / best)


def meets_target(row: Dict[str, float], target: float = 1.1) -> bool:
  """At most `target` x the better estimator, or, where even the oracle
  is above that (shared task spread no weighting removes), at most
  `target` x the oracle."""
  return (row["hybrid_over_best"] <= target or
          row["hybrid_over_best"] <= target * row["oracle_over_best"])


def table(rows) -> str:
  """Markdown: one row per setting, ratios to the better of RP and ES."""
  lines = ["| theta | inner step | k | draws | hybrid | oracle (inverse "
           "variance) | oracle (paired) | fixed floor 1e-8 | target |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    note = "met" if r["meets_target"] else "missed"
    if r["oracle_above_target"]:
      note += " (oracle above 1.1x: target 1.1x the oracle)"
    lines.append(
        f"| {r['theta']} | {r['inner_step']} | {r['k']} | {r['draws']} | "
        f"{r['hybrid_over_best']:.2f} | {r['oracle_over_best']:.2f} | "
        f"{r['oracle_paired_over_best']:.2f} | "
        f"{r['fixed_floor_over_best']:.3g} | {note} |")
  return "\n".join(lines)
