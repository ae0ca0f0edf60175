r"""Single-machine meta-training with learned_optimization's `run_train`.

  python -m pathology_fix.train --train_log_dir DIR --config_file FILE.gin \
      [--gin_bindings 'run_train.num_steps = 100'] [--gin_import MODULE]

The flags are LO's own (`learned_optimization.setup_experiment`). Training
runs LO's `outer_train.run_train` with a resumable loop in place of LO 0.0.1's
`local_train` (see `pathology_fix.local_training`): rerunning the same command
with the same DIR continues from the last checkpoint. DIR receives
checkpoint_<N>/params_<N>, TensorBoard event files, metrics.jsonl and
config.gin.

Bad input (missing --train_log_dir, missing config file, unknown gin
configurable or parameter, module that can't be imported) prints one line
`error: ...` on stderr and exits with status 2. Ctrl-C saves a checkpoint and
exits with status 130. Logging shows warnings only; pass --verbosity=0 for
LO's INFO messages.
"""

import importlib
import os
import sys
import tokenize

from absl import app
from absl import flags
from absl import logging
import gin

import pathology_fix  # pylint: disable=unused-import  # compat before LO
from learned_optimization import outer_train  # pylint: disable=g-bad-import-order
from learned_optimization import setup_experiment  # pylint: disable=g-bad-import-order  # defines the flags
from pathology_fix import lo_api
from pathology_fix import local_training

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(setup_experiment)  # list them in --help

USAGE_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130

# What gin raises for a bad config: unknown configurable/parameter/reference
# (ValueError), failing `import` lines (ImportError), syntax errors.
_GIN_PARSE_ERRORS = (ValueError, ImportError, SyntaxError, tokenize.TokenError,
                     OSError)


class UsageError(Exception):
  """Bad command-line input; reported as one line, exit status 2."""


def _one_line(error: BaseException) -> str:
  """First line of a (gin) error message, plus where gin says it happened."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  where = next((l for l in lines[1:] if l.startswith("In ")), None)
  return f"{lines[0]} ({where[3:]})" if where else lines[0]


def _check_flags(argv):
  """Raises UsageError for problems that need no gin parsing to detect."""
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.train_log_dir:
    raise UsageError("--train_log_dir is required (the directory for "
                     "checkpoints, summaries and metrics)")
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


def _parse_gin():
  """LO's flag/gin set-up, but failing on unknown configurables and params."""
  # `include 'other.gin'` resolves beside the including file.
  for path in FLAGS.config_file or []:
    gin.add_config_file_search_path(os.path.dirname(os.path.abspath(path)))
  try:
    # Config files are translated as gin reads them (lo_api.install).
    FLAGS.gin_bindings = lo_api.translate_bindings(FLAGS.gin_bindings or [])
    setup_experiment.setup_experiment(
        gin_finalize=True, gin_skip_unknown=False, make_dir=True)
  except _GIN_PARSE_ERRORS as e:
    raise UsageError(f"gin config: {_one_line(e)}") from e


def _train():
  with local_training.installed():
    try:
      outer_train.run_train(FLAGS.train_log_dir)
    except local_training.CheckpointError as e:
      raise UsageError(str(e)) from e
    except RuntimeError as e:
      # gin raises this before training starts when a parameter is unset.
      if "Required bindings" in str(e):
        raise UsageError(f"gin config: {_one_line(e)}") from e
      raise


def main(argv):
  if not FLAGS["verbosity"].present:
    # Warnings only unless asked: app.run's INFO default (gin config dump,
    # each checkpoint) would bury the progress bar.
    logging.set_verbosity(logging.WARNING)
  try:
    _check_flags(argv)
    _parse_gin()
    _train()
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return USAGE_EXIT_CODE
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


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
