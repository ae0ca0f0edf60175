"""Resumable single-machine meta-training loop for LO's `outer_train.run_train`.

`run_train` calls `outer_train.local_train` by global name, and LO 0.0.1's
version restores the last checkpoint and then ignores it: every rerun starts
from fresh meta-parameters. `resumable_local_train` here has the same
signature and continues from the last checkpoint instead; the CLI swaps it in
(`lo_api.local_train_replaced_by`) while `python -m pathology_fix.train` runs.

Per run: seeding (one seed for all processes), restore or init
(`checkpoints.restore_everywhere`), then `outer_loop.run`'s steps, each logged
(`summaries`), checkpointed every few steps and at the end (also on Ctrl-C),
with a progress bar and a closing summary of where everything went. The run
directory's format is `checkpoints`'.

Meta-validation, best-theta selection and theta averaging (off unless bound):

  resumable_local_train.meta_validation = @MetaValidation()
  resumable_local_train.theta_ema = @ThetaEMA()

After every outer step the EMA of theta is updated; when
`MetaValidation.decide` says so (every `every_n_steps`, within its
`max_time_fraction` of wall time) the latest and the EMA theta are
meta-validated, logged as meta_valid/latest, meta_valid/ema, meta_valid_best
(...) in metrics.jsonl and TensorBoard, and the argmin so far is kept as
params_best. All of it is checkpointed with each checkpoint_<N>
(`checkpoints.save_selection`) and restored on resume. The logged
elapsed_time is wall time: training plus validation.
"""

import collections
import os
import secrets
import sys
import time
from typing import Any, Callable, Optional, Sequence, Tuple

from absl import logging
import gin
import jax
import jax.numpy as jnp
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import gradient_learner
import numpy as onp
import tqdm

from pathology_fix_core import errors
from pathology_fix.lo_boundary import lo_api
from pathology_fix.runtime import checkpoints
from pathology_fix.runtime import distributed
from pathology_fix.runtime import meta_validation as meta_validation_lib
from pathology_fix.runtime import outer_loop
from pathology_fix.runtime import summaries
from pathology_fix.runtime import theta_averaging


def estimator_groups(num_estimators: int,
                      per_step: Optional[int]) -> Sequence[Sequence[int]]:
  """Estimator indices per outer step, cycling as LO main's local_train does."""
  if not per_step:
    return [list(range(num_estimators))]
  if not 1 <= per_step <= num_estimators:
    raise errors.InvalidArgument(
        f"resumable_local_train.run_num_estimators_per_gradient ({per_step}) "
        f"must be between 1 and num_estimators ({num_estimators})",
        "resumable_local_train.run_num_estimators_per_gradient")
  cycle = [i % num_estimators
           for i in range(per_step * num_estimators)]  # whole groups repeat
  return [cycle[g:g + per_step] for g in range(0, len(cycle), per_step)]


def _resolve_seed(seed: Optional[int]) -> int:
  if seed is not None:
    return int(seed)
  # One seed for all processes: each would draw a different one.
  return distributed.broadcast_int(secrets.randbits(31))


def _restore_or_init(train_log_dir: str,
                     outer_learner: gradient_learner.GradientLearner,
                     init_key) -> Tuple[Any, float, int, Optional[str]]:
  """(learner state, elapsed time, total inner steps, restored path or None)."""
  state = outer_learner.init(init_key)
  template = gradient_learner.OptCheckpoint(
      state, elapsed_time=onp.asarray(0.0, onp.float64), total_inner_steps=0)
  restored = checkpoints.restore_everywhere(train_log_dir, template)
  if restored is None:
    return state, 0.0, 0, None
  checkpoint_data, restored_path = restored
  return (checkpoint_data.gradient_learner_state,
          float(checkpoint_data.elapsed_time),
          int(checkpoint_data.total_inner_steps), restored_path)


@gin.configurable
def resumable_local_train(
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
    meta_validation: Optional[meta_validation_lib.MetaValidation] = None,
    theta_ema: Optional[theta_averaging.ThetaEMA] = None,
    max_skipped_steps: int = 10,
    on_validated: Optional[Callable[[], None]] = None,
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
    num_seconds: training time limit, earlier runs included (0: no limit).
    stochastic_resample_frequency: resample an estimator with probability
      1 / this each step (0: never).
    checkpoint_every_n_steps: save a checkpoint every n outer steps (and at the
      end, and on Ctrl-C).
    keep: how many checkpoints (and params) to keep; params_0, the starting
      theta, is kept as well.
    seed: fixes all randomness (JAX keys, LO's global numpy draws); None
      draws one and prints it. A resumed run draws what the uninterrupted one
      would (but its estimators' inner problems restart).
    sample_estimators_fn: builds the estimators (LO main's run_train passes
      its `sample_estimator_fn`); None: LO's `build_gradient_estimators`.
    run_num_estimators_per_gradient: estimators run per outer step, cycling
      through the `num_estimators` (LO main); None: all of them.
    worker_id: passed to `sample_estimators_fn` (LO main).
    meta_validation: validate the latest and the EMA theta during training
      and keep params_best (module docstring); None: no meta-validation.
    theta_ema: the EMA of theta, saved as params_ema; None: ThetaEMA()'s
      defaults when meta_validation is on, else no averaging.
    max_skipped_steps: stop after this many steps in a row with no finite sample.
    on_validated: called once all is built and checked, before the run
      directory is made (the CLI writes config.gin then).

  Returns:
    The outer step reached.
  """
  _check_arguments(
      num_estimators=num_estimators, summary_every_n=summary_every_n,
      num_steps=num_steps, num_seconds=num_seconds,
      stochastic_resample_frequency=stochastic_resample_frequency,
      checkpoint_every_n_steps=checkpoint_every_n_steps, keep=keep,
      max_skipped_steps=max_skipped_steps, seed=seed)
  selection = _Selection.create(meta_validation, theta_ema, lopt,
                                outer_learner, train_log_dir)
  groups = estimator_groups(num_estimators, run_num_estimators_per_gradient)
  seed = _resolve_seed(seed)
  logging.info("Seed: %d", seed)
  init_key, estimators_key, base_key = jax.random.split(
      jax.random.PRNGKey(seed), 3)
  # Built (so validated) before the run directory exists: nothing left behind.
  gradient_estimators = lo_api.build_gradient_estimators(
      sample_estimators_fn, lopt, estimators_key, num_estimators,
      worker_id=worker_id)
  progress, metrics_log, summary_writer = _open_run(
      train_log_dir, outer_learner, keep, init_key, seed, num_steps,
      on_validated, selection)
  start_step = progress.step

  stop_reason = "num_steps reached"
  pbar = None
  try:
    if start_step < num_steps:
      steps = outer_loop.run(
          outer_learner, gradient_estimators, progress.learner_state,
          num_steps, base_key,
          unroll_key=jax.random.fold_in(estimators_key, start_step),
          summary_every_n=summary_every_n, lopt=lopt,
          stochastic_resample_frequency=stochastic_resample_frequency,
          estimator_groups=groups,
          sample_estimators_fn=sample_estimators_fn, worker_id=worker_id)
      pbar = _progress_bar(num_steps, start_step)
      if _log_steps(steps, progress, pbar, metrics_log, summary_writer,
                    checkpoint_every_n_steps, num_seconds, num_steps,
                    max_skipped_steps):
        stop_reason = f"num_seconds={num_seconds} reached"
  except KeyboardInterrupt:
    stop_reason = "interrupted"
    raise
  except OSError as e:
    stop_reason = None
    raise _write_error(train_log_dir, e, progress.intact()) from e
  except Exception:
    stop_reason = None  # the traceback says enough
    raise
  finally:
    if pbar is not None:
      pbar.close()
    try:
      # Also on Ctrl-C: progress only ever holds a completed update.
      if progress.step != progress.last_saved_step:
        progress.save()
    finally:
      _close_quietly(metrics_log, summary_writer)
    if stop_reason and distributed.is_primary():
      _print_outputs(train_log_dir, progress.step, num_steps, start_step,
                     stop_reason, selection)
  return progress.step


def _close_quietly(metrics_log, summary_writer):
  """Closes both; on a full disk, an error here would hide the first one."""
  try:
    metrics_log.close()
  except OSError as e:
    logging.warning("Could not close %s: %s", checkpoints.METRICS_FILE, e)
  summaries.close_writer(summary_writer)


def _check_arguments(seed, **loop_arguments):
  """All of resumable_local_train's checks that need nothing built."""
  _reject_overridden_bindings(**{
      k: loop_arguments[k] for k in (
          "num_estimators", "summary_every_n", "num_steps", "num_seconds",
          "stochastic_resample_frequency")})
  check_loop_arguments(**loop_arguments)
  if seed is not None and (isinstance(seed, bool) or
                           not isinstance(seed, (int, onp.integer))):
    raise errors.InvalidArgument(
        f"resumable_local_train.seed must be an integer or None (drawn), got "
        f"{seed!r}", "resumable_local_train.seed")


def _write_error(train_log_dir: str, e: OSError, intact: str):
  return TrainingError(
      f"cannot write in {train_log_dir}: {e.strerror or e}"
      f"{f' ({e.filename})' if e.filename else ''}. "
      f"{intact}; rerun the same command to resume")


def _progress_bar(num_steps: int, start_step: int):
  return tqdm.tqdm(total=num_steps, initial=start_step, desc="outer steps",
                   unit="step", dynamic_ncols=True,
                   disable=not distributed.is_primary())


def _open_run(train_log_dir, outer_learner, keep, init_key, seed, num_steps,
              on_validated, selection):
  """(progress, metrics log, summary writer) in a directory made only now."""
  try:
    if on_validated is not None:
      on_validated()
    os.makedirs(train_log_dir, exist_ok=True)
    progress = _start(train_log_dir, outer_learner, keep, init_key, seed,
                      num_steps, selection)
    metrics_log, summary_writer = summaries.open_summaries(
        train_log_dir, outer_learner, progress.learner_state,
        restored=progress.restored_path is not None)
  except OSError as e:  # e.g. a full disk: nothing trained yet
    raise TrainingError(
        f"cannot write in {train_log_dir}: {e.strerror or e}"
        f"{f' ({e.filename})' if e.filename else ''}; rerun the same command "
        "once it can be written") from e
  return progress, metrics_log, summary_writer


def _check_int(name: str, value, minimum: int, meaning: str = ""):
  if isinstance(value, bool) or not isinstance(value, (int, onp.integer)) or (
      value < minimum):
    raise errors.InvalidArgument(
        f"run_train.{name} must be an integer >= {minimum}{meaning}, got "
        f"{value!r}", f"run_train.{name}")


def check_loop_arguments(num_estimators, summary_every_n, num_steps,
                         num_seconds, stochastic_resample_frequency,
                         checkpoint_every_n_steps, keep, max_skipped_steps):
  """Raises InvalidArgument for values that would train nothing or crash."""
  _check_int("num_estimators", num_estimators, 1)
  _check_int("summary_every_n", summary_every_n, 1)
  _check_int("num_steps", num_steps, 0, " (0 only saves the start)")
  _check_int("stochastic_resample_frequency", stochastic_resample_frequency,
             0, " (0: never resample)")
  if isinstance(num_seconds, bool) or not isinstance(
      num_seconds, (int, float)) or not 0 <= num_seconds < float("inf"):
    raise errors.InvalidArgument(
        "run_train.num_seconds must be a finite number >= 0 (0: no limit), "
        f"got {num_seconds!r}", "run_train.num_seconds")
  for name, value in (("checkpoint_every_n_steps", checkpoint_every_n_steps),
                      ("keep", keep), ("max_skipped_steps", max_skipped_steps)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise errors.InvalidArgument(
          f"resumable_local_train.{name} must be an integer >= 1, got "
          f"{value!r}", f"resumable_local_train.{name}")


def _reject_overridden_bindings(**received):
  """Raises for a `resumable_local_train.<name>` binding the caller overrides.

  LO's run_train passes these arguments explicitly (its own defaults), and
  an explicit argument beats a gin binding: such a binding would be silently
  ignored. They must be bound on run_train.
  """
  bound = lo_api.get_bindings("resumable_local_train")
  for name, value in received.items():
    if name in bound and bound[name] != value:
      raise errors.InvalidArgument(
          f"resumable_local_train.{name} = {bound[name]!r} is overridden by "
          f"the caller's {name}={value!r} (LO's run_train passes it): bind "
          f"run_train.{name} instead", f"resumable_local_train.{name}")


def _start(train_log_dir, outer_learner, keep, init_key, seed: int,
           num_steps: int, selection: Optional["_Selection"]) -> "_Progress":
  """The restored (or initial, then saved) state, with a line saying which."""
  progress = _Progress(train_log_dir, outer_learner, keep,
                       *_restore_or_init(train_log_dir, outer_learner, init_key))
  progress.selection = selection
  start_step = progress.step
  if selection is not None:
    selection.restore(progress)
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
    if selection is not None and distributed.is_primary():
      # params_best / params_ema may be ahead of the restored checkpoint
      # (a kill between their write and checkpoint_<N>'s): rewrite them.
      selection.save(start_step, keep)
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
    self.selection = None  # a _Selection, saved with every checkpoint

  @property
  def step(self) -> int:
    return int(self.learner_state.theta_opt_state.iteration)

  def save(self):
    theta = lo_api.get_meta_params(self.outer_learner, self.learner_state)
    if not all(bool(jnp.all(jnp.isfinite(x)))
               for x in jax.tree_util.tree_leaves(theta)):
      # Never overwrite good checkpoints with a theta no run can continue.
      raise TrainingError(
          f"theta is not finite at outer step {self.step}; not checkpointed. "
          f"The last checkpoint in {self.train_log_dir} is intact")
    if not distributed.is_primary():
      self.last_saved_step = self.step
      return
    if self.selection is not None:
      self.selection.save(self.step, self.keep)
    try:
      checkpoints.save_checkpoint(
          self.train_log_dir, self.outer_learner,
          gradient_learner.OptCheckpoint(
              self.learner_state,
              elapsed_time=onp.asarray(self.elapsed_time, onp.float64),
              total_inner_steps=int(self.total_inner_steps)), self.keep)
    except OSError as e:
      raise TrainingError(
          f"cannot write checkpoint {self.step} in {self.train_log_dir}: "
          f"{e.strerror or e}. {self.intact()}; free space and rerun the "
          "same command to resume") from e
    self.last_saved_step = self.step

  def intact(self) -> str:
    """Which checkpoint a failed write left intact, as a sentence."""
    steps = checkpoints.checkpoint_steps(self.train_log_dir)
    if not steps:
      return "No checkpoint was written"
    return (f"The last checkpoint, {checkpoints.CHECKPOINT_PREFIX}{steps[-1]},"
            " is intact")


class TrainingError(Exception):
  """Training cannot go on (e.g. no finite sample for many steps in a row).

  `message` is the message alone (gin appends to str(error)).
  """

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


def _log_steps(steps, progress: _Progress, pbar, metrics_log, summary_writer,
               checkpoint_every_n_steps: int, num_seconds: float,
               num_steps: int, max_skipped_steps: int = 10) -> bool:
  """Logs and checkpoints each outer step; True if stopped by num_seconds."""
  worker_ids = collections.deque(maxlen=10)
  step_start = time.time()
  skipped_in_a_row, warned = 0, False
  for out in steps:
    if out.skipped:
      skipped_in_a_row += 1
      if not warned and distributed.is_primary():
        pbar.write(f"warning: outer step {out.step} skipped: no sample of any "
                   "estimator was finite (theta and the outer optimizer kept; "
                   "'skipped' in metrics.jsonl counts such steps)",
                   file=sys.stderr)
        warned = True
    else:
      skipped_in_a_row = 0
    now = time.time()
    delta_time = max(now - step_start, 1e-9)
    step_start = now
    worker_ids.append([0])
    to_write = summaries.step_summary(out, progress.outer_learner, worker_ids,
                             out.with_metrics, delta_time,
                             progress.total_inner_steps, progress.elapsed_time)
    validation_seconds = 0.0
    if progress.selection is not None:
      scalars, validation_seconds = progress.selection.after_step(
          out.step, lo_api.get_meta_params(progress.outer_learner,
                                           out.learner_state),
          progress.elapsed_time + delta_time, out.step >= num_steps, pbar)
      to_write.update(scalars)
      to_write["elapsed_time"] += validation_seconds
      step_start = now + validation_seconds  # not the next step's time
    summaries.write_summaries(summary_writer, metrics_log, to_write, out.step)
    # Commit only once the step is logged: what a checkpoint holds (also on
    # Ctrl-C) always has its metrics.jsonl line.
    progress.learner_state = out.learner_state
    if progress.selection is not None:
      progress.selection.commit()
    progress.elapsed_time += delta_time + validation_seconds
    pbar.set_postfix(meta_loss=f"{out.mean_loss:.4g}", refresh=False)
    pbar.update(progress.step - pbar.n)
    if skipped_in_a_row >= max_skipped_steps:
      raise TrainingError(
          f"{skipped_in_a_row} outer steps in a row (up to step "
          f"{progress.step}) had no finite sample: the inner problems "
          "diverge. The checkpoints hold the last good theta; lower the "
          "learning rates or VariationalEstimator.max_loss, or raise "
          "resumable_local_train.max_skipped_steps")
    if progress.step % checkpoint_every_n_steps == 0:
      # Checkpoint N implies step N's events are on disk (written in this
      # thread, see tensorboard_writer): a kill now loses none of them.
      getattr(summary_writer, "flush", lambda: None)()
      progress.save()
    if num_seconds and progress.elapsed_time > num_seconds:
      return True
  return False


def _print_outputs(train_log_dir: str, step: int, num_steps: int,
                   start_step: int, stop_reason: str,
                   selection: Optional["_Selection"] = None):
  d = os.path.abspath(train_log_dir)
  done = step - start_step
  print(f"Meta-training stopped at outer step {step} of {num_steps} "
        f"({stop_reason}; this run did {done} step{'' if done == 1 else 's'}).\n"
        f"  checkpoints: {d}/{checkpoints.CHECKPOINT_PREFIX}{step} and "
        f"{checkpoints.PARAMS_PREFIX}{step} (rerun the same command to resume)\n"
        f"  summaries:   {d} (tensorboard --logdir {d})\n"
        f"  metrics:     {d}/{checkpoints.METRICS_FILE}\n"
        f"  gin config:  {d}/config.gin",
        flush=True)
  if selection is not None:
    selection.print_summary(d)


VALIDATION_METRIC_PREFIX = "mean||"


class _Selection:
  """The EMA of theta, meta-validation and the best theta during one run.

  Its state is `meta_validation.MetaValidationState` (clock, best entry and
  theta, EMA); every process keeps it (the same in all: the decision to
  validate is process 0's, the scores are deterministic), process 0 writes it.
  """

  def __init__(self, validator, ema, lopt, outer_learner, train_log_dir):
    self.validator = validator
    self.ema = ema
    self.lopt = lopt
    self.outer_learner = outer_learner
    self.train_log_dir = train_log_dir
    self.state = None
    self.pending = None  # after_step's state until the step is committed

  @classmethod
  def create(cls, validator, ema, lopt, outer_learner, train_log_dir
            ) -> Optional["_Selection"]:
    if validator is None and ema is None:
      return None
    if validator is not None and not isinstance(
        validator, meta_validation_lib.MetaValidation):
      raise errors.InvalidArgument(
          f"resumable_local_train.meta_validation={validator!r}; allowed: "
          "None or @MetaValidation()", "resumable_local_train.meta_validation")
    if ema is None:
      ema = theta_averaging.ThetaEMA()
    if not isinstance(ema, theta_averaging.ThetaEMA):
      raise errors.InvalidArgument(
          f"resumable_local_train.theta_ema={ema!r}; allowed: None or "
          "@ThetaEMA()", "resumable_local_train.theta_ema")
    return cls(validator, ema, lopt, outer_learner, train_log_dir)

  def _theta(self, learner_state):
    return jax.device_get(
        lo_api.get_meta_params(self.outer_learner, learner_state))

  def restore(self, progress: "_Progress"):
    """The state saved with the restored checkpoint, else a fresh one."""
    template = meta_validation_lib.MetaValidation.init_state(
        self.ema, self._theta(progress.learner_state))
    restored = None
    if progress.restored_path is not None:
      restored = checkpoints.load_selection(self.train_log_dir, progress.step,
                                            template)
      if restored is None:
        logging.warning(
            "No %s%d beside %s: meta-validation and the theta EMA start "
            "afresh from its theta.", checkpoints.SELECTION_PREFIX,
            progress.step, progress.restored_path)
    self.state = template if restored is None else restored

  def save(self, step: int, keep: int):
    best = self.state.best
    checkpoints.save_selection(
        self.train_log_dir, step, self.state,
        (self.state.best_theta, int(best.step)) if best.found else None,
        self.state.ema.average, keep)

  def after_step(self, step: int, theta, train_and_validation_seconds: float,
                 is_last: bool, pbar) -> Tuple[dict, float]:
    """EMA update; validation if due. ({scalars to log}, seconds spent)."""
    theta = jax.device_get(theta)
    state = self.state.replace(ema=self.ema.update(self.state.ema, theta))
    self.pending = state
    if self.validator is None:
      return {}, 0.0
    clock = state.clock
    train_seconds = max(
        train_and_validation_seconds - float(clock.seconds), 0.0)
    decision = self.validator.decide(clock, step, train_seconds)
    # The last step is validated too if the budget allows (its theta is the
    # run's result); never twice at one step.
    final = (is_last and int(clock.count) > 0 and
             step != int(clock.last_step) and
             decision.projected <= self.validator.max_time_fraction)
    # Timing differs between processes: process 0 decides for all.
    if not distributed.broadcast_int(int(decision.validate or final)):
      return {}, 0.0
    state, result = self.validator.validate(state, self.lopt, step, theta)
    self.pending = state
    scalars = {
        k[len(VALIDATION_METRIC_PREFIX):] if k.startswith(
            VALIDATION_METRIC_PREFIX) else k: v
        for k, v in meta_validation_lib.validation_metrics(
            state, result, train_seconds).items()}
    if distributed.is_primary():
      best = state.best
      line = (f"meta-validation at step {step}: " + ", ".join(
          f"{k} {v:.4g}" for k, v in result.scores.items()) +
              f"; best {float(best.score):.4g} ({best.kind}, step "
              f"{int(best.step)}); {result.seconds:.1f} s, "
              f"{scalars['meta_valid_time_fraction']:.1%} of wall time")
      if pbar is not None:
        pbar.write(line)
      else:
        print(line, flush=True)
    return scalars, result.seconds

  def commit(self):
    """Makes `after_step`'s state current, with the step's learner state."""
    self.state = self.pending

  def print_summary(self, run_dir: str):
    if self.state is None:
      return
    if self.validator is not None:
      best, clock = self.state.best, self.state.clock
      where = (f"{run_dir}/{checkpoints.PARAMS_BEST} (meta_valid "
               f"{float(best.score):.4g}, {best.kind} theta of step "
               f"{int(best.step)})" if best.found else "none yet")
      print(f"  meta-validation: {int(clock.count)} validations, "
            f"{float(clock.seconds):.1f} s; best theta: {where}", flush=True)
    print(f"  theta EMA:   {run_dir}/{checkpoints.PARAMS_EMA} (decay "
          f"{self.ema.decay})", flush=True)
