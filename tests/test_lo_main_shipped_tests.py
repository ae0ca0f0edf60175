"""learned_optimization GitHub main's OWN test files, through our layer.

The same runner as tests/test_lo_shipped_tests.py (0.0.1): each module in a
subprocess that imports pathology_fix first, os.cpu_count() at a time. Runs
only where LO main is installed (`PATHOLOGY_FIX_LO=main ./run.sh test`).
Survey at commit 32186aa: 40 of 71 modules pass; the rest are listed in
NOT_RUN with the reason.
"""

import pytest

import test_lo_shipped_tests as shipped
from pathology_fix.lo_boundary import lo_api

pytestmark = pytest.mark.skipif(
    not lo_api.IS_MAIN, reason="learned_optimization GitHub main's test modules")

# Run by default (and in CI's GitHub-main run): the meta-training machinery
# our code builds on, and the compat layer's stand-ins (courier, tensorboard).
CORE_MODULES = (
    "outer_trainers.truncated_grad_test",
    "outer_trainers.truncated_es_test",
    "outer_trainers.truncated_pes_test",
    "outer_trainers.gradient_learner_test",
    "outer_trainers.truncation_schedule_test",
    "outer_trainers.lopt_truncated_step_test",
    "learned_optimizers.base_test",
    "learned_optimizers.mlp_lopt_test",
    "optimizers.base_test",
    "optimizers.gradient_accumulator_test",
    "optimizers.nadamw_test",
    "tasks.quadratics_test",
    "tasks.task_augmentation_test",
    "tasks.parametric.cfgobject_test",
    "distributed_test",  # courier replaced by pathology_fix.lo_boundary.inprocess_courier
    "continuous_eval.task_group_server_test",
    "population.population_test",
    "population.examples.synthetic.train_test",
    "population.mutators.fixed_schedule_test",
    "population.mutators.single_worker_explore_test",
    "population.mutators.winner_take_all_genetic_test",
    "circular_buffer_test",
    "jax_utils_test",
    "tree_utils_test",
)

# Also pass, but take 30 s to minutes each on 2 cores: `pytest -m slow`.
SLOW_MODULES = (
    "outer_train_test",
    "outer_trainers.full_es_test",
    "outer_trainers.full_grad_test",
    "eval_training_test",
    "baselines.run_trainer_test",
    "continuous_eval.run_eval_worker_test",
    "learned_optimizers.adafac_mlp_lopt_test",
    "learned_optimizers.adafac_nominal_test",
    "learned_optimizers.nn_adam_test",
    "learned_optimizers.rnn_mlp_lopt_test",
    "optimizers.opt_to_optax_test",
    "optimizers.optax_opts_test",
    "research.general_lopt.hyper_v2_test",
    "tasks.es_wrapper_test",
)

# Extra environment per module: these skip themselves below 8 devices.
ENV = {
    "outer_trainers.truncated_pes_pmap_test": {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    "eval_training_multi_device_test": {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
}
SLOW_MODULES += tuple(ENV)

_TFDS = ("needs tensorflow_datasets downloads (tfds.builder/tfds.load), "
         "not installed; our offline data is pathology_fix.tasks_and_data.data")
_SEQIO = "imports seqio (LM tasks), which is not installed"
_TIME_FILTER = ("imports learned_optimization.time_filter, which is not in "
                "the repository")
_ML_COLLECTIONS = "imports ml_collections, which is not installed"
_NOT_IN_WHEEL = "reads a data file the repository does not ship ({})"

# LO main test modules NOT run, and why.
NOT_RUN = {
    "summary_test": "defines no tests without oryx, which is broken on current "
                    "jax (summary.ORYX_LOGGING is False)",
    "baselines.normalizers_test": _NOT_IN_WHEEL.format(
        "baselines/data/speedup_over_adam.json, ~/lopt_baselines_archives"),
    "continuous_eval.run_eval_chief_test": _NOT_IN_WHEEL.format(
        "baselines/data/speedup_over_adam.json"),
    "optimizers.opt_list_test": _NOT_IN_WHEEL.format("optimizers/data/"),
    "optimizers.shampoo_test": "imports optax_shampoo, which is not installed",
    "population.examples.simple_cnn.train_test": _TFDS,
    "research.general_lopt.prefab_test": "downloads pretrained weights from "
                                         "gs:// (tf.io.gfile)",
    "research.general_lopt.pretrained_optimizers_test": "downloads pretrained "
                                                        "weights from gs:// "
                                                        "(tf.io.gfile)",
    "tasks.datasets.image_test": _TFDS,
    "tasks.datasets.language_test": _SEQIO,
    "tasks.fixed.conv_test": _TFDS,
    "tasks.fixed.es_wrapped_test": _TFDS,
    "tasks.fixed.image_mlp_ae_test": _TFDS,
    "tasks.fixed.image_mlp_test": _TFDS,
    "tasks.fixed.lopt_test": _TFDS,
    "tasks.fixed.mlp_mixer_test": _ML_COLLECTIONS,
    "tasks.fixed.resnet_test": "needs the preprocessed imagenet2012_16 tfds "
                               "dataset",
    "tasks.fixed.rnn_lm_test": _SEQIO,
    "tasks.fixed.transformer_lm_test": _SEQIO,
    "tasks.fixed.vit_test": _ML_COLLECTIONS,
    "tasks.parametric.image_conv_test": _TIME_FILTER,
    "tasks.parametric.image_mlp_ae_test": _TIME_FILTER,
    "tasks.parametric.image_mlp_test": _TIME_FILTER,
    "tasks.parametric.image_mlp_vae_test": "imports tensorflow_probability, "
                                           "which is not installed",
    "tasks.parametric.image_resnet_test": _TIME_FILTER,
    "tasks.parametric.lm_rnn_test": _SEQIO,
    "tasks.parametric.lm_transformer_test": _SEQIO,
    "tasks.parametric.lopt_test": _TIME_FILTER,
    "tasks.parametric.lopt_trunc_test": "imports learned_optimization.research."
                                        "hyper_lopt, which is not in the "
                                        "repository",
    "tasks.parametric.parametric_utils_test": "1 of its 4 tests needs "
                                              "tensorflow_datasets (" + _TFDS +
                                              ")",
    "tasks.parametric.vit_test": _SEQIO,
}


@pytest.fixture(scope="module")
def lo_runs(request, tmp_path_factory):
  selected = [
      item.callspec.params["module"] for item in request.session.items
      if item.module is request.module and hasattr(item, "callspec")
  ]
  runs = shipped._Runs(selected, tmp_path_factory.mktemp("lo_main_shipped"), ENV)  # pylint: disable=protected-access
  yield runs
  runs.close()


_PARAMS = ([pytest.param(m, id=m) for m in CORE_MODULES] +
           [pytest.param(m, id=m, marks=pytest.mark.slow) for m in SLOW_MODULES])


@pytest.mark.parametrize("module", _PARAMS)
def test_lo_main_shipped_test_module_passes(lo_runs, module):
  shipped.assert_module_passed(lo_runs.result(module), module)


def test_not_run_modules_are_accounted_for():
  """Every LO main test module is either run here or listed with a reason."""
  found = shipped.shipped_test_modules()
  run = set(CORE_MODULES) | set(SLOW_MODULES)
  assert not run & set(NOT_RUN)
  assert found == run | set(NOT_RUN), found ^ (run | set(NOT_RUN))
