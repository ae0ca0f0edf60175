"""Meta-validation, params_best and the theta EMA inside `pathology_fix.train`.

Tiny runs of gin_configs/meta_validation.gin (3-class Fashion-MNIST 8x8 MLP
tasks, 2 validation tasks of 20 inner steps, validated every outer step):
the best theta is the argmin of what metrics.jsonl logs, a resumed run keeps
the best and continues the EMA, two processes pick the same best as one, and
no validation task uses a held-out class.
"""

import contextlib
import shutil

import flax
import gin
import jax
import numpy as np
import portpicker
import pytest

import cli_utils
import pathology_fix  # noqa: F401  (compat before LO)
from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-bad-import-order
from pathology_fix.lo_boundary import lo_api
from pathology_fix.optimizers import outer_schedule
from pathology_fix.runtime import checkpoints
from pathology_fix.runtime import meta_validation as mv
from pathology_fix.runtime import theta_averaging
from pathology_fix.tasks_and_data import tasks

CONFIG = cli_utils.REPO / "gin_configs" / "meta_validation.gin"
DECAY = 0.5
TINY = ("run_train.summary_every_n = 1",
        "resumable_local_train.checkpoint_every_n_steps = 1",
        "resumable_local_train.keep = 100",
        "VariationalEstimator.num_tasks = 6",
        "LinearTruncationCurriculum.k_max = 10",
        "ConstantTruncationSchedule.total_length = 40",
        "VariationalEstimator.random_initial_iteration_offset = 40",
        "MetaValidation.num_tasks = 2",
        "MetaValidation.inner_steps = 20",
        "MetaValidation.every_n_steps = 1",
        "MetaValidation.max_time_fraction = 1.0",
        f"ThetaEMA.decay = {DECAY}",
        "scheduled_outer_optimizer.total_steps = 5",
        "scheduled_outer_optimizer.warmup_steps = 1")
KINDS = ("latest", "ema")


@contextlib.contextmanager
def _gin(bindings=()):
  """meta_validation.gin (which includes demo.gin) parsed in this process."""
  gin.clear_config()
  gin.add_config_file_search_path(str(CONFIG.parent))
  try:
    gin.parse_config_files_and_bindings([str(CONFIG)], list(bindings))
    yield
  finally:
    gin.clear_config()


def _train(run_dir, steps, extra_flags=()):
  return cli_utils.train_command(run_dir, f"run_train.num_steps = {steps}",
                                 *TINY, config_file=CONFIG,
                                 extra_flags=extra_flags)


def _run(run_dir, steps):
  proc = cli_utils.run_train(run_dir, f"run_train.num_steps = {steps}", *TINY,
                             config_file=CONFIG)
  assert proc.returncode == 0, cli_utils.describe(proc)
  return proc


@pytest.fixture(scope="module")
def lopt():
  with _gin(TINY):
    return mlp_lopt.MLPLOpt()


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("mv") / "run"
  proc = _run(run_dir, 3)
  return run_dir, proc


def _logged(run_dir):
  """[(step, kind, score)] of every validation, in order."""
  out = []
  for r in cli_utils.read_metrics(run_dir):
    out += [(r["step"], k, r[f"meta_valid/{k}"]) for k in KINDS
            if f"meta_valid/{k}" in r]
  return out


def _state(run_dir, step, lopt):
  template = mv.MetaValidation.init_state(
      theta_averaging.ThetaEMA(DECAY), lopt.init(jax.random.PRNGKey(0)))
  return checkpoints.load_selection(str(run_dir), step, template)


def _theta_of(run_dir, step, kind, lopt):
  if kind == "latest":
    return checkpoints.load_params(str(run_dir), step, lopt)
  return _state(run_dir, step, lopt).ema.average


def _assert_trees_equal(a, b, **tol):
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                              **tol), a, b)


def test_best_theta_is_the_argmin_of_the_logged_meta_validation(run3, lopt):
  run_dir, proc = run3
  logged = _logged(run_dir)
  assert [(s, k) for s, k, _ in logged] == [(s, k) for s in (1, 2, 3)
                                            for k in KINDS]
  assert "meta-validation at step 1: latest" in proc.stdout
  assert f"{run_dir}/params_best" in proc.stdout
  scores = [v for _, _, v in logged]
  step, kind, score = logged[int(np.argmin(scores))]
  last = cli_utils.read_metrics(run_dir)[-1]
  assert last["meta_valid_best"] == pytest.approx(score)
  assert last["meta_valid_best_step"] == step
  assert 0 < last["meta_valid_time_fraction"] < 1
  assert last["elapsed_time"] > last["meta_valid_seconds"] > 0
  tags = cli_utils.read_scalars(run_dir)
  assert [s for s, _ in tags["meta_valid/ema"]] == [1, 2, 3]
  # params_best: that entry's theta, tagged with its step.
  best, best_step = _load_named(run_dir, checkpoints.PARAMS_BEST, lopt)
  assert best_step == step
  _assert_trees_equal(best, _theta_of(run_dir, step, kind, lopt), rtol=0)
  state = _state(run_dir, 3, lopt)
  assert (int(state.best.step), state.best.kind) == (step, kind)
  # Scoring params_best again gives the logged best.
  with _gin(TINY):
    validator = mv.MetaValidation()
  again = validator.evaluate(lopt, {"best": best}).scores["best"]
  assert again == pytest.approx(score, rel=1e-5)
  # params_ema: the EMA of params_0..params_3 (theta_1 = the start).
  ema = theta_averaging.ThetaEMA(DECAY)
  want = ema.init(checkpoints.load_params(str(run_dir), 0, lopt))
  for s in (1, 2, 3):
    want = ema.update(want, checkpoints.load_params(str(run_dir), s, lopt))
  got, ema_step = _load_named(run_dir, checkpoints.PARAMS_EMA, lopt)
  assert ema_step == 3
  _assert_trees_equal(got, want.average, rtol=1e-6)


def _load_named(run_dir, name, lopt):
  from learned_optimization import checkpoints as lo_checkpoints  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  template = gradient_learner.ParameterCheckpoint(
      lopt.init(jax.random.PRNGKey(0)), "", 0)
  loaded = lo_checkpoints.load_state(str(run_dir / name), template)
  return loaded.params, int(loaded.step)


def test_resume_keeps_the_best_and_the_ema(run3, lopt, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(run3[0], run_dir)
  before = _state(run_dir, 3, lopt)
  proc = _run(run_dir, 5)
  assert f"Resuming from {run_dir}/checkpoint_3" in proc.stdout
  logged = _logged(run_dir)
  assert [s for s, _, _ in logged] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
  step, kind, score = logged[int(np.argmin([v for _, _, v in logged]))]
  after = _state(run_dir, 5, lopt)
  assert (int(after.best.step), after.best.kind) == (step, kind)
  assert float(after.best.score) == pytest.approx(score)
  assert int(after.clock.count) == 5
  assert float(after.clock.seconds) > float(before.clock.seconds)
  best, _ = _load_named(run_dir, checkpoints.PARAMS_BEST, lopt)
  _assert_trees_equal(best, after.best_theta, rtol=0)
  if step <= 3:  # a best from before the restart is still the one kept
    _assert_trees_equal(best, before.best_theta, rtol=0)
  # The EMA continues from the restored one (not afresh from theta_3).
  ema = theta_averaging.ThetaEMA(DECAY)
  want = before.ema
  for s in (4, 5):
    want = ema.update(want, checkpoints.load_params(str(run_dir), s, lopt))
  assert int(after.ema.count) == int(want.count) == 6
  _assert_trees_equal(after.ema.average, want.average, rtol=1e-6)
  got, _ = _load_named(run_dir, checkpoints.PARAMS_EMA, lopt)
  _assert_trees_equal(got, want.average, rtol=1e-6)


@pytest.mark.slow
def test_two_processes_pick_the_same_best_as_one(run3, lopt, tmp_path):
  import test_distributed  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / "two"
  port = portpicker.pick_unused_port()
  commands = [_train(run_dir, 3, test_distributed._coordinator_flags(port, i))  # pylint: disable=protected-access
              for i in range(2)]
  with test_distributed._processes(commands, test_distributed._env()) as procs:  # pylint: disable=protected-access
    results = test_distributed._finish(procs)  # pylint: disable=protected-access
  for code, _, err in results:
    assert code == 0, err[-3000:]
  one, two = _state(run3[0], 3, lopt), _state(run_dir, 3, lopt)
  assert (int(two.best.step), two.best.kind) == (int(one.best.step),
                                                 one.best.kind)
  np.testing.assert_allclose([v for _, _, v in _logged(run_dir)],
                             [v for _, _, v in _logged(run3[0])], rtol=1e-4)
  for name in (checkpoints.PARAMS_BEST, checkpoints.PARAMS_EMA):
    a, step_a = _load_named(run3[0], name, lopt)
    b, step_b = _load_named(run_dir, name, lopt)
    assert step_a == step_b
    _assert_trees_equal(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pool", ["train", "all"])
def test_validation_tasks_never_use_a_heldout_class(pool):
  bindings = TINY + (f"sample_fashion_mnist_family.class_pool = '{pool}'",
                     "MetaValidation.num_tasks = 12")
  with _gin(bindings):
    validator = mv.MetaValidation()
  seen = set()
  for t in validator.tasks:
    classes = set(t.spec.classes)
    assert not classes & set(tasks.HELDOUT_CLASSES), t.spec
    seen |= classes
  assert seen == {0, 1, 2, 3, 4}  # every training class is used


def test_bindings_are_found_inside_lo_mains_default_scope():
  # LO main's run_train moves every binding into "default_scope".
  gin.clear_config()
  try:
    gin.parse_config("""
        import pathology_fix.optimizers.outer_schedule
        import pathology_fix.tasks_and_data.tasks
        default_scope/paper_outer_optimizer.learning_rate = 0.003
        default_scope/build_gradient_estimators.sample_task_family_fn = @sample_fashion_mnist_family
        default_scope/sample_fashion_mnist_family.architecture = 'mlp2x32'
        default_scope/sample_fashion_mnist_family.image_size = 8
    """)
    assert lo_api.query_binding("paper_outer_optimizer.learning_rate") == 0.003
    opt = outer_schedule.scheduled_outer_optimizer(schedule="cosine",
                                                   total_steps=10)
    assert opt.learning_rate(0) == pytest.approx(0.003)
    dist = mv.distribution_from_gin()
    assert (dist.architecture, dist.image_size) == ("mlp2x32", 8)
  finally:
    gin.clear_config()


def test_ready_config_turns_everything_on():
  with _gin():
    opt = outer_schedule.scheduled_outer_optimizer()
    assert opt.schedule.schedule == "cosine"
    assert opt.learning_rate(0) < opt.learning_rate(5)  # warm-up
    assert opt.learning_rate(49) < opt.learning_rate(5)  # decay
    assert opt.learning_rate(5) == pytest.approx(3e-3)
    bound = gin.get_bindings("resumable_local_train")
    assert {"meta_validation", "theta_ema"} <= set(bound)
