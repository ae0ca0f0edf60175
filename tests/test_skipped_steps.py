"""Outer steps where no sample is finite: skipped, counted, and bounded."""

import numpy as np

import pathology_fix  # pylint: disable=unused-import  # compat before LO
from pathology_fix.cli import train
from pathology_fix.runtime import checkpoints

import cli_utils
import diverging_task  # pylint: disable=unused-import  # registers the family

HYBRID = cli_utils.REPO / "gin_configs" / "hybrid_quadratic.gin"


def test_run_whose_inner_problems_always_diverge(tmp_path, capfd):
  run_dir = tmp_path / "run"
  status = train.execute([
      "pathology_fix.train", f"--train_log_dir={run_dir}",
      f"--config_file={HYBRID}",
      "--gin_bindings=sample_single_task_family.task_family = "
      "@DivergingQuadraticFamily()",
      "--gin_bindings=DivergingQuadraticFamily.dim = 2",
      "--gin_bindings=VariationalEstimator.unroll_length = 10",
      "--gin_bindings=resumable_local_train.max_skipped_steps = 3",
      "--gin_bindings=resumable_local_train.checkpoint_every_n_steps = 2",
      "--gin_bindings=resumable_local_train.seed = 0",
  ])
  err = capfd.readouterr().err
  assert status == 1, err
  errors = cli_utils.error_lines(err)
  assert len(errors) == 1 and "3 outer steps in a row" in errors[0], err
  assert err.count("skipped: no sample of any estimator was finite") == 1, err

  metrics = cli_utils.read_metrics(run_dir)
  assert [(m["step"], m["skipped"]) for m in metrics] == [
      (1, 1.0), (2, 1.0), (3, 1.0)]
  # Theta never moved, and what is checkpointed is the starting theta.
  assert checkpoints.checkpoint_steps(str(run_dir))[-1] == 3
  template = cli_utils.params_template(HYBRID)
  start = cli_utils.load_state(run_dir / "params_0", template).params
  last = cli_utils.load_state(run_dir / "params_3", template).params
  assert _leaves(start)
  for a, b in zip(_leaves(start), _leaves(last)):
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
