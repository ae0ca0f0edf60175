"""Every estimator variant returns a finite gradient.

Bad samples (inf, NaN, or finite samples so large that their mean overflows)
are injected through the public `estimators.combine_samples`, in every mode,
and produced for real inside an `EstimatorMixture` run through LO's
`gradient_worker_compute`: the other estimator's contribution must survive.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import estimator_fixtures as fx
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import gradient_learner
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import base as tasks_base
from pathology_fix.meta_gradient import estimators
from pathology_fix.meta_gradient import mixing
from test_combine import np_merge

N = 16
HUGE = 3e37  # finite in float32; 16 of them sum to inf
SIGMA = float(np.sqrt(0.5))  # 2 sigma^2 = 1: ES sample = (L+ - L-) * eps
SHAPES = {"a": (3,), "b": (2, 2)}


def _clean_inputs(seed=0):
  """Finite losses [2, N], RP pair gradients [2, N, ...] and eps [N, ...]."""
  rng = np.random.default_rng(seed)
  losses = rng.normal(size=(2, N)).astype(np.float32)
  pair = {k: rng.normal(size=(2, N) + s).astype(np.float32)
          for k, s in SHAPES.items()}
  eps = {k: (SIGMA * rng.normal(size=(N,) + s)).astype(np.float32)
         for k, s in SHAPES.items()}
  return losses, pair, eps


def _inject(kind):
  """Inputs with bad RP and ES samples of one kind, and what to expect.

  Returns (losses, pair, eps, rp_dropped, es_dropped, zeroed_coordinate).
  """
  losses, pair, eps = _clean_inputs()
  if kind == "inf":
    pair["a"][0, 3, 1] = np.inf    # RP sample 3
    losses[0, 5] = -np.inf         # ES sample 5
    return losses, pair, eps, [3], [5], None
  if kind == "nan":
    pair["b"][1, 2, 0, 1] = np.nan  # RP sample 2
    losses[1, 7] = np.nan           # ES sample 7
    return losses, pair, eps, [2], [7], None
  # Huge: every sample of coordinate a[0] is 3e37 in both estimators, all
  # finite (ES: coefficient 3e7 times eps 1e30); the other coordinates are
  # ordinary numbers.
  pair["a"][:, :, 0] = HUGE
  losses[0], losses[1] = 3e7, 0.0
  eps["a"][:, 0] = 1e30
  return losses, pair, eps, [], [], ("a", 0)


def _np_samples(losses, pair, eps):
  """RP and ES samples and RP's half-differences in float64, from the
  paper's formulas."""
  l64 = losses.astype(np.float64)
  rp = {k: (v[0].astype(np.float64) + v[1]) / 2 for k, v in pair.items()}
  half = {k: (v[0].astype(np.float64) - v[1]) / 2 for k, v in pair.items()}
  coeff = (l64[0] - l64[1]) / (2 * SIGMA**2)
  es = {k: coeff.reshape((N,) + (1,) * len(SHAPES[k])) * v.astype(np.float64)
        for k, v in eps.items()}
  return rp, es, half


def _np_finite_mean(samples):
  n = next(iter(samples.values())).shape[0]
  ok = np.ones(n, bool)
  for v in samples.values():
    ok &= np.isfinite(v.reshape(n, -1)).all(axis=1)
  return {k: v[ok].mean(axis=0) for k, v in samples.items()}


@pytest.mark.parametrize("kind", ["inf", "nan", "huge"])
@pytest.mark.parametrize("mode", estimators.MERGES)
def test_every_mode_drops_bad_samples_and_stays_finite(mode, kind):
  losses, pair, eps, rp_dropped, es_dropped, zeroed = _inject(kind)
  grad, diag = estimators.combine_samples(
      jnp.asarray(losses), jax.tree_util.tree_map(jnp.asarray, pair),
      jax.tree_util.tree_map(jnp.asarray, eps), SIGMA,
      merge_fn=estimators.MERGES[mode])
  for k, v in grad.items():
    assert v.shape == SHAPES[k] and v.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(v))), (mode, kind, k, v)

  rp, es, half = _np_samples(losses, pair, eps)
  want = {"rp": lambda: _np_finite_mean(rp),
          "es": lambda: _np_finite_mean(es),
          "hybrid": lambda: np_merge(rp, es, half)[0]}[mode]()
  for k, v in want.items():
    got = np.asarray(grad[k], np.float64)
    ok = np.isfinite(v)  # float64 reference: nothing overflows here
    if zeroed and k == zeroed[0]:
      ok[zeroed[1]] = False
      assert got[zeroed[1]] == 0.0
    np.testing.assert_allclose(got[ok], v[ok], rtol=2e-4, atol=1e-5,
                               err_msg=f"{mode} {kind} {k}")

  assert int(diag["overflow_zeroed"]) == (1 if zeroed else 0)
  uses = {"rp": ["rp"], "es": ["es"], "hybrid": ["rp", "es"]}[mode]
  dropped = {"rp": rp_dropped, "es": es_dropped}
  for name in uses:
    assert int(diag[f"{name}_nonfinite"]) == len(dropped[name])
    assert int(diag[f"num_samples_{name}"]) == N - len(dropped[name])
  for name in {"rp", "es"} - set(uses):
    # That estimator is not computed: no samples, no weight.
    assert int(diag[f"num_samples_{name}"]) == 0
    assert float(diag["rp_weight_mean"]) == (1.0 if name == "es" else 0.0)


class _SteepLinearTask(tasks_base.Task):
  """loss = 7e18 * w from w = 0: with lr = 1 each RP sample is about -7e37.

  Every quantity stays finite in float32 (losses ~1e38, products ~5e37), but
  the sum of 16 RP samples overflows: the mean of finite samples is -inf.
  """

  def loss(self, params, key, data):
    del key, data
    return 7e18 * jnp.sum(params["w"])

  def init(self, key):
    del key
    return {"w": jnp.zeros((1,))}


def _steep_family(key=None):
  del key
  return tasks_base.single_task_to_family(_SteepLinearTask(), name="steep")


@pytest.mark.parametrize("cls", [estimators.VariationalRP,
                                 estimators.HybridRPES])
def test_mixture_keeps_the_other_estimators_gradient(cls):
  """One estimator's samples overflow; LO must not zero the whole coordinate.

  LO's `gradient_worker_compute` averages the estimators' gradients and then
  replaces non-finite coordinates by 0, so an inf from ours would erase the
  other estimator's contribution too.
  """
  def ours(family, lopt):
    return cls(family, lopt, truncation_schedule.ConstantTruncationSchedule(2),
               num_tasks=N, unroll_length=2, steps_per_jit=1, sigma=0.1,
               max_loss=float("inf"))

  def other(family, lopt):
    return estimators.VariationalES(
        family, lopt, truncation_schedule.ConstantTruncationSchedule(10),
        num_tasks=8, unroll_length=10, steps_per_jit=5, sigma=0.1)

  lopt = lopt_base.LearnableSGD(initial_lr=1.0)
  mixture = mixing.EstimatorMixture([ours, other],
                                    task_family_fns=[_steep_family, None])
  ests = [mixture(fx.fixed_quadratic_family(), lopt) for _ in range(2)]
  assert ests[0].task_family.name == "steep"
  theta = lopt.init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  states = [e.init_worker_state(weights, jax.random.PRNGKey(i))
            for i, e in enumerate(ests)]
  key = jax.random.PRNGKey(5)
  out = gradient_learner.gradient_worker_compute(
      weights, ests, states, key, with_metrics=True)

  # Each estimator alone, with the key LO's loop hands it (split in order).
  singles = []
  for est, state in zip(ests, states):
    key, rng = jax.random.split(key)
    single, metrics = est.compute_gradient_estimate(weights, rng, state)
    singles.append((float(single.grad["log_lr"]), metrics))
  (g_ours, m_ours), (g_other, _) = singles
  mixed = float(out.to_put.theta_grads["log_lr"])
  assert g_other != 0.0 and np.isfinite(g_ours), (g_ours, g_other)
  np.testing.assert_allclose(mixed, (g_ours + g_other) / 2, rtol=1e-6)
  assert g_ours == 0.0
  assert int(m_ours["mean||overflow_zeroed"]) == 1  # it did overflow
  assert int(m_ours["mean||num_samples_rp"]) == N   # from finite samples
  assert out.metrics["mean||steep/overflow_zeroed"] == 1
