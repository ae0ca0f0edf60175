"""Bad configurations of `python -m pathology_fix.train` .

Each case must print exactly one stderr line, `error: ...`, naming the
parameter and its bad value, exit with status 2, and leave the run directory
as it was (same files, same bytes). Most cases run in this process through
`train.execute` (the CLI's in-process entry point: one JAX start-up for all);
`test_in_a_subprocess` repeats a few through the real command line.
"""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

import pathology_fix  # pylint: disable=unused-import  # compat before LO
from pathology_fix.runtime import checkpoints
from pathology_fix.cli import train

import cli_utils

HYBRID = cli_utils.REPO / "gin_configs" / "hybrid_quadratic.gin"
CURRICULUM = "VariationalEstimator.truncation_length = @LinearTruncationCurriculum()"
DIGITS = ("build_gradient_estimators.sample_task_family_fn = "
          "@sample_digits_family",
          "sample_digits_family.architecture = 'mlp2x32'")
GARBAGE = b"\x85\xa3not a checkpoint"


def _file(name, content):
  def make(run_dir):
    run_dir.mkdir(exist_ok=True)
    (run_dir / name).write_bytes(content)
  return make


def _a_file(run_dir):
  run_dir.write_bytes(b"not a directory")


def _earlier_run_without_checkpoints(run_dir):
  run_dir.mkdir()
  (run_dir / "params_0").write_bytes(GARBAGE)
  (run_dir / "params_4").write_bytes(GARBAGE)
  (run_dir / "metrics.jsonl").write_text('{"step": 1, "mean_loss": 1.0}\n')


def _checkpoint_of(*bindings):
  """A readable checkpoint_0 of hybrid_quadratic.gin (with `bindings`)."""
  def make(run_dir):
    from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
    run_dir.mkdir()
    with cli_utils.gin_config(HYBRID, bindings):
      learner = gradient_learner.GradientLearner()
      checkpoints.save_checkpoint(
          str(run_dir), learner, checkpoints.checkpoint_template(learner),
          keep=1)
    (run_dir / "config.gin").write_text("# the earlier run's config\n")
    (run_dir / "metrics.jsonl").write_text("")
  return make


# (id, gin bindings and flags ("-..."; "extra" is a stray positional
# argument), set-up of the run directory or None, substrings of the error).
CASES = [
    # Estimators.
    ("sigma", ["VariationalEstimator.sigma = -1.0"], None,
     ["HybridRPES.sigma must be > 0", "-1.0"]),
    ("num_tasks", ["VariationalEstimator.num_tasks = 0"], None,
     ["HybridRPES.num_tasks (0)", ">= 2"]),
    ("meta_loss_split", ["VariationalEstimator.meta_loss_split = 'bogus'"],
     None, ["meta_loss_split", "'bogus'", "'outer_valid'",
            "VariationalEstimator.meta_loss_split = 'bogus'"]),
    ("steps_per_jit", ["VariationalEstimator.steps_per_jit = 7"], None,
     ["HybridRPES.steps_per_jit (7)", "HybridRPES.unroll_length (20)",
      "VariationalEstimator.steps_per_jit = 7"]),
    ("trunc_length alias", ["HybridRPES.trunc_length = 40"], None,
     ["HybridRPES.unroll_length (20)", "HybridRPES.trunc_length (40)"]),
    ("rp_variance_pooling", ["VariationalEstimator.rp_variance_pooling = 'mean'"],
     None, ["HybridRPES.rp_variance_pooling ('mean') must be one of "
            "['coordinate', 'tensor']"]),
    ("min_finite_samples", ["VariationalEstimator.min_finite_samples = 1"],
     None, ["HybridRPES.min_finite_samples (1) must be an integer >= 2"]),
    ("num_tasks below min_finite_samples",
     ["VariationalEstimator.num_tasks = 4"], None,
     ["HybridRPES.num_tasks (4) must be >= HybridRPES.min_finite_samples (5)"]),
    ("rematerialize", ["VariationalEstimator.rematerialize = 'often'"], None,
     ["rematerialize", "'often'", "VariationalEstimator.rematerialize"]),
    ("truncation_length type", ["VariationalEstimator.truncation_length = 100"],
     None, ["HybridRPES.truncation_length (100)", "TruncationLength"]),
    # Curriculum.
    ("k_min", [CURRICULUM, "LinearTruncationCurriculum.k_min = 0"], None,
     ["LinearTruncationCurriculum.k_min (0) must be >= 1"]),
    ("k_max < k_min", [CURRICULUM, "LinearTruncationCurriculum.k_min = 100",
                       "LinearTruncationCurriculum.k_max = 50"], None,
     ["LinearTruncationCurriculum.k_min (100)",
      "LinearTruncationCurriculum.k_max (50)"]),
    ("jitter", [CURRICULUM, "LinearTruncationCurriculum.jitter = (1.2, 0.8)"],
     None, ["LinearTruncationCurriculum.jitter ((1.2, 0.8))", "0 < low <= high"]),
    ("constant length", [
        "VariationalEstimator.truncation_length = @ConstantTruncationLength()",
        "ConstantTruncationLength.length = 15"], None,
     ["ConstantTruncationLength.length (15)", "steps_per_jit (10)"]),
    # Data.
    ("batch_size", [*DIGITS, "sample_digits_family.batch_size = 0"], None,
     ["digits_datasets.batch_size", "got 0",
      "sample_digits_family.batch_size = 0"]),
    ("normalization", [*DIGITS, "sample_digits_family.normalization = 'z'"],
     None, ["digits_datasets.normalization", "'standard'", "got 'z'"]),
    ("missing dataset", [
        "build_gradient_estimators.sample_task_family_fn = "
        "@sample_fashion_mnist_family",
        "data.fashion_mnist_datasets.data_dir = '/nonexistent/fmnist'"], None,
     ["/nonexistent/fmnist/", "data_dir"]),
    # Tasks.
    ("num_classes_per_task", [
        *DIGITS, "sample_digits_family.num_classes_per_task = 1"], None,
     ["DigitsClassSubsetFamily.num_classes_per_task", "got 1",
      "sample_digits_family.num_classes_per_task = 1"]),
    ("architecture", [*DIGITS, "sample_digits_family.architecture = 'vgg'"],
     None, ["DigitsClassSubsetFamily.architecture", "'vgg'", "'conv3'"]),
    # The training loop and the CLI's flags.
    ("keep", ["resumable_local_train.keep = 0"], None,
     ["keep must be >= 1", "resumable_local_train.keep = 0"]),
    # LO's run_train passes num_seconds itself: the binding would be ignored.
    ("binding run_train overrides", ["resumable_local_train.num_seconds = 5"],
     None, ["resumable_local_train.num_seconds = 5", "run_train.num_seconds"]),
    ("n not a multiple of the subsets", [
        "build_gradient_estimators.sample_task_family_fn = "
        "@sample_every_subset_family",
        "sample_every_subset_family.architecture = 'mlp2x32'"], None,
     ["HybridRPES.num_tasks (8)", "multiple", "10 class subsets"]),
    ("unknown parameter", ["Adam.no_such_parameter = 1"], None,
     ["no_such_parameter"]),
    ("unknown configurable", ["NoSuchConfigurable.x = 1"], None,
     ["NoSuchConfigurable"]),
    ("missing --train_log_dir", ["--train_log_dir="], None,
     ["--train_log_dir is required"]),
    ("--train_log_dir is a file", [], _a_file,
     ["not a directory"]),
    ("nonexistent --config_file", ["--config_file=/nonexistent/x.gin"], None,
     ["/nonexistent/x.gin"]),
    ("unimportable --gin_import", ["--gin_import=no_such_mod"], None,
     ["no_such_mod"]),
    ("unknown flag", ["--no_such_flag=1"], None, ["no_such_flag"]),
    ("positional argument", ["extra"], None, ["unexpected arguments: extra"]),
    # Checkpoints.
    ("corrupt checkpoint", [], _file("checkpoint_3", GARBAGE),
     ["checkpoint_3", "can be restored"]),
    ("missing checkpoint", [], _earlier_run_without_checkpoints,
     ["params_4", "metrics.jsonl", "no checkpoint_<N>"]),
    ("checkpoint of another config", [],
     _checkpoint_of("MLPLOpt.hidden_size = 8"),
     ["checkpoint_0", "Did the config change?"]),
    ("bad value on resume", ["VariationalEstimator.sigma = 0.0"],
     _checkpoint_of(), ["HybridRPES.sigma must be > 0"]),
]


def _argv(run_dir, args):
  """Program name, --train_log_dir and --config_file unless args set them."""
  flags = [a for a in args if a.startswith("-") or a == "extra"]
  bindings = [f"--gin_bindings={a}" for a in args if a not in flags]
  argv = ["pathology_fix.train"]
  if not any(a.startswith("--train_log_dir") for a in flags):
    argv.append(f"--train_log_dir={run_dir}")
  if not any(a.startswith("--config_file") for a in flags):
    argv.append(f"--config_file={HYBRID}")
  return argv + bindings + flags


def _snapshot(path: pathlib.Path):
  """{relative path: sha256 of its bytes, or "dir"}; None if path is absent."""
  if not path.exists():
    return None
  if path.is_file():
    return hashlib.sha256(path.read_bytes()).hexdigest()
  entries = {}
  for root, dirs, files in os.walk(path):
    for name in dirs:
      entries[os.path.relpath(os.path.join(root, name), path)] = "dir"
    for name in files:
      full = pathlib.Path(root, name)
      entries[os.path.relpath(full, path)] = hashlib.sha256(
          full.read_bytes()).hexdigest()
  return entries


def _check_one_error_line(stderr, expected, case):
  lines = stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), (
      f"{case}: stderr is not one error line:\n{stderr}")
  for text in expected:
    assert text in lines[0], f"{case}: {text!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case, args, make_run_dir, expected", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_and_leaves_the_run_directory(
    tmp_path, capfd, case, args, make_run_dir, expected):
  run_dir = tmp_path / "run"
  if make_run_dir is not None:
    make_run_dir(run_dir)
  before = _snapshot(run_dir)
  capfd.readouterr()

  status = train.execute(_argv(run_dir, args))

  stderr = capfd.readouterr().err
  assert status == 2, f"{case}: status {status}\n{stderr}"
  _check_one_error_line(stderr, expected, case)
  assert _snapshot(run_dir) == before, f"{case}: run directory changed"


def test_at_least_15_cases_in_every_category():
  assert len(CASES) >= 15
  assert len({c[0] for c in CASES}) == len(CASES)


def test_verbose_adds_the_traceback(tmp_path, capfd):
  status = train.execute(
      _argv(tmp_path / "run", ["VariationalEstimator.sigma = -1.0",
                               "--verbose"]))
  stderr = capfd.readouterr().err
  assert status == 2
  assert "Traceback (most recent call last)" in stderr
  assert "validate_sigma" in stderr  # where it was raised
  assert stderr.splitlines()[-1].startswith("error: HybridRPES.sigma")
  assert not (tmp_path / "run").exists()


def test_a_good_config_still_runs_after_bad_ones(tmp_path, capfd):
  # The same process, after the failures above: nothing is left behind that
  # breaks the next run (gin's lock, flags, the swapped-in local_train).
  # num_steps = 0 saves the starting point and stops before any compilation.
  status = train.execute(_argv(tmp_path / "run", ["run_train.num_steps = 0"]))
  assert status == 0, capfd.readouterr().err
  assert checkpoints.checkpoint_steps(str(tmp_path / "run")) == [0]
  assert (tmp_path / "run" / "config.gin").is_file()


@pytest.mark.parametrize("case", ["sigma", "corrupt checkpoint",
                                  "unknown flag"])
def test_in_a_subprocess(tmp_path, case):
  _, args, make_run_dir, expected = next(c for c in CASES if c[0] == case)
  run_dir = tmp_path / "run"
  if make_run_dir is not None:
    make_run_dir(run_dir)
  before = _snapshot(run_dir)
  cmd = [sys.executable, "-m"] + _argv(run_dir, args)
  proc = subprocess.run(
      cmd, cwd=cli_utils.REPO, env=cli_utils.subprocess_env(),
      capture_output=True, text=True, timeout=cli_utils.TIMEOUT_S)
  assert proc.returncode == 2, cli_utils.describe(proc)
  _check_one_error_line(proc.stderr, expected, case)
  assert _snapshot(run_dir) == before
