"""No XLA compilation after the first outer step while k varies.

Everything HybridRPES runs compiles in its first outer step (both reverse
passes when the schedule can need both); any later compile is a cache miss:
a k-dependent shape, a weak type that changed, a lazily compiled branch.
"""

import jax
import numpy as np

import estimator_fixtures as fx
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import quadratics
from pathology_fix.meta_gradient import estimators
from pathology_fix.meta_gradient import schedules

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class _CompileLog:
  """Names of the functions XLA compiles while `active` (eager ops included)."""

  def __init__(self):
    self.names = []
    self.active = False

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration
    if self.active and event == BACKEND_COMPILE:
      self.names.append(kwargs.get("fun_name"))


def test_curriculum_steps_compile_nothing_after_warm_up():
  # k grows 10 -> 60 (jittered) across remat_chunk_threshold=3 chunks, and
  # 155-step inner runs force resets and truncations clipped to odd lengths.
  est = estimators.HybridRPES(
      quadratics.FixedDimQuadraticFamilyData(4), mlp_lopt.MLPLOpt(),
      truncation_schedule.ConstantTruncationSchedule(155),
      num_tasks=5, steps_per_jit=10, remat_chunk_threshold=3,
      truncation_length=schedules.LinearTruncationCurriculum(
          k_min=10, k_max=60, num_iterations=20))
  theta = mlp_lopt.MLPLOpt().init(jax.random.PRNGKey(0))
  state = est.init_worker_state(fx.worker_weights(theta), jax.random.PRNGKey(1))

  lengths, finished = [], []
  with _CompileLog() as log:
    for i in range(30):
      log.active = i >= 1  # the first step is the warm-up
      out, metrics = est.compute_gradient_estimate(
          fx.worker_weights(theta, outer_iteration=i), jax.random.PRNGKey(i),
          state)
      jax.block_until_ready(out.grad)
      state = out.unroll_state
      lengths.append(int(metrics["mean||truncation_length"]))
      finished.append(float(metrics["mean||inner_runs_finished"]))

  # The run did cover what could recompile: both reverse passes, clipped
  # lengths and inner runs that ended (and were reset on the next step).
  assert min(lengths[1:]) <= 30 and max(lengths[1:]) > 30, lengths
  assert any(k % 10 for k in lengths), lengths
  assert sum(f > 0 for f in finished[1:-1]) >= 2, finished
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(out.grad))
  assert log.names == [], f"compiled after warm-up: {log.names}"
