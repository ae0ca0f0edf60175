"""pathology_fix_core.objectives.clipped_mean_loss against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathology_fix_core import objectives as obj


def np_clipped_mean(losses, mask, max_loss):
  losses = np.asarray(losses, np.float64)
  mask = np.broadcast_to(np.asarray(mask, bool), losses.shape)
  out = np.zeros(losses.shape[1:])
  for idx in np.ndindex(*losses.shape[1:]):
    col = losses[(slice(None),) + idx][mask[(slice(None),) + idx]]
    out[idx] = np.minimum(col, max_loss).mean() if col.size else 0.0
  return out


def _losses(seed, shape):
  rng = np.random.default_rng(seed)
  # Log-uniform losses from 0.01 to 1000, so many exceed the clip value.
  return (10.0 ** rng.uniform(-2, 3, size=shape)).astype(np.float32)


@pytest.mark.parametrize("max_loss", [10.0, 1.0, np.inf])
def test_no_mask_matches_reference(max_loss):
  losses = _losses(0, (20, 3, 4))
  got = obj.clipped_mean_loss(losses, max_loss=max_loss)
  assert got.shape == (3, 4)
  want = np_clipped_mean(losses, np.ones(losses.shape, bool), max_loss)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_default_clip_is_ten():
  losses = np.array([1.0, 50.0, 3.0], np.float32)
  np.testing.assert_allclose(obj.clipped_mean_loss(losses), (1 + 10 + 3) / 3,
                             rtol=1e-6)


def test_mask_matches_reference_and_ignores_masked_values():
  losses = _losses(1, (12, 5))
  rng = np.random.default_rng(2)
  mask = rng.uniform(size=losses.shape) < 0.6
  mask[:, 3] = False  # a column with no valid step -> 0
  poisoned = losses.copy()
  poisoned[~mask] = np.nan  # masked-out steps must contribute nothing
  poisoned[~mask & (rng.uniform(size=mask.shape) < 0.5)] = np.inf
  got = jax.jit(obj.clipped_mean_loss)(poisoned, mask)
  want = np_clipped_mean(losses, mask, 10.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(got[3]) == 0.0
  assert np.all(np.isfinite(got))


def test_step_mask_broadcasts_over_columns():
  losses = _losses(3, (8, 6))
  mask = np.arange(8) < 5
  got = obj.clipped_mean_loss(losses, mask, max_loss=20.0)
  want = np_clipped_mean(losses, mask[:, None], 20.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="mask shape"):
    obj.clipped_mean_loss(losses, np.ones((8, 5), bool))


def test_scalar_output_and_gradient_zero_above_clip():
  losses = jnp.array([2.0, 30.0, 4.0, 11.0])
  mask = jnp.array([True, True, True, False])
  grad = jax.grad(lambda l: obj.clipped_mean_loss(l, mask))(losses)
  # Unclipped valid steps get 1/count, clipped or masked steps get 0.
  np.testing.assert_allclose(grad, [1 / 3, 0.0, 1 / 3, 0.0], rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_validate_max_loss(bad):
  with pytest.raises(ValueError, match="max_loss"):
    obj.validate_max_loss(bad)
  with pytest.raises(ValueError, match="max_loss"):
    obj.clipped_mean_loss(jnp.ones(3), max_loss=bad)
  assert obj.validate_max_loss(10) == 10.0


def test_batch_average_clips_each_batch_then_averages():
  # Three distinct batches per column; one of them diverged (25 > 10).
  losses = np.array([[1.0, 2.0], [3.0, 25.0], [25.0, 0.5]], np.float32)
  got = obj.batch_averaged_meta_loss(losses, max_loss=10.0)
  np.testing.assert_allclose(got, [(1 + 3 + 10) / 3, (2 + 10 + 0.5) / 3],
                             rtol=1e-6)
  np.testing.assert_allclose(
      obj.batch_averaged_meta_loss(losses, 10.0, clip_mode="mean"),
      losses.mean(axis=0), rtol=1e-6)
  # The clipped batch passes no gradient; the others pass 1/B each.
  grad = jax.grad(lambda l: jnp.sum(obj.batch_averaged_meta_loss(l, 10.0)))(
      jnp.asarray(losses))
  np.testing.assert_allclose(grad, np.where(losses > 10, 0.0, 1 / 3),
                             rtol=1e-6)


def test_bad_clip_mode_names_the_parameter():
  with pytest.raises(ValueError, match="meta_loss_clip_mode.*per_batch.*mean"):
    obj.batch_averaged_meta_loss(jnp.ones((2,)), clip_mode="median")
