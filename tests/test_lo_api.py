"""One plugin for learned_optimization PyPI 0.0.1 and GitHub main (lo_api).

Runs on whichever LO the venv holds (CI runs it on both, see .ci/run); tests
that need one API's feature skip themselves on the other.
"""

import concurrent.futures
import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import pathology_fix  # pylint: disable=unused-import  # compat before LO
from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-bad-import-order
from learned_optimization.outer_trainers import gradient_learner
from learned_optimization.outer_trainers import truncated_pes
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import quadratics
from pathology_fix.meta_gradient import estimators
from pathology_fix.lo_boundary import lo_api
from pathology_fix.runtime import local_training
from pathology_fix.meta_gradient import mixing

import cli_utils

main_only = pytest.mark.skipif(not lo_api.IS_MAIN,
                               reason="needs learned_optimization GitHub main")

# ------------------------------------------------------------ gin translation


@pytest.mark.parametrize("line, expected", [
    ("run_train.outer_learner = @GradientLearner()",
     "run_train.outer_learner_fn = @GradientLearner"),
    ("GradientLearner.lopt = @singleton()",
     "GradientLearner.meta_init = @singleton()"),
    ("TruncatedPES.num_tasks = 4", "VectorizedLOptTruncatedStep.num_tasks = 4"),
    ("TruncatedPES.trunc_sched = @ConstantTruncationSchedule()",
     "VectorizedLOptTruncatedStep.trunc_sched = @ConstantTruncationSchedule()"),
    ("TruncatedPES.train_and_meta = True",
     'VectorizedLOptTruncatedStep.meta_loss_split = "outer_valid"'),
    # Unchanged: same name on both, or not ours to rename.
    ("TruncatedPES.trunc_length = 10", "TruncatedPES.trunc_length = 10"),
    ("VariationalEstimator.num_tasks = 8", "VariationalEstimator.num_tasks = 8"),
    ("run_train.lopt = @lopt/singleton()", "run_train.lopt = @lopt/singleton()"),
])
def test_translate_line_renames_what_main_renamed(line, expected):
  assert lo_api.translate_line(line) == expected


def test_translated_configs_build_on_main_and_leave_references_alone():
  text = ("build_gradient_estimators.gradient_estimator_fn = @HybridRPES\n"
          "# run_train.outer_learner = @GradientLearner()\n")
  out = lo_api.translate_config(text).splitlines()
  assert out == [
      "build_gradient_estimators.gradient_estimator_fn = @HybridRPES",
      "build_gradient_estimators.truncated_step_fn = @LazyLOptTruncatedStep",
      "# run_train.outer_learner = @GradientLearner()",
  ]
  own_step_fn = text + "build_gradient_estimators.truncated_step_fn = @Foo\n"
  assert "LazyLOptTruncatedStep" not in lo_api.translate_config(own_step_fn)


def test_scoped_binding_is_one_clear_error():
  with pytest.raises(lo_api.ConfigError, match=r"x\.gin:2: scoped binding "
                     r"'lopt/singleton.constructor = @MLPLOpt'.*lost"):
    lo_api.translate_config(
        "run_train.lopt = @lopt/singleton()\n"
        "lopt/singleton.constructor = @MLPLOpt\n", "x.gin")


@main_only
def test_cli_fails_with_one_line_on_a_scoped_config(tmp_path):
  config = tmp_path / "scoped.gin"
  config.write_text(
      cli_utils.LO_PES_CONFIG.read_text().replace(
          "run_train.lopt = @singleton()", "run_train.lopt = @lopt/singleton()")
      .replace("singleton.constructor", "lopt/singleton.constructor"))
  proc = cli_utils.run_train(tmp_path / "run", config_file=config)
  assert proc.returncode == 2, cli_utils.describe(proc)
  (line,) = cli_utils.error_lines(proc.stderr)
  assert "scoped binding" in line and "lopt/singleton.constructor" in line


# ------------------------------------------------------ estimator building


def _family_and_lopt():
  return quadratics.FixedDimQuadraticFamily(4), mlp_lopt.MLPLOpt(
      hidden_size=4, hidden_layers=1)


def _gradient(estimator, lopt):
  theta = lopt.init(jax.random.PRNGKey(0))
  weights = gradient_learner.WorkerWeights(
      theta=theta, theta_model_state=None,
      outer_state=gradient_learner.OuterState(np.asarray(0)))
  state = estimator.init_worker_state(weights, jax.random.PRNGKey(1))
  out, _ = estimator.compute_gradient_estimate(
      weights, jax.random.PRNGKey(2), state, with_summary=False)
  return out.grad


@main_only
def test_truncated_step_construction_matches_task_family_construction():
  """main's fn(truncated_step) builds the same estimator as fn(family, lopt)."""
  from learned_optimization.outer_trainers import lopt_truncated_step  # pylint: disable=g-import-not-at-top
  family, lopt = _family_and_lopt()
  sched = truncation_schedule.ConstantTruncationSchedule(40)
  step = lopt_truncated_step.VectorizedLOptTruncatedStep(
      family, lopt, sched, num_tasks=5)
  from_step = estimators.HybridRPES(step, unroll_length=10)
  direct = estimators.HybridRPES(family, lopt, sched, 5, unroll_length=10)
  assert from_step.num_samples == 5 and from_step.trunc_sched is sched
  assert from_step.task_name() == family.name
  jax.tree_util.tree_map(np.testing.assert_allclose, _gradient(from_step, lopt),
                         _gradient(direct, lopt))


def test_estimator_without_learned_opt_names_the_parameter():
  family, _ = _family_and_lopt()
  with pytest.raises(TypeError, match=r"HybridRPES\.learned_opt is missing"):
    estimators.HybridRPES(family, trunc_sched=None, num_tasks=4)


def test_mixture_builds_both_types_the_way_this_lo_calls_them():
  family, lopt = _family_and_lopt()
  mixture = mixing.EstimatorMixture(
      [lambda *a: estimators.HybridRPES(
          *a, trunc_sched=truncation_schedule.ConstantTruncationSchedule(40),
          num_tasks=5, unroll_length=10),
       lambda *a: a])
  args = ((lo_api.LazyLOptTruncatedStep(family, lopt),) if lo_api.IS_MAIN
          else (family, lopt))
  hybrid, passed_on = mixture(*args), mixture(*args)
  assert hybrid.task_family is family and hybrid.learned_opt is lopt
  if lo_api.IS_MAIN:  # LO's own estimators get a truncated step
    (step,) = passed_on
    assert step.task_family is family and step.learned_opt is lopt
  else:
    assert passed_on == (family, lopt)


@main_only
def test_lazy_step_builds_main_truncated_pes_from_gin(tmp_path):
  import gin  # pylint: disable=g-import-not-at-top
  family, lopt = _family_and_lopt()
  gin.clear_config()
  try:
    gin.parse_config([
        "VectorizedLOptTruncatedStep.num_tasks = 3",
        "VectorizedLOptTruncatedStep.trunc_sched = "
        "@ConstantTruncationSchedule()",
        "ConstantTruncationSchedule.total_length = 20",
    ])
    pes = truncated_pes.TruncatedPES(
        lo_api.LazyLOptTruncatedStep(family, lopt), trunc_length=10)
    grad = _gradient(pes, lopt)
  finally:
    gin.clear_config()
  assert pes.truncated_step.num_tasks == 3
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grad))


@pytest.mark.parametrize("num, per_step", [(3, 2), (4, 1), (2, 2), (5, 3)])
def test_estimator_groups_cycle_like_lo_main(num, per_step):
  groups = local_training.estimator_groups(num, per_step)
  cycle = itertools.cycle(range(num))
  reference = [[next(cycle) for _ in range(per_step)] for _ in range(3 * num)]
  assert [groups[s % len(groups)] for s in range(3 * num)] == reference


def test_estimator_groups_default_and_bad_value():
  assert local_training.estimator_groups(3, None) == [[0, 1, 2]]
  with pytest.raises(ValueError, match="run_num_estimators_per_gradient"):
    local_training.estimator_groups(2, 3)


# ------------------------------------------ every shipped config, 2 steps

# Small enough for 2 CPU cores: what is checked is each config's wiring
# (estimator, objective, curriculum, data), not its full size.
_SMALL_CNN_RECIPE = (
    "VariationalEstimator.num_tasks = 5",
    "VariationalEstimator.meta_loss_evals = 1",
    "VariationalEstimator.random_initial_iteration_offset = 0",
    "LinearTruncationCurriculum.k_min = 10",
    "LinearTruncationCurriculum.k_max = 20",
    "ConstantTruncationLength.length = 10",
    "ConstantTruncationSchedule.total_length = 40",
    "sample_fashion_mnist_family.batch_size = 8",
    "sample_fashion_mnist_family.image_size = 8",
    "sample_fashion_mnist_family.architecture = 'mlp2x32'",
)
SMALL = {
    "paper_hybrid": _SMALL_CNN_RECIPE,
    "paper_hybrid_train_objective": _SMALL_CNN_RECIPE,
    "ablation_rp_only": _SMALL_CNN_RECIPE,
    "ablation_es_only": _SMALL_CNN_RECIPE,
    "ablation_fixed_k10": _SMALL_CNN_RECIPE,
    "ablation_fixed_k100": _SMALL_CNN_RECIPE,
    "ablation_fixed_k1000": _SMALL_CNN_RECIPE,
    "lo_truncated_pes_validation": _SMALL_CNN_RECIPE + (
        "TruncatedPES.num_tasks = 2", "TruncatedPES.trunc_length = 10"),
    "lo_truncated_pes_validation_clipped": _SMALL_CNN_RECIPE + (
        "TruncatedPES.num_tasks = 2", "TruncatedPES.trunc_length = 10"),
    "headline_nnadam_fmnist8": (
        "LinearTruncationCurriculum.k_min = 10",
        "LinearTruncationCurriculum.k_max = 20",
        "sample_every_subset_family.batch_size = 16",
        "ConstantTruncationSchedule.total_length = 40",
        "VariationalEstimator.random_initial_iteration_offset = 0"),
    "headline_progress_fmnist8": (
        "LinearTruncationCurriculum.k_min = 10",
        "LinearTruncationCurriculum.k_max = 20",
        "sample_every_subset_family.batch_size = 16",
        "ConstantTruncationSchedule.total_length = 40",
        "VariationalEstimator.random_initial_iteration_offset = 0"),
    "demo": ("VariationalEstimator.num_tasks = 5",
             "ConstantTruncationSchedule.total_length = 40",
             "VariationalEstimator.random_initial_iteration_offset = 0"),
}
CONFIGS = sorted(p.stem for p in (cli_utils.REPO / "gin_configs").glob("*.gin"))
# On 0.0.1 the default run already trains a few of these; all of them are
# the point of the GitHub-main run.
_marks = () if lo_api.IS_MAIN else (pytest.mark.slow,)


@pytest.fixture(scope="module")
def config_runs(tmp_path_factory):
  """Every config's 2-step run, os.cpu_count() at a time, started at once."""
  root = tmp_path_factory.mktemp("configs")

  def run(name):
    log_dir = root / name
    bindings = ("run_train.num_steps = 2",) + SMALL.get(name, ())
    proc = cli_utils.run_train(
        log_dir, *bindings,
        config_file=cli_utils.REPO / "gin_configs" / f"{name}.gin")
    return proc, log_dir

  pool = concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1))
  futures = {name: pool.submit(run, name) for name in CONFIGS}
  yield futures
  pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.parametrize(
    "name", [pytest.param(n, id=n, marks=_marks) for n in CONFIGS])
def test_every_shipped_config_trains_two_steps(config_runs, name):
  proc, log_dir = config_runs[name].result()
  assert proc.returncode == 0, cli_utils.describe(proc)
  steps = [r["step"] for r in cli_utils.read_metrics(log_dir)]
  assert steps == [1, 2], steps
  assert os.path.isfile(log_dir / "checkpoint_2")
  assert cli_utils.event_files(log_dir)
  assert "Compiling" not in proc.stderr  # main's jax_log_compiles stays off


# ------------------------------------------------- LO main's own binary


def _has_run_outer_train_single():
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec(
      "learned_optimization.run_outer_train_single") is not None


@pytest.mark.skipif(not _has_run_outer_train_single(),
                    reason="this learned_optimization has no "
                    "run_outer_train_single")
def test_lo_binary_trains_with_our_estimator_without_tensorflow(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  assert importlib.util.find_spec("tensorflow") is None
  log_dir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "learned_optimization.run_outer_train_single",
       f"--train_log_dir={log_dir}", "--gin_import=pathology_fix",
       f"--config_file={cli_utils.REPO / 'gin_configs' / 'hybrid_quadratic.gin'}",
       "--gin_bindings=run_train.num_steps = 2"],
      cwd=cli_utils.REPO, env=cli_utils.subprocess_env(), capture_output=True,
      text=True, timeout=cli_utils.TIMEOUT_S)
  assert proc.returncode == 0, (
      "(needs pathology_fix_startup.pth: run scripts/bootstrap.sh)\n" +
      cli_utils.describe(proc))
  config = (log_dir / "config.gin").read_text()
  assert "gradient_estimator_fn = @HybridRPES" in config
  assert os.path.isfile(log_dir / "params_0")
  scalars = cli_utils.read_scalars(log_dir)  # tensorboardX events, no TF
  assert scalars["mean_loss"] and scalars["mean_loss"][0][0] == 1
  assert proc.stderr.count("Compiling") == 0
