"""`python -m pathology_fix.demo` (`./run.sh demo`), shortened to 3 steps."""

import json
import math
import subprocess
import sys

import cli_utils
import numpy as np
import pytest


def test_demo_trains_then_compares_thetas_on_heldout_classes(tmp_path):
  log_dir = tmp_path / "demo"
  proc = subprocess.run(
      [sys.executable, "-m", "pathology_fix.demo", "--train_log_dir",
       str(log_dir), "--num_steps", "3"],
      cwd=cli_utils.REPO, env=cli_utils.subprocess_env(), capture_output=True,
      text=True, timeout=cli_utils.TIMEOUT_S)
  assert proc.returncode == 0, cli_utils.describe(proc)
  # demo.gin includes hybrid_quadratic.gin: gin's package-resource probe for
  # it must not log an ERROR.
  assert "Path not found" not in proc.stderr, proc.stderr[-2000:]
  assert [r["step"] for r in cli_utils.read_metrics(log_dir)] == [1, 2, 3]
  # The demo's config turns meta-validation on; it prints the curve.
  assert "Meta-validation (fixed tasks" in proc.stdout, proc.stdout[-2000:]
  assert "(params_best)" in proc.stdout
  assert (log_dir / "params_best").is_file()
  assert (log_dir / "params_ema").is_file()

  heldout = json.loads((log_dir / "heldout_eval.json").read_text())
  assert heldout["setup"]["initial_params"] == "params_0"
  assert heldout["setup"]["trained_params"] == "params_3"
  assert len(heldout["setup"]["tasks"]) == 4
  # Held-out classes only: task names end in their class ids.
  for name in heldout["setup"]["tasks"]:
    assert set(name.rsplit("_c", 1)[1]) <= set("56789"), name
  keys = {"train_loss_mean", "final_train_loss", "final_outer_valid_loss",
          "final_test_loss"}
  for which in ("initial", "trained", "adam_1e-3", "adam_tuned"):
    assert set(heldout[which]) == keys, which
    assert all(math.isfinite(v) for v in heldout[which].values()), which
  assert heldout["initial"] != heldout["trained"]  # theta moved in 3 steps

  # Adam beside the thetas: 1e-3, and per task the grid's rate with the
  # lowest validation loss (checked against the per-task rows' own grid).
  lrs = heldout["adam"]["learning_rates"]
  assert len(lrs) == 11 and math.isclose(lrs[0], 1e-4)
  assert math.isclose(lrs[-1], 10.0) and any(
      math.isclose(lr, 1e-3) for lr in lrs)
  assert heldout["adam"]["tuned_on"] == "final_outer_valid_loss"
  rows = heldout["per_task"]
  tuned_lrs = heldout["adam"]["tuned_learning_rate_per_task"]
  assert sorted(tuned_lrs) == sorted(heldout["setup"]["tasks"])
  for task in heldout["setup"]["tasks"]:
    mine = {r["name"]: r for r in rows if r["task"] == task}
    assert set(mine) == {"initial", "trained", "adam_1e-3", "adam_tuned"}
    assert math.isclose(mine["adam_1e-3"]["learning_rate"], 1e-3, rel_tol=1e-6)
    assert mine["adam_tuned"]["learning_rate"] == tuned_lrs[task]
    # The tuned rate never does worse on validation than 1e-3 (in the grid).
    assert (mine["adam_tuned"]["final_outer_valid_loss"]
            <= mine["adam_1e-3"]["final_outer_valid_loss"])
  for which in ("adam_1e-3", "adam_tuned"):
    assert math.isclose(heldout[which]["final_test_loss"], sum(
        r["final_test_loss"] for r in rows if r["name"] == which) / 4)
  assert "Adam tuned" in proc.stdout and "Adam 1e-3" in proc.stdout

  png = log_dir / "meta_loss.png"
  assert png.is_file() and png.stat().st_size > 0
  assert f"held-out results: {log_dir}/heldout_eval.json" in proc.stdout
  assert f"plot:             {png}" in proc.stdout


@pytest.mark.slow
def test_heldout_comparison_matches_adam_run_rate_by_rate(monkeypatch):
  """Adam rows against LO's own Adam(lr) entries of `meta_test`, tuned by hand."""
  import jax
  from learned_optimization.learned_optimizers import mlp_lopt
  from learned_optimization.optimizers import base as opt_base
  from pathology_fix.cli import demo
  from pathology_fix.runtime import evaluation

  lrs = (1e-4, 1e-3, 1e-1)
  monkeypatch.setattr(demo, "ADAM_LRS", lrs)
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  make_tasks = demo.heldout_tasks(keys[1:], architecture="mlp2x32",
                                  image_size=8, batch_size=32)
  lopt = mlp_lopt.MLPLOpt(hidden_size=8, hidden_layers=1)
  got = demo.heldout_comparison(make_tasks, lopt,
                                {"theta": lopt.init(keys[0])}, 20, keys[0])
  ref = evaluation.meta_test(make_tasks(), None, {
      lr: opt_base.Adam(lr) for lr in lrs}, 20, keys[0])
  for task in {r["task"] for r in ref.per_task}:
    by_lr = {r["name"]: r for r in ref.per_task if r["task"] == task}
    mine = {r["name"]: r for r in got["per_task"] if r["task"] == task}
    best = min(lrs, key=lambda lr: by_lr[lr]["final_outer_valid_loss"])
    assert mine["adam_tuned"]["learning_rate"] == float(np.float32(best))
    for name, lr in (("adam_1e-3", 1e-3), ("adam_tuned", best)):
      for metric in ("final_test_loss", "final_outer_valid_loss",
                     "train_loss_mean"):
        assert math.isclose(mine[name][metric], by_lr[lr][metric],
                            rel_tol=1e-5, abs_tol=1e-6), (task, name, metric)
