"""The antithetic truncated unroll shared by HybridRPES, VariationalRP and VariationalES.

For n samples (one inner problem each) and perturbations eps_i, one
truncation runs 2n unrolls of k inner steps in one vectorized computation:

  unroll (s, i) uses theta + eps_i (s = 0) or theta - eps_i (s = 1);
  both start from inner state w_i and see the same data and inner keys;
  L[s, i] = mean over its steps of min(meta_loss_t, max_loss).

Three pieces, one file each:
  inner_problems.py  the inner problems: init, reset, one step, meta-loss,
                     data and keys (LO main's `TruncatedStep` role);
  vjp_engine.py      the chunked forward and reverse pass (stored or
                     rematerialized residuals) giving dL[s, i]/dtheta;
  this module        `AntitheticUnroller.truncate`, the one call the
                     estimators make.
"""

from typing import Any, Optional, Tuple

import jax
import numpy as np

from pathology_fix.meta_gradient import inner_problems
from pathology_fix.meta_gradient import vjp_engine

# Re-exported: the state and result types, and the option tuples.
VariationalUnrollState = inner_problems.VariationalUnrollState
AntitheticUnrollOut = vjp_engine.AntitheticUnrollOut
META_LOSS_SPLITS = inner_problems.META_LOSS_SPLITS
REMATERIALIZE_CHOICES = vjp_engine.REMATERIALIZE_CHOICES


class AntitheticUnroller:
  """Runs antithetic truncated unrolls of `num_samples` inner problems.

  `problems` (an `inner_problems.InnerProblems`) and `engine` (a
  `vjp_engine.ChunkedVJP`) are public; see them for the options, which each
  validates. num_samples comes validated from the estimator, and
  sample_sharding (a `sharding.SampleSharding` of those samples) is the
  estimator's own, so both place the samples alike.
  """

  def __init__(self, task_family, learned_opt, trunc_sched, num_samples: int,
               sample_sharding, steps_per_jit: int, meta_loss_split: str,
               meta_loss_evals: int, max_loss: float,
               rematerialize: Any = "auto",
               meta_loss_clip_mode: str = "per_batch",
               remat_chunk_threshold: int = 10,
               remat_memory_budget_mb: Optional[float] = None,
               max_num_chunks: Optional[int] = None):
    self.sharding = sample_sharding
    self.problems = inner_problems.InnerProblems(
        task_family, learned_opt, trunc_sched, num_samples, steps_per_jit,
        meta_loss_split, meta_loss_evals, max_loss, meta_loss_clip_mode,
        self.sharding)
    self.engine = vjp_engine.ChunkedVJP(
        self.problems, rematerialize=rematerialize,
        remat_chunk_threshold=remat_chunk_threshold,
        remat_memory_budget_mb=remat_memory_budget_mb,
        max_num_chunks=max_num_chunks)

  def init_state(self, theta, outer_state, key,
                 random_initial_iteration_offset: int = 0):
    """Fresh inner problems (`InnerProblems.init_state`)."""
    return self.problems.init_state(theta, outer_state, key,
                                    random_initial_iteration_offset)

  def prepare(self, theta, state, outer_state, key):
    """Resets finished inner problems; returns (state, steps left [n] numpy)."""
    return self.problems.prepare(theta, state, outer_state, key)

  @staticmethod
  def finished(state: VariationalUnrollState):
    return inner_problems.InnerProblems.finished(state)

  def unroll(self, theta, eps, state: VariationalUnrollState, key,
             num_steps: int, with_rp_grads: bool,
             steps_left: Optional[np.ndarray] = None,
             branch_opt_states: Any = None) -> AntitheticUnrollOut:
    """Runs the 2n antithetic unrolls for up to `num_steps` inner steps.

    Sample i unrolls min(num_steps, steps left in its inner run) steps.

    Args:
      theta: learned-optimizer parameters.
      eps: perturbations, leaves [n, ...] shaped like theta.
      state: the inner problems (all of them have steps left).
      key: randomness of the inner steps, shared by + and - unrolls.
      num_steps: truncation length k.
      with_rp_grads: also run the reverse pass for dL/dtheta.
      steps_left: `InnerProblems.steps_left(state)` if the caller has it.
      branch_opt_states: None, or inner optimizer states with leaves
        [2, n, ...] when the two branches continue separate inner runs
        (NoiseReuseES); the default starts both from state.inner_opt_state.

    Returns:
      Losses [2, n], dL/dtheta [2, n, ...] (or None) and both branches'
      final inner states.
    """
    if steps_left is None:
      steps_left = self.problems.steps_left(state)
    per_sample_steps = np.minimum(int(num_steps), np.asarray(steps_left))
    theta, key = self.sharding.replicate((theta, key))
    return self.engine.run(theta, eps, state, key, per_sample_steps,
                           with_rp_grads, branch_opt_states)

  def next_state(self, state: VariationalUnrollState,
                 out: AntitheticUnrollOut) -> VariationalUnrollState:
    """Next state: the theta + eps unroll, with the step count advanced."""
    return self.problems.next_state(state, out.final_opt_states, out.num_steps)

  def truncate(self, theta, eps, state: VariationalUnrollState, key, k: int,
               with_rp_grads: bool = True,
               steps_left: Optional[np.ndarray] = None
              ) -> Tuple[Any, Any, VariationalUnrollState]:
    """One antithetic truncation of k steps: (losses, grads, next_state).

    losses: [2, n] (row 0: theta + eps); grads: dL[s, i]/dtheta, leaves
    [2, n, ...], or None without `with_rp_grads`; next_state: the inner
    problems continued from the theta + eps unroll.
    """
    out = self.unroll(theta, eps, state, key, k, with_rp_grads, steps_left)
    return out.losses, out.rp_grads, self.next_state(state, out)
