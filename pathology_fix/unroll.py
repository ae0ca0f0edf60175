"""The antithetic truncated unroll shared by HybridRPES, VariationalRP and VariationalES.

For n samples (one inner problem each) and perturbations eps_i, it runs 2n
unrolls of k inner steps in one vectorized computation:

  unroll (s, i) uses theta + eps_i (s = 0) or theta - eps_i (s = 1);
  both start from inner state w_i and see the same data and inner keys;
  L[s, i] = mean over its steps of min(meta_loss_t, max_loss).

The per-unroll gradients dL[s, i] / dtheta come from reverse mode through the
unroll, which runs in chunks of `steps_per_jit` steps. Two reverse passes:

* rematerialized: the forward pass keeps only each chunk's starting state and
  the backward pass recomputes one chunk at a time under `jax.vjp`. Memory
  grows with the number of chunks only by one inner state each; the price is
  one extra forward pass.
* stored residuals: the forward chunk returns its `jax.vjp` pullback (a
  pytree holding the residuals) and the backward pass only applies it. No
  recompute, but every chunk's residuals stay alive until the backward pass.

`rematerialize="auto"` stores residuals while the truncation has at most
`remat_chunk_threshold` chunks and they fit in `remat_memory_budget_mb`, and
rematerializes otherwise. Every chunk
function is jitted once per unroller: the chunk index and per-sample step
counts are traced arguments, so no truncation length k triggers a compile.
The sample axis is split across local devices when there are several
(`sharding.py`).
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
from pathology_fix import sharding
from pathology_fix import variational

META_LOSS_SPLITS = ("train", "outer_valid")
REMATERIALIZE_CHOICES = (True, False, "auto")


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
  """(float leaves, other leaves, rebuild fn): integer counters get no cotangent.

  rebuild(new_floats, new_others=None) puts the tree back together; by default
  with the original non-float leaves.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_float = [_is_differentiable(x) for x in leaves]
  floats = [x for x, f in zip(leaves, is_float) if f]
  others = [x for x, f in zip(leaves, is_float) if not f]

  def rebuild(new_floats, new_others=None):
    it_f = iter(new_floats)
    it_o = iter(others if new_others is None else new_others)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it_f) if f else next(it_o) for f in is_float])

  return floats, others, rebuild


def _strong_types(tree):
  """Drops weak types, so the first and later states hit the same jit cache."""
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype),
                                tree)


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


class AntitheticUnroller:
  """Runs antithetic truncated unrolls of `num_samples` inner problems.

  Static configuration is held here so the chunk functions jit once per
  estimator; task_family, learned_opt and trunc_sched follow LO's interfaces.

  rematerialize: True (recompute each chunk in the backward pass), False
    (keep every chunk's residuals) or "auto" (keep them while the truncation
    has at most `remat_chunk_threshold` chunks and all its residuals fit in
    `remat_memory_budget_mb`). Both give the same gradient.
  remat_memory_budget_mb: None means a quarter of the device's memory limit,
    or 4096 MiB where the device reports none (CPU).
  shard_samples: split the samples across local devices when there are
    several (see `sharding.py`).
  max_num_chunks: the most chunks a truncation can have (None: unknown).
    With "auto", both reverse passes are compiled on the first truncation
    unless this shows that the rematerialized one is never needed.
  """

  def __init__(self, task_family, learned_opt, trunc_sched, num_samples: int,
               steps_per_jit: int, meta_loss_split: str, meta_loss_evals: int,
               max_loss: float, rematerialize: Any = "auto",
               meta_loss_clip_mode: str = "per_batch",
               remat_chunk_threshold: int = 10,
               remat_memory_budget_mb: Optional[float] = None,
               shard_samples: bool = True,
               max_num_chunks: Optional[int] = None):
    if meta_loss_split not in META_LOSS_SPLITS:
      raise ValueError(f"meta_loss_split ({meta_loss_split!r}) must be one of "
                       f"{META_LOSS_SPLITS}")
    if int(meta_loss_evals) < 1:
      raise ValueError(f"meta_loss_evals ({meta_loss_evals}) must be >= 1")
    if meta_loss_split == "train" and int(meta_loss_evals) != 1:
      # LO's convention: the train meta-loss is the loss of the inner step's
      # own batch, before the update; there are no extra batches to average.
      raise ValueError(
          f"meta_loss_evals ({meta_loss_evals}) must be 1 with "
          "meta_loss_split='train' (the meta-loss is the training loss of the "
          "inner step's own batch); use meta_loss_split='outer_valid' to "
          "average several batches")
    if not (isinstance(rematerialize, bool) or rematerialize == "auto"):
      raise ValueError(f"rematerialize ({rematerialize!r}) must be one of "
                       f"{REMATERIALIZE_CHOICES}")
    if int(remat_chunk_threshold) < 0:
      raise ValueError(
          f"remat_chunk_threshold ({remat_chunk_threshold}) must be >= 0")
    if remat_memory_budget_mb is not None and not remat_memory_budget_mb > 0:
      raise ValueError(
          f"remat_memory_budget_mb ({remat_memory_budget_mb}) must be > 0")
    self.task_family = task_family
    self.learned_opt = learned_opt
    self.trunc_sched = trunc_sched
    self.num_samples = int(num_samples)
    self.steps_per_jit = int(steps_per_jit)
    self.meta_loss_split = meta_loss_split
    self.meta_loss_evals = int(meta_loss_evals)
    self.max_loss = objectives.validate_max_loss(max_loss)
    self.meta_loss_clip_mode = objectives.validate_clip_mode(
        meta_loss_clip_mode)
    self.rematerialize = rematerialize
    self.remat_chunk_threshold = int(remat_chunk_threshold)
    self.remat_memory_budget_mb = remat_memory_budget_mb
    self.max_num_chunks = max_num_chunks
    self.residual_bytes_per_chunk = None  # measured on the first reverse pass
    self.sharding = sharding.SampleSharding(self.num_samples,
                                            enabled=shard_samples)

    self._init_states = jax.jit(self._init_sharded)
    self._prepare = jax.jit(self._reset_and_count)
    self._begin = jax.jit(self._pair_up)
    self._forward_chunk = jax.jit(self._forward)
    self._forward_chunk_vjp = jax.jit(self._forward_with_pullback)
    self._backward_chunk = jax.jit(self._chunk_vjp)
    self._apply_pullback = jax.jit(self._pullback)
    self._finish_forward = jax.jit(self._losses_and_cotangents)
    self._continue = jax.jit(self._continue_from_positive)
    self._other_pass_compiled = rematerialize != "auto"

  def memory_budget_bytes(self) -> float:
    if self.remat_memory_budget_mb is not None:
      return float(self.remat_memory_budget_mb) * 2**20
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
      return stats["bytes_limit"] * self.sharding.num_devices / 4
    return 4096. * 2**20

  def uses_remat(self, num_chunks: int) -> bool:
    """Whether a truncation of `num_chunks` chunks recomputes its forward."""
    if self.rematerialize != "auto":
      return bool(self.rematerialize)
    if int(num_chunks) > self.remat_chunk_threshold:
      return True
    residuals = self.residual_bytes_per_chunk
    return residuals is not None and (
        int(num_chunks) * residuals > self.memory_budget_bytes())

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

  def _init_sharded(self, theta, outer_state, keys):
    states = jax.vmap(self._init_one, in_axes=(None, None, 0))(theta,
                                                                outer_state,
                                                                keys)
    return self.sharding.constrain(_strong_types(states), axis=0)

  def init_state(self, theta, outer_state, key,
                 random_initial_iteration_offset: int = 0):
    """Fresh inner problems; optionally staggered so they end at different times."""
    theta, outer_state, key = self.sharding.replicate((theta, outer_state, key))
    key_init, key_offset = jax.random.split(key)
    state = self._init_states(theta, outer_state,
                              jax.random.split(key_init, self.num_samples))
    if random_initial_iteration_offset:
      offset = jax.random.randint(key_offset, (self.num_samples,), 0,
                                  random_initial_iteration_offset, jnp.int32)
      offset = jnp.minimum(offset, state.truncation_state.length - 1)
      state = state.replace(inner_step=offset.astype(jnp.int32))
    return self.sharding.put(state, axis=0)

  def _reset_finished(self, theta, state, outer_state, key):
    fresh = self._init_sharded(theta, outer_state,
                               jax.random.split(key, self.num_samples))
    return _tree_where(self.finished(state), fresh, state)

  def _reset_and_count(self, theta, state, outer_state, key):
    # cond, not a Python branch: compiled with everything else at warm-up,
    # and no inner problem is initialized on steps where none finished.
    state = jax.lax.cond(
        jnp.any(self.finished(state)),
        lambda s: self._reset_finished(theta, s, outer_state, key),
        lambda s: s, state)
    state = self.sharding.constrain(state, axis=0)
    return state, state.truncation_state.length - state.inner_step

  @staticmethod
  def finished(state: VariationalUnrollState) -> jnp.ndarray:
    return state.inner_step >= state.truncation_state.length

  def prepare(self, theta, state, outer_state, key):
    """Resets finished inner problems; returns (state, steps left [n] numpy)."""
    theta, outer_state, key = self.sharding.replicate((theta, outer_state, key))
    state, steps_left = self._prepare(theta, state, outer_state, key)
    return state, np.asarray(steps_left)

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
      if self.meta_loss_clip_mode == "per_batch":
        meta_losses = task.normalizer(meta_losses)
      meta_loss = objectives.batch_averaged_meta_loss(
          meta_losses, self.max_loss, self.meta_loss_clip_mode)
    if meta_data is None or self.meta_loss_clip_mode == "mean":
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

  def _chunk_inputs(self, key, chunk_index, steps):
    """Keys and active mask of chunk `chunk_index` (a traced scalar)."""
    step_index = chunk_index * self.steps_per_jit + jnp.arange(
        self.steps_per_jit)
    active = step_index[:, None] < steps[None, :]
    return self._chunk_keys(key, chunk_index), active

  def _forward(self, theta_pair, opt_states, task_params, datas, key,
               chunk_index, steps, totals):
    """One chunk forward; adds its clipped loss sums to `totals` [2, n]."""
    keys, active = self._chunk_inputs(key, chunk_index, steps)
    opt_states, chunk_totals = self._chunk(theta_pair, opt_states, task_params,
                                           datas, keys, active)
    return (self.sharding.constrain(opt_states, axis=1),
            self.sharding.constrain(totals + chunk_totals, axis=1))

  def _forward_with_pullback(self, theta_pair, opt_states, task_params, datas,
                             key, chunk_index, steps, totals):
    """`_forward`, also returning the chunk's pullback (residuals kept)."""
    keys, active = self._chunk_inputs(key, chunk_index, steps)
    floats, _, rebuild = _split_differentiable(opt_states)

    def chunk_of_floats(theta_pair, floats):
      out_states, chunk_totals = self._chunk(theta_pair, rebuild(floats),
                                             task_params, datas, keys, active)
      out_floats, out_others, _ = _split_differentiable(out_states)
      return (out_floats, chunk_totals), out_others

    (out_floats, chunk_totals), pullback, out_others = jax.vjp(
        chunk_of_floats, theta_pair, floats, has_aux=True)
    out_states = _split_differentiable(opt_states)[2](out_floats, out_others)
    return (self.sharding.constrain(out_states, axis=1),
            self.sharding.constrain(totals + chunk_totals, axis=1), pullback)

  def _pullback(self, pullback, cot_float_states, cot_totals, rp_grads):
    """Applies a stored chunk pullback; accumulates dL/dtheta_pair."""
    d_theta, cot_prev = pullback((cot_float_states, cot_totals))
    return (self.sharding.constrain(_tree_add(rp_grads, d_theta), axis=1),
            self.sharding.constrain(cot_prev, axis=1))

  def _chunk_vjp(self, theta_pair, opt_states, task_params, datas, key,
                 chunk_index, steps, cot_float_states, cot_totals, rp_grads):
    """Recomputes one chunk and pulls cotangents back to theta and its start state."""
    keys, active = self._chunk_inputs(key, chunk_index, steps)
    floats, _, rebuild = _split_differentiable(opt_states)

    def chunk_of_floats(theta_pair, floats):
      out_states, totals = self._chunk(theta_pair, rebuild(floats), task_params,
                                       datas, keys, active)
      return _split_differentiable(out_states)[0], totals

    _, pullback = jax.vjp(chunk_of_floats, theta_pair, floats)
    return self._pullback(pullback, cot_float_states, cot_totals, rp_grads)

  def _pair_up(self, theta, eps, inner_opt_state):
    """theta +- eps and two copies of the inner states, [2, n, ...] each."""
    theta_pair = variational.antithetic_thetas(theta, eps)
    opt_states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]),
                                        inner_opt_state)
    totals = jnp.zeros((2, self.num_samples))
    return self.sharding.constrain((theta_pair, opt_states, totals), axis=1)

  def _losses_and_cotangents(self, theta_pair, final_opt_states, totals,
                             steps):
    """Mean losses [2, n]; zero cotangents and dL/dtheta to start the backward."""
    counts = steps.astype(totals.dtype)[None, :]
    losses = jnp.where(counts > 0, totals / jnp.maximum(counts, 1), 0.)
    cot_totals = jnp.broadcast_to(
        jnp.where(counts > 0, 1. / jnp.maximum(counts, 1), 0.), totals.shape)
    cot_states = [
        jnp.zeros_like(x) for x in _split_differentiable(final_opt_states)[0]
    ]
    rp_grads = jax.tree_util.tree_map(jnp.zeros_like, theta_pair)
    return self.sharding.constrain((losses, cot_totals, cot_states, rp_grads),
                                   axis=1)

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
             num_steps: int, with_rp_grads: bool,
             steps_left: Optional[np.ndarray] = None) -> AntitheticUnrollOut:
    """Runs the 2n antithetic unrolls for up to `num_steps` inner steps.

    Sample i unrolls min(num_steps, steps left in its inner run) steps.

    Args:
      theta: learned-optimizer parameters.
      eps: perturbations, leaves [n, ...] shaped like theta.
      state: the inner problems (all of them have steps left).
      key: randomness of the inner steps, shared by + and - unrolls.
      num_steps: truncation length k.
      with_rp_grads: also run the reverse pass for dL/dtheta.
      steps_left: `steps_left(state)` if the caller has it (saves a sync).
    """
    spj = self.steps_per_jit
    if steps_left is None:
      steps_left = self.steps_left(state)
    per_sample_steps = np.minimum(int(num_steps), np.asarray(steps_left))
    num_chunks = -(-int(per_sample_steps.max()) // spj)
    theta, key = self.sharding.replicate((theta, key))
    steps = self.sharding.replicate(jnp.asarray(per_sample_steps, jnp.int32))
    theta_pair, opt_states, totals = self._begin(theta, eps,
                                                 state.inner_opt_state)
    measure = (with_rp_grads and self.rematerialize == "auto" and
               self.residual_bytes_per_chunk is None)
    remat = self.uses_remat(num_chunks)  # revised at chunk 0 once measured
    # Per chunk: (start state, data) to recompute it, or its pullback.
    saved = []
    for c in range(num_chunks):
      datas = self.sharding.put(self._chunk_data(), axis=1)
      args = (theta_pair, opt_states, state.task_param, datas, key, c, steps,
              totals)
      if c == 0:
        if measure:
          self.residual_bytes_per_chunk = self._residual_bytes(*args)
        remat = self.uses_remat(num_chunks)
      if with_rp_grads and not remat:
        opt_states, totals, pullback = self._forward_chunk_vjp(*args)
        saved.append(pullback)
      else:
        if with_rp_grads:
          saved.append((opt_states, datas))
        opt_states, totals = self._forward_chunk(*args)
    losses, cot_totals, cot_states, rp_grads = self._finish_forward(
        theta_pair, opt_states, totals, steps)

    if not with_rp_grads:
      rp_grads = None
    else:
      if not self._other_pass_compiled:
        self._compile_other_reverse_pass(
            remat, (theta_pair, opt_states, state.task_param, datas, key, 0,
                    steps, totals), (cot_states, cot_totals, rp_grads))
      for c in reversed(range(num_chunks)):
        # Popping frees each chunk's residuals as soon as they are used.
        if remat:
          opt_states_c, datas = saved.pop()
          rp_grads, cot_states = self._backward_chunk(
              theta_pair, opt_states_c, state.task_param, datas, key, c, steps,
              cot_states, cot_totals, rp_grads)
        else:
          rp_grads, cot_states = self._apply_pullback(saved.pop(), cot_states,
                                                      cot_totals, rp_grads)

    return AntitheticUnrollOut(
        losses=losses,
        rp_grads=rp_grads,
        final_opt_states=opt_states,
        num_steps=per_sample_steps)

  def _residual_bytes(self, *forward_args) -> int:
    """Bytes one chunk's stored pullback holds (traced, not run)."""
    out = jax.eval_shape(self._forward_chunk_vjp, *forward_args)
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(out[2]))

  def _compile_other_reverse_pass(self, remat, forward_args, backward_args):
    """With "auto", compiles the reverse pass this truncation did not use.

    Only when the schedule can need both (`max_num_chunks`); the first
    truncation then compiles both, and a curriculum that crosses the
    threshold later on (or a truncation clipped at the end of an inner run)
    does not stall on a compile mid-run. The executables land in JAX's
    compilation cache, which later calls hit.
    """
    self._other_pass_compiled = True
    max_chunks = self.max_num_chunks
    if max_chunks is not None and self.uses_remat(max_chunks) == self.uses_remat(
        1):
      return
    if remat:
      # One real chunk: its pullback carries the residuals' shardings.
      pullback = self._forward_chunk_vjp(*forward_args)[2]
      self._apply_pullback.lower(pullback, *backward_args).compile()
    else:
      self._forward_chunk.lower(*forward_args).compile()
      theta_pair, opt_states, task_params, datas, key, c, steps, _ = (
          forward_args)
      self._backward_chunk.lower(theta_pair, opt_states, task_params, datas,
                                 key, c, steps, *backward_args).compile()

  def _continue_from_positive(self, state, final_opt_states, num_steps):
    next_state = state.replace(
        inner_opt_state=jax.tree_util.tree_map(lambda x: x[0],
                                               final_opt_states),
        inner_step=state.inner_step + num_steps.astype(jnp.int32))
    return self.sharding.constrain(next_state, axis=0)

  def next_state(self, state: VariationalUnrollState,
                 out: AntitheticUnrollOut) -> VariationalUnrollState:
    """Next state: the theta + eps unroll, with the step count advanced."""
    return self._continue(state, out.final_opt_states,
                          self.sharding.replicate(
                              jnp.asarray(out.num_steps, jnp.int32)))
