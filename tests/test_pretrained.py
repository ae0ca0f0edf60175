"""pathology_fix.pretrained: shipped files, loading, the optax adapter."""

import importlib.resources
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
from learned_optimization.learned_optimizers import mlp_lopt
import numpy as np
import optax
import pytest

import cli_utils
from pathology_fix import pretrained

SHIPPED = "mlp_lopt_demo_fmnist8"
# Every shipped optimizer: its class and its held-out tasks' batch size.
ALL_SHIPPED = {"mlp_lopt_demo_fmnist8": ("MLPLOpt", 64),
               "nnadam_fmnist8": ("NNAdam", 128),
               "progress_fmnist8": ("ProgressAdam", 128)}
every_shipped = pytest.mark.parametrize("name", sorted(ALL_SHIPPED))
NUM_STEPS = 100


def _problem():
  """A 2-layer MLP regression with fixed data: (params, loss_fn, batches)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(k1, (4, 8)) * 0.5, "b1": jnp.zeros(8),
            "w2": jax.random.normal(k2, (8, 1)) * 0.5, "b2": jnp.zeros(1)}
  x = jax.random.normal(k3, (NUM_STEPS, 16, 4))
  y = jnp.sin(x.sum(-1, keepdims=True)) + 0.1 * jax.random.normal(
      k4, (NUM_STEPS, 16, 1))

  def loss_fn(p, batch):
    xb, yb = batch
    h = jnp.tanh(xb @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - yb) ** 2)

  return params, loss_fn, (x, y)


def _train_lo(learned_opt, theta):
  params, loss_fn, batches = _problem()
  opt = learned_opt.opt_fn(theta)
  state = opt.init(params, num_steps=NUM_STEPS)

  @jax.jit
  def step(state, batch):
    loss, grad = jax.value_and_grad(loss_fn)(opt.get_params(state), batch)
    return opt.update(state, grad, loss=loss)

  for t in range(NUM_STEPS):
    state = step(state, jax.tree_util.tree_map(lambda a: a[t], batches))
  return opt.get_params(state), loss_fn, batches


def _train_optax(tx):
  params, loss_fn, batches = _problem()
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grad = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grad, state, params, loss=loss)
    return optax.apply_updates(params, updates), state

  for t in range(NUM_STEPS):
    params, state = step(params, state,
                         jax.tree_util.tree_map(lambda a: a[t], batches))
  return params


def _assert_same_params(a, b):
  # optax applies params + (new - params): equal up to float32 rounding.
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _mean_loss(params, loss_fn, batches):
  return float(jnp.mean(jax.vmap(lambda b: loss_fn(params, b))(batches)))


def test_every_shipped_optimizer_is_tested():
  assert pretrained.names() == sorted(ALL_SHIPPED)


@every_shipped
def test_shipped_files_resolve_through_the_installed_package(name):
  folder = importlib.resources.files("pathology_fix.pretrained") / name
  files = {p.name for p in folder.iterdir()}
  params = [f for f in files if f.startswith("params_")]
  assert len(params) == 1 and {"lopt.gin", "record.json"} <= files, files
  record = json.loads((folder / "record.json").read_text())
  for key in ("command", "seed", "meta_training_minutes", "outer_steps",
              "git_commit", "heldout"):
    assert key in record, key
  assert record["license"] == pretrained.LICENSE == "Apache-2.0"
  assert record["params_file"] == params[0]
  assert record["command"] == f"python -m experiments.pretrain {name}"
  assert record["heldout"]["per_task"], record["heldout"]
  for snap in record.get("snapshots", []):
    assert (folder / "snapshots" / f"params_{snap['step']}").is_file(), snap


def _files(root: pathlib.Path):
  return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@every_shipped
def test_setup_ships_the_pretrained_files(name, tmp_path):
  # What an install gets: setuptools' build_py output (no network needed).
  subprocess.run([sys.executable, "setup.py", "-q", "build_py",
                  "--build-lib", str(tmp_path)], cwd=cli_utils.REPO,
                 check=True, capture_output=True, timeout=300)
  shipped = pathlib.Path(pretrained.path(name))
  built = tmp_path / "pathology_fix" / "pretrained" / name
  assert _files(built) == _files(shipped)
  for p in _files(shipped):
    assert (built / p).read_bytes() == (shipped / p).read_bytes()


@every_shipped
def test_load_gives_the_architecture_and_a_trained_theta(name):
  learned_opt, theta = pretrained.load(name)
  assert type(learned_opt).__name__ == ALL_SHIPPED[name][0]
  fresh = learned_opt.init(jax.random.PRNGKey(0))
  assert (jax.tree_util.tree_structure(theta)
          == jax.tree_util.tree_structure(fresh))
  for a, b in zip(jax.tree_util.tree_leaves(theta),
                  jax.tree_util.tree_leaves(fresh)):
    assert a.shape == b.shape and bool(jnp.all(jnp.isfinite(a)))


@every_shipped
def test_optax_adapter_matches_lo_opt_fn_over_100_steps(name):
  learned_opt, theta = pretrained.load(name)
  lo_params, loss_fn, batches = _train_lo(learned_opt, theta)
  optax_params = _train_optax(pretrained.optax(name, NUM_STEPS))
  _assert_same_params(optax_params, lo_params)
  start, _, _ = _problem()
  # It trained, and the result depends on theta (another theta differs).
  assert (_mean_loss(lo_params, loss_fn, batches)
          < 0.9 * _mean_loss(start, loss_fn, batches))
  other = learned_opt.init(jax.random.PRNGKey(1))
  other_params = _train_optax(
      pretrained.lopt_to_optax(learned_opt, other, NUM_STEPS))
  assert not np.allclose(other_params["w1"], lo_params["w1"], atol=1e-4)


def test_lopt_to_optax_works_for_any_learned_optimizer():
  learned_opt = mlp_lopt.MLPLOpt(hidden_size=8, hidden_layers=1)
  theta = learned_opt.init(jax.random.PRNGKey(3))
  lo_params, _, _ = _train_lo(learned_opt, theta)
  tx = pretrained.lopt_to_optax(learned_opt, theta, NUM_STEPS)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  _assert_same_params(_train_optax(tx), lo_params)


def test_progress_adam_saved_like_a_shipped_optimizer_runs_as_optax(
    tmp_path, monkeypatch):
  """ProgressAdam in a folder laid out the way experiments.pretrain writes."""
  import flax.serialization
  import gin
  from experiments import pretrain
  from learned_optimization.outer_trainers import gradient_learner
  from pathology_fix.optimizers import progress_lopt
  folder = tmp_path / "progress_test"
  folder.mkdir()
  gin.clear_config()
  try:  # lopt.gin from the meta-training run's gin bindings
    gin.parse_config(["ProgressAdam.initial_learning_rate = 0.03",
                      "ProgressAdam.knots = (0.0, 0.5, 1.0)"])
    (folder / "lopt.gin").write_text(pretrain.architecture_gin("ProgressAdam"))
  finally:
    gin.clear_config()
  theta = {"log_lr": jnp.asarray([0.05, -0.1, -0.3], jnp.float32),
           "beta1": jnp.asarray(0.02, jnp.float32),
           "beta2": jnp.asarray(-0.05, jnp.float32),
           "weight_decay": jnp.asarray(0.05, jnp.float32)}
  # params_<N> as checkpoints.save_checkpoint writes it.
  (folder / "params_7").write_bytes(flax.serialization.to_bytes(
      gradient_learner.ParameterCheckpoint(theta, "no_gen_id", 7)))
  (folder / "record.json").write_text(json.dumps({"name": "progress_test"}))
  monkeypatch.setattr(pretrained, "_root", lambda: str(tmp_path))

  learned_opt, loaded = pretrained.load("progress_test")
  assert isinstance(learned_opt, progress_lopt.ProgressAdam)
  assert learned_opt.knots == (0.0, 0.5, 1.0)
  assert learned_opt.initial_learning_rate == 0.03
  for key, value in theta.items():
    np.testing.assert_array_equal(loaded[key], value)
  lo_params, loss_fn, batches = _train_lo(learned_opt, theta)
  _assert_same_params(
      _train_optax(pretrained.optax("progress_test", NUM_STEPS)), lo_params)
  start, _, _ = _problem()
  assert (_mean_loss(lo_params, loss_fn, batches)
          < 0.9 * _mean_loss(start, loss_fn, batches))
  # The run length reaches the schedule: the same steps, declared as half of
  # a run twice as long, follow the first half of the curve instead.
  longer = _train_optax(pretrained.optax("progress_test", 2 * NUM_STEPS))
  assert not np.allclose(longer["w1"], lo_params["w1"], atol=1e-4)


def test_bad_input_names_the_parameter():
  with pytest.raises(ValueError, match="pretrained.name 'nope'.*shipped"):
    pretrained.load("nope")
  learned_opt, theta = pretrained.load(SHIPPED)
  with pytest.raises(ValueError, match="lopt_to_optax.num_steps"):
    pretrained.lopt_to_optax(learned_opt, theta, 0)
  with pytest.raises(TypeError, match="lopt_to_optax.learned_opt"):
    pretrained.lopt_to_optax(optax.adam(1e-3), theta, 10)
  tx = pretrained.lopt_to_optax(learned_opt, theta, 10)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match="loss is None"):
    tx.update({"w": jnp.ones(3)}, state, params)
  with pytest.raises(ValueError, match="params is None"):
    tx.update({"w": jnp.ones(3)}, state, loss=1.0)


def test_architecture_file_rejects_other_configurables(tmp_path):
  path = tmp_path / "lopt.gin"
  path.write_text("Adam.learning_rate = 0.1\n")
  with pytest.raises(ValueError, match="must bind exactly one of"):
    pretrained.read_architecture(str(path))
  path.write_text("scope/MLPLOpt.hidden_size = 4\n")
  with pytest.raises(ValueError, match="only unscoped bindings"):
    pretrained.read_architecture(str(path))


def _recipe_gin(name):
  import gin
  from experiments import pretrain
  recipe = pretrain.RECIPES[name]
  gin.clear_config()
  gin.add_config_file_search_path(str(cli_utils.REPO / "gin_configs"))
  gin.parse_config_file(str(cli_utils.REPO / recipe["config"]))
  return pretrain, recipe


@pytest.mark.slow
@every_shipped
def test_shipped_heldout_results_reproduce_the_record(name):
  """The shipped theta, rerun through today's code, gives the record's table."""
  import gin
  pretrain, recipe = _recipe_gin(name)
  record = pretrained.record(name)
  try:
    heldout, step = pretrain.evaluate(pretrained.path(name), recipe,
                                      False, record["seed"])
  finally:
    gin.clear_config()
  assert f"params_{step}" == record["params_file"]
  assert [r["task"] for r in heldout["per_task"]] == [
      r["task"] for r in record["heldout"]["per_task"]]
  for now, then in zip(heldout["per_task"], record["heldout"]["per_task"]):
    for key, value in then.items():
      if key != "task":
        assert math.isclose(now[key], value, rel_tol=1e-3), (now, then)


@pytest.mark.slow
def test_pretrain_quick_writes_a_loadable_optimizer(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.pretrain", SHIPPED, "--quick",
       "--out_dir", str(out), "--run_dir", str(tmp_path / "run")],
      cwd=cli_utils.REPO, env=cli_utils.subprocess_env(), capture_output=True,
      text=True, timeout=cli_utils.TIMEOUT_S)
  assert proc.returncode == 0, cli_utils.describe(proc)
  assert "[pretrain] held-out wins" in proc.stdout
  record = json.loads((out / "record.json").read_text())
  assert record["outer_steps"] == 3 and record["params_file"] == "params_3"
  assert record["command"].endswith("--quick")
  assert record["license"] == pretrained.LICENSE
  learned_opt = pretrained.read_architecture(str(out / "lopt.gin"))
  shipped_opt, _ = pretrained.load(SHIPPED)
  assert type(learned_opt) is type(shipped_opt)
  assert len(record["heldout"]["per_task"]) == 2


@every_shipped
def test_shipped_optimizer_beats_adam_1e3_on_two_heldout_tasks(name):
  """The headline optimizer's regression check: 2 new held-out tasks, 300 steps, test loss.

  The record's first two held-out class subsets (its seed), with fresh
  inits; against LO's own Adam(1e-3), same data and keys.
  """
  from learned_optimization.optimizers import base as opt_base
  from pathology_fix.cli import demo
  from pathology_fix.runtime import evaluation
  record = pretrained.record(name)
  keys = jax.random.split(jax.random.PRNGKey(record["heldout"]["seed"]),
                          record["heldout"]["per_task"].__len__() + 1)
  tasks = demo.heldout_tasks(keys[1:3], num_classes_per_task=3,
                             architecture="mlp2x32", image_size=8,
                             batch_size=ALL_SHIPPED[name][1])()
  learned_opt, theta = pretrained.load(name)
  result = evaluation.meta_test(
      tasks, learned_opt, {"learned": theta, "adam": opt_base.Adam(1e-3)},
      300, keys[0])
  for task in tasks:
    rows = {r["name"]: r["final_test_loss"] for r in result.per_task
            if r["task"] == task.name}
    assert rows["learned"] < rows["adam"], (task.name, rows)


@pytest.mark.slow
def test_e5_headline_of_a_shipped_optimizer_writes_the_issue_keys(tmp_path):
  """E5 --pretrained (quick): the headline keys, the curve and its plot."""
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.e5_headline", "--pretrained",
       "nnadam_fmnist8", "--quick", "--out", str(tmp_path)],
      cwd=cli_utils.REPO, env=cli_utils.subprocess_env(), capture_output=True,
      text=True, timeout=cli_utils.TIMEOUT_S)
  assert proc.returncode == 0, cli_utils.describe(proc)
  results = json.loads((tmp_path / "results.json").read_text())
  for key in ("win_rate_test", "win_rate_train"):
    assert 0.0 <= results[key] <= 1.0, (key, results[key])
  ratio = results["wallclock_ratio_to_best_train_loss"]
  assert ratio is None or ratio > 0, ratio
  snapshots = pretrained.record("nnadam_fmnist8")["snapshots"]
  curve = results["win_rate_vs_minutes"]
  assert [r["minutes"] for r in curve[:-1]] == [s["minutes"] for s in snapshots]
  assert curve[-1]["label"] == "shipped"
  assert curve[-1]["win_rate_test"] == results["win_rate_test"]
  assert set(results["unseen_architectures"]) == {"conv3@8px",
                                                  "mlp3x128@14px"}
  assert (tmp_path / "win_rate_vs_minutes.png").stat().st_size > 0
