"""Chunked reverse pass through the 2n antithetic unrolls of one truncation.

The forward pass runs `InnerProblems.chunk` (steps_per_jit inner steps of all
2n unrolls) chunk after chunk; L[s, i] is the clipped meta-loss summed over
the active steps of unroll (s, i), divided by its step count. dL/dtheta_pair
comes from reverse mode, chunk by chunk, in one of two ways:

* rematerialized: the forward pass keeps only each chunk's starting state and
  the backward pass recomputes one chunk at a time under `jax.vjp`. Memory
  grows with the number of chunks only by one inner state each; the price is
  one extra forward pass.
* stored residuals: the forward chunk returns its `jax.vjp` pullback (a
  pytree holding the residuals) and the backward pass only applies it. No
  recompute, but every chunk's residuals stay alive until the backward pass.

Within a chunk, what a residual is depends on `InnerProblems.step_checkpoint`:
by default only each inner step's carried state, the step being recomputed
under `jax.vjp` just before its pullback (so its intermediates stay in
cache instead of a whole chunk's being written out and read back).

`rematerialize="auto"` stores residuals while the truncation has at most
`remat_chunk_threshold` chunks and they fit in `remat_memory_budget_mb`, and
rematerializes otherwise. Every chunk function is jitted once per engine: the
chunk index and per-sample step counts are traced arguments, so no
truncation length k triggers a compile.

The jitted pieces are public so a benchmark can clock them one by one:
`pair_up`, `forward_chunk`, `forward_chunk_vjp`, `finish_forward`,
`apply_pullback`, `backward_chunk`, and `residual_bytes`.
"""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pathology_fix_core import errors
from pathology_fix_core import variational

REMATERIALIZE_CHOICES = (True, False, "auto")


@flax.struct.dataclass
class AntitheticUnrollOut:
  """Result of one antithetic truncation; index 0 of the [2] axis is theta+eps."""
  losses: jnp.ndarray  # [2, n] mean clipped meta-loss of each unroll
  rp_grads: Any  # theta-shaped leaves [2, n, ...]: dL[s, i]/dtheta; or None
  final_opt_states: Any  # inner optimizer states, leaves [2, n, ...]
  num_steps: np.ndarray  # int [n], inner steps unrolled per sample


def _is_differentiable(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def split_differentiable(tree):
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


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def validate_remat_options(rematerialize, remat_chunk_threshold,
                           remat_memory_budget_mb):
  if not (isinstance(rematerialize, bool) or rematerialize == "auto"):
    raise errors.InvalidArgument(
        f"rematerialize ({rematerialize!r}) must be one of "
        f"{REMATERIALIZE_CHOICES}", "rematerialize")
  if int(remat_chunk_threshold) < 0:
    raise errors.InvalidArgument(
        f"remat_chunk_threshold ({remat_chunk_threshold}) must be >= 0",
        "remat_chunk_threshold")
  if remat_memory_budget_mb is not None and not remat_memory_budget_mb > 0:
    raise errors.InvalidArgument(
        f"remat_memory_budget_mb ({remat_memory_budget_mb}) must be > 0",
        "remat_memory_budget_mb")


class ChunkedVJP:
  """Forward and chunked reverse pass over `problems` (an `InnerProblems`).

  rematerialize: True (recompute each chunk in the backward pass), False
    (keep every chunk's residuals) or "auto" (keep them while the truncation
    has at most `remat_chunk_threshold` chunks and all its residuals fit in
    `remat_memory_budget_mb`). Both give the same gradient.
  remat_memory_budget_mb: None means a quarter of the device's memory limit,
    or 4096 MiB where the device reports none (CPU).
  max_num_chunks: the most chunks a truncation can have (None: unknown).
    With "auto", both reverse passes are compiled on the first truncation
    unless this shows that the rematerialized one is never needed.
  """

  def __init__(self, problems, rematerialize: Any = "auto",
               remat_chunk_threshold: int = 10,
               remat_memory_budget_mb: Optional[float] = None,
               max_num_chunks: Optional[int] = None):
    validate_remat_options(rematerialize, remat_chunk_threshold,
                           remat_memory_budget_mb)
    self.problems = problems
    self.sharding = problems.sharding
    self.rematerialize = rematerialize
    self.remat_chunk_threshold = int(remat_chunk_threshold)
    self.remat_memory_budget_mb = remat_memory_budget_mb
    self.max_num_chunks = max_num_chunks
    self.residual_bytes_per_chunk = None  # measured on the first reverse pass
    self.pair_up = jax.jit(self._pair_up)
    self.forward_chunk = jax.jit(self._forward)
    self.forward_chunk_vjp = jax.jit(self._forward_with_pullback)
    self.backward_chunk = jax.jit(self._chunk_vjp)
    self.apply_pullback = jax.jit(self._pullback)
    self.finish_forward = jax.jit(self._losses_and_cotangents)
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

  # The jitted pieces.

  def _forward(self, theta_pair, opt_states, task_params, datas, key,
               chunk_index, steps, totals):
    """One chunk forward; adds its clipped loss sums to `totals` [2, n]."""
    keys, active = self.problems.chunk_inputs(key, chunk_index, steps)
    opt_states, chunk_totals = self.problems.chunk(
        theta_pair, opt_states, task_params, datas, keys, active)
    return (self.sharding.constrain(opt_states, axis=1),
            self.sharding.constrain(totals + chunk_totals, axis=1))

  def _forward_with_pullback(self, theta_pair, opt_states, task_params, datas,
                             key, chunk_index, steps, totals):
    """`forward_chunk`, also returning the chunk's pullback (residuals kept)."""
    keys, active = self.problems.chunk_inputs(key, chunk_index, steps)
    floats, _, rebuild = split_differentiable(opt_states)

    def chunk_of_floats(theta_pair, floats):
      out_states, chunk_totals = self.problems.chunk(
          theta_pair, rebuild(floats), task_params, datas, keys, active)
      out_floats, out_others, _ = split_differentiable(out_states)
      return (out_floats, chunk_totals), out_others

    (out_floats, chunk_totals), pullback, out_others = jax.vjp(
        chunk_of_floats, theta_pair, floats, has_aux=True)
    out_states = rebuild(out_floats, out_others)
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
    keys, active = self.problems.chunk_inputs(key, chunk_index, steps)
    floats, _, rebuild = split_differentiable(opt_states)

    def chunk_of_floats(theta_pair, floats):
      out_states, totals = self.problems.chunk(theta_pair, rebuild(floats),
                                               task_params, datas, keys, active)
      return split_differentiable(out_states)[0], totals

    _, pullback = jax.vjp(chunk_of_floats, theta_pair, floats)
    return self._pullback(pullback, cot_float_states, cot_totals, rp_grads)

  def _pair_up(self, theta, eps, inner_opt_state):
    """theta +- eps and two copies of the inner states, [2, n, ...] each."""
    theta_pair = variational.antithetic_thetas(theta, eps)
    opt_states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]),
                                        inner_opt_state)
    totals = jnp.zeros((2, self.problems.num_samples))
    return self.sharding.constrain((theta_pair, opt_states, totals), axis=1)

  def _losses_and_cotangents(self, theta_pair, final_opt_states, totals,
                             steps):
    """Mean losses [2, n]; zero cotangents and dL/dtheta to start the backward."""
    counts = steps.astype(totals.dtype)[None, :]
    losses = jnp.where(counts > 0, totals / jnp.maximum(counts, 1), 0.)
    cot_totals = jnp.broadcast_to(
        jnp.where(counts > 0, 1. / jnp.maximum(counts, 1), 0.), totals.shape)
    cot_states = [
        jnp.zeros_like(x) for x in split_differentiable(final_opt_states)[0]
    ]
    rp_grads = jax.tree_util.tree_map(jnp.zeros_like, theta_pair)
    return self.sharding.constrain((losses, cot_totals, cot_states, rp_grads),
                                   axis=1)

  # The truncation.

  def run(self, theta, eps, state, key, per_sample_steps: np.ndarray,
          with_rp_grads: bool,
          branch_opt_states: Any = None) -> AntitheticUnrollOut:
    """Forward over all chunks, then (with_rp_grads) the reverse pass.

    theta, key: replicated; eps: leaves [n, ...]; state: the inner problems;
    per_sample_steps: int [n] numpy, steps each sample unrolls;
    branch_opt_states: None (both branches start from state.inner_opt_state)
      or leaves [2, n, ...], each branch's own start (NoiseReuseES).
    """
    # At least one chunk, also when no sample has a step left (its steps are
    # masked): the reverse pass below needs a chunk's data.
    num_chunks = max(
        1, -(-int(per_sample_steps.max()) // self.problems.steps_per_jit))
    steps = self.sharding.replicate(jnp.asarray(per_sample_steps, jnp.int32))
    theta_pair, opt_states, totals = self.pair_up(theta, eps,
                                                  state.inner_opt_state)
    if branch_opt_states is not None:
      opt_states = self.sharding.put(branch_opt_states, axis=1)
    measure = (with_rp_grads and self.rematerialize == "auto" and
               self.residual_bytes_per_chunk is None)
    remat = self.uses_remat(num_chunks)  # revised at chunk 0 once measured
    # Per chunk: (start state, data) to recompute it, or its pullback.
    saved = []
    for c in range(num_chunks):
      datas = self.sharding.put_process_local(self.problems.chunk_data(),
                                                axis=1)
      args = (theta_pair, opt_states, state.task_param, datas, key, c, steps,
              totals)
      if c == 0:
        if measure:
          self.residual_bytes_per_chunk = self.residual_bytes(*args)
        remat = self.uses_remat(num_chunks)
      if with_rp_grads and not remat:
        opt_states, totals, pullback = self.forward_chunk_vjp(*args)
        saved.append(pullback)
      else:
        if with_rp_grads:
          saved.append((opt_states, datas))
        opt_states, totals = self.forward_chunk(*args)
    losses, cot_totals, cot_states, rp_grads = self.finish_forward(
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
          rp_grads, cot_states = self.backward_chunk(
              theta_pair, opt_states_c, state.task_param, datas, key, c, steps,
              cot_states, cot_totals, rp_grads)
        else:
          rp_grads, cot_states = self.apply_pullback(saved.pop(), cot_states,
                                                     cot_totals, rp_grads)

    return AntitheticUnrollOut(
        losses=losses,
        rp_grads=rp_grads,
        final_opt_states=opt_states,
        num_steps=per_sample_steps)

  def residual_bytes(self, *forward_args) -> int:
    """Bytes one chunk's stored pullback holds (traced, not run)."""
    out = jax.eval_shape(self.forward_chunk_vjp, *forward_args)
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
      pullback = self.forward_chunk_vjp(*forward_args)[2]
      self.apply_pullback.lower(pullback, *backward_args).compile()
    else:
      self.forward_chunk.lower(*forward_args).compile()
      theta_pair, opt_states, task_params, datas, key, c, steps, _ = (
          forward_args)
      self.backward_chunk.lower(theta_pair, opt_states, task_params, datas,
                                key, c, steps, *backward_args).compile()
