"""Meta-validation tasks (never held out) and their fixed-key evaluation."""

import flax
import gin
import jax
import numpy as np
import pytest

import cli_utils
import pathology_fix  # noqa: F401  (compat before LO)
from learned_optimization.learned_optimizers import base as lopt_base  # pylint: disable=g-bad-import-order
from pathology_fix.tasks_and_data import tasks
from pathology_fix.runtime import evaluation
from pathology_fix.runtime import meta_validation as mv
from pathology_fix.runtime import theta_averaging

HELDOUT = set(tasks.HELDOUT_CLASSES)
SMALL = mv.MetaTrainingDistribution(class_pool="all", architecture="mlp2x32",
                                    image_size=8, batch_size=32)
STEPS = 30


@pytest.fixture(scope="module")
def validator():
  return mv.MetaValidation(num_tasks=3, inner_steps=STEPS, seed=1,
                           distribution=SMALL)


@pytest.fixture(scope="module")
def lopt():
  return lopt_base.LearnableAdam(initial_lr=3e-3)


def _parse(config):
  gin.clear_config()
  gin.add_config_file_search_path(str(cli_utils.REPO / "gin_configs"))
  gin.parse_config_file(str(cli_utils.REPO / "gin_configs" / config))


@pytest.mark.parametrize("config,want", [
    ("headline_nnadam_fmnist8.gin", mv.MetaTrainingDistribution(
        "train", 3, "fashion_mnist", "mlp2x32", 8, 128, "unit")),
    ("demo.gin", mv.MetaTrainingDistribution(
        "train", 3, "fashion_mnist", "mlp2x32", 8, 64, "unit")),
    ("paper_hybrid.gin", mv.MetaTrainingDistribution(
        "train", 3, "fashion_mnist", "conv3", None, 128, "unit")),
])
def test_distribution_is_read_from_the_runs_gin_config(config, want):
  try:
    _parse(config)
    assert mv.distribution_from_gin() == want
  finally:
    gin.clear_config()


def test_distribution_through_the_validation_meta_loss_wrapper():
  try:
    _parse("lo_truncated_pes_validation_clipped.gin")
    got = mv.distribution_from_gin()
    want = {k: gin.query_parameter(f"sample_fashion_mnist_family.{k}")
            for k in ("class_pool", "architecture")}
    assert (got.class_pool, got.architecture) == (want["class_pool"],
                                                  want["architecture"])
  finally:
    gin.clear_config()


def test_a_non_class_subset_family_needs_an_explicit_distribution():
  try:
    _parse("hybrid_quadratic.gin")
    with pytest.raises(ValueError, match=r"MetaValidation\.distribution"):
      mv.distribution_from_gin()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("pool", ["train", "all", (0, 2, 4, 6, 8),
                                  (1, 3, 5, 7, 9, 0)])
@pytest.mark.parametrize("num_tasks", [1, 4, 10, 23])
def test_validation_classes_never_include_a_heldout_class(pool, num_tasks):
  for seed in range(4):
    dist = mv.MetaTrainingDistribution(class_pool=pool,
                                       num_classes_per_task=2)
    specs = mv.validation_specs(dist, num_tasks, seed)
    assert len(specs) == num_tasks
    for s in specs:
      assert len(set(s.classes)) == 2
      assert not set(s.classes) & HELDOUT
      assert set(s.classes) <= set(tasks._resolve_pool(pool))  # pylint: disable=protected-access
    # Every allowed subset is used before any repeats.
    allowed = [c for c in tasks._resolve_pool(pool) if c not in HELDOUT]  # pylint: disable=protected-access
    m = len(allowed) * (len(allowed) - 1) // 2
    used = {tuple(sorted(s.classes)) for s in specs}
    assert len(used) == min(num_tasks, m)


def test_built_tasks_hold_only_training_classes(validator):
  assert len(validator.tasks) == 3
  for t in validator.tasks:
    classes = t.task.datasets.extra_info["classes"]
    assert not set(classes) & HELDOUT and len(classes) == 3
    assert tuple(classes) == t.spec.classes
    # The whole inner_valid split (600 per class) is scored.
    assert float(t.eval_weights.sum()) == pytest.approx(1.0)
    assert int((t.eval_weights > 0).sum()) == 3 * 600
    assert t.batch_index.shape == (STEPS, 32)
    assert t.batch_index.max() < len(t.train["label"])


@pytest.mark.parametrize("pool,match", [
    ("heldout", r"num_classes_per_task=3; allowed: 2 to .* are \(\) \(0\)"),
    ((0, 1, 5, 6, 7), r"num_classes_per_task=3; .* are \(0, 1\) \(2\)"),
])
def test_pools_without_enough_training_classes_raise(pool, match):
  with pytest.raises(ValueError,
                     match=r"MetaValidation\.distribution\." + match):
    mv.validation_specs(mv.MetaTrainingDistribution(class_pool=pool), 4, 0)


def test_heldout_check_and_digits_raise():
  with pytest.raises(ValueError, match=r"held-out classes \[5\]"):
    mv.check_no_heldout((0, 5, 1))
  with pytest.raises(ValueError, match=r"dataset='digits'; allowed: "
                                       r"\('fashion_mnist',\)"):
    mv.validation_specs(mv.MetaTrainingDistribution(dataset="digits"), 2, 0)


def test_fixed_keys_give_identical_scores(validator, lopt):
  theta = lopt.init(jax.random.PRNGKey(0))
  first = validator.evaluate(lopt, {"latest": theta})
  again = validator.evaluate(lopt, {"latest": theta, "copy": theta})
  rebuilt = mv.MetaValidation(num_tasks=3, inner_steps=STEPS, seed=1,
                              distribution=SMALL).evaluate(
                                  lopt, {"latest": theta})
  for other in (again, rebuilt):
    np.testing.assert_array_equal(first.final_loss["latest"],
                                  other.final_loss["latest"])
    assert first.scores["latest"] == other.scores["latest"]
  np.testing.assert_array_equal(again.final_loss["copy"],
                                first.final_loss["latest"])
  assert first.scores["latest"] == pytest.approx(
      np.mean(first.final_loss["latest"]))
  assert np.all(np.isfinite(first.final_loss["latest"]))
  assert first.compile_seconds > 0 and again.compile_seconds == 0
  assert set(first.metrics()) == {"mean||meta_valid/latest",
                                  "mean||meta_valid_seconds"}


def test_scores_tell_thetas_apart_and_seeds_pick_other_tasks(validator, lopt):
  theta = lopt.init(jax.random.PRNGKey(0))
  slow = jax.tree_util.tree_map(lambda x: x - 3.0, theta)  # lr / e^3
  out = validator.evaluate(lopt, {"good": theta, "slow": slow})
  # 30 steps at lr 1.5e-4 barely move from chance (ln 3) loss.
  assert out.scores["good"] < out.scores["slow"]
  assert out.scores["slow"] == pytest.approx(np.log(3), abs=0.15)
  other = mv.validation_specs(SMALL, 3, seed=2)
  assert [(s.classes, s.data_seed) for s in other] != [
      (s.classes, s.data_seed) for s in validator.specs]


def test_a_subset_of_tasks_gives_the_same_per_task_numbers(validator, lopt):
  theta = lopt.init(jax.random.PRNGKey(0))
  whole = validator.evaluate(lopt, {"t": theta})
  part = validator.evaluate(lopt, {"t": theta}, task_indices=[2, 0])
  np.testing.assert_array_equal(part.final_loss["t"],
                                whole.final_loss["t"][[2, 0]])
  assert part.task_names == [whole.task_names[2], whole.task_names[0]]


class _FixedBatches:
  """A validation task as `meta_test` sees a task: same model, "train"
  batches in the validator's order, the whole split from its datasets."""

  def __init__(self, vt):
    self._vt = vt
    self.name = vt.task.name
    self.datasets = self
    self.init_with_state = vt.task.init_with_state
    self.loss_with_state = vt.task.loss_with_state
    self.normalizer = vt.task.normalizer

  def split(self, name):
    assert name == "train"
    return iter([{k: a[rows] for k, a in self._vt.train.items()}
                 for rows in self._vt.batch_index])

  def split_arrays(self, name):
    return self._vt.task.datasets.split_arrays(name)


def test_scores_equal_the_heldout_evaluation_on_the_same_runs(validator,
                                                              lopt):
  # meta_test (the held-out evaluation's code) on the same tasks, inits and
  # batches gives the same final inner_valid losses and training losses.
  theta = lopt.init(jax.random.PRNGKey(0))
  ours = validator.evaluate(lopt, {"t": theta})
  ref = evaluation.meta_test(
      [_FixedBatches(t) for t in validator.tasks], lopt, {"t": theta}, STEPS,
      validator.key, splits=("inner_valid",), whole_splits=True,
      same_model=True)
  rows = ref.per_task
  np.testing.assert_allclose(ours.final_loss["t"],
                             [r["final_inner_valid_loss"] for r in rows],
                             rtol=1e-5)
  np.testing.assert_allclose(ours.train_loss["t"],
                             [r["train_loss_mean"] for r in rows], rtol=1e-5)


def test_validation_from_the_headline_gin_config():
  try:
    _parse("headline_nnadam_fmnist8.gin")
    v = mv.MetaValidation(num_tasks=2, inner_steps=5)
  finally:
    gin.clear_config()
  assert v.distribution.architecture == "mlp2x32"
  assert v.tasks[0].train["image"].shape[1:] == (8, 8, 1)
  assert v.tasks[0].batch_index.shape == (5, 128)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_tasks": 0}, r"num_tasks=0; allowed: an integer >= 1"),
    ({"inner_steps": 0}, r"inner_steps=0; allowed: an integer >= 1"),
    ({"split": "train"}, r"split='train'; allowed: \('inner_valid', "
                         r"'outer_valid', 'test'\)"),
    ({"every_n_steps": -1}, r"every_n_steps=-1; allowed"),
    ({"max_time_fraction": 2.0}, r"max_time_fraction=2\.0; allowed"),
    ({"distribution": "train"}, r"distribution='train'; allowed: None or a "
                                "MetaTrainingDistribution"),
])
def test_bad_values_name_the_parameter(kwargs, match):
  args = dict(num_tasks=2, inner_steps=5, distribution=SMALL)
  args.update(kwargs)
  with pytest.raises(ValueError, match=r"MetaValidation\." + match):
    mv.MetaValidation(**args)


def test_bad_evaluate_arguments(validator, lopt):
  theta = lopt.init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="thetas is empty"):
    validator.evaluate(lopt, {})
  with pytest.raises(ValueError, match=r"task_indices=\[3\]; allowed"):
    validator.evaluate(lopt, {"t": theta}, task_indices=[3])


def test_gin_names_configure_it():
  gin.clear_config()
  try:
    gin.parse_config("""
        import pathology_fix.runtime.meta_validation
        MetaValidation.num_tasks = 2
        MetaValidation.inner_steps = 7
        MetaValidation.every_n_steps = 3
        MetaValidation.max_time_fraction = 0.1
        MetaValidation.seed = 5
        MetaValidation.split = "test"
        MetaValidation.distribution = @MetaTrainingDistribution()
        MetaTrainingDistribution.architecture = "mlp2x32"
        MetaTrainingDistribution.image_size = 8
    """)
    v = mv.MetaValidation()
  finally:
    gin.clear_config()
  assert (v.num_tasks, v.inner_steps, v.every_n_steps, v.max_time_fraction,
          v.seed, v.split) == (2, 7, 3, 0.1, 5, "test")
  assert v.distribution.architecture == "mlp2x32"
  # The test split: 1,000 examples per class.
  assert int((v.tasks[0].eval_weights > 0).sum()) == 3 * 1000


def _train_loop(validator, lopt, ema, state, thetas, steps, log):
  """Outer steps `steps` of a fake run (theta_s = thetas[s]): EMA update,
  then a validation; logs (step, kind, score, theta evaluated)."""
  for s in steps:
    state = state.replace(ema=ema.update(state.ema, thetas[s]))
    evaluated = {"latest": thetas[s], "ema": state.ema.average}
    state, result = validator.validate(state, lopt, s, thetas[s])
    log += [(s, k, result.scores[k], evaluated[k]) for k in evaluated]
    metrics = mv.validation_metrics(state, result, train_seconds=100.0 * s)
    assert metrics["mean||meta_valid_best"] == float(state.best.score)
  return state


def test_validate_keeps_the_argmin_of_the_logged_scores_across_resume(
    validator, lopt):
  theta0 = lopt.init(jax.random.PRNGKey(0))
  offsets = [0.0, -2.0, 0.7, 1.2, -1.0, 0.4, 0.9]  # log learning-rate moves
  thetas = [jax.tree_util.tree_map(lambda x, o=o: x + o, theta0)
            for o in offsets]
  ema = theta_averaging.ThetaEMA(decay=0.5)
  log = []
  start = validator.init_state(ema, theta0)
  whole = _train_loop(validator, lopt, ema, start, thetas, range(1, 7), log)
  scores = [e[2] for e in log]
  first = int(np.argmin(scores))  # np.argmin returns the first minimum
  assert (int(whole.best.step), whole.best.kind) == log[first][:2]
  assert float(whole.best.score) == min(scores)
  jax.tree_util.tree_map(np.testing.assert_array_equal, whole.best_theta,
                         log[first][3])
  assert int(whole.clock.count) == 6 and int(whole.clock.last_step) == 6
  # Interrupted after step 3, restored from bytes, continued.
  part = _train_loop(validator, lopt, ema, start, thetas, range(1, 4), [])
  restored = flax.serialization.from_bytes(
      validator.init_state(ema, theta0), flax.serialization.to_bytes(part))
  resumed = _train_loop(validator, lopt, ema, restored, thetas, range(4, 7),
                        [])
  assert resumed.best == whole.best
  for a, b in ((resumed.best_theta, whole.best_theta),
               (resumed.ema, whole.ema)):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
