"""`python -m pathology_fix.train` with the HybridRPES config, end to end."""

import jax
import jax.numpy as jnp
import numpy as np

import cli_utils

HYBRID_CONFIG = cli_utils.REPO / "gin_configs" / "hybrid_quadratic.gin"
DIAGNOSTICS = ("rp_weight_mean", "rp_log_var_median", "es_log_var_median",
               "rp_nonfinite", "es_nonfinite", "truncation_length", "sigma")


def _meta_loss(theta, num_tasks=16, num_steps=200, seed=1234):
  """Mean inner training loss of MLPLOpt(theta) over full 200-step runs.

  Evaluated on quadratics drawn with a key that training never sees, so it
  measures the learned optimizer rather than where the truncated unrolls of
  the training run happened to be (their `mean_loss` rises and falls with the
  position in the inner trajectory).
  """
  from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-import-not-at-top
  from learned_optimization.tasks import quadratics  # pylint: disable=g-import-not-at-top
  opt = mlp_lopt.MLPLOpt(hidden_size=32, hidden_layers=1).opt_fn(theta)
  family = quadratics.FixedDimQuadraticFamily(10)

  def run(key):
    cfg_key, init_key, data_key = jax.random.split(key, 3)
    task = family.task_fn(family.sample(cfg_key))
    state = opt.init(task.init(init_key), num_steps=num_steps)

    def step(state, key):
      loss, grad = jax.value_and_grad(task.loss)(opt.get_params(state), key,
                                                 None)
      return opt.update(state, grad, loss=loss), loss

    _, losses = jax.lax.scan(step, state, jax.random.split(data_key, num_steps))
    return losses.mean()

  keys = jax.random.split(jax.random.PRNGKey(seed), num_tasks)
  return float(jnp.mean(jax.jit(jax.vmap(run))(keys)))


def test_hybrid_meta_training_lowers_the_meta_loss_and_logs_diagnostics(
    tmp_path):
  proc = cli_utils.run_train(tmp_path, "run_train.num_steps = 20",
                             "resumable_local_train.seed = 0",
                             config_file=HYBRID_CONFIG)
  assert proc.returncode == 0, cli_utils.describe(proc)
  rows = cli_utils.read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 21))
  assert np.all(np.isfinite([r["mean_loss"] for r in rows]))
  # Seeds 0-5 measured: after/before = 0.68 to 0.79.
  template = cli_utils.params_template(HYBRID_CONFIG)
  before = _meta_loss(cli_utils.load_state(tmp_path / "params_0", template).params)
  after = _meta_loss(cli_utils.load_state(tmp_path / "params_20", template).params)
  assert after < 0.9 * before, (before, after)
  for name in DIAGNOSTICS:
    assert all(np.isfinite(r[name]) for r in rows), name
  assert {r["truncation_length"] for r in rows} == {20.0}
  assert all(0.0 <= r["rp_weight_mean"] <= 1.0 for r in rows)
  scalars = cli_utils.read_scalars(tmp_path)
  for name in DIAGNOSTICS:
    assert any(tag.endswith(name) for tag in scalars), (name, sorted(scalars))


def test_mixture_of_hybrid_and_lo_pes_runs(tmp_path):
  proc = cli_utils.run_train(
      tmp_path, "run_train.num_steps = 3",
      config_file=cli_utils.REPO / "gin_configs" / "mix_hybrid_and_lo_pes.gin")
  assert proc.returncode == 0, cli_utils.describe(proc)
  rows = cli_utils.read_metrics(tmp_path)
  assert len(rows) == 3 and all(np.isfinite(r["mean_loss"]) for r in rows)
  # Our diagnostics come from the HybridRPES half of each step.
  assert all("rp_weight_mean" in r for r in rows)
