"""Gaussian-smoothed (variational) outer objective: perturbations and samples.

The smoothed outer objective (the paper, Sec. 4.1; docs/method.md §3-§4) is

  L~(theta) = E_{eps ~ N(0, sigma^2 I)} [ L(theta + eps) ].

From one antithetic pair of unrolls, run with ``theta + eps`` and ``theta - eps``
from the same inner state and the same data, with mean outer losses ``L+`` and
``L-``, two unbiased estimates of ``grad L~(theta)`` are available:

  RP (reparameterization):  g_rp = (grad L(theta + eps) + grad L(theta - eps)) / 2
  ES (evolution strategies): g_es = (L+ - L-) / 2 * eps / sigma^2

Every function here is pure and jit-able, and works on arbitrary pytrees of
floating point arrays (the outer parameters ``theta``). ``validate_sigma`` is the
one exception: it is a Python-level configuration check.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from pathology_fix_core import errors

PyTree = Any


def validate_sigma(sigma: float, name: str = "sigma") -> float:
  """Checks the perturbation scale of the smoothed objective.

  Args:
    sigma: standard deviation of the Gaussian perturbation, a concrete Python
      or NumPy scalar (not a traced value).
    name: what the message calls it, e.g. ``"HybridRPES.sigma"``.

  Returns:
    ``sigma`` as a Python float.

  Raises:
    ValueError: if ``sigma`` is not a finite number > 0.
  """
  try:
    value = float(sigma)
  except (TypeError, ValueError) as e:
    raise errors.InvalidArgument(f"{name} must be > 0, got {sigma!r}",
                                 name) from e
  if not math.isfinite(value) or value <= 0.0:
    raise errors.InvalidArgument(f"{name} must be > 0, got {sigma!r}", name)
  return value


def sample_perturbation(key: jax.Array, theta: PyTree,
                        sigma: float) -> PyTree:
  """Draws one perturbation ``eps ~ N(0, sigma^2 I)`` shaped like ``theta``.

  Every leaf gets its own key, split from ``key``, so leaves of equal shape
  receive independent noise.

  Args:
    key: a JAX PRNG key.
    theta: pytree of floating point arrays; only shapes and dtypes are used.
    sigma: scalar standard deviation (may be a traced value).

  Returns:
    A pytree ``eps`` with the structure of ``theta``; each leaf has the shape
    and dtype of the corresponding ``theta`` leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten(theta)
  if not leaves:
    return theta
  keys = jax.random.split(key, len(leaves))
  eps_leaves = []
  for k, leaf in zip(keys, leaves):
    leaf = jnp.asarray(leaf)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"theta leaves must be floating point, got dtype {leaf.dtype}")
    noise = jax.random.normal(k, leaf.shape, leaf.dtype)
    # Cast back so a float32 sigma does not promote bfloat16/float16 leaves.
    eps_leaves.append((noise * sigma).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, eps_leaves)


def sample_perturbations(key: jax.Array, theta: PyTree, sigma: float,
                         num_samples: int) -> PyTree:
  """Draws ``num_samples`` independent perturbations shaped like ``theta``.

  Args:
    key: a JAX PRNG key.
    theta: pytree of floating point arrays with leaves of shape ``[...]``.
    sigma: scalar standard deviation (may be a traced value).
    num_samples: static Python int ``n >= 1``.

  Returns:
    A pytree with the structure of ``theta`` whose leaves have shape
    ``[n, ...]``; row ``i`` is ``sample_perturbation(keys[i], theta, sigma)``.
  """
  if int(num_samples) < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
  keys = jax.random.split(key, int(num_samples))
  return jax.vmap(lambda k: sample_perturbation(k, theta, sigma))(keys)


def antithetic_thetas(theta: PyTree, eps: PyTree) -> PyTree:
  """Stacks the antithetic pair ``theta + eps`` and ``theta - eps``.

  Args:
    theta: pytree with leaves of shape ``[...]``.
    eps: pytree with the structure of ``theta`` and leaves of shape ``[...]``
      or ``[n, ...]`` (a leading sample axis; ``theta`` is broadcast).

  Returns:
    A pytree with leaves of shape ``[2, ...]`` (or ``[2, n, ...]``): index 0
    holds ``theta + eps`` and index 1 holds ``theta - eps``.
  """
  def pair(t, e):
    return jnp.stack([t + e, t - e], axis=0)

  return jax.tree_util.tree_map(pair, theta, eps)


def _expand_to(x: jax.Array, ndim: int) -> jax.Array:
  """Appends singleton axes to ``x`` so it broadcasts over trailing dims."""
  if x.ndim > ndim:
    raise ValueError(
        f"loss of shape {x.shape} has more dims than a perturbation leaf "
        f"with {ndim} dims")
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def es_gradient_sample(loss_pos: jax.Array, loss_neg: jax.Array, eps: PyTree,
                       sigma: float) -> PyTree:
  """Antithetic ES estimate of the smoothed-objective gradient.

    g_es = (L+ - L-) / 2 * eps / sigma^2

  Args:
    loss_pos: outer loss of the ``theta + eps`` unroll, shape ``[]`` or ``[n]``.
    loss_neg: outer loss of the ``theta - eps`` unroll, same shape.
    eps: the perturbation pytree; leaves ``[...]`` for scalar losses or
      ``[n, ...]`` for losses of shape ``[n]``.
    sigma: scalar standard deviation used to draw ``eps``.

  Returns:
    A pytree shaped like ``eps`` (leaf dtypes kept), one ES sample per row.
  """
  coeff = (jnp.asarray(loss_pos) - jnp.asarray(loss_neg)) / (2.0 * sigma**2)

  def scale(e):
    return (_expand_to(coeff, e.ndim) * e).astype(e.dtype)

  return jax.tree_util.tree_map(scale, eps)


def rp_gradient_sample(grad_pos: PyTree, grad_neg: PyTree) -> PyTree:
  """Antithetic reparameterization estimate of the smoothed gradient.

    g_rp = (grad L(theta + eps) + grad L(theta - eps)) / 2

  Args:
    grad_pos: gradient pytree of the ``theta + eps`` unroll's loss.
    grad_neg: gradient pytree of the ``theta - eps`` unroll's loss, same
      structure and shapes (``[...]`` or ``[n, ...]``).

  Returns:
    A pytree shaped like ``grad_pos``.
  """
  return jax.tree_util.tree_map(lambda a, b: (a + b) / 2, grad_pos, grad_neg)


def noise_reuse_es_sample(loss_pos: jax.Array, loss_neg: jax.Array,
                          eps: PyTree, sigma: float,
                          weight: jax.Array) -> PyTree:
  """Noise-reuse ES (NRES, Li et al. 2023) sample of one truncation.

    g_t = w_t (L+_t - L-_t) / 2 * eps / sigma^2

  ``eps`` is drawn once per inner run and reused by every truncation of it;
  the ``theta + eps`` and ``theta - eps`` branches each continue their own
  inner run (they are not re-synchronized between truncations). ``L+-_t``
  are the mean per-step losses of truncation t and ``w_t = k_t / k`` its
  steps over the nominal truncation length. For a run of T steps cut into
  truncations of nominal length k (the last one may be shorter),
  ``sum_t w_t L_t = (T / k) L_T`` with ``L_T`` the run's mean per-step loss,
  so the sum of the run's samples is ``T / k`` times the antithetic ES
  estimate of ``grad E_eps[L_T(theta + eps)]``: their sum times ``k / T``
  (their mean when k divides T) is unbiased for the gradient of the
  full-horizon smoothed objective. A single g_t is not; nor is the sum when
  theta or k change within the run (online use trades that for fresh
  gradients, as PES does).

  Args:
    loss_pos, loss_neg: ``[]`` or ``[n]`` mean losses of the two branches.
    eps: the run's perturbation, leaves ``[...]`` or ``[n, ...]``.
    sigma: scalar standard deviation used to draw ``eps``.
    weight: ``w_t``, shape ``[]`` or ``[n]`` (0 for a sample that did not
      step).

  Returns:
    A pytree shaped like ``eps``, one sample per row.
  """
  weight = jnp.asarray(weight)
  return es_gradient_sample(weight * jnp.asarray(loss_pos),
                            weight * jnp.asarray(loss_neg), eps, sigma)


def rp_half_difference(grad_pos: PyTree, grad_neg: PyTree) -> PyTree:
  """Half the difference of an antithetic pair's gradients.

    h = (grad L(theta + eps) - grad L(theta - eps)) / 2

  Its mean over eps is 0; it shares the pair's task and batches, so its
  spread is the perturbation's own effect on the gradient, which the merge
  uses as RP's own noise (`combine.rp_noise`).

  Args:
    grad_pos, grad_neg: as in `rp_gradient_sample`.

  Returns:
    A pytree shaped like ``grad_pos``.
  """
  return jax.tree_util.tree_map(lambda a, b: (a - b) / 2, grad_pos, grad_neg)
