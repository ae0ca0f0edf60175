"""Several estimator types (and task families) in one LO `run_train`.

LO's `build_gradient_estimators` calls ONE `gradient_estimator_fn` (0.0.1:
`(task_family, learned_opt)`; main: `(truncated_step)`) `num_estimators` times. `EstimatorMixture` is such a
function that cycles through several, e.g. in gin:

  build_gradient_estimators.gradient_estimator_fn = @EstimatorMixture()
  EstimatorMixture.estimator_fns = [@HybridRPES, @TruncatedPES]

With `run_train.num_estimators = 2` each outer step then averages one
HybridRPES and one TruncatedPES gradient (LO weights estimators equally).
"""

from typing import Callable, Optional, Sequence

import gin
import jax

from pathology_fix_core import errors
from pathology_fix.lo_boundary import lo_api


@gin.configurable
class EstimatorMixture:
  """Builds estimator i with `estimator_fns[i % len]`.

  Args:
    estimator_fns: estimator classes or callables, called the way this LO's
      `build_gradient_estimators` calls them (see `lo_api.call_estimator_fn`).
    task_family_fns: optional, one per estimator fn: `key -> TaskFamily`
      replacing the family LO sampled for that estimator (None keeps it).
  """

  def __init__(self,
               estimator_fns: Sequence[Callable] = gin.REQUIRED,
               task_family_fns: Optional[Sequence[Optional[Callable]]] = None):
    if not estimator_fns:
      raise errors.InvalidArgument(
          "EstimatorMixture.estimator_fns must name at least one "
          "estimator, e.g. [@HybridRPES, @TruncatedPES]",
          "EstimatorMixture.estimator_fns")
    if task_family_fns is not None and len(task_family_fns) != len(
        estimator_fns):
      raise errors.InvalidArgument(
          f"EstimatorMixture.task_family_fns has {len(task_family_fns)} entries;"
          f" it needs one per estimator_fns entry ({len(estimator_fns)})",
          "EstimatorMixture.task_family_fns")
    self.estimator_fns = list(estimator_fns)
    self.task_family_fns = task_family_fns
    self._built = 0

  def __call__(self, *args):
    """`(task_family, learned_opt)` on LO 0.0.1, `(truncated_step)` on main."""
    task_family, learned_opt = lo_api.estimator_fn_args(args)
    index = self._built % len(self.estimator_fns)
    self._built += 1
    if self.task_family_fns is not None and self.task_family_fns[index]:
      task_family = self.task_family_fns[index](jax.random.PRNGKey(self._built))
    return lo_api.call_estimator_fn(self.estimator_fns[index], task_family,
                                    learned_opt)
