r"""Single-machine meta-training with learned_optimization's `run_train`.

  python -m pathology_fix.train --train_log_dir DIR --config_file FILE.gin \
      [--gin_bindings 'run_train.num_steps = 100'] [--gin_import MODULE]

The flags are LO's own (`learned_optimization.setup_experiment`). Training
runs LO's `outer_train.run_train` with a resumable loop in place of LO 0.0.1's
`local_train` (`pathology_fix.runtime.local_training`): rerunning the same command
with the same DIR continues from the last checkpoint. DIR receives
checkpoint_<N>/params_<N>, TensorBoard event files, metrics.jsonl and
config.gin.

Bad input prints one line `error: ...` on stderr and exits with status 2,
leaving DIR as it was: missing --train_log_dir, missing config file, unknown
gin configurable or parameter, module that can't be imported, a checkpoint
that can't be restored, a call gin refuses, and every value a configurable
rejects (the line names the gin binding; see `config_errors`).
--verbose adds the Python traceback. Ctrl-C saves a checkpoint and exits with
status 130. Logging shows warnings only; pass --verbosity=0 for LO's INFO
messages.

Several processes (JAX's multi-controller runtime, `runtime/distributed.py`):
run the same command in every process, adding

  --coordinator_address HOST:PORT --num_processes P --process_id I

(HOST:PORT is process 0's). Without them the run is one process, unless the
environment is a multi-process SLURM step, Open MPI launch or multi-host Cloud
TPU, which JAX configures itself from. The estimators' samples are split over
all processes' devices; only process 0 writes DIR. A process that dies makes
the others stop with one `error:` line (status 1) as soon as their next
collective fails; a silent one (stopped, hung) after --heartbeat_timeout_s
(`distributed.watch_peers`). Rerun all of them to resume.
"""

import contextlib
import functools
import importlib
import io
import os
import re
import shutil
import sys
import tempfile
import traceback
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax
from learned_optimization import outer_train
from learned_optimization import setup_experiment  # defines the flags

from pathology_fix.cli import config_errors
from pathology_fix.cli import lo_checks
from pathology_fix.lo_boundary import lo_api
from pathology_fix.runtime import checkpoints
from pathology_fix.runtime import distributed
from pathology_fix.runtime import local_training

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(setup_experiment)  # list them in --help
flags.DEFINE_boolean(
    "verbose", False,
    "On bad input or config, print the Python traceback before the one-line "
    "error.")

flags.DEFINE_string(
    "coordinator_address", None,
    "Several processes: HOST:PORT of process 0's coordinator (jax.distributed).")
flags.DEFINE_integer("num_processes", None,
                     "Several processes: how many take part.")
flags.DEFINE_integer("process_id", None,
                     "Several processes: this one's index, 0..num_processes-1.")
flags.DEFINE_integer(
    "heartbeat_timeout_s", distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
    "Several processes: a process silent this long counts as dead and the "
    "others stop.")

USAGE_EXIT_CODE = 2
FAILED_EXIT_CODE = 1
INTERRUPTED_EXIT_CODE = 130

class UsageError(Exception):
  """Bad command-line input; reported as one line, exit status 2."""


def _check_flags(argv):
  """Raises UsageError for problems that need no gin parsing to detect."""
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.train_log_dir:
    raise UsageError("--train_log_dir is required (the directory for "
                     "checkpoints, summaries and metrics)")
  _check_writable(FLAGS.train_log_dir)
  if not FLAGS.config_file and not FLAGS.gin_bindings:
    raise UsageError("--config_file is required (a gin file configuring "
                     "run_train, e.g. gin_configs/lo_truncated_pes_quadratic.gin)")
  for path in FLAGS.config_file or []:
    if not os.path.isfile(path):
      raise UsageError(f"--config_file {path}: no such file")
  for module in FLAGS.gin_import or []:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise UsageError(f"--gin_import {module}: {config_errors.one_line(e)}") from e
  if FLAGS.heartbeat_timeout_s < 1:
    raise UsageError(f"--heartbeat_timeout_s ({FLAGS.heartbeat_timeout_s}) "
                     "must be >= 1")
  try:
    distributed.validate(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  except ValueError as e:
    raise UsageError(str(e)) from e
  _check_resumable(FLAGS.train_log_dir)


def _check_writable(train_log_dir: str):
  """The directory, or its nearest existing parent, takes new files."""
  existing = os.path.abspath(train_log_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = ("" if existing == os.path.abspath(train_log_dir) else
            f" ({existing} is a file)")
    raise UsageError(f"--train_log_dir {train_log_dir}: not a directory{what}; "
                     "pass a directory, existing or not")
  # A file actually written: permission bits say nothing for root or a
  # read-only mount.
  try:
    fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=existing)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UsageError(f"--train_log_dir {train_log_dir}: cannot write in "
                     f"{existing} ({e.strerror}); pass a writable "
                     "directory") from e


def _stop_for_silent_peer(message: str):
  """From the watchdog thread: the main thread may be stuck in a collective."""
  sys.stdout.flush()
  # A leading newline ends the progress bar's line, which the stuck main
  # thread cannot close.
  print(f"\nerror: {message}. The checkpoints in {FLAGS.train_log_dir} are "
        "complete: stop every process and rerun them to resume",
        file=sys.stderr, flush=True)
  os._exit(FAILED_EXIT_CODE)  # pylint: disable=protected-access


def _join_processes():
  """jax.distributed set-up (before any JAX computation); see distributed.py."""
  try:
    if distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                              FLAGS.process_id,
                              heartbeat_timeout_s=FLAGS.heartbeat_timeout_s):
      distributed.watch_peers(FLAGS.heartbeat_timeout_s, _stop_for_silent_peer)
  except (RuntimeError, ValueError) as e:
    raise distributed.DistributedError(
        f"cannot join the {FLAGS.num_processes or 'detected'} processes at "
        f"{FLAGS.coordinator_address or 'the detected coordinator'}: "
        f"{config_errors.one_line(e)}") from e


def _check_resumable(train_log_dir: str):
  """An earlier run's outputs without a checkpoint: training would restart."""
  if checkpoints.checkpoint_steps(train_log_dir):
    return
  earlier = [f"{checkpoints.PARAMS_PREFIX}{n}" for n in
             checkpoints.checkpoint_steps(train_log_dir,
                                             checkpoints.PARAMS_PREFIX)
             if n > 0]
  metrics = os.path.join(train_log_dir, checkpoints.METRICS_FILE)
  if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
    earlier.append(checkpoints.METRICS_FILE)
  if earlier:
    raise UsageError(
        f"--train_log_dir {train_log_dir} holds an earlier run "
        f"({', '.join(earlier)}) but no {checkpoints.CHECKPOINT_PREFIX}<N> "
        "to resume from: restore its checkpoints, or use a new --train_log_dir")


class _RunDirectory:
  """What train_log_dir held before this run, to undo one that failed to start.

  Files this run created go; config.gin gets its old contents back; a
  directory this run created (parents included) goes entirely.
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self.created_root = None
    parent = self.path
    while not os.path.exists(parent):
      self.created_root, parent = parent, os.path.dirname(parent)
    self.names = set() if self.created_root else set(os.listdir(self.path))
    self.steps = set(checkpoints.checkpoint_steps(self.path))
    self.config = self._read("config.gin")

  def _read(self, name: str) -> Optional[bytes]:
    try:
      with open(os.path.join(self.path, name), "rb") as f:
        return f.read()
    except OSError:
      return None

  def trained(self) -> bool:
    """Whether this run saved a checkpoint after an outer step."""
    new = set(checkpoints.checkpoint_steps(self.path)) - self.steps
    return any(step > 0 for step in new)

  def _new_names(self):
    try:
      return set(os.listdir(self.path)) - self.names
    except FileNotFoundError:
      return set()

  def restore(self):
    if not distributed.is_primary():
      return  # process 0 owns the directory
    if self.created_root:
      shutil.rmtree(self.created_root, ignore_errors=True)
      return
    for name in self._new_names():
      path = os.path.join(self.path, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
    if self.config is not None and self._read("config.gin") != self.config:
      checkpoints.write_atomically(
          os.path.join(self.path, "config.gin"), self.config)


def _parse_gin(make_dir: bool = True):
  """LO's flag/gin set-up, but failing on unknown configurables and params."""
  # `include 'other.gin'` resolves beside the including file.
  for path in FLAGS.config_file or []:
    gin.add_config_file_search_path(os.path.dirname(os.path.abspath(path)))
  try:
    # Config files are translated as gin reads them (lo_api.install).
    FLAGS.gin_bindings = lo_api.translate_bindings(FLAGS.gin_bindings or [])
    setup_experiment.setup_experiment(
        gin_finalize=True, gin_skip_unknown=False, make_dir=make_dir)
  except config_errors.PARSE_ERRORS as e:
    raise UsageError(f"gin config: {config_errors.one_line(e)}") from e


# How a collective with a dead peer fails (gloo / NCCL see the connection
# close; the coordination service's heartbeat catches silent ones).
_PEER_FAILURE = re.compile(
    r"Gloo|NCCL|Connection (closed|reset)|heartbeat|coordination service|"
    r"UNAVAILABLE|DEADLINE_EXCEEDED", re.IGNORECASE)


def _train():
  try:
    _run_train()
  except UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1 and _PEER_FAILURE.search(str(e)):
      raise distributed.DistributedError(
          f"process {jax.process_index()} of {jax.process_count()} stopped: "
          f"another process is gone ({str(e).strip().splitlines()[0]}). "
          f"The checkpoints in "
          f"{FLAGS.train_log_dir} are complete: rerun every process to "
          "resume") from e
    raise


@contextlib.contextmanager
def _config_gin_deferred():
  """Holds LO run_train's config.gin until the config is validated.

  run_train writes config.gin before it calls local_train; written then, a
  config rejected later would leave a run directory behind. Only process 0
  writes it in a multi-process run.
  """
  file_open = outer_train.filesystem.file_open
  held = {}

  def open_config_into_memory(path, mode="r", *args, **kwargs):
    if os.path.basename(path) == "config.gin" and "w" in mode:
      held[path] = io.StringIO()
      held[path].close = lambda: None  # read after run_train's `with`
      return held[path]
    return file_open(path, mode, *args, **kwargs)

  def write_held():
    if not distributed.is_primary():
      return
    for path, text in held.items():
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      checkpoints.write_atomically(path, text.getvalue().encode())

  outer_train.filesystem.file_open = open_config_into_memory
  try:
    yield write_held
  finally:
    outer_train.filesystem.file_open = file_open


def _run_train():
  validated = []

  def on_validated():
    validated.append(True)
    write_config_gin()

  with _config_gin_deferred() as write_config_gin, \
      lo_api.local_train_replaced_by(functools.partial(
          local_training.resumable_local_train, on_validated=on_validated)):
    try:
      lo_checks.check_bindings()
      outer_train.run_train(FLAGS.train_log_dir)
    except checkpoints.CheckpointError as e:
      raise UsageError(e.message) from e
    except OSError as e:
      if not os.path.exists(FLAGS.train_log_dir):
        raise UsageError(f"--train_log_dir {FLAGS.train_log_dir}: "
                         f"{config_errors.one_line(e)}") from e
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not config_errors.is_config_error(e):
        built_badly = (None if validated else
                       config_errors.construction_error(e))
        if built_badly is None:
          raise
        raise UsageError(built_badly) from e
      if config_errors.raised_by_gin(e):
        raise UsageError(f"gin config: {config_errors.one_line(e)}") from e
      raise UsageError(config_errors.describe(e)) from e


def _report(error: UsageError) -> int:
  if FLAGS.is_parsed() and FLAGS.verbose and error.__cause__ is not None:
    traceback.print_exception(error.__cause__, file=sys.stderr)
  sys.stdout.flush()
  print(f"error: {error}", file=sys.stderr, flush=True)
  return USAGE_EXIT_CODE


def main(argv):
  if not FLAGS["verbosity"].present:
    # Warnings only unless asked: app.run's INFO default (gin config dump,
    # each checkpoint) would bury the progress bar.
    logging.set_verbosity(logging.WARNING)
  run_directory = None
  try:
    _check_flags(argv)
    _join_processes()
    run_directory = _RunDirectory(FLAGS.train_log_dir)
    # Every process parses (and rejects a bad config by itself); process 0
    # makes the directory (and alone writes config.gin into it).
    # The directory is made once the config is validated (_run_train).
    _parse_gin(make_dir=False)
    distributed.barrier("pathology_fix_run_directory")
    _train()
  except UsageError as e:
    if run_directory is not None and not run_directory.trained():
      run_directory.restore()
    return _report(e)
  except local_training.TrainingError as e:
    sys.stdout.flush()
    print(f"error: {e.message}", file=sys.stderr, flush=True)
    return FAILED_EXIT_CODE
  except distributed.DistributedError as e:
    sys.stdout.flush()
    print(f"error: {e}", file=sys.stderr, flush=True)
    # Collectives with a dead peer can block interpreter shutdown: don't wait.
    os._exit(FAILED_EXIT_CODE)  # pylint: disable=protected-access
  except KeyboardInterrupt:
    print(f"error: interrupted; the last state is checkpointed in "
          f"{FLAGS.train_log_dir}: rerun the same command to resume",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # All is saved and closed by now. A Ctrl-C that landed inside a library
    # (tensorboardX's queue, XLA) once hung interpreter shutdown: don't wait.
    os._exit(INTERRUPTED_EXIT_CODE)  # pylint: disable=protected-access
  return 0


def _parse_flags(argv):
  """absl's flag parsing, with a one-line error instead of absl's two."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {config_errors.one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


def execute(argv: Sequence[str]) -> int:
  """`python -m pathology_fix.train ARGS` in this process; returns the status.

  argv[0] is the program name. absl's flags and the gin config are reset
  first; afterwards the gin config is cleared and the flags go back to their
  defaults, parsed if they had been parsed before. absl's app set-up (logging handlers, signal
  handling) is skipped. For tests and for embedding the CLI in a program.
  """
  flags_were_parsed = FLAGS.is_parsed()
  FLAGS.unparse_flags()
  gin.clear_config()
  try:
    try:
      remaining = _parse_flags(list(argv))
    except SystemExit as e:
      return int(e.code)
    return main(remaining)
  finally:
    gin.clear_config()
    # Back to defaults, parsed or not as before (a failed parse leaves absl's
    # flags unparsed, and LO reads flags such as profile_log_times).
    FLAGS.unparse_flags()
    if flags_were_parsed:
      FLAGS.mark_as_parsed()


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
