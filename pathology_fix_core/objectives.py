"""Outer (meta) loss over a truncation: clipped mean of per-step losses.

The released code of Metz et al. (2019) clips every inner step's loss at 10
before averaging over the unrolled steps, so one diverging step cannot
dominate the outer objective (and has zero gradient once clipped); the paper,
Sec. 5; docs/method.md §7.
"""

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from pathology_fix_core import errors


def validate_max_loss(max_loss: float) -> float:
  """Checks the loss clip value; returns it as a Python float.

  Raises:
    ValueError: if ``max_loss`` is not a number > 0 (``inf`` means no clip).
  """
  try:
    value = float(max_loss)
  except (TypeError, ValueError) as e:
    raise errors.InvalidArgument(f"max_loss must be > 0, got {max_loss!r}",
                                 "max_loss") from e
  if math.isnan(value) or value <= 0.0:
    raise errors.InvalidArgument(f"max_loss must be > 0, got {max_loss!r}",
                                 "max_loss")
  return value


def clipped_loss_sum_and_count(
    per_step_losses: jax.Array,
    mask: Optional[jax.Array] = None,
    max_loss: float = 10.0) -> Tuple[jax.Array, jax.Array]:
  """Sum over valid steps of ``min(loss_t, max_loss)``, and the step count.

    total[...] = sum_t mask[t, ...] * min(loss[t, ...], max_loss)
    count[...] = sum_t mask[t, ...]

  Steps with ``mask == False`` are zeroed before the sum, so any value there
  (inf/NaN included) contributes nothing. Chunked unrolls add these sums over
  chunks and divide once at the end.

  Args:
    per_step_losses: array of shape ``[k, ...]`` (step axis first).
    mask: None (all steps valid), or a boolean array of shape ``[k, ...]``, or
      of shape ``[k]`` (applied to every trailing column).
    max_loss: clip value, > 0 (a concrete value is validated; a traced one is
      used as is).

  Returns:
    ``(total, count)``, both of shape ``[...]`` and the losses' dtype.
  """
  if isinstance(max_loss, (int, float)):
    validate_max_loss(max_loss)
  losses = jnp.asarray(per_step_losses)
  if losses.ndim < 1:
    raise ValueError("per_step_losses must have a leading step axis")
  clipped = jnp.minimum(losses, max_loss)
  if mask is None:
    mask = jnp.ones(losses.shape, dtype=bool)
  mask = jnp.asarray(mask, dtype=bool)
  if mask.shape == losses.shape[:1]:
    mask = mask.reshape(mask.shape + (1,) * (losses.ndim - 1))
  elif mask.shape != losses.shape:
    raise ValueError(f"mask shape {mask.shape} must be {losses.shape} or "
                     f"{losses.shape[:1]}")
  mask = jnp.broadcast_to(mask, losses.shape)
  total = jnp.sum(jnp.where(mask, clipped, 0), axis=0)
  count = jnp.sum(mask, axis=0).astype(total.dtype)
  return total, count


def clipped_mean_loss(per_step_losses: jax.Array,
                      mask: Optional[jax.Array] = None,
                      max_loss: float = 10.0) -> jax.Array:
  """Mean over steps of ``min(loss_t, max_loss)``, counting valid steps only.

    out[...] = total[...] / count[...]   (0 where the count is 0)

  with ``total, count = clipped_loss_sum_and_count(...)``.

  Returns:
    Array of shape ``[...]`` for ``per_step_losses`` of shape ``[k, ...]``.
  """
  total, count = clipped_loss_sum_and_count(per_step_losses, mask, max_loss)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0)


META_LOSS_CLIP_MODES = ("per_batch", "mean")


def validate_clip_mode(clip_mode: str) -> str:
  """Checks `meta_loss_clip_mode`; returns it.

  Raises:
    ValueError: if ``clip_mode`` is not one of ``META_LOSS_CLIP_MODES``.
  """
  if clip_mode not in META_LOSS_CLIP_MODES:
    raise errors.InvalidArgument(
        f"meta_loss_clip_mode ({clip_mode!r}) must be one of "
        f"{META_LOSS_CLIP_MODES}", "meta_loss_clip_mode")
  return clip_mode


def batch_averaged_meta_loss(batch_losses: jax.Array,
                             max_loss: float = 10.0,
                             clip_mode: str = "per_batch") -> jax.Array:
  """One step's meta-loss from several evaluation batches.

    "per_batch" (the released code of Metz et al.):
        out[...] = mean_b min(loss[b, ...], max_loss)
    "mean" (clip applied afterwards, to the mean, by the per-step clip):
        out[...] = mean_b loss[b, ...]

  With "per_batch" a diverged batch adds exactly max_loss / B and no gradient;
  with "mean" it can push the mean over the clip and zero the gradient of
  every batch of that step.

  Args:
    batch_losses: array of shape ``[B, ...]`` (batch axis first).
    max_loss: clip value, > 0.
    clip_mode: "per_batch" or "mean".

  Returns:
    Array of shape ``[...]``.
  """
  validate_clip_mode(clip_mode)
  if isinstance(max_loss, (int, float)):
    validate_max_loss(max_loss)
  losses = jnp.asarray(batch_losses)
  if losses.ndim < 1:
    raise ValueError("batch_losses must have a leading batch axis")
  if clip_mode == "per_batch":
    losses = jnp.minimum(losses, max_loss)
  return jnp.mean(losses, axis=0)
