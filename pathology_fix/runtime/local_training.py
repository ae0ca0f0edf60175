"""Resumable single-machine meta-training loop for LO's `outer_train.run_train`.

`run_train` calls `outer_train.local_train` by global name, and LO 0.0.1's
version restores the last checkpoint and then ignores it: every rerun starts
from fresh meta-parameters. `local_train` here has the same signature and
continues from the last checkpoint instead; `installed()` swaps it in while
our entry point (`python -m pathology_fix.train`) runs.

What a train_log_dir holds afterwards:

  checkpoint_<N>   flax.serialization.to_bytes(OptCheckpoint) after N outer
                   steps: theta, outer-optimizer state, elapsed time. LO's name
                   and format (`checkpoints.load_state` reads it).
  params_<N>       to_bytes(ParameterCheckpoint): theta only, for evaluation.
  metrics.jsonl    one JSON object per outer step: "step", "mean_loss" and
                   every scalar written to TensorBoard, under the same tag.
                   Non-finite values are written as null.
  events.out.tfevents.*   TensorBoard summaries (LO's JaxboardWriter).
  config.gin       written by run_train.

Checkpoints are written atomically (`<name>.tmp`, fsync, rename), so a kill at
any moment leaves the previous ones intact; a resumed run restores the newest
readable one, and drops later metrics so step numbers stay monotone.

Several processes (`pathology_fix.distributed`): every process runs this loop
on the same train_log_dir (a shared filesystem); only process 0 writes it
(checkpoints, params, metrics.jsonl, TensorBoard). All processes restore
process 0's newest checkpoint before it writes again, and stop with an error
if they restored different steps (the directory is not shared).
"""

import collections
import contextlib
import json
import os
import re
import secrets
import threading
import time
from typing import Any, Iterator, Mapping, MutableMapping, Optional, Sequence, Tuple

from absl import logging
import gin
import jax
import jax.numpy as jnp
from learned_optimization import checkpoints
from learned_optimization import outer_train
from learned_optimization import summary
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import gradient_learner
import numpy as onp
import tqdm

from pathology_fix.runtime import distributed
from pathology_fix.lo_boundary import lo_api
from pathology_fix.runtime import outer_loop

CHECKPOINT_PREFIX = "checkpoint_"
PARAMS_PREFIX = "params_"
METRICS_FILE = "metrics.jsonl"
TMP_SUFFIX = ".tmp"
_GEN_ID = "no_gen_id"  # what LO's local_train stores; no population here

PRNGKey = jnp.ndarray


class CheckpointError(RuntimeError):
  """Checkpoints exist in a train_log_dir but none of them can be restored."""


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
  with open(tmp_path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp_path, path)
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


def load_params(train_log_dir: str, step: int,
                lopt: lopt_base.LearnedOptimizer) -> Any:
  """theta from `params_<step>` in train_log_dir (LO's ParameterCheckpoint)."""
  path = os.path.join(train_log_dir, f"{PARAMS_PREFIX}{int(step)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no such parameter file; saved steps: "
        f"{checkpoint_steps(train_log_dir, PARAMS_PREFIX)}")
  template = gradient_learner.ParameterCheckpoint(
      lopt.init(jax.random.PRNGKey(0)), _GEN_ID, 0)
  return checkpoints.load_state(path, template).params


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
        (CHECKPOINT_PREFIX, PARAMS_PREFIX)):
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
    for later in checkpoint_steps(train_log_dir, PARAMS_PREFIX):
      if later > step:
        _remove_file(os.path.join(train_log_dir, f"{PARAMS_PREFIX}{later}"))
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


def _is_scalar(value: Any) -> bool:
  return onp.ndim(value) == 0


def mark_restart(summary_writer: Any, first_new_step: int):
  """Tells TensorBoard to drop events from `first_new_step` on of the killed run.

  Only our tensorboardX writer (what LO's JaxboardWriter is without
  TensorFlow) can; with TF's writer this is skipped.
  """
  drop_from = getattr(summary_writer, "mark_restart", None)
  if drop_from is not None:
    drop_from(first_new_step)


def _close_writer(summary_writer: Any, timeout_s: float = 30.0):
  """Closes the writer (tensorboardX drains its queue only on close).

  Bounded: after a Ctrl-C landed inside the writer its queue may never drain.
  """
  closer = threading.Thread(target=summary_writer.close, daemon=True)
  closer.start()
  closer.join(timeout_s)
  if closer.is_alive():
    logging.warning("Summary writer did not close within %.0f s; the last "
                    "TensorBoard events may be missing.", timeout_s)


def estimator_groups(num_estimators: int,
                      per_step: Optional[int]) -> Sequence[Sequence[int]]:
  """Estimator indices per outer step, cycling as LO main's local_train does."""
  if not per_step:
    return [list(range(num_estimators))]
  if not 1 <= per_step <= num_estimators:
    raise ValueError(
        f"resumable_local_train.run_num_estimators_per_gradient ({per_step}) "
        f"must be between 1 and num_estimators ({num_estimators})")
  cycle = [i % num_estimators
           for i in range(per_step * num_estimators)]  # whole groups repeat
  return [cycle[g:g + per_step] for g in range(0, len(cycle), per_step)]


def _resolve_seed(seed: Optional[int]) -> int:
  if seed is not None:
    return int(seed)
  # One seed for all processes: each would draw a different one.
  return distributed.broadcast_int(secrets.randbits(31))


def _restore_everywhere(train_log_dir: str, template):
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


def _restore_or_init(train_log_dir: str,
                     outer_learner: gradient_learner.GradientLearner,
                     init_key) -> Tuple[Any, float, int, Optional[str]]:
  """(learner state, elapsed time, total inner steps, restored path or None)."""
  state = outer_learner.init(init_key)
  template = gradient_learner.OptCheckpoint(
      state, elapsed_time=onp.asarray(0.0, onp.float64), total_inner_steps=0)
  restored = _restore_everywhere(train_log_dir, template)
  if restored is None:
    return state, 0.0, 0, None
  checkpoint_data, restored_path = restored
  return (checkpoint_data.gradient_learner_state,
          float(checkpoint_data.elapsed_time),
          int(checkpoint_data.total_inner_steps), restored_path)


def _open_summaries(train_log_dir: str,
                    outer_learner: gradient_learner.GradientLearner,
                    learner_state, restored: bool):
  """metrics.jsonl and TensorBoard, continued after a restored step.

  Processes other than 0 get writers that discard everything.
  """
  if not distributed.is_primary():
    return _Discard(), _Discard()
  step = int(learner_state.theta_opt_state.iteration)
  metrics_log = MetricsLog(
      os.path.join(train_log_dir, METRICS_FILE),
      keep_up_to_step=step if restored else 0)
  summary_writer = summary.JaxboardWriter(train_log_dir)
  if restored:
    mark_restart(summary_writer, step + 1)
  else:
    theta = lo_api.get_meta_params(outer_learner, learner_state)
    shapes = jax.tree_util.tree_map(
        lambda x: (tuple(onp.shape(x)), str(jnp.asarray(x).dtype)), theta)
    summary_writer.text("theta_structure", str(shapes), step=0)
  return metrics_log, summary_writer


class _Discard:
  """MetricsLog and summary writer of the processes that do not write."""

  def write(self, *args, **kwargs):
    pass

  scalar = histogram = text = close = write


def _step_summary(out: outer_loop.OuterStep,
                  outer_learner: gradient_learner.GradientLearner,
                  worker_ids, with_metrics: bool, delta_time: float,
                  total_inner_steps: int,
                  elapsed_time: float) -> MutableMapping[str, Any]:
  """LO's learner summary of one step, plus the estimators' metrics."""
  # LO's local_train drops the estimators' metrics; keep both.
  with onp.errstate(divide="ignore"):
    to_write = outer_train.summarize_learner(
        step=out.step,
        metrics=out.metrics,
        worker_ids=worker_ids,
        with_metrics=with_metrics,
        theta=lo_api.get_meta_params(outer_learner, out.learner_state),
        delta_time=delta_time,
        total_inner_steps=total_inner_steps,
        delta_inner_steps=onp.asarray(0))
  # gradient_worker_compute does not report inner steps (LO's loop logs 0
  # for them too): leave these out rather than log zeros.
  to_write.pop("inner_steps", None)
  to_write.pop("total_time/inner_steps_per_second", None)
  to_write["elapsed_time"] = elapsed_time + delta_time
  return to_write


@gin.configurable("resumable_local_train")
def local_train(
    train_log_dir: str,
    lopt: lopt_base.LearnedOptimizer,
    outer_learner: gradient_learner.GradientLearner,
    num_estimators: int = 2,
    summary_every_n: int = 10,
    num_steps: int = 10000,
    num_seconds: float = 0.,
    stochastic_resample_frequency: int = 200,
    checkpoint_every_n_steps: int = 10,
    keep: int = 5,
    seed: Optional[int] = None,
    sample_estimators_fn: Optional[Any] = None,
    run_num_estimators_per_gradient: Optional[int] = None,
    worker_id: int = 0,
) -> int:
  """Meta-trains `lopt` in one process, resuming from train_log_dir if possible.

  Same signature as LO's `outer_train.local_train` (0.0.1's, and main's with
  `sample_estimators_fn` / `run_num_estimators_per_gradient`), plus the gin
  parameters below (bind them as `resumable_local_train.<name>`).

  Args:
    train_log_dir: directory for checkpoints, summaries and metrics.jsonl.
    lopt: learned optimizer to train.
    outer_learner: learner which updates the learned optimizer weights.
    num_estimators: number of gradient estimators to meta-train with.
    summary_every_n: compute the estimators' (slower) metrics every n steps.
    num_steps: total outer steps, counting those of earlier runs.
    num_seconds: stop after this much training time (0: no limit), counting
      earlier runs.
    stochastic_resample_frequency: resample an estimator with probability
      1 / this each step (0: never).
    checkpoint_every_n_steps: save a checkpoint every n outer steps (and at the
      end, and on Ctrl-C).
    keep: how many checkpoints (and params) to keep; params_0, the starting
      theta, is kept as well.
    seed: fixes all randomness (JAX keys and LO's global numpy draws) for a
      reproducible run; None draws one and prints it. Keys are derived from
      the outer step, so a resumed run draws what the uninterrupted run would
      have; its estimators' inner problems restart, though (LO's checkpoint
      format holds no estimator state).
    sample_estimators_fn: builds the estimators (LO main's run_train passes
      its `sample_estimator_fn`); None: LO's `build_gradient_estimators`.
    run_num_estimators_per_gradient: estimators run per outer step, cycling
      through the `num_estimators` (LO main); None: all of them.
    worker_id: passed to `sample_estimators_fn` (LO main).

  Returns:
    The outer step reached.
  """
  overridden = _overridden_binding(
      num_estimators=num_estimators, summary_every_n=summary_every_n,
      num_steps=num_steps, num_seconds=num_seconds,
      stochastic_resample_frequency=stochastic_resample_frequency)
  if overridden:
    raise ValueError(overridden)
  if checkpoint_every_n_steps < 1:
    raise ValueError("checkpoint_every_n_steps must be >= 1")
  if keep < 1:
    raise ValueError("keep must be >= 1")
  groups = estimator_groups(num_estimators, run_num_estimators_per_gradient)
  os.makedirs(train_log_dir, exist_ok=True)
  seed = _resolve_seed(seed)
  logging.info("Seed: %d", seed)
  init_key, estimators_key, base_key = jax.random.split(
      jax.random.PRNGKey(seed), 3)
  progress = _start(train_log_dir, outer_learner, keep, init_key, seed,
                    num_steps)
  start_step = progress.step
  metrics_log, summary_writer = _open_summaries(
      train_log_dir, outer_learner, progress.learner_state,
      restored=progress.restored_path is not None)

  stop_reason = "num_steps reached"
  pbar = None
  try:
    if start_step < num_steps:
      gradient_estimators = lo_api.build_gradient_estimators(
          sample_estimators_fn, lopt, estimators_key, num_estimators,
          worker_id=worker_id)
      steps = outer_loop.run(
          outer_learner, gradient_estimators, progress.learner_state,
          num_steps, base_key,
          unroll_key=jax.random.fold_in(estimators_key, start_step),
          summary_every_n=summary_every_n, lopt=lopt,
          stochastic_resample_frequency=stochastic_resample_frequency,
          estimator_groups=groups,
          sample_estimators_fn=sample_estimators_fn, worker_id=worker_id)
      pbar = tqdm.tqdm(total=num_steps, initial=start_step,
                       desc="outer steps", unit="step", dynamic_ncols=True,
                       disable=not distributed.is_primary())
      if _log_steps(steps, progress, pbar, metrics_log, summary_writer,
                    checkpoint_every_n_steps, num_seconds):
        stop_reason = f"num_seconds={num_seconds} reached"
  except KeyboardInterrupt:
    stop_reason = "interrupted"
    raise
  except Exception:
    stop_reason = None  # the traceback says enough
    raise
  finally:
    if pbar is not None:
      pbar.close()
    # Also on Ctrl-C: progress only ever holds a completed update.
    if progress.step != progress.last_saved_step:
      progress.save()
    metrics_log.close()
    _close_writer(summary_writer)
    if stop_reason and distributed.is_primary():
      _print_outputs(train_log_dir, progress.step, num_steps, start_step,
                     stop_reason)
  return progress.step


def _overridden_binding(**received) -> Optional[str]:
  """Why a `resumable_local_train.<name>` binding was overridden, or None.

  LO's run_train passes these arguments explicitly (its own defaults), and
  an explicit argument beats a gin binding: such a binding would be silently
  ignored. They must be bound on run_train.
  """
  bound = gin.get_bindings("resumable_local_train")
  for name, value in received.items():
    if name in bound and bound[name] != value:
      return (f"resumable_local_train.{name} = {bound[name]!r} is overridden "
              f"by the caller's {name}={value!r} (LO's run_train passes it): "
              f"bind run_train.{name} instead")
  return None


def _start(train_log_dir, outer_learner, keep, init_key, seed: int,
           num_steps: int) -> "_Progress":
  """The restored (or initial, then saved) state, with a line saying which."""
  progress = _Progress(train_log_dir, outer_learner, keep,
                       *_restore_or_init(train_log_dir, outer_learner, init_key))
  start_step = progress.step
  # LO draws from numpy's global RNG (estimator resampling, event sampling).
  onp.random.seed((seed + start_step) % 2**32)
  where = ("" if jax.process_count() == 1 else
           f" on {jax.process_count()} processes")
  if progress.restored_path is None:
    if distributed.is_primary():
      print(f"Starting meta-training in {train_log_dir} (seed {seed}){where}.",
            flush=True)
    progress.save()
  else:
    if distributed.is_primary():
      print(f"Resuming from {progress.restored_path}: outer step {start_step} "
            f"of {num_steps} (seed {seed}){where}.", flush=True)
    progress.last_saved_step = start_step
  return progress


class _Progress:
  """The run's state a checkpoint holds, and the step it was last saved at.

  Only process 0 writes; the others just track the step.
  """

  def __init__(self, train_log_dir, outer_learner, keep, learner_state,
               elapsed_time, total_inner_steps, restored_path):
    self.train_log_dir = train_log_dir
    self.outer_learner = outer_learner
    self.keep = keep
    self.learner_state = learner_state
    self.elapsed_time = elapsed_time
    self.total_inner_steps = total_inner_steps
    self.restored_path = restored_path
    self.last_saved_step = None

  @property
  def step(self) -> int:
    return int(self.learner_state.theta_opt_state.iteration)

  def save(self):
    if not distributed.is_primary():
      self.last_saved_step = self.step
      return
    save_checkpoint(
        self.train_log_dir, self.outer_learner,
        gradient_learner.OptCheckpoint(
            self.learner_state,
            elapsed_time=onp.asarray(self.elapsed_time, onp.float64),
            total_inner_steps=int(self.total_inner_steps)), self.keep)
    self.last_saved_step = self.step


def _log_steps(steps, progress: _Progress, pbar, metrics_log, summary_writer,
               checkpoint_every_n_steps: int, num_seconds: float) -> bool:
  """Logs and checkpoints each outer step; True if stopped by num_seconds."""
  worker_ids = collections.deque(maxlen=10)
  step_start = time.time()
  for out in steps:
    now = time.time()
    delta_time = max(now - step_start, 1e-9)
    step_start = now
    worker_ids.append([0])
    to_write = _step_summary(out, progress.outer_learner, worker_ids,
                             out.with_metrics, delta_time,
                             progress.total_inner_steps, progress.elapsed_time)
    write_summaries(summary_writer, metrics_log, to_write, out.step)
    # Commit only once the step is logged: what a checkpoint holds (also on
    # Ctrl-C) always has its metrics.jsonl line.
    progress.learner_state = out.learner_state
    progress.elapsed_time += delta_time
    pbar.set_postfix(meta_loss=f"{out.mean_loss:.4g}", refresh=False)
    pbar.update(progress.step - pbar.n)
    if progress.step % checkpoint_every_n_steps == 0:
      progress.save()
    if num_seconds and progress.elapsed_time > num_seconds:
      return True
  return False


_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")


def tensorboard_tag(name: str) -> str:
  """The tag TensorBoard writers store `name` under (theta paths contain '~')."""
  return _INVALID_TAG_CHARACTERS.sub("_", name).lstrip("/")


def write_summaries(summary_writer: Any, metrics_log: MetricsLog,
                     to_write: MutableMapping[str, Any], step: int):
  scalars = {}
  for name, value in to_write.items():
    # Cleaned here, not by the writer, so metrics.jsonl uses the same keys.
    tag = tensorboard_tag(name)
    if _is_scalar(value):
      scalars[tag] = float(value)
      summary_writer.scalar(tag, scalars[tag], step=step)
    else:
      summary_writer.histogram(tag, onp.asarray(value), step=step)
  metrics_log.write(step, scalars)


def _print_outputs(train_log_dir: str, step: int, num_steps: int,
                   start_step: int, stop_reason: str):
  d = os.path.abspath(train_log_dir)
  done = step - start_step
  print(f"Meta-training stopped at outer step {step} of {num_steps} "
        f"({stop_reason}; this run did {done} step{'' if done == 1 else 's'}).\n"
        f"  checkpoints: {d}/{CHECKPOINT_PREFIX}{step} and "
        f"{PARAMS_PREFIX}{step} (rerun the same command to resume)\n"
        f"  summaries:   {d} (tensorboard --logdir {d})\n"
        f"  metrics:     {d}/{METRICS_FILE}\n"
        f"  gin config:  {d}/config.gin",
        flush=True)


@contextlib.contextmanager
def installed() -> Iterator[None]:
  """Makes LO's `run_train` use this `local_train` inside the block."""
  original = outer_train.local_train
  outer_train.local_train = local_train
  try:
    yield
  finally:
    outer_train.local_train = original
