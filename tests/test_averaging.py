"""Theta EMA: the bias-corrected average against its weighted-sum formula."""

import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathology_fix.runtime import theta_averaging
from pathology_fix_core import averaging


def _reference(thetas, decay):
  """sum_i (1 - d) d^(t - i) theta_i / (1 - d^t), in float64, per prefix t."""
  out = []
  for t in range(1, len(thetas) + 1):
    w = np.array([(1 - decay) * decay**(t - i) for i in range(1, t + 1)])
    if decay == 0:
      w = np.eye(t)[-1]
    stacked = np.stack(thetas[:t]).astype(np.float64)
    out.append(np.tensordot(w, stacked, axes=1) / w.sum())
  return out


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
def test_ema_matches_the_weighted_sum_formula(decay):
  rng = np.random.default_rng(0)
  thetas = [rng.normal(size=(3, 2)).astype(np.float32) + i for i in range(40)]
  want = _reference(thetas, decay)
  average, count = averaging.ema_init(thetas[0])
  np.testing.assert_array_equal(average, thetas[0])  # m_1 = theta_1
  update = jax.jit(averaging.ema_update)
  for t in range(1, len(thetas)):
    average, count = update(average, count, thetas[t], decay)
    assert int(count) == t + 1
    np.testing.assert_allclose(average, want[t], rtol=2e-5, atol=2e-5)


def test_early_average_is_not_dominated_by_the_first_theta():
  # With d = 0.999 an uncorrected EMA from theta_1 would still be ~99% theta_1
  # after 10 thetas; the corrected one weights them almost equally.
  thetas = [np.full([4], float(i), np.float32) for i in range(10)]
  average, count = averaging.ema_init(thetas[0])
  for x in thetas[1:]:
    average, count = averaging.ema_update(average, count, x, 0.999)
  assert abs(float(average[0]) - 4.5) < 0.05


def test_weight_starts_at_one_and_decreases_to_one_minus_decay():
  d = 0.99
  w = np.array([float(averaging.ema_weight(t, d)) for t in range(1, 500, 25)])
  assert w[0] == pytest.approx(1.0, rel=1e-5)
  assert np.all(np.diff(w) < 0)
  assert float(averaging.ema_weight(5000, d)) == pytest.approx(1 - d, rel=1e-5)
  # w_2 = (1 - d) / (1 - d^2) = 1 / (1 + d)
  assert float(averaging.ema_weight(2, d)) == pytest.approx(1 / (1 + d),
                                                             rel=1e-5)


def test_runtime_ema_on_a_pytree_and_checkpoint_roundtrip():
  ema = theta_averaging.ThetaEMA(decay=0.9)
  rng = np.random.default_rng(1)
  make = lambda: {"w": rng.normal(size=(2, 3)).astype(np.float32),  # noqa: E731
                  "b": {"c": rng.normal(size=(4,)).astype(np.float32)}}
  thetas = [make() for _ in range(6)]
  state = ema.init(thetas[0])
  for x in thetas[1:3]:
    state = ema.update(state, x)
  restored = flax.serialization.from_bytes(
      ema.init(thetas[0]), flax.serialization.to_bytes(state))
  uninterrupted = state
  for x in thetas[3:]:
    restored = ema.update(restored, x)
    uninterrupted = ema.update(uninterrupted, x)
  for key in ("w",):
    want = _reference([t[key] for t in thetas], 0.9)[-1]
    np.testing.assert_allclose(restored.average[key], want, rtol=1e-5)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.average,
                         uninterrupted.average)
  assert int(restored.count) == 6
  assert restored.average["b"]["c"].dtype == jnp.float32


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, "x", None])
def test_bad_decay_raises(decay):
  with pytest.raises(ValueError, match=r"ThetaEMA\.decay.*\[0, 1\)"):
    theta_averaging.ThetaEMA(decay=decay)


def test_the_core_module_imports_only_jax_and_numpy():
  code = ("import sys, pathology_fix_core.averaging\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('learned_optimization', 'pathology_fix', 'gin', 'flax')))\n")
  out = subprocess.run([sys.executable, "-c", code], check=True, text=True,
                       capture_output=True,
                       cwd=str(pathlib.Path(__file__).parents[1])
                      ).stdout.strip()
  assert out == "[]"
