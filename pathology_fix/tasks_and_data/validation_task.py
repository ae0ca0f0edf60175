"""The validation meta-objective as a task wrapper, for every estimator.

Our estimators compute each step's meta-loss from `meta_loss_evals`
outer_valid batches, each clipped at `max_loss` (`inner_problems`); LO's own
TruncatedPES / TruncatedES / TruncatedGrad with `train_and_meta=True` read one
outer_valid batch and call `task.loss` on it, unclipped. Wrapping the task
family makes LO's estimators optimize the same objective:

  outer_valid batches come stacked, B = meta_loss_evals at a time, as a
  `StackedMetaBatches`; on one, the wrapped task's loss is

    L_meta = mean_b min(loss(params, key_b, batch_b), max_loss)

  (`objectives.batch_averaged_meta_loss`, "per_batch"); on any other batch
  (train, inner_valid, test) it is the task's own loss, so inner training is
  unchanged.

For tasks with the identity normalizer (all of `tasks.py` here) this is
exactly what our estimators compute with the same `meta_loss_evals` and
`max_loss`; otherwise LO normalizes the clipped mean while ours clip the
normalized losses. Use it with LO's `train_and_meta=True` (GitHub main:
`meta_loss_split="outer_valid"`), and with our estimators at
`meta_loss_evals=1` (the wrapper already averages).
"""

from typing import Any, Callable, Optional

import flax
import gin
import jax
import numpy as np

from learned_optimization.tasks import base as tasks_base
from learned_optimization.tasks.datasets import base as datasets_base
from pathology_fix_core import errors
from pathology_fix.meta_gradient import batches
from pathology_fix_core import objectives


@flax.struct.dataclass
class StackedMetaBatches:
  """B outer_valid batches, leaves [B, ...] (a pytree LO's batching keeps)."""
  batches: Any


class _Stacked:
  """`count` batches of `iterator` at a time, as one `StackedMetaBatches`."""

  def __init__(self, iterator, count: int):
    self._iterator = iterator
    self._count = count

  def __iter__(self):
    return self

  def __next__(self) -> StackedMetaBatches:
    stack = [next(self._iterator) for _ in range(self._count)]
    return StackedMetaBatches(
        jax.tree_util.tree_map(lambda *xs: np.stack(xs), *stack))

  def skip(self):
    """Advances as `next` does, skipping the batches (`batches.skip`)."""
    for _ in range(self._count):
      batches.skip(self._iterator)


def _check(name: str, meta_loss_evals: int, max_loss: float):
  if (isinstance(meta_loss_evals, bool) or not isinstance(meta_loss_evals, int)
      or meta_loss_evals < 1):
    raise errors.InvalidArgument(
        f"{name}.meta_loss_evals ({meta_loss_evals!r}) must be "
        "an integer >= 1", f"{name}.meta_loss_evals")
  try:
    return objectives.validate_max_loss(max_loss)
  except ValueError as e:
    raise errors.InvalidArgument(f"{name}.max_loss: {e}", f"{name}.max_loss") from e


class ValidationMetaLossTask(tasks_base.Task):
  """`task` whose loss on `StackedMetaBatches` is the clipped batch average."""

  def __init__(self, task, meta_loss_evals: int = 5, max_loss: float = 10.0,
               datasets: Optional[datasets_base.Datasets] = None):
    self.task = task
    self.meta_loss_evals = meta_loss_evals
    self.max_loss = _check("ValidationMetaLossTask", meta_loss_evals, max_loss)
    self.datasets = datasets

  def loss_with_state_and_aux(self, params, state, key, data):
    if not isinstance(data, StackedMetaBatches):
      return self.task.loss_with_state_and_aux(params, state, key, data)
    count = jax.tree_util.tree_leaves(data.batches)[0].shape[0]
    keys = jax.random.split(key, count)
    losses = jax.vmap(lambda k, d: self.task.loss_with_state_and_aux(
        params, state, k, d)[0])(keys, data.batches)
    # The model state is not advanced by evaluation batches.
    return (objectives.batch_averaged_meta_loss(losses, self.max_loss), state,
            {})

  def loss_with_state(self, params, state, key, data):
    loss, state, _ = self.loss_with_state_and_aux(params, state, key, data)
    return loss, state

  def loss_and_aux(self, params, key, data):
    loss, _, aux = self.loss_with_state_and_aux(params, None, key, data)
    return loss, aux

  def loss(self, params, key, data):
    return self.loss_with_state_and_aux(params, None, key, data)[0]

  def init_with_state(self, key):
    return self.task.init_with_state(key)

  def init(self, key):
    return self.task.init(key)

  def normalizer(self, loss):
    return self.task.normalizer(loss)

  @property
  def name(self):
    return f"ValidationMetaLoss_{self.task.name}"


def wrap_datasets(datasets, meta_loss_evals: int):
  """`datasets` whose outer_valid yields `StackedMetaBatches` of B batches."""
  if datasets is None:
    return None
  return datasets_base.Datasets(
      train=datasets.train, inner_valid=datasets.inner_valid,
      outer_valid=_Stacked(datasets.outer_valid, meta_loss_evals),
      test=datasets.test, extra_info=datasets.extra_info)


@gin.configurable
class ValidationMetaLossFamily(tasks_base.TaskFamily):
  """A task family whose tasks' meta-loss is the clipped validation average.

  Args:
    task_family: the family to wrap (must have datasets).
    meta_loss_evals: outer_valid batches B averaged per meta-loss.
    max_loss: each batch's loss is clipped at this value.
    datasets: None (wrap task_family.datasets), or datasets whose outer_valid
      already yields `StackedMetaBatches` (e.g. a round robin over several
      families' `wrap_datasets`, so one stack never mixes class subsets).
  """

  def __init__(self, task_family, meta_loss_evals: int = 5,
               max_loss: float = 10.0,
               datasets: Optional[datasets_base.Datasets] = None):
    self.max_loss = _check("ValidationMetaLossFamily", meta_loss_evals,
                           max_loss)
    if task_family.datasets is None:
      raise errors.InvalidArgument(
          f"ValidationMetaLossFamily.task_family ({task_family.name}) has no "
          "datasets: the validation meta-loss needs outer_valid batches",
          "ValidationMetaLossFamily.task_family")
    self.task_family = task_family
    self.meta_loss_evals = meta_loss_evals
    self.datasets = datasets or wrap_datasets(task_family.datasets,
                                              meta_loss_evals)
    self._name = f"ValidationMetaLoss_{task_family.name}"

  def sample(self, key):
    return self.task_family.sample(key)

  def task_fn(self, cfg):
    return ValidationMetaLossTask(self.task_family.task_fn(cfg),
                                  self.meta_loss_evals, self.max_loss,
                                  self.datasets)

  def eval_task_fn(self, cfg):
    return self.task_fn(cfg)


@gin.configurable
def sample_validation_meta_loss_family(
    key, sample_task_family_fn: Callable = gin.REQUIRED,
    meta_loss_evals: int = 5, max_loss: float = 10.0):
  """`sample_task_family_fn(key)`, wrapped in a `ValidationMetaLossFamily`.

  For `build_gradient_estimators.sample_task_family_fn` in gin configs.
  """
  return ValidationMetaLossFamily(sample_task_family_fn(key), meta_loss_evals,
                                  max_loss)
