"""Meta-validation: whole inner runs on a fixed set of meta-training-like tasks.

The meta-loss a training run logs is read wherever its truncated unrolls
happen to be, and the held-out tasks must not be looked at while training.
To see whether theta improves, and to pick the best theta, a run trains a
fixed set of V validation tasks from scratch with theta, from fixed keys,
every few outer steps:

* Tasks: drawn from the run's own meta-training distribution (the class
  pool, k classes per task, architecture, image size, batch size,
  normalization of its task family): its k-class subsets (all C(pool, k) in
  a seeded order, cycled), with other batch orders and other initializations
  than the run's (keys and batch orders come from a separate stream,
  `VALIDATION_STREAM`), scored on examples the run never reads (below).
  Never a held-out class: the pool is the run's pool minus
  `tasks.HELDOUT_CLASSES`, and every built task's classes are checked again
  (`check_no_heldout` raises ValueError). Fashion-MNIST only: scikit-learn's
  digits is the held-out (out-of-distribution) dataset.
* Each task trains `inner_steps` steps (as long as the run's inner runs) on
  the task's "train" split in a fixed batch order, from a fixed init.
* Score (`meta_valid`): the mean over tasks of the final loss on the whole
  `split` ("inner_valid" by default), the exact mean over all its examples.
  That is the quantity the held-out evaluation reports (final loss of a
  whole inner run on a held-aside split, `evaluation.meta_test` with
  whole_splits), on the meta-training classes' own held-aside data:
  meta-training reads only "train" (inner steps) and "outer_valid" (the
  meta-loss, which theta is fitted to), and "test" is for evaluation code
  (tasks.py); on held-out tasks E5 tunes its baselines on "inner_valid"
  too (experiments/lib/analysis.py).

Same keys and batches on every call, so scores are comparable across outer
steps, and `evaluate` gives identical numbers for identical thetas. One
compilation per `MetaValidation` and learned optimizer serves every task
(the tasks share one model) and every theta; tasks and thetas run one after
the other, so a task's numbers do not depend on which others are evaluated
(`task_indices` may split the tasks between processes exactly).

Gin (see `MetaValidation` for all parameters):

  import pathology_fix.runtime.meta_validation
  MetaValidation.num_tasks = 10
  MetaValidation.inner_steps = 1000
  MetaValidation.every_n_steps = 10
  MetaValidation.max_time_fraction = 0.15
  # what the training loop (`local_training`) runs every few outer steps:
  resumable_local_train.meta_validation = @MetaValidation()

Cost (the headline recipe: NNAdam, mlp2x32 on 8x8 images, 1,000 inner
steps; one busy core of 2): ~0.16 s per task and theta, so 10 tasks x 2
thetas (latest and EMA) ~3.2 s, plus ~6 s compiling once. At ~7 outer
steps per minute, validating every 10 outer steps costs ~4% of wall time.

With `distribution` unbound, the tasks follow the run's gin-bound
`build_gradient_estimators.sample_task_family_fn` and its bindings
(`distribution_from_gin`); a `MetaTrainingDistribution` may be bound
instead.
"""

import dataclasses
import inspect
import itertools
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax
import gin
import jax
import numpy as np

from pathology_fix_core import errors
from pathology_fix.lo_boundary import lo_api
from pathology_fix.tasks_and_data import tasks as tasks_lib
from pathology_fix.runtime import evaluation
from pathology_fix.runtime import model_selection
from pathology_fix.runtime import theta_averaging

VALIDATION_STREAM = 0x4D56  # folded into keys and batch-order seeds
SPLITS = ("inner_valid", "outer_valid", "test")
DATASETS = ("fashion_mnist",)
# sample_task_family_fns whose tasks are class subsets of one pool.
FAMILY_FNS = ("sample_every_subset_family", "sample_fashion_mnist_family")
# Wrappers: name -> the parameter holding the wrapped sample_task_family_fn.
WRAPPER_FNS = {"sample_validation_meta_loss_family": "sample_task_family_fn"}
FAMILY_SELECTOR = "build_gradient_estimators.sample_task_family_fn"
_PREFIX = "MetaValidation."


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MetaTrainingDistribution:
  """A run's meta-training tasks: k classes of `class_pool`, one network.

  The parameters of `tasks.sample_every_subset_family` /
  `sample_fashion_mnist_family` (their names and defaults).
  """
  class_pool: Union[str, Tuple[int, ...]] = "train"
  num_classes_per_task: int = 3
  dataset: str = "fashion_mnist"
  architecture: str = "conv3"
  image_size: Optional[int] = None
  batch_size: int = 128
  normalization: str = "unit"

  def validation_pool(self) -> Tuple[int, ...]:
    """The pool's classes that are not held out (`tasks.HELDOUT_CLASSES`)."""
    pool = tasks_lib._resolve_pool(self.class_pool, _PREFIX)  # pylint: disable=protected-access
    return tuple(c for c in pool if c not in tasks_lib.HELDOUT_CLASSES)

  def check(self):
    """Raises ValueError unless validation tasks can be drawn from it."""
    if self.dataset not in DATASETS:
      raise errors.InvalidArgument(
          f"{_PREFIX}distribution.dataset={self.dataset!r}; allowed: "
          f"{DATASETS} (digits is the held-out, out-of-distribution dataset)",
          f"{_PREFIX}distribution")
    tasks_lib._check_architecture(self.architecture, _PREFIX)  # pylint: disable=protected-access
    pool = self.validation_pool()
    if not 2 <= self.num_classes_per_task <= len(pool):
      raise errors.InvalidArgument(
          f"{_PREFIX}distribution.num_classes_per_task="
          f"{self.num_classes_per_task!r}; allowed: 2 to the number of "
          f"non-held-out classes of class_pool {self.class_pool!r}, which "
          f"are {pool} ({len(pool)})", f"{_PREFIX}distribution")


def _family_kwargs(name: str) -> Tuple[Any, Dict[str, Any]]:
  """(function, its arguments as a call would get them: bindings, defaults)."""
  fn = getattr(tasks_lib, name)
  params = inspect.signature(fn).parameters
  kwargs = {p: v.default for p, v in params.items()
            if v.default is not inspect.Parameter.empty}
  kwargs.update(lo_api.get_bindings(name))
  return fn, kwargs


def distribution_from_gin(selector: str = FAMILY_SELECTOR
                         ) -> MetaTrainingDistribution:
  """The meta-training distribution the parsed gin config trains on.

  Reads `selector` (a reference such as `@sample_every_subset_family`,
  possibly inside `@sample_validation_meta_loss_family`) and the bindings
  of that function, with its defaults for unbound parameters.

  Raises:
    ValueError: nothing bound, or a family that is not a class-subset
      family of `FAMILY_FNS` (e.g. quadratics): bind
      `MetaValidation.distribution` then.
  """
  try:
    ref = lo_api.query_binding(selector)
  except ValueError as e:
    raise errors.InvalidArgument(
        f"{_PREFIX}distribution is None and {selector} is not "
        "bound; bind one of them", f"{_PREFIX}distribution") from e
  name = getattr(getattr(ref, "configurable", None), "name", None)
  while name in WRAPPER_FNS:
    inner = f"{name}.{WRAPPER_FNS[name]}"
    ref = lo_api.query_binding(inner)
    name = getattr(getattr(ref, "configurable", None), "name", None)
  if name not in FAMILY_FNS:
    raise errors.InvalidArgument(
        f"{_PREFIX}distribution is None and {selector} is {ref!r}; deriving "
        f"the validation tasks needs one of {FAMILY_FNS} (optionally wrapped "
        f"in {tuple(WRAPPER_FNS)}), or bind MetaValidation.distribution",
        f"{_PREFIX}distribution")
  _, kwargs = _family_kwargs(name)
  pool = kwargs["class_pool"]
  return MetaTrainingDistribution(
      class_pool=pool if isinstance(pool, str) else tuple(int(c) for c in pool),
      num_classes_per_task=int(kwargs["num_classes_per_task"]),
      dataset=kwargs.get("dataset", "fashion_mnist"),
      architecture=kwargs["architecture"],
      image_size=kwargs["image_size"], batch_size=int(kwargs["batch_size"]),
      normalization=kwargs["normalization"])


def check_no_heldout(classes: Sequence[int], what: str = "validation task"):
  """Raises ValueError if `classes` contains a held-out class."""
  overlap = sorted(set(int(c) for c in classes) &
                   set(tasks_lib.HELDOUT_CLASSES))
  if overlap:
    raise ValueError(f"{_PREFIX}: {what} classes {tuple(classes)} include the "
                     f"held-out classes {overlap} (tasks.HELDOUT_CLASSES = "
                     f"{tasks_lib.HELDOUT_CLASSES}); meta-validation must "
                     "never use them")


@dataclasses.dataclass(frozen=True)
class ValidationTaskSpec:
  """Task `index`: its classes (label i is classes[i]) and batch-order seed."""
  index: int
  classes: Tuple[int, ...]
  data_seed: int


def validation_specs(distribution: MetaTrainingDistribution, num_tasks: int,
                     seed: int) -> List[ValidationTaskSpec]:
  """num_tasks specs: the pool's k-subsets in a seeded order, cycled."""
  distribution.check()
  subsets = list(itertools.combinations(distribution.validation_pool(),
                                        distribution.num_classes_per_task))
  rng = np.random.default_rng([int(seed), VALIDATION_STREAM])
  order = rng.permutation(len(subsets))
  seeds = rng.integers(0, 2**31 - 1, size=num_tasks)
  specs = [ValidationTaskSpec(i, tuple(int(c) for c in
                                       subsets[order[i % len(subsets)]]),
                              int(seeds[i])) for i in range(num_tasks)]
  for s in specs:
    check_no_heldout(s.classes)
  return specs


@dataclasses.dataclass
class ValidationTask:
  """One validation task and its fixed inputs.

  task: the LO Task (a `tasks.ClassSubsetFamily`'s); train: its whole
  "train" split {name: [N, ...]}; batch_index: int32 [inner_steps, B] rows
  of `train` per inner step; eval_examples / eval_weights: the whole
  validation split zero-padded to a multiple of the chunk size, weights
  1/n on the n real examples (`evaluation.exact_mean_loss`).
  """
  spec: ValidationTaskSpec
  task: Any
  train: Dict[str, np.ndarray]
  batch_index: np.ndarray
  eval_examples: Dict[str, np.ndarray]
  eval_weights: np.ndarray


def batch_order(num_examples: int, batch_size: int, num_steps: int,
                seed: int) -> np.ndarray:
  """int32 [num_steps, batch_size]: seeded per-epoch permutations, in order
  (every example once per epoch; batches may straddle epochs)."""
  rng = np.random.default_rng([int(seed), VALIDATION_STREAM])
  need = num_steps * batch_size
  epochs = [rng.permutation(num_examples)
            for _ in range(-(-need // num_examples))]
  return np.concatenate(epochs)[:need].reshape(
      num_steps, batch_size).astype(np.int32)


def _padded(examples: Dict[str, np.ndarray], size: int):
  n = len(next(iter(examples.values())))
  pad = {k: np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)])
         for k, a in examples.items()}
  return pad, np.where(np.arange(size) < n, 1.0 / n, 0.0).astype(np.float32)


def build_validation_tasks(distribution: MetaTrainingDistribution,
                           specs: Sequence[ValidationTaskSpec],
                           inner_steps: int, split: str,
                           chunk_size: int = evaluation.EVAL_CHUNK_SIZE
                          ) -> List[ValidationTask]:
  """The tasks of `specs` with their fixed batches and validation split."""
  out = []
  for spec in specs:
    family = tasks_lib.ClassSubsetFamily(
        spec.classes, dataset=distribution.dataset,
        architecture=distribution.architecture,
        image_size=distribution.image_size,
        batch_size=distribution.batch_size,
        normalization=distribution.normalization, seed=spec.data_seed)
    check_no_heldout(family.datasets.extra_info["classes"])
    train = family.datasets.split_arrays("train")
    examples = family.datasets.split_arrays(split)
    n = len(examples["label"])
    examples, weights = _padded(examples, -(-n // chunk_size) * chunk_size)
    out.append(ValidationTask(
        spec, family.task, train,
        batch_order(len(train["label"]), distribution.batch_size,
                    inner_steps, spec.data_seed), examples, weights))
  sizes = {(len(t.train["label"]), len(t.eval_weights)) for t in out}
  if len(sizes) != 1:  # one compilation serves all tasks
    raise ValueError(f"{_PREFIX}: validation tasks have different split sizes"
                     f" {sorted(sizes)}; they must share one shape")
  return out


def inner_run_fn(task, lopt, num_steps: int, chunk_size: int):
  """run(theta, key, train, batch_index, eval_examples, eval_weights) ->
  (losses [num_steps], final validation loss []), as `evaluation.meta_test`
  computes them: init from split(key)[0], step keys split(split(key)[1],
  num_steps + 1), batches train[batch_index[t]], exact whole-split loss."""

  def run(theta, key, train, batch_index, eval_examples, eval_weights):
    opt = lopt.opt_fn(theta)
    init_key, key = jax.random.split(key)
    params, model_state = task.init_with_state(init_key)
    opt_state = opt.init(params, model_state, num_steps=num_steps)
    keys = jax.random.split(key, num_steps + 1)

    def step(opt_state, xs):
      step_key, rows = xs
      batch = jax.tree_util.tree_map(lambda a: a[rows], train)
      params, model_state = opt.get_params_state(opt_state)
      (loss, model_state), grad = jax.value_and_grad(
          task.loss_with_state, has_aux=True)(params, model_state, step_key,
                                              batch)
      return opt.update(opt_state, grad, loss=loss,
                        model_state=model_state), loss

    opt_state, losses = jax.lax.scan(step, opt_state,
                                     (keys[:-1], batch_index))
    params, model_state = opt.get_params_state(opt_state)
    final = evaluation.exact_mean_loss(
        lambda x: task.loss_with_state(
            params, model_state, keys[-1],
            jax.tree_util.tree_map(lambda a: a[None], x))[0],
        eval_examples, eval_weights, chunk_size)
    return task.normalizer(losses), task.normalizer(final)

  return run


@dataclasses.dataclass
class MetaValidationResult:
  """One meta-validation of several thetas.

  scores: {kind: meta_valid}, the mean over the evaluated tasks of
    final_loss (NaN if any task's is NaN: a diverged theta is never best).
  final_loss: {kind: float [V']} final validation-split loss per task.
  train_loss: {kind: float [V']} mean inner training loss per task.
  task_indices: the V' tasks evaluated; task_names: their names.
  seconds: wall time of the call; compile_seconds: the part compiling.
  """
  scores: Dict[str, float]
  final_loss: Dict[str, np.ndarray]
  train_loss: Dict[str, np.ndarray]
  task_indices: List[int]
  task_names: List[str]
  seconds: float
  compile_seconds: float

  def metrics(self) -> Dict[str, float]:
    """{"mean||meta_valid/<kind>": score, "mean||meta_valid_seconds": s}."""
    out = {f"mean||meta_valid/{k}": v for k, v in self.scores.items()}
    out["mean||meta_valid_seconds"] = self.seconds
    return out


def validation_metrics(state: "MetaValidationState",
                       result: MetaValidationResult,
                       train_seconds: float) -> Dict[str, float]:
  """The result's metrics, plus "mean||meta_valid_best" (the best score so
  far), "mean||meta_valid_best_step" and "mean||meta_valid_time_fraction"
  (validation seconds / wall seconds) from the state after `validate`."""
  out = result.metrics()
  out["mean||meta_valid_best"] = float(state.best.score)
  out["mean||meta_valid_best_step"] = float(state.best.step)
  out["mean||meta_valid_time_fraction"] = state.clock.fraction(train_seconds)
  return out


@flax.struct.dataclass
class MetaValidationState:
  """What a run keeps (and checkpoints) for meta-validation and selection.

  clock: the validations so far (cost bound); best: the best entry;
  best_theta: its theta (the starting theta until one is found); ema: the
  theta EMA. Checkpoint with `flax.serialization.to_bytes(state)`, restore
  with `from_bytes(MetaValidation.init_state(ema, theta_template), data)`.
  """
  clock: model_selection.ValidationClock
  best: model_selection.BestTheta
  best_theta: Any
  ema: theta_averaging.EmaState


def _check_int(name: str, value: Any, low: int):
  if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and value >= low):
    raise errors.InvalidArgument(
        f"{_PREFIX}{name}={value!r}; allowed: an integer >= "
        f"{low}", f"{_PREFIX}{name}")


def _as_numpy(tree: Any, template: Any) -> Any:
  """tree's leaves as numpy arrays of template's dtypes (no weak types)."""
  return jax.tree_util.tree_map(lambda x, t: np.asarray(x, t.dtype), tree,
                                template)


@gin.configurable
class MetaValidation:
  """A fixed validation task set, its evaluation of thetas, and its budget.

  Args:
    num_tasks: V, validation tasks (>= 1); 10 = every 3-class subset of
      the 5 meta-training classes once.
    inner_steps: inner steps of each run (>= 1); match the run's inner runs.
    every_n_steps: validate every this many outer steps (`decide`).
    max_time_fraction: at most this fraction of wall time validating, in
      (0, 1] (`decide` postpones validations that would exceed it).
    seed: fixes the tasks' subsets order, batch orders and init keys.
    split: the validation split scored: "inner_valid", "outer_valid" or
      "test".
    distribution: the meta-training distribution; None reads the gin config
      (`distribution_from_gin`).
    chunk_size: examples per forward pass of the whole-split loss.
  """

  def __init__(self, num_tasks: int = 10, inner_steps: int = 1000,
               every_n_steps: int = 10, max_time_fraction: float = 0.15,
               seed: int = 0, split: str = "inner_valid",
               distribution: Optional[MetaTrainingDistribution] = None,
               chunk_size: int = evaluation.EVAL_CHUNK_SIZE):
    _check_int("num_tasks", num_tasks, 1)
    _check_int("inner_steps", inner_steps, 1)
    _check_int("seed", seed, 0)
    _check_int("chunk_size", chunk_size, 1)
    model_selection.check_budget(every_n_steps, max_time_fraction, _PREFIX)
    if split not in SPLITS:
      raise errors.InvalidArgument(
          f"{_PREFIX}split={split!r}; allowed: {SPLITS}", f"{_PREFIX}split")
    if distribution is None:
      distribution = distribution_from_gin()
    if not isinstance(distribution, MetaTrainingDistribution):
      raise errors.InvalidArgument(
          f"{_PREFIX}distribution={distribution!r}; allowed: "
          "None or a MetaTrainingDistribution", f"{_PREFIX}distribution")
    self.num_tasks, self.inner_steps = int(num_tasks), int(inner_steps)
    self.every_n_steps = int(every_n_steps)
    self.max_time_fraction = float(max_time_fraction)
    self.seed, self.split, self.chunk_size = int(seed), split, int(chunk_size)
    self.distribution = distribution
    self.specs = validation_specs(distribution, self.num_tasks, self.seed)
    self.tasks = build_validation_tasks(distribution, self.specs,
                                        self.inner_steps, split, chunk_size)
    # meta_test(tasks, key=self.key) gives task i the key self.task_keys[i].
    self.key = jax.random.fold_in(jax.random.PRNGKey(self.seed),
                                  VALIDATION_STREAM)
    self.task_keys = np.asarray(jax.random.split(self.key, self.num_tasks))
    self._compiled = None  # (lopt, theta template, executable)

  def decide(self, clock: model_selection.ValidationClock, step: int,
             train_seconds: float) -> model_selection.Decision:
    """`clock.decide` with this config's every_n_steps and max_time_fraction."""
    return clock.decide(step, train_seconds, self.every_n_steps,
                        self.max_time_fraction)

  def _args(self, i: int):
    t = self.tasks[i]
    return (self.task_keys[i], t.train, t.batch_index, t.eval_examples,
            t.eval_weights)

  def _executable(self, lopt, theta) -> Tuple[Any, Any, float]:
    """(compiled run, theta template, seconds spent compiling now)."""
    if self._compiled is not None and self._compiled[0] is lopt:
      return self._compiled[1], self._compiled[2], 0.0
    start = time.perf_counter()
    template = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
        theta)
    run = inner_run_fn(self.tasks[0].task, lopt, self.inner_steps,
                       self.chunk_size)
    compiled = jax.jit(run).lower(template, *self._args(0)).compile()
    self._compiled = (lopt, compiled, template)
    return compiled, template, time.perf_counter() - start

  def evaluate(self, lopt, thetas: Mapping[str, Any],
               task_indices: Optional[Sequence[int]] = None
              ) -> MetaValidationResult:
    """Trains the validation tasks with each theta of `lopt` from scratch.

    Args:
      lopt: the LearnedOptimizer; `lopt.opt_fn(theta)` trains the tasks.
      thetas: {kind: theta}, e.g. {"latest": theta, "ema": ema.average};
        all of lopt's structure (compiled once, for the first lopt given).
      task_indices: evaluate only these tasks (default: all V); a task's
        numbers do not depend on which others run.

    Returns:
      MetaValidationResult (scores = mean final validation-split loss).
    """
    if not thetas:
      raise ValueError(f"{_PREFIX}evaluate: thetas is empty")
    indices = (list(range(self.num_tasks)) if task_indices is None
               else [int(i) for i in task_indices])
    if not indices or any(not 0 <= i < self.num_tasks for i in indices):
      raise ValueError(f"{_PREFIX}evaluate: task_indices={task_indices!r}; "
                       "allowed: a non-empty subset of "
                       f"range({self.num_tasks})")
    start = time.perf_counter()
    run, template, compile_seconds = self._executable(
        lopt, next(iter(thetas.values())))
    outs = {kind: [run(_as_numpy(theta, template), *self._args(i))
                   for i in indices] for kind, theta in thetas.items()}
    outs = jax.block_until_ready(outs)
    final = {k: np.array([float(f) for _, f in v]) for k, v in outs.items()}
    train = {k: np.array([float(np.mean(l)) for l, _ in v])
             for k, v in outs.items()}
    return MetaValidationResult(
        scores={k: float(np.mean(v)) for k, v in final.items()},
        final_loss=final, train_loss=train, task_indices=indices,
        task_names=[self.tasks[i].task.name for i in indices],
        seconds=time.perf_counter() - start, compile_seconds=compile_seconds)

  @staticmethod
  def init_state(ema: theta_averaging.ThetaEMA,
                 theta: Any) -> MetaValidationState:
    """The state at the start of training from `theta` (EMA = theta)."""
    return MetaValidationState(model_selection.ValidationClock(),
                               model_selection.BestTheta(), theta,
                               ema.init(theta))

  def validate(self, state: MetaValidationState, lopt, step: int,
               theta: Any) -> Tuple[MetaValidationState,
                                    MetaValidationResult]:
    """Evaluates {"latest": theta, "ema": state.ema.average} at outer step
    `step`; books the time and updates the best (latest before EMA, so a
    tie keeps the latest). Call it when `decide` says so."""
    thetas = {"latest": theta, "ema": state.ema.average}
    result = self.evaluate(lopt, thetas)
    best, best_theta = state.best, state.best_theta
    for kind, value in thetas.items():
      best, improved = best.update(step, kind, result.scores[kind])
      if improved:
        best_theta = value
    clock = state.clock.record(step, result.seconds, result.compile_seconds)
    return state.replace(clock=clock, best=best,
                         best_theta=best_theta), result
