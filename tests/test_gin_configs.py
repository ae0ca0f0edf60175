"""Every shipped gin config parses and builds the estimators it names."""

import pathlib

import gin
import pytest

import jax
import cli_utils
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.outer_trainers import truncated_pes
from pathology_fix.meta_gradient import estimators
from pathology_fix.lo_boundary import lo_api
from pathology_fix.meta_gradient import schedules
from pathology_fix.tasks_and_data import validation_task

CONFIGS = sorted((cli_utils.REPO / "gin_configs").glob("*.gin"))

EXPECTED_ESTIMATOR = {
    "hybrid_quadratic": estimators.HybridRPES,
    "demo": estimators.HybridRPES,
    "meta_validation": estimators.HybridRPES,
    "headline_nnadam_fmnist8": estimators.HybridRPES,
    "headline_progress_fmnist8": estimators.HybridRPES,
    "paper_hybrid": estimators.HybridRPES,
    "paper_hybrid_train_objective": estimators.HybridRPES,
    "ablation_rp_only": estimators.VariationalRP,
    "ablation_es_only": estimators.VariationalES,
    "ablation_fixed_k10": estimators.HybridRPES,
    "ablation_fixed_k100": estimators.HybridRPES,
    "ablation_fixed_k1000": estimators.HybridRPES,
    "lo_truncated_pes_quadratic": truncated_pes.TruncatedPES,
    "lo_truncated_pes_validation": truncated_pes.TruncatedPES,
    "lo_truncated_pes_validation_clipped": truncated_pes.TruncatedPES,
}


def _build(config: pathlib.Path, count=1):
  gin.clear_config()
  gin.add_config_file_search_path(str(config.parent))
  try:
    gin.parse_config_files_and_bindings([str(config)], [])
    return lo_api.build_gradient_estimators(
        None, mlp_lopt.MLPLOpt(), jax.random.PRNGKey(0), count)
  finally:
    gin.clear_config()


def test_every_config_is_covered():
  assert {c.stem for c in CONFIGS} >= set(EXPECTED_ESTIMATOR) - {"x"}
  assert {c.stem for c in CONFIGS} - {"mix_hybrid_and_lo_pes"} == set(
      EXPECTED_ESTIMATOR)


@pytest.mark.parametrize("name", sorted(EXPECTED_ESTIMATOR))
def test_config_builds_its_estimator(name):
  (estimator,) = _build(cli_utils.REPO / "gin_configs" / f"{name}.gin")
  assert type(estimator) is EXPECTED_ESTIMATOR[name]  # pylint: disable=unidiomatic-typecheck
  if name.startswith("ablation_fixed_k"):
    length = estimator.truncation_length
    assert isinstance(length, schedules.ConstantTruncationLength)
    assert length.length == int(name.rsplit("k", 1)[1])
  if name.startswith("paper") or name.startswith("ablation"):
    assert estimator.num_samples == 128 and estimator.sigma == 0.1
    split = "train" if name.endswith("train_objective") else "outer_valid"
    assert estimator.unroller.problems.meta_loss_split == split
  if name.startswith("headline_"):
    # Every 3-class subset of classes 0-4, one per sample (n = 10).
    assert estimator.task_family.num_subsets == 10
    assert estimator.num_samples == 10
  if name == "lo_truncated_pes_validation_clipped":
    family = (getattr(estimator, "task_family", None) or
              estimator.truncated_step.task_family)  # 0.0.1 or main
    assert isinstance(family, validation_task.ValidationMetaLossFamily)
    assert (family.meta_loss_evals, family.max_loss) == (5, 10.0)


@pytest.mark.parametrize("name, lopt", [
    ("headline_nnadam_fmnist8", "NNAdam"),
    ("headline_progress_fmnist8", "ProgressAdam")])
def test_headline_configs_meta_train_their_learned_optimizer(name, lopt):
  config = cli_utils.REPO / "gin_configs" / f"{name}.gin"
  gin.clear_config()
  gin.add_config_file_search_path(str(config.parent))
  try:
    gin.parse_config_files_and_bindings([str(config)], [])
    assert gin.query_parameter("singleton.constructor").selector == lopt
    assert gin.query_parameter(f"{lopt}.initial_learning_rate") == 1e-2
  finally:
    gin.clear_config()


def test_mixture_config_builds_both_estimator_types():
  built = _build(cli_utils.REPO / "gin_configs" / "mix_hybrid_and_lo_pes.gin",
                 count=2)
  assert [type(e) for e in built] == [estimators.HybridRPES,
                                      truncated_pes.TruncatedPES]
