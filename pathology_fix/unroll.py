"""The antithetic truncated unroll shared by HybridRPES, VariationalRP and VariationalES.

For n samples (one inner problem each) and perturbations eps_i, it runs 2n
unrolls of k inner steps in one vectorized computation:

  unroll (s, i) uses theta + eps_i (s = 0) or theta - eps_i (s = 1);
  both start from inner state w_i and see the same data and inner keys;
  L[s, i] = mean over its steps of min(meta_loss_t, max_loss).

The per-unroll gradients dL[s, i] / dtheta come from reverse mode through the
unroll. The unroll runs in chunks of `steps_per_jit` steps: the forward pass
keeps only each chunk's starting state, and the backward pass recomputes one
chunk at a time under `jax.vjp` (rematerialization). Memory grows with the
number of chunks only by one inner state each, and the two chunk functions
compile once, whatever k is.
"""

import functools
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from learned_optimization import training
from learned_optimization.outer_trainers import gradient_learner
from pathology_fix import objectives
from pathology_fix import variational

META_LOSS_SPLITS = ("train", "outer_valid")


@flax.struct.dataclass
class VariationalUnrollState(gradient_learner.GradientEstimatorState):
  """Inner problems of one estimator; every leaf has a leading [n] axis."""
  inner_opt_state: Any
  task_param: Any
  inner_step: jnp.ndarray  # int32 [n], steps done in the current inner run
  truncation_state: Any  # LO TruncationSchedule state; `.length` is [n]


@flax.struct.dataclass
class AntitheticUnrollOut:
  """Result of one antithetic truncation; index 0 of the [2] axis is theta+eps."""
  losses: jnp.ndarray  # [2, n] mean clipped meta-loss of each unroll
  rp_grads: Any  # theta-shaped leaves [2, n, ...]: dL[s, i]/dtheta; or None
  final_opt_states: Any  # inner optimizer states, leaves [2, n, ...]
  num_steps: np.ndarray  # int [n], inner steps unrolled per sample


def _tree_where(condition, on_true, on_false):
  """Per-sample select: condition [n] broadcast against leaves [n, ...]."""

  def select(a, b):
    c = jnp.reshape(condition, condition.shape + (1,) * (a.ndim - condition.ndim))
    return jnp.where(c, a, b)

  return jax.tree_util.tree_map(select, on_true, on_false)


def _is_differentiable(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _split_differentiable(tree):
  """(float leaves, other leaves, rebuild fn): integer counters get no cotangent."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_float = [_is_differentiable(x) for x in leaves]
  floats = [x for x, f in zip(leaves, is_float) if f]
  others = [x for x, f in zip(leaves, is_float) if not f]

  def rebuild(new_floats):
    it_f, it_o = iter(new_floats), iter(others)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it_f) if f else next(it_o) for f in is_float])

  return floats, rebuild


class AntitheticUnroller:
  """Runs antithetic truncated unrolls of `num_samples` inner problems.

  Static configuration is held here so the chunk functions jit once per
  estimator; task_family, learned_opt and trunc_sched follow LO's interfaces.
  """

  def __init__(self, task_family, learned_opt, trunc_sched, num_samples: int,
               steps_per_jit: int, meta_loss_split: str, meta_loss_evals: int,
               max_loss: float):
    if meta_loss_split not in META_LOSS_SPLITS:
      raise ValueError(f"meta_loss_split ({meta_loss_split!r}) must be one of "
                       f"{META_LOSS_SPLITS}")
    if int(meta_loss_evals) < 1:
      raise ValueError(f"meta_loss_evals ({meta_loss_evals}) must be >= 1")
    self.task_family = task_family
    self.learned_opt = learned_opt
    self.trunc_sched = trunc_sched
    self.num_samples = int(num_samples)
    self.steps_per_jit = int(steps_per_jit)
    self.meta_loss_split = meta_loss_split
    self.meta_loss_evals = int(meta_loss_evals)
    self.max_loss = objectives.validate_max_loss(max_loss)

    self._init_states = jax.jit(jax.vmap(self._init_one, in_axes=(None, None, 0)))
    self._reset = jax.jit(self._reset_finished)
    self._forward_chunk = jax.jit(self._chunk)
    self._backward_chunk = jax.jit(self._chunk_vjp)

  # Inner problems.

  def _init_one(self, theta, outer_state, key) -> VariationalUnrollState:
    key_task, key_params, key_length, key_opt = jax.random.split(key, 4)
    task_param = self.task_family.sample(key_task)
    params, model_state = self.task_family.task_fn(task_param).init_with_state(
        key_params)
    truncation_state = jax.tree_util.tree_map(
        jnp.asarray, self.trunc_sched.init(key_length, outer_state))
    opt_state = self.learned_opt.opt_fn(theta, is_training=True).init(
        params, model_state, num_steps=truncation_state.length, key=key_opt)
    return VariationalUnrollState(
        inner_opt_state=opt_state,
        task_param=task_param,
        inner_step=jnp.asarray(0, dtype=jnp.int32),
        truncation_state=truncation_state)

  def init_state(self, theta, outer_state, key,
                 random_initial_iteration_offset: int = 0):
    """Fresh inner problems; optionally staggered so they end at different times."""
    key_init, key_offset = jax.random.split(key)
    state = self._init_states(theta, outer_state,
                              jax.random.split(key_init, self.num_samples))
    if random_initial_iteration_offset:
      offset = jax.random.randint(key_offset, (self.num_samples,), 0,
                                  random_initial_iteration_offset, jnp.int32)
      offset = jnp.minimum(offset, state.truncation_state.length - 1)
      state = state.replace(inner_step=offset.astype(jnp.int32))
    return state

  def _reset_finished(self, theta, state, outer_state, key):
    fresh = self._init_states(theta, outer_state,
                              jax.random.split(key, self.num_samples))
    return _tree_where(self.finished(state), fresh, state)

  @staticmethod
  def finished(state: VariationalUnrollState) -> jnp.ndarray:
    return state.inner_step >= state.truncation_state.length

  def reset_finished(self, theta, state, outer_state, key):
    """Re-initializes the inner problems whose run reached its total length."""
    if bool(np.any(np.asarray(self.finished(state)))):
      state = self._reset(theta, state, outer_state, key)
    return state

  def steps_left(self, state: VariationalUnrollState) -> np.ndarray:
    return np.asarray(state.truncation_state.length - state.inner_step)

  # One inner step of one unroll, and a chunk of them for all 2n unrolls.

  def _inner_step(self, theta, opt_state, task_param, key, data, active):
    task = self.task_family.task_fn(task_param)
    opt = self.learned_opt.opt_fn(theta, is_training=True)
    params, model_state = opt.get_params_state(opt_state)
    key_train, key_update, key_meta = jax.random.split(key, 3)
    if self.meta_loss_split == "outer_valid":
      train_data, meta_data = data
    else:
      train_data, meta_data = data, None
    (loss, next_model_state), grad = jax.value_and_grad(
        task.loss_with_state, has_aux=True)(params, model_state, key_train,
                                             train_data)
    next_opt_state = opt.update(
        opt_state, grad, loss=loss, model_state=next_model_state,
        key=key_update)
    if meta_data is None:
      meta_loss = loss  # LO's convention: the training loss before the update
    else:
      next_params = opt.get_params(next_opt_state)
      meta_keys = jax.random.split(key_meta, self.meta_loss_evals)
      meta_losses = jax.vmap(lambda k, d: task.loss_with_state(
          next_params, next_model_state, k, d)[0])(meta_keys, meta_data)
      meta_loss = jnp.mean(meta_losses)
    meta_loss = task.normalizer(meta_loss)
    # A finished inner run stays frozen until the next truncation resets it.
    next_opt_state = _tree_where(active, next_opt_state, opt_state)
    return next_opt_state, meta_loss

  def _chunk(self, theta_pair, opt_states, task_params, datas, keys, active):
    """steps_per_jit steps of all 2n unrolls.

    Args:
      theta_pair: leaves [2, n, ...]; opt_states: leaves [2, n, ...];
      task_params: leaves [n, ...]; datas: leaves [steps, n, ...];
      keys: [steps, n, 2]; active: bool [steps, n].

    Returns:
      (opt_states after the chunk, clipped meta-loss summed over active steps
      [2, n]).
    """
    per_sample = jax.vmap(self._inner_step)
    per_sign = jax.vmap(per_sample, in_axes=(0, 0, None, None, None, None))

    def step(states, xs):
      key, data, act = xs
      states, losses = per_sign(theta_pair, states, task_params, key, data, act)
      return states, losses

    opt_states, losses = jax.lax.scan(step, opt_states, (keys, datas, active))
    mask = jnp.broadcast_to(active[:, None, :], losses.shape)
    total, _ = objectives.clipped_loss_sum_and_count(losses, mask, self.max_loss)
    return opt_states, total

  def _chunk_vjp(self, theta_pair, opt_states, task_params, datas, keys, active,
                 cot_float_states, cot_totals):
    """Recomputes one chunk and pulls cotangents back to theta and its start state."""
    floats, rebuild = _split_differentiable(opt_states)

    def chunk_of_floats(theta_pair, floats):
      out_states, totals = self._chunk(theta_pair, rebuild(floats), task_params,
                                       datas, keys, active)
      return _split_differentiable(out_states)[0], totals

    _, pullback = jax.vjp(chunk_of_floats, theta_pair, floats)
    return pullback((cot_float_states, cot_totals))

  # Data and keys for one chunk.

  def _chunk_data(self):
    family = self.task_family
    shape = (self.steps_per_jit, self.num_samples)
    if family.datasets is None:
      return None if self.meta_loss_split == "train" else (None, None)
    train = training.get_batches(family, shape, numpy=True, split="train")
    if self.meta_loss_split == "train":
      return train
    evals = [
        training.get_batches(family, shape, numpy=True, split="outer_valid")
        for _ in range(self.meta_loss_evals)
    ]
    meta = jax.tree_util.tree_map(lambda *xs: np.stack(xs, axis=2), *evals)
    return train, meta

  def _chunk_keys(self, key, chunk_index):
    keys = jax.random.split(
        jax.random.fold_in(key, chunk_index),
        self.steps_per_jit * self.num_samples)
    return keys.reshape((self.steps_per_jit, self.num_samples) + keys.shape[1:])

  # The truncation.

  def unroll(self, theta, eps, state: VariationalUnrollState, key,
             num_steps: int, with_rp_grads: bool) -> AntitheticUnrollOut:
    """Runs the 2n antithetic unrolls for up to `num_steps` inner steps.

    Sample i unrolls min(num_steps, steps left in its inner run) steps.

    Args:
      theta: learned-optimizer parameters.
      eps: perturbations, leaves [n, ...] shaped like theta.
      state: the inner problems (all of them have steps left).
      key: randomness of the inner steps, shared by + and - unrolls.
      num_steps: truncation length k.
      with_rp_grads: also run the reverse pass for dL/dtheta.
    """
    n, spj = self.num_samples, self.steps_per_jit
    theta_pair = variational.antithetic_thetas(theta, eps)
    opt_states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]),
                                        state.inner_opt_state)
    per_sample_steps = np.minimum(int(num_steps), self.steps_left(state))
    num_chunks = -(-int(per_sample_steps.max()) // spj)
    totals = jnp.zeros((2, n))
    saved = []
    for c in range(num_chunks):
      step_index = c * spj + np.arange(spj)
      active = step_index[:, None] < per_sample_steps[None, :]
      datas, keys = self._chunk_data(), self._chunk_keys(key, c)
      if with_rp_grads:
        saved.append((opt_states, datas, keys, active))
      opt_states, chunk_totals = self._forward_chunk(
          theta_pair, opt_states, state.task_param, datas, keys, active)
      totals = totals + chunk_totals
    counts = jnp.asarray(per_sample_steps, dtype=totals.dtype)[None, :]
    losses = jnp.where(counts > 0, totals / jnp.maximum(counts, 1), 0.)

    rp_grads = None
    if with_rp_grads:
      cot_totals = jnp.broadcast_to(
          jnp.where(counts > 0, 1. / jnp.maximum(counts, 1), 0.), (2, n))
      cot_states = [jnp.zeros_like(x) for x in _split_differentiable(opt_states)[0]]
      rp_grads = jax.tree_util.tree_map(jnp.zeros_like, theta_pair)
      for opt_states_c, datas, keys, active in reversed(saved):
        d_theta, cot_states = self._backward_chunk(
            theta_pair, opt_states_c, state.task_param, datas, keys, active,
            cot_states, cot_totals)
        rp_grads = jax.tree_util.tree_map(jnp.add, rp_grads, d_theta)

    return AntitheticUnrollOut(
        losses=losses,
        rp_grads=rp_grads,
        final_opt_states=opt_states,
        num_steps=per_sample_steps)

  @staticmethod
  def continue_from_positive(state: VariationalUnrollState,
                             out: AntitheticUnrollOut) -> VariationalUnrollState:
    """Next state: the theta + eps unroll, with the step count advanced."""
    return state.replace(
        inner_opt_state=jax.tree_util.tree_map(lambda x: x[0],
                                               out.final_opt_states),
        inner_step=state.inner_step + jnp.asarray(out.num_steps, jnp.int32))
