"""The run directory's format: checkpoints, parameters and the metrics log.

What a train_log_dir holds:

  checkpoint_<N>   flax.serialization.to_bytes(OptCheckpoint) after N outer
                   steps: theta, outer-optimizer state, elapsed time. LO's name
                   and format (`learned_optimization.checkpoints.load_state`
                   reads it).
  params_<N>       to_bytes(ParameterCheckpoint): theta only (`load_params`);
                   params_0, the theta training started from, is always kept.
  metrics.jsonl    one JSON object per outer step: "step", "mean_loss" and
                   every scalar written to TensorBoard, under the same tag
                   (`MetricsLog`, `read_metrics`). Non-finite values are null.
  events.out.tfevents.*   TensorBoard summaries (`summaries`).
  config.gin       written by LO's run_train.

With meta-validation or theta averaging on (`local_training`), also:

  meta_validation_<N>  to_bytes(MetaValidationState) after N outer steps:
                   the validation clock, the best entry and its theta, the
                   EMA of theta; written before checkpoint_<N>, restored with
                   it (`save_selection`, `load_selection`).
  params_best      ParameterCheckpoint of the theta with the lowest logged
                   meta-validation score (its step: the outer step it was
                   validated at).
  params_ema       ParameterCheckpoint of the EMA of theta (step: N).

Checkpoints are written atomically (`<name>.tmp`, fsync, rename), so a kill at
any moment leaves the previous ones intact; a resumed run restores the newest
readable one (`restore_latest_checkpoint`), and drops later metrics so step
numbers stay monotone. Several processes (`distributed`): only process 0
writes; every process restores process 0's newest checkpoint
(`restore_everywhere`), and they stop with an error if they restored
different steps (the directory is not shared).
"""

import json
import os
import re
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import jax
from learned_optimization import checkpoints
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import gradient_learner
import numpy as onp

from pathology_fix.lo_boundary import lo_api
from pathology_fix.runtime import distributed

CHECKPOINT_PREFIX = "checkpoint_"
PARAMS_PREFIX = "params_"
METRICS_FILE = "metrics.jsonl"
SELECTION_PREFIX = "meta_validation_"
PARAMS_BEST = "params_best"
PARAMS_EMA = "params_ema"
NAMED_PARAMS = {"best": PARAMS_BEST, "ema": PARAMS_EMA}
TMP_SUFFIX = ".tmp"
_GEN_ID = "no_gen_id"  # what LO's local_train stores; no population here

PRNGKey = jax.Array


class CheckpointError(RuntimeError):
  """Checkpoints exist in a train_log_dir but none of them can be restored."""

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message  # gin appends its call lines to str(error)


def _fsync_dir(path: str):
  """Makes a rename in `path` durable (no-op where directories can't be opened)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_atomically(path: str, data: bytes):
  """Writes `data` to `path` so that readers see the old or the new file only."""
  tmp_path = path + TMP_SUFFIX
  try:
    with open(tmp_path, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    # A full disk (or a Ctrl-C) leaves no partial file behind.
    try:
      os.remove(tmp_path)
    except OSError:
      pass
    raise
  _fsync_dir(os.path.dirname(os.path.abspath(path)))


def checkpoint_steps(train_log_dir: str, prefix: str = CHECKPOINT_PREFIX
                    ) -> Sequence[int]:
  """Sorted steps N of the complete `<prefix><N>` files (`.tmp` excluded)."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)$")
  try:
    names = os.listdir(train_log_dir)
  except FileNotFoundError:
    return []
  steps = []
  for name in names:
    match = pattern.match(name)
    if match and os.path.isfile(os.path.join(train_log_dir, name)):
      steps.append(int(match.group(1)))
  return sorted(steps)


def checkpoint_template(
    outer_learner: gradient_learner.GradientLearner,
    key: Optional[PRNGKey] = None) -> gradient_learner.OptCheckpoint:
  """An OptCheckpoint with the right structure, for `checkpoints.load_state`."""
  if key is None:
    key = jax.random.PRNGKey(0)
  return gradient_learner.OptCheckpoint(
      outer_learner.init(key),
      elapsed_time=onp.asarray(0.0, onp.float64),
      total_inner_steps=0)


def save_checkpoint(train_log_dir: str,
                    outer_learner: gradient_learner.GradientLearner,
                    opt_checkpoint: gradient_learner.OptCheckpoint,
                    keep: int) -> str:
  """Writes params_<N> and checkpoint_<N> (N = outer step); keeps the last `keep`.

  params_0 (the theta training started from) is never removed.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  state = opt_checkpoint.gradient_learner_state
  step = int(state.theta_opt_state.iteration)
  params = gradient_learner.ParameterCheckpoint(
      lo_api.get_meta_params(outer_learner, state), _GEN_ID, step)
  # params first: checkpoint_<N> existing implies params_<N> is complete.
  write_atomically(
      os.path.join(train_log_dir, f"{PARAMS_PREFIX}{step}"),
      flax.serialization.to_bytes(params))
  path = os.path.join(train_log_dir, f"{CHECKPOINT_PREFIX}{step}")
  write_atomically(path, flax.serialization.to_bytes(opt_checkpoint))
  for prefix in (CHECKPOINT_PREFIX, PARAMS_PREFIX):
    for old in checkpoint_steps(train_log_dir, prefix)[:-keep]:
      if prefix == PARAMS_PREFIX and old == 0:
        continue  # the starting theta, kept for before/after comparisons
      _remove_file(os.path.join(train_log_dir, f"{prefix}{old}"))
  logging.info("Saved %s", path)
  return path


def load_params(train_log_dir: str, step: Union[int, str],
                lopt: lopt_base.LearnedOptimizer) -> Any:
  """theta from `params_<step>` in train_log_dir (LO's ParameterCheckpoint).

  step: an outer step, or "best" / "ema" for params_best / params_ema.
  """
  if isinstance(step, str) and step in NAMED_PARAMS:
    path = os.path.join(train_log_dir, NAMED_PARAMS[step])
  else:
    path = os.path.join(train_log_dir, f"{PARAMS_PREFIX}{int(step)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no such parameter file; saved steps: "
        f"{checkpoint_steps(train_log_dir, PARAMS_PREFIX)}")
  template = gradient_learner.ParameterCheckpoint(
      lopt.init(jax.random.PRNGKey(0)), _GEN_ID, 0)
  return checkpoints.load_state(path, template).params


def save_selection(train_log_dir: str, step: int, state: Any,
                   best: Optional[Tuple[Any, int]], ema: Optional[Any],
                   keep: int):
  """Writes meta_validation_<step> (the state's bytes), params_best and
  params_ema; keeps the last `keep` meta_validation_<N>.

  state: a flax-serializable state (`meta_validation.MetaValidationState`);
  best: (theta, the step it was validated at), None while none is found;
  ema: the averaged theta, or None. Call before `save_checkpoint` of the
  same step: checkpoint_<N> existing implies these are complete.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  step = int(step)
  if best is not None:
    write_atomically(os.path.join(train_log_dir, PARAMS_BEST),
                     flax.serialization.to_bytes(
                         gradient_learner.ParameterCheckpoint(
                             best[0], _GEN_ID, int(best[1]))))
  if ema is not None:
    write_atomically(os.path.join(train_log_dir, PARAMS_EMA),
                     flax.serialization.to_bytes(
                         gradient_learner.ParameterCheckpoint(
                             ema, _GEN_ID, step)))
  write_atomically(os.path.join(train_log_dir, f"{SELECTION_PREFIX}{step}"),
                   flax.serialization.to_bytes(state))
  for old in checkpoint_steps(train_log_dir, SELECTION_PREFIX)[:-keep]:
    _remove_file(os.path.join(train_log_dir, f"{SELECTION_PREFIX}{old}"))


def load_selection(train_log_dir: str, step: int, template: Any
                  ) -> Optional[Any]:
  """The state `save_selection` wrote at `step`, restored into `template`;
  None if there is no such file (e.g. the run had meta-validation off)."""
  path = os.path.join(train_log_dir, f"{SELECTION_PREFIX}{int(step)}")
  if not os.path.isfile(path):
    return None
  restored = checkpoints.load_state(path, template)
  _check_like(restored, template)
  return restored


def _remove_file(path: str):
  # Not LO's filesystem.remove: it is shutil.rmtree, which fails on files.
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _check_like(restored: Any, template: Any):
  """flax restores arrays of any shape (and dicts of any keys): compare."""
  if (jax.tree_util.tree_structure(restored) !=
      jax.tree_util.tree_structure(template)):
    raise ValueError("its pytree structure differs from this config's")
  leaves, _ = jax.tree_util.tree_flatten_with_path(restored)
  for (path, got), want in zip(leaves, jax.tree_util.tree_leaves(template)):
    if onp.shape(got) != onp.shape(want):
      raise ValueError(f"{jax.tree_util.keystr(path)} has shape "
                       f"{onp.shape(got)}, this config's {onp.shape(want)}")


def restore_latest_checkpoint(
    train_log_dir: str, template: gradient_learner.OptCheckpoint
) -> Optional[Tuple[gradient_learner.OptCheckpoint, str]]:
  """Restores the newest readable checkpoint_<N>; None if there is none.

  Leftover `.tmp` files (a write cut short by a kill) are removed. An
  unreadable newest checkpoint is skipped for an older one, and then removed
  together with any later params_<M>, so that it can't shadow the new ones.

  Args:
    train_log_dir: directory holding the checkpoints.
    template: structure to restore into (see `checkpoint_template`).

  Returns:
    (restored OptCheckpoint, its path), or None when no checkpoint exists.

  Raises:
    CheckpointError: checkpoints exist but none can be read, e.g. because the
      config changed the learned optimizer's structure.
  """
  for name in os.listdir(train_log_dir):
    if name.endswith(TMP_SUFFIX) and name.startswith(
        (CHECKPOINT_PREFIX, PARAMS_PREFIX, SELECTION_PREFIX)):
      logging.warning("Removing %s, left by an interrupted write.", name)
      _remove_file(os.path.join(train_log_dir, name))

  unreadable = []
  for step in reversed(checkpoint_steps(train_log_dir)):
    path = os.path.join(train_log_dir, f"{CHECKPOINT_PREFIX}{step}")
    try:
      restored = checkpoints.load_state(path, template)
      _check_like(restored, template)
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to parse (truncated msgpack, wrong structure) means the
      # same thing here: this file cannot be resumed from. Warned about only
      # if an older one restores; else the CheckpointError says it all.
      unreadable.append((path, e))
      continue
    for bad_path, error in unreadable:
      logging.warning("Cannot restore %s (%s: %s); removing it and resuming "
                      "from %s.", bad_path, type(error).__name__, error, path)
      _remove_file(bad_path)
    for prefix in (PARAMS_PREFIX, SELECTION_PREFIX):
      for later in checkpoint_steps(train_log_dir, prefix):
        if later > step:
          _remove_file(os.path.join(train_log_dir, f"{prefix}{later}"))
    return restored, path

  if unreadable:
    path, error = unreadable[0]
    raise CheckpointError(
        f"none of the {len(unreadable)} checkpoints in {train_log_dir} can be "
        f"restored (newest: {os.path.basename(path)}: "
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})."
        " Did the config change? Use a new --train_log_dir to start afresh.")
  return None


class MetricsLog:
  """Appends one JSON object per outer step to metrics.jsonl."""

  def __init__(self, path: str, keep_up_to_step: Optional[int]):
    self._path = path
    if keep_up_to_step is not None and os.path.exists(path):
      self._truncate(keep_up_to_step)
    self._file = open(path, "a")

  def _truncate(self, last_step: int):
    """Drops records after `last_step`: a killed run logged past its checkpoint."""
    kept = []
    with open(self._path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue  # a line cut short by the kill
        if isinstance(record, dict) and record.get("step", last_step + 1) <= last_step:
          kept.append(json.dumps(record) + "\n")
    write_atomically(self._path, "".join(kept).encode())

  def write(self, step: int, scalars: Mapping[str, float]):
    record = {"step": int(step)}
    if "mean_loss" in scalars:
      record["mean_loss"] = None  # placeholder: keeps it second in the line
    for k, v in scalars.items():
      v = float(v)
      record[k] = v if onp.isfinite(v) else None  # strict JSON has no NaN
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self):
    self._file.close()


def read_metrics(train_log_dir: str) -> List[Mapping[str, Any]]:
  """The records of metrics.jsonl, one per outer step."""
  with open(os.path.join(train_log_dir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def restore_everywhere(train_log_dir: str, template):
  """`restore_latest_checkpoint` in every process, process 0 (which cleans up) first.

  Returns before process 0 writes anything, so all restore the same step.
  """
  primary = distributed.is_primary()
  restored = restore_latest_checkpoint(train_log_dir, template) if primary else None
  distributed.barrier("pathology_fix_restore_primary")
  if not primary:
    restored = restore_latest_checkpoint(train_log_dir, template)
  distributed.barrier("pathology_fix_restore_all")
  step = -1 if restored is None else int(
      restored[0].gradient_learner_state.theta_opt_state.iteration)
  primary_step = distributed.broadcast_int(step)
  if step != primary_step:
    raise CheckpointError(
        f"process {jax.process_index()} restored step {step} from "
        f"{train_log_dir} but process 0 restored step {primary_step} (-1: "
        "none): every process needs the same train_log_dir on a shared "
        "filesystem")
  return restored
