"""`python -m pathology_fix.train` with the HybridRPES config, end to end."""

import numpy as np

import cli_utils

HYBRID_CONFIG = cli_utils.REPO / "gin_configs" / "hybrid_quadratic.gin"
DIAGNOSTICS = ("rp_weight_mean", "rp_log_var_median", "es_log_var_median",
               "rp_nonfinite", "es_nonfinite", "truncation_length", "sigma")


def test_hybrid_meta_training_lowers_the_meta_loss_and_logs_diagnostics(
    tmp_path):
  proc = cli_utils.run_train(tmp_path, "run_train.num_steps = 20",
                             config_file=HYBRID_CONFIG)
  assert proc.returncode == 0, cli_utils.describe(proc)
  rows = cli_utils.read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 21))
  losses = np.array([r["mean_loss"] for r in rows])
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.9 * losses[:5].mean(), losses
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
