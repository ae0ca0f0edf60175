"""The two learned_optimization APIs this plugin runs on, in one place.

PyPI `learned-optimization==0.0.1` (March 2022) and GitHub main (tested at
32186aa, 2026-03-23) both call themselves 0.0.1, so the API is told by a
feature: `learned_optimization.outer_trainers.truncated_step` exists only on
main. Differences the plugin meets:

| what                        | 0.0.1                                   | main |
|-----------------------------|-----------------------------------------|------|
| estimator construction      | `fn(task_family, learned_opt)`          | `fn(truncated_step_fn(task_family, learned_opt))` |
| `build_gradient_estimators` | no `worker_id`                          | `worker_id=` required |
| learner's theta             | `GradientLearner.get_lopt_params`       | `get_meta_params` |
| gin: `run_train`            | `outer_learner = @GradientLearner()`    | `outer_learner_fn = @GradientLearner` |
| gin: `GradientLearner`      | `lopt = ...`                            | `meta_init = ...` |
| gin: LO estimators          | `TruncatedPES.num_tasks`, `.trunc_sched`, `.train_and_meta` | on `VectorizedLOptTruncatedStep` (`meta_loss_split`) |
| gin scopes                  | kept                                    | dropped by `run_train` (`_move_all_gin_config_to_default_scope`) |

On main, `install()` makes gin read config files through `translate_config`,
which rewrites the 0.0.1 bindings above, so the shipped configs (and users'
0.0.1 configs) run on both; scoped bindings fail with one clear error.
"""

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import gin

from pathology_fix_core import errors

IS_MAIN = importlib.util.find_spec(
    "learned_optimization.outer_trainers.truncated_step") is not None
API_NAME = "GitHub main" if IS_MAIN else "0.0.1"


class ConfigError(ValueError):
  """A gin config that cannot mean the same on this learned_optimization."""


# ---------------------------------------------------------------- estimators


def _is_truncated_step(value) -> bool:
  if isinstance(value, LazyLOptTruncatedStep):
    return True  # hasattr on it would build the real step
  return hasattr(value, "task_family") and hasattr(value, "learned_opt") and (
      not hasattr(value, "sample"))


@dataclasses.dataclass(frozen=True)
class EstimatorInputs:
  """What either LO's call hands an estimator.

  trunc_sched and num_tasks are the truncated step's (main), or None when
  there is none (0.0.1's call, or a `LazyLOptTruncatedStep`); an estimator's
  own bindings take precedence over them.
  """
  task_family: Any
  learned_opt: Any
  trunc_sched: Any = None
  num_tasks: Optional[int] = None


def estimator_inputs(owner: str, first, learned_opt) -> EstimatorInputs:
  """Unpacks `fn(task_family, learned_opt)` (0.0.1) or `fn(truncated_step)` (main).

  Raises:
    TypeError naming `<owner>.learned_opt` when there is none, or when a
    truncated step comes with a different one.
  """
  trunc_sched = num_tasks = None
  if _is_truncated_step(first):
    step = first
    if learned_opt is not None and learned_opt is not step.learned_opt:
      raise errors.InvalidArgumentType(
          f"{owner}: got a truncated_step and a different learned_opt; pass "
          "one or the other", f"{owner}.learned_opt")
    learned_opt = step.learned_opt
    if not isinstance(step, LazyLOptTruncatedStep):
      trunc_sched, num_tasks = step.trunc_sched, step.num_tasks
    first = step.task_family
  if learned_opt is None:
    raise errors.InvalidArgumentType(
        f"{owner}.learned_opt is missing: build it as {owner}(task_family, "
        f"learned_opt, ...) (learned_optimization 0.0.1) or "
        f"{owner}(truncated_step, ...) (GitHub main)", f"{owner}.learned_opt")
  return EstimatorInputs(first, learned_opt, trunc_sched, num_tasks)


@gin.configurable
class LazyLOptTruncatedStep:
  """main's `truncated_step_fn` result, built only if an LO estimator uses it.

  Our estimators read `task_family` and `learned_opt` only; LO's own (e.g.
  `TruncatedPES` in `EstimatorMixture`) get a `VectorizedLOptTruncatedStep`
  built from gin bindings on first use, so configs without LO estimators
  need no `VectorizedLOptTruncatedStep.*` bindings.
  """

  def __init__(self, task_family, learned_opt):
    self.task_family = task_family
    self.learned_opt = learned_opt
    self._step = None

  def task_name(self):
    return self.task_family.name

  def cfg_name(self):
    return self.learned_opt.name

  def __getattr__(self, name):
    if name.startswith("__") or name == "_step":
      raise AttributeError(name)
    if self._step is None:
      from learned_optimization.outer_trainers import lopt_truncated_step  # pylint: disable=g-import-not-at-top
      self._step = lopt_truncated_step.VectorizedLOptTruncatedStep(
          self.task_family, self.learned_opt)
    return getattr(self._step, name)


def call_estimator_fn(estimator_fn: Callable, task_family, learned_opt):
  """Builds one estimator the way this LO's `build_gradient_estimators` does."""
  if IS_MAIN:
    return estimator_fn(LazyLOptTruncatedStep(task_family, learned_opt))
  return estimator_fn(task_family, learned_opt)


def estimator_fn_args(args: Sequence[Any]) -> Tuple[Any, Any]:
  """(task_family, learned_opt) from a `gradient_estimator_fn` call's args."""
  if len(args) == 1 and _is_truncated_step(args[0]):
    return args[0].task_family, args[0].learned_opt
  if len(args) == 2:
    return args[0], args[1]
  raise TypeError(
      "gradient_estimator_fn takes (task_family, learned_opt) "
      "(learned_optimization 0.0.1) or (truncated_step) (GitHub main); got "
      f"{len(args)} arguments")


_STEP_KWARGS = ("trunc_sched", "num_tasks", "random_initial_iteration_offset")


def build_lo_estimator(estimator_cls, task_family, learned_opt, **kwargs):
  """One of LO's own estimators (TruncatedGrad/ES/PES) from 0.0.1's arguments.

  On main, `trunc_sched`, `num_tasks` and `random_initial_iteration_offset`
  go to a `VectorizedLOptTruncatedStep`, the rest to the estimator;
  `train_and_meta=True` becomes the step's `meta_loss_split="outer_valid"`.
  """
  if not IS_MAIN:
    return estimator_cls(task_family, learned_opt, **kwargs)
  from learned_optimization.outer_trainers import lopt_truncated_step  # pylint: disable=g-import-not-at-top
  step_kwargs = {k: kwargs.pop(k) for k in _STEP_KWARGS if k in kwargs}
  if kwargs.pop("train_and_meta", False):
    step_kwargs["meta_loss_split"] = "outer_valid"
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      task_family, learned_opt, **step_kwargs)
  return estimator_cls(step, **kwargs)


# --------------------------------------------------------------- outer loop


def get_meta_params(outer_learner, state):
  """theta from a GradientLearner's state (main renamed get_lopt_params)."""
  getter = getattr(outer_learner, "get_meta_params", None) or getattr(
      outer_learner, "get_lopt_params")
  return getter(state)


def build_gradient_estimators(sample_estimators_fn: Optional[Callable],
                              learned_opt, key, num_gradient_estimators: int,
                              worker_id: int = 0):
  """Calls LO's (or a user's) `build_gradient_estimators` on either API."""
  if sample_estimators_fn is None:
    from learned_optimization import outer_train  # pylint: disable=g-import-not-at-top
    sample_estimators_fn = outer_train.build_gradient_estimators
  kwargs = dict(learned_opt=learned_opt, key=key,
                num_gradient_estimators=num_gradient_estimators)
  if IS_MAIN:
    kwargs["worker_id"] = worker_id
  return sample_estimators_fn(**kwargs)


def maybe_resample_gradient_estimators(
    sample_estimators_fn: Optional[Callable], learned_opt, gradient_estimators,
    unroll_states, worker_weights, key, stochastic_resample_frequency: int,
    worker_id: int = 0):
  """LO's `maybe_resample_gradient_estimators` with main's extra arguments."""
  from learned_optimization import outer_train  # pylint: disable=g-import-not-at-top
  kwargs = dict(worker_weights=worker_weights, key=key,
                stochastic_resample_frequency=stochastic_resample_frequency)
  if IS_MAIN:
    if sample_estimators_fn is not None:
      kwargs["sample_estimators_fn"] = sample_estimators_fn
    kwargs["worker_id"] = worker_id
  elif sample_estimators_fn is not None:
    raise errors.InvalidArgument(
        "resumable_local_train.sample_estimators_fn needs learned_optimization "
        "GitHub main; 0.0.1 always resamples with build_gradient_estimators",
        "sample_estimators_fn")
  return outer_train.maybe_resample_gradient_estimators(
      learned_opt, gradient_estimators, unroll_states, **kwargs)


@contextlib.contextmanager
def local_train_replaced_by(local_train: Callable[..., Any]) -> Iterator[None]:
  """Makes LO's `run_train` call `local_train` inside the block.

  `run_train` looks `outer_train.local_train` up by global name when it runs
  (0.0.1 and main), so swapping the module attribute is enough.
  """
  from learned_optimization import outer_train  # pylint: disable=g-import-not-at-top
  original = outer_train.local_train
  outer_train.local_train = local_train
  try:
    yield
  finally:
    outer_train.local_train = original


# ----------------------------------------------------------------------- gin

_CALLED_LEARNER = re.compile(
    r"^(\s*)run_train\.outer_learner\s*=\s*@([\w.]+)\(\)\s*(#.*)?$")
_LO_ESTIMATORS = r"(?:TruncatedPES|TruncatedES|TruncatedGrad|FullES|FullGrad)"
_STEP_ARGS = re.compile(
    r"^(\s*)" + _LO_ESTIMATORS +
    r"\.(num_tasks|trunc_sched|random_initial_iteration_offset)(\s*=)")
_TRAIN_AND_META = re.compile(
    r"^(\s*)" + _LO_ESTIMATORS + r"\.train_and_meta\s*=\s*(True|False)\s*(#.*)?$")
_RENAMES = (
    (re.compile(r"^(\s*)GradientLearner\.lopt(\s*=)"),
     r"\1GradientLearner.meta_init\2"),
)
_ESTIMATOR_FN = re.compile(r"^\s*build_gradient_estimators\.gradient_estimator_fn\s*=")
_STEP_FN = re.compile(r"^\s*build_gradient_estimators\.truncated_step_fn\s*=")
# `scope/name.param = value`; `@scope/name()` values are references, not keys.
_SCOPED_BINDING = re.compile(r"^\s*([\w.]+(?:/[\w.]+)*)/([\w.]+)\.(\w+)\s*=")


# LO main's run_train moves every binding into this gin scope, so that
# unscoped gin.query_parameter / get_bindings find nothing inside it.
MAIN_GIN_SCOPE = "default_scope"


def query_binding(binding_key: str) -> Any:
  """`gin.query_parameter`, also inside LO main's run_train (its scope).

  Raises ValueError when the parameter is bound in neither.
  """
  try:
    return gin.query_parameter(binding_key)
  except ValueError:
    if binding_key.startswith(MAIN_GIN_SCOPE + "/"):
      raise
    return gin.query_parameter(f"{MAIN_GIN_SCOPE}/{binding_key}")


def get_bindings(configurable: str) -> dict:
  """`gin.get_bindings`, with the bindings LO main's run_train moved into its
  scope (unscoped ones win)."""
  out = {}
  for selector in (f"{MAIN_GIN_SCOPE}/{configurable}", configurable):
    try:
      out.update(gin.get_bindings(selector))
    except ValueError:
      pass  # not a registered configurable
  return out


def check_no_scopes(line: str, where: str = "gin config"):
  """Raises ConfigError for a scoped binding: main's run_train drops scopes."""
  match = _SCOPED_BINDING.match(line)
  if match and match.group(1) != "default_scope":
    raise ConfigError(
        f"{where}: scoped binding '{line.strip()}': learned_optimization "
        "GitHub main's run_train moves every binding out of its scope, so "
        f"'{match.group(1)}/' would be silently lost; bind "
        f"'{match.group(2)}.{match.group(3)}' without a scope")


def translate_line(line: str) -> str:
  """One 0.0.1 binding in main's spelling (unchanged if nothing to do)."""
  match = _CALLED_LEARNER.match(line)
  if match:
    return f"{match.group(1)}run_train.outer_learner_fn = @{match.group(2)}"
  match = _TRAIN_AND_META.match(line)
  if match:
    split = '"outer_valid"' if match.group(2) == "True" else "None"
    return f"{match.group(1)}VectorizedLOptTruncatedStep.meta_loss_split = {split}"
  line = _STEP_ARGS.sub(r"\1VectorizedLOptTruncatedStep.\2\3", line)
  for pattern, replacement in _RENAMES:
    line = pattern.sub(replacement, line)
  return line


def translate_config(text: str, where: str = "gin config") -> str:
  """A gin file's text with 0.0.1 bindings rewritten for main.

  Also sets `build_gradient_estimators.truncated_step_fn` to
  `LazyLOptTruncatedStep` next to a `gradient_estimator_fn` binding, unless
  the file binds a truncated_step_fn itself. Scoped bindings raise.
  """
  lines = text.splitlines()
  binds_step_fn = any(_STEP_FN.match(l) for l in lines)
  out = []
  for number, line in enumerate(lines, 1):
    check_no_scopes(line, f"{where}:{number}")
    out.append(translate_line(line))
    if _ESTIMATOR_FN.match(line) and not binds_step_fn:
      out.append("build_gradient_estimators.truncated_step_fn = "
                 "@LazyLOptTruncatedStep")
  return "\n".join(out) + "\n"


def translate_bindings(bindings: Sequence[str]) -> Sequence[str]:
  """--gin_bindings for this LO (each may hold several lines)."""
  if not IS_MAIN:
    return list(bindings)
  return [translate_config(b, "--gin_bindings").rstrip("\n") for b in bindings]


def _open_translated(path):
  with open(path) as f:
    return io.StringIO(translate_config(f.read(), path))


_installed = False


def install():
  """On main: gin reads config files through `translate_config`. Idempotent."""
  global _installed
  if _installed or not IS_MAIN:
    return
  # gin tries its readers in order and the first is plain `open`: ours must
  # come first (gin has no public way to prepend one).
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  readers.insert(0, (_open_translated, os.path.isfile))
  _installed = True
