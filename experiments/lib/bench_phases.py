"""Seconds per phase of one HybridRPES truncation, for the benchmarks.

Kept apart from `bench_runs` (which calls it) and `bench_profile` so that no
benchmark module imports another back.
"""

import statistics
import time
from typing import Dict


def phase_seconds(est, weights, state, k: int, repeats: int) -> Dict[str, float]:
  """Seconds per outer step of each phase of HybridRPES's truncation.

  Replays `vjp_engine.ChunkedVJP.run` (same jitted pieces, same remat
  choice) blocking after every call, and the merge (`combine_samples`):
  data (host batches and their transfer), forward chunks, reverse chunks
  and merge; medians over `repeats` replays, of wall-clock and of CPU time
  (phase_*_cpu_s). Blocking serializes what the real step overlaps, so the
  parts add up to a little more than a step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pathology_fix.meta_gradient import estimators  # pylint: disable=g-import-not-at-top
  from pathology_fix_core import variational  # pylint: disable=g-import-not-at-top
  unroller = est.unroller
  engine, problems = unroller.engine, unroller.problems
  theta = weights.theta
  eps = variational.sample_perturbations(jax.random.PRNGKey(8), theta,
                                         est.sigma, num_samples=est.num_tasks)
  steps_left = problems.steps_left(state)
  per_sample = np.minimum(k, steps_left)
  num_chunks = -(-int(per_sample.max()) // problems.steps_per_jit)
  remat = engine.uses_remat(num_chunks)
  steps = jnp.asarray(per_sample, jnp.int32)
  key = jax.random.PRNGKey(9)
  totals_by_phase = {p: [] for p in ("data", "forward", "reverse", "merge")}

  cpu_by_phase = {p: [] for p in totals_by_phase}

  def clocked(phase, fn, *args):
    start, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    seconds[phase] += time.perf_counter() - start
    cpu_seconds[phase] += time.process_time() - cpu
    return out

  for _ in range(repeats + 1):
    seconds = dict.fromkeys(totals_by_phase, 0.0)
    cpu_seconds = dict.fromkeys(totals_by_phase, 0.0)
    theta_pair, states, totals = engine.pair_up(theta, eps,
                                                state.inner_opt_state)
    saved = []
    for c in range(num_chunks):
      datas = clocked("data", lambda: engine.sharding.put_process_local(
          problems.chunk_data(), axis=1))
      args = (theta_pair, states, state.task_param, datas, key, c, steps,
              totals)
      if remat:
        saved.append((states, datas))
        states, totals = clocked("forward", engine.forward_chunk, *args)
      else:
        states, totals, pullback = clocked("forward", engine.forward_chunk_vjp,
                                           *args)
        saved.append(pullback)
    losses, cot_totals, cot_states, grads = engine.finish_forward(
        theta_pair, states, totals, steps)
    for c in reversed(range(num_chunks)):
      if remat:
        states_c, datas = saved.pop()
        grads, cot_states = clocked(
            "reverse", engine.backward_chunk, theta_pair, states_c,
            state.task_param, datas, key, c, steps, cot_states, cot_totals,
            grads)
      else:
        grads, cot_states = clocked("reverse", engine.apply_pullback,
                                    saved.pop(), cot_states, cot_totals, grads)
    leaves = jax.tree_util.tree_leaves
    clocked("merge", lambda: estimators.combine_samples(
        losses, leaves(grads), leaves(eps), est.sigma, merge_fn=est.merge_fn,
        **est.merge_options))
    for phase, s in seconds.items():
      totals_by_phase[phase].append(s)
      cpu_by_phase[phase].append(cpu_seconds[phase])
  out = {f"phase_{p}_s": statistics.median(v[1:])
         for p, v in totals_by_phase.items()}
  out.update({f"phase_{p}_cpu_s": statistics.median(v[1:])
              for p, v in cpu_by_phase.items()})
  out["phase_remat"] = bool(remat)
  return out
