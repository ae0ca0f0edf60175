"""`python -m pathology_fix.demo` (the README's main job), shortened to 3 steps."""

import json
import math
import subprocess
import sys

import cli_utils


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

  heldout = json.loads((log_dir / "heldout_eval.json").read_text())
  assert heldout["setup"]["initial_params"] == "params_0"
  assert heldout["setup"]["trained_params"] == "params_3"
  assert len(heldout["setup"]["tasks"]) == 4
  # Held-out classes only: task names end in their class ids.
  for name in heldout["setup"]["tasks"]:
    assert set(name.rsplit("_c", 1)[1]) <= set("56789"), name
  keys = {"train_loss_mean", "final_train_loss", "final_outer_valid_loss",
          "final_test_loss"}
  for which in ("initial", "trained"):
    assert set(heldout[which]) == keys
    assert all(math.isfinite(v) for v in heldout[which].values())
  assert heldout["initial"] != heldout["trained"]  # theta moved in 3 steps

  png = log_dir / "meta_loss.png"
  assert png.is_file() and png.stat().st_size > 0
  assert f"held-out results: {log_dir}/heldout_eval.json" in proc.stdout
  assert f"plot:             {png}" in proc.stdout
