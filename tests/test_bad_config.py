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
     ["resumable_local_train.keep must be an integer >= 1", "got 0"]),
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
    # Values that once crashed later or trained silently on nothing.
    ("outer learning rate negative",
     ["paper_outer_optimizer.learning_rate = -1e-3"], None,
     ["paper_outer_optimizer.learning_rate=-0.001", "finite number > 0"]),
    ("outer learning rate a string",
     ["paper_outer_optimizer.learning_rate = 'fast'"], None,
     ["paper_outer_optimizer.learning_rate='fast'", "finite number > 0"]),
    ("outer learning rate infinite",
     ["paper_outer_optimizer.learning_rate = 1e999"], None,
     ["paper_outer_optimizer.learning_rate=inf", "finite number > 0"]),
    ("outer meta_loss_split", ["paper_outer_optimizer.learning_rate = None",
                               "paper_outer_optimizer.meta_loss_split = 'x'"],
     None, ["paper_outer_optimizer.meta_loss_split='x'", "'train'"]),
    ("Adam binding replaced", ["Adam.learning_rate = 1e-3"], None,
     ["Adam.learning_rate = 0.001", "paper_outer_optimizer.learning_rate"]),
    ("empty estimator mixture", [
        "build_gradient_estimators.gradient_estimator_fn = @EstimatorMixture()",
        "EstimatorMixture.estimator_fns = []"], None,
     ["EstimatorMixture.estimator_fns must name at least one"]),
    ("truncation schedule 0", ["ConstantTruncationSchedule.total_length = 0"],
     None, ["ConstantTruncationSchedule.total_length", ">= 1", "got 0"]),
    ("truncation schedule negative",
     ["ConstantTruncationSchedule.total_length = -10"], None,
     ["ConstantTruncationSchedule.total_length", ">= 1", "got -10"]),
    ("hidden_size negative", ["MLPLOpt.hidden_size = -1"], None,
     ["MLPLOpt.hidden_size must be an integer >= 1", "got -1"]),
    ("hidden_size fractional", ["MLPLOpt.hidden_size = 2.5"], None,
     ["MLPLOpt.hidden_size must be an integer >= 1", "got 2.5"]),
    ("hidden_layers negative", ["MLPLOpt.hidden_layers = -1"], None,
     ["MLPLOpt.hidden_layers must be an integer >= 0"]),
    ("exp_mult negative", ["MLPLOpt.exp_mult = -1.0"], None,
     ["MLPLOpt.exp_mult must be a finite number > 0"]),
    ("quadratic dim 0", ["FixedDimQuadraticFamily.dim = 0"], None,
     ["FixedDimQuadraticFamily.dim must be an integer >= 1", "got 0"]),
    ("quadratic dim a string", ["FixedDimQuadraticFamily.dim = 'ten'"], None,
     ["FixedDimQuadraticFamily.dim must be an integer >= 1", "'ten'"]),
    ("task family None", ["sample_single_task_family.task_family = None"],
     None, ["TaskFamily", "sample_single_task_family"]),
    ("theta_opt None", ["GradientLearner.theta_opt = None"], None,
     ["configurable GradientLearner"]),
    ("initial offset negative",
     ["VariationalEstimator.random_initial_iteration_offset = -3"], None,
     ["HybridRPES.random_initial_iteration_offset (-3)", ">= 0",
      "VariationalEstimator.random_initial_iteration_offset = -3"]),
    ("max_loss 0", ["VariationalEstimator.max_loss = 0.0"], None,
     ["HybridRPES.max_loss (0.0) must be a number > 0"]),
    ("meta_loss_evals 0", ["VariationalEstimator.meta_loss_evals = 0"], None,
     ["meta_loss_evals (0) must be >= 1",
      "VariationalEstimator.meta_loss_evals = 0"]),
    ("meta_loss_clip_mode", ["VariationalEstimator.meta_loss_clip_mode = 'x'"],
     None, ["'per_batch'", "VariationalEstimator.meta_loss_clip_mode = 'x'"]),
    ("es_variance_pooling", ["VariationalEstimator.es_variance_pooling = 'x'"],
     None, ["HybridRPES.es_variance_pooling ('x')", "'coordinate'"]),
    ("remat_chunk_threshold", ["VariationalEstimator.remat_chunk_threshold = -1"],
     None, ["remat_chunk_threshold (-1) must be >= 0",
            "VariationalEstimator.remat_chunk_threshold = -1"]),
    ("remat_memory_budget_mb", [
        "VariationalEstimator.remat_memory_budget_mb = 0"], None,
     ["remat_memory_budget_mb (0) must be > 0"]),
    ("sigma a string", ["VariationalEstimator.sigma = 'big'"], None,
     ["HybridRPES.sigma must be > 0", "'big'"]),
    ("sigma bound on the subclass", [
        "build_gradient_estimators.gradient_estimator_fn = @HybridRPES",
        "HybridRPES.sigma = 0"], None, ["HybridRPES.sigma must be > 0, got 0"]),
    ("num_tasks a string", ["VariationalEstimator.num_tasks = 'eight'"], None,
     ["HybridRPES.num_tasks ('eight') must be an integer >= 2"]),
    ("steps_per_jit 0", ["VariationalEstimator.steps_per_jit = 0"], None,
     ["HybridRPES.steps_per_jit (0) must be an integer >= 1"]),
    ("unroll_length 0", ["VariationalEstimator.unroll_length = 0"], None,
     ["HybridRPES.unroll_length (0)", "VariationalEstimator.unroll_length = 0"]),
    ("curriculum num_iterations", [
        CURRICULUM, "LinearTruncationCurriculum.num_iterations = 0"], None,
     ["LinearTruncationCurriculum.num_iterations (0) must be an integer >= 1"]),
    # run_train and the training loop.
    ("num_steps negative", ["run_train.num_steps = -5"], None,
     ["run_train.num_steps must be an integer >= 0", "got -5"]),
    ("num_estimators 0", ["run_train.num_estimators = 0"], None,
     ["run_train.num_estimators must be an integer >= 1", "got 0"]),
    ("num_estimators a string", ["run_train.num_estimators = 'two'"], None,
     ["run_train.num_estimators must be an integer >= 1", "'two'"]),
    ("summary_every_n 0", ["run_train.summary_every_n = 0"], None,
     ["run_train.summary_every_n must be an integer >= 1", "got 0"]),
    ("num_seconds negative", ["run_train.num_seconds = -1"], None,
     ["run_train.num_seconds must be a finite number >= 0"]),
    ("resample frequency negative",
     ["run_train.stochastic_resample_frequency = -1"], None,
     ["run_train.stochastic_resample_frequency must be an integer >= 0"]),
    ("checkpoint_every_n_steps 0",
     ["resumable_local_train.checkpoint_every_n_steps = 0"], None,
     ["resumable_local_train.checkpoint_every_n_steps must be an integer >= 1"]),
    ("max_skipped_steps 0", ["resumable_local_train.max_skipped_steps = 0"],
     None, ["resumable_local_train.max_skipped_steps must be an integer >= 1"]),
    ("seed a string", ["resumable_local_train.seed = 'x'"], None,
     ["resumable_local_train.seed must be an integer or None", "'x'"]),
    ("estimators per gradient", [
        "resumable_local_train.run_num_estimators_per_gradient = 5"], None,
     ["resumable_local_train.run_num_estimators_per_gradient (5)",
      "between 1 and num_estimators (1)"]),
    ("--train_log_dir below a file", ["--train_log_dir={run}/sub/run"],
     _a_file, ["not a directory", "is a file"]),
    ("--heartbeat_timeout_s 0", ["--heartbeat_timeout_s=0"], None,
     ["--heartbeat_timeout_s (0) must be >= 1"]),
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
  flags = [f.replace("{run}", str(run_dir)) for f in flags]
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

  captured = capfd.readouterr()
  stderr = captured.err
  assert status == 2, f"{case}: status {status}\n{stderr}"
  _check_one_error_line(stderr, expected, case)
  assert "Starting meta-training" not in captured.out, case
  assert _snapshot(run_dir) == before, f"{case}: run directory changed"
  if before is None:
    assert not run_dir.exists(), f"{case}: run directory left behind"


def test_at_least_50_cases():
  assert len(CASES) >= 50
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


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory nothing can be written in, root included (a read-only mount)."""
  path = tmp_path / "read_only"
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k",
                            "tmpfs", str(path)], capture_output=True).returncode == 0
  if not mounted:
    if os.geteuid() == 0:
      pytest.skip("cannot mount a read-only tmpfs here")
    path.chmod(0o500)
  yield path
  if mounted:
    subprocess.run(["umount", str(path)], check=True)
  else:
    path.chmod(0o700)


def test_unwritable_train_log_dir(read_only_dir, capfd):
  run_dir = read_only_dir / "run"
  status = train.execute(_argv(run_dir, []))
  captured = capfd.readouterr()
  assert status == 2, captured.err
  _check_one_error_line(captured.err, [str(run_dir), "cannot write in",
                                       str(read_only_dir)], "unwritable")
  assert "Starting meta-training" not in captured.out
  assert os.listdir(read_only_dir) == []


@pytest.mark.parametrize("learning_rate", [float("nan"), -1e-3, 0.0, "fast",
                                           True, float("inf")])
def test_outer_learning_rate_rejected(learning_rate):
  # NaN cannot be written in gin; the check itself must still catch it.
  from pathology_fix.optimizers import outer_optimizer  # pylint: disable=g-import-not-at-top
  from pathology_fix_core import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.InvalidArgument) as raised:
    outer_optimizer.paper_outer_optimizer(learning_rate=learning_rate)
  assert raised.value.parameters == ("paper_outer_optimizer.learning_rate",)
