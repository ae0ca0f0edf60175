"""Running `python -m pathology_fix.train` from tests, and reading what it wrote."""

import atexit
import contextlib
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import gin

REPO = pathlib.Path(__file__).resolve().parents[1]
LO_PES_CONFIG = REPO / "gin_configs" / "lo_truncated_pes_quadratic.gin"
# Generous: a cold start compiles for ~20 s on 2 cores; this only stops hangs.
TIMEOUT_S = 600


def train_command(train_log_dir, *bindings, config_file=LO_PES_CONFIG,
                  extra_flags=()):
  cmd = [sys.executable, "-m", "pathology_fix.train"]
  if train_log_dir is not None:
    cmd.append(f"--train_log_dir={train_log_dir}")
  if config_file is not None:
    cmd.append(f"--config_file={config_file}")
  cmd += [f"--gin_bindings={b}" for b in bindings]
  cmd += list(extra_flags)
  return cmd


@functools.lru_cache(maxsize=None)
def _jax_cache_dir():
  path = tempfile.mkdtemp(prefix="pathology_fix_test_jax_cache_")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def subprocess_env():
  # Compilation dominates these short runs; later runs of the same config in
  # this pytest session reuse the XLA executables of the first one.
  return {
      **os.environ,
      "JAX_COMPILATION_CACHE_DIR": _jax_cache_dir(),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


def run_train(train_log_dir, *bindings, **kwargs):
  """Runs the CLI to completion; returns the CompletedProcess (text output)."""
  return subprocess.run(
      train_command(train_log_dir, *bindings, **kwargs),
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=TIMEOUT_S)


def start_train(train_log_dir, *bindings, stdout, stderr, **kwargs):
  """Starts the CLI in the background; returns the Popen."""
  return subprocess.Popen(
      train_command(train_log_dir, *bindings, **kwargs),
      cwd=REPO, env=subprocess_env(), stdout=stdout, stderr=stderr, text=True)


def describe(proc) -> str:
  """Exit status and output tails, for assertion messages."""
  return (f"exit status {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
          f"\n--- stderr ---\n{proc.stderr[-3000:]}")


def error_lines(stderr: str):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def read_metrics(train_log_dir):
  with open(os.path.join(train_log_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def event_files(train_log_dir):
  return sorted(
      p for p in os.listdir(train_log_dir) if p.startswith("events.out.tfevents"))


def read_scalars(log_dir):
  """{tag: [(step, value)]} from the event files in log_dir, without TensorFlow."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {
      tag: [(e.step, e.value) for e in acc.Scalars(tag)]
      for tag in acc.Tags()["scalars"]
  }


@contextlib.contextmanager
def gin_config(config_file=LO_PES_CONFIG, bindings=()):
  """The config's gin bindings, in this process, for building templates."""
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(config_file)], list(bindings))
    yield
  finally:
    gin.clear_config()


def checkpoint_template(config_file=LO_PES_CONFIG):
  """An OptCheckpoint template for LO's checkpoints.load_state."""
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  with gin_config(config_file):
    outer_learner = gradient_learner.GradientLearner()
    return checkpoints.checkpoint_template(outer_learner)


def load_state(path, template):
  """Reads a checkpoint with LO's own reader (proves the format is LO's)."""
  from learned_optimization import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.load_state(str(path), template)


def params_template(config_file=LO_PES_CONFIG):
  """A ParameterCheckpoint template for LO's checkpoints.load_state."""
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  template = checkpoint_template(config_file)
  theta = template.gradient_learner_state.theta_opt_state.params
  return gradient_learner.ParameterCheckpoint(theta, "", 0)
