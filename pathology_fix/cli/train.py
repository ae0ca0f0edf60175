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
that can't be restored, and every ValueError or TypeError that a configurable
raises while gin builds the run (a bad value: the line names the gin binding).
--verbose adds the Python traceback. Ctrl-C saves a checkpoint and exits with
status 130. Logging shows warnings only; pass --verbosity=0 for LO's INFO
messages.

Several processes (JAX's multi-controller runtime, `pathology_fix.distributed`):
run the same command in every process, adding

  --coordinator_address HOST:PORT --num_processes P --process_id I

(HOST:PORT is process 0's). Without them the run is one process, unless the
environment is a multi-process SLURM step, Open MPI launch or multi-host Cloud
TPU, which JAX configures itself from. The estimators' samples are split over
all processes' devices; only process 0 writes DIR. A process that dies makes
the others stop with one `error:` line (status 1) as soon as their next
collective fails (a silent peer: after --heartbeat_timeout_s, with JAX's own
message); rerun all of them to resume.
"""

import contextlib
import importlib
import os
import re
import shutil
import sys
import tokenize
import traceback
from typing import List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import gin
import jax

from learned_optimization import outer_train
from learned_optimization import setup_experiment  # defines the flags
from pathology_fix.tasks_and_data import data
from pathology_fix.runtime import distributed
from pathology_fix.lo_boundary import lo_api
from pathology_fix.runtime import checkpoints
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

# What gin raises for a bad config: unknown configurable/parameter/reference
# (ValueError), failing `import` lines (ImportError), syntax errors.
_GIN_PARSE_ERRORS = (ValueError, ImportError, SyntaxError, tokenize.TokenError,
                     OSError)


# What a configurable raises for a bad value (or a dataset that isn't there).
_CONFIG_ERRORS = (ValueError, TypeError, data.DatasetNotFoundError)
# Configurables whose bodies run the training (not build it), and those
# which build what the training loop uses.
_TRAINING_LOOPS = ("run_train", "resumable_local_train")
_BUILDERS = ("build_gradient_estimators",)
# What gin appends to an exception raised inside a configurable, innermost
# first: "In call to configurable 'NAME' (<function f at 0x..>) in scope 'S'".
_GIN_CALL = re.compile(r"In call to configurable '([^']+)' \((.*?)\)"
                       r"(?: in scope '([^']*)')?$")
_LEADING_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class UsageError(Exception):
  """Bad command-line input; reported as one line, exit status 2."""


def _one_line(error: BaseException) -> str:
  """First line of a (gin) error message, plus where gin says it happened."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  where = next((l for l in lines[1:] if l.startswith("In ")), None)
  return f"{lines[0]} ({where[3:]})" if where else lines[0]


def _gin_calls(error: BaseException) -> List[Tuple[str, str, str]]:
  """(configurable, python name, scope) of gin's calls, innermost first."""
  calls = []
  for line in str(error).splitlines():
    match = _GIN_CALL.match(line.strip())
    if match:
      name, obj, scope = match.groups()
      python_name = re.search(r"<(?:function|class) '?([\w.]+)", obj)
      calls.append((name, python_name.group(1).split(".")[-1]
                    if python_name else "", scope or ""))
  return calls


def _message(error: BaseException) -> str:
  """The message without gin's "In call to configurable" lines, on one line."""
  lines = []
  for line in str(error).splitlines():
    if _GIN_CALL.match(line.strip()):
      break
    if line.strip():
      lines.append(line.strip())
  return " ".join(lines) or type(error).__name__


def _raised_in(error: BaseException) -> str:
  """Name of the function whose own code raised `error`."""
  tb = error.__traceback__
  if tb is None:
    return ""
  while tb.tb_next is not None:
    tb = tb.tb_next
  return tb.tb_frame.f_code.co_name


def _is_config_error(error: BaseException) -> bool:
  """A ValueError/TypeError of a configurable rejecting its (gin) arguments.

  Raised while gin evaluates run_train's arguments, by a training loop's own
  argument checks, or while the loop builds its estimators (with their task
  families, data and schedules); not by the training steps that follow.
  """
  if not isinstance(error, _CONFIG_ERRORS):
    return False
  calls = _gin_calls(error)
  if not calls:
    return False
  names = [name for name, _, _ in calls]
  name, python_name, _ = calls[0]
  if name in _TRAINING_LOOPS:
    return _raised_in(error) == python_name
  loops = [i for i, n in enumerate(names) if n in _TRAINING_LOOPS]
  if not loops:
    return False
  if names[loops[0]] == "run_train":
    return True  # evaluating run_train's arguments, before it trains
  return any(n in _BUILDERS for n in names[:loops[0]])


def _binding(key: str) -> Optional[str]:
  """"KEY = value" if gin has KEY bound, else None.

  run_train moves every binding into scope "default_scope": look there too.
  """
  unscoped = key.split("/")[-1]
  for candidate in (key, f"default_scope/{unscoped}"):
    try:
      return f"{unscoped} = {gin.query_parameter(candidate)!r}"
    except (ValueError, KeyError):
      continue
  return None


def _describe_config_error(error: BaseException) -> str:
  """The message, plus the gin bindings of the parameters it names.

  Validators name the parameter first ("HybridRPES.sigma must be > 0, ...",
  "batch_size must be ..."). Each binding is looked up under the names the
  message gives and under every configurable gin was calling; without one,
  the line names the configurable that raised.
  """
  message = _message(error)
  calls = _gin_calls(error)
  leading = _LEADING_NAME.match(message)
  names = [leading.group(0)] if leading else []
  names += [n for n in _LEADING_NAME.findall(message) if "." in n]
  keys = []
  for name in names:
    if "." in name:
      keys.append(name)
    parameter = name.split(".")[-1]
    keys += [f"{scope + '/' if scope else ''}{configurable}.{parameter}"
             for configurable, _, scope in calls]
  bindings = []
  for key in keys:
    binding = _binding(key)
    if (binding and binding not in bindings and
        binding.split(" = ")[0] not in message):
      bindings.append(binding)
  if bindings:
    return f"{message} (gin: {'; '.join(bindings)})"
  if (leading and "." in leading.group(0)) or calls[0][0] in message:
    return message
  return f"{message} (in call to configurable {calls[0][0]})"


def _check_flags(argv):
  """Raises UsageError for problems that need no gin parsing to detect."""
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.train_log_dir:
    raise UsageError("--train_log_dir is required (the directory for "
                     "checkpoints, summaries and metrics)")
  if os.path.exists(FLAGS.train_log_dir) and not os.path.isdir(
      FLAGS.train_log_dir):
    raise UsageError(f"--train_log_dir {FLAGS.train_log_dir}: not a directory")
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
      raise UsageError(f"--gin_import {module}: {_one_line(e)}") from e
  if FLAGS.heartbeat_timeout_s < 1:
    raise UsageError(f"--heartbeat_timeout_s ({FLAGS.heartbeat_timeout_s}) "
                     "must be >= 1")
  try:
    distributed.validate(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  except ValueError as e:
    raise UsageError(str(e)) from e
  _check_resumable(FLAGS.train_log_dir)


def _join_processes():
  """jax.distributed set-up (before any JAX computation); see distributed.py."""
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id,
                           heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
  except (RuntimeError, ValueError) as e:
    raise distributed.DistributedError(
        f"cannot join the {FLAGS.num_processes or 'detected'} processes at "
        f"{FLAGS.coordinator_address or 'the detected coordinator'}: "
        f"{_one_line(e)}") from e


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
  except _GIN_PARSE_ERRORS as e:
    raise UsageError(f"gin config: {_one_line(e)}") from e


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
def _config_gin_from_primary_only():
  """LO's run_train writes config.gin; in a multi-process run only process 0."""
  if distributed.is_primary():
    yield
    return
  file_open = outer_train.filesystem.file_open

  def open_unless_config(path, mode="r", *args, **kwargs):
    if os.path.basename(path) == "config.gin" and "w" in mode:
      return open(os.devnull, mode)  # pylint: disable=unspecified-encoding
    return file_open(path, mode, *args, **kwargs)

  outer_train.filesystem.file_open = open_unless_config
  try:
    yield
  finally:
    outer_train.filesystem.file_open = file_open


def _run_train():
  with lo_api.local_train_replaced_by(local_training.resumable_local_train), \
      _config_gin_from_primary_only():
    try:
      outer_train.run_train(FLAGS.train_log_dir)
    except checkpoints.CheckpointError as e:
      raise UsageError(_message(e)) from e
    except RuntimeError as e:
      # gin raises this before training starts when a parameter is unset.
      if "Required bindings" in str(e):
        raise UsageError(f"gin config: {_one_line(e)}") from e
      raise
    except _CONFIG_ERRORS as e:
      if _is_config_error(e):
        raise UsageError(_describe_config_error(e)) from e
      raise


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
    _parse_gin(make_dir=distributed.is_primary())
    distributed.barrier("pathology_fix_run_directory")
    _train()
  except UsageError as e:
    if run_directory is not None and not run_directory.trained():
      run_directory.restore()
    return _report(e)
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
    print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
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
