"""experiments/meta_validation_study.py: saved thetas on meta-validation and
held-out tasks, the latest / best / EMA marks and the rank correlation."""

import json
import subprocess
import sys

import numpy as np
import pytest

import cli_utils
from experiments import meta_validation_study as study
from pathology_fix.runtime import theta_averaging

DEMO = cli_utils.REPO / "gin_configs" / "demo.gin"
TINY_RUN = ("run_train.num_steps = 2",
            "resumable_local_train.checkpoint_every_n_steps = 1",
            "VariationalEstimator.num_tasks = 6",
            "LinearTruncationCurriculum.k_max = 10",
            "ConstantTruncationSchedule.total_length = 40",
            "VariationalEstimator.random_initial_iteration_offset = 40")


def test_ema_over_saved_thetas_equals_the_runtime_ema():
  thetas = [{"w": np.full(3, float(i))} for i in range(5)]
  ema = theta_averaging.ThetaEMA(0.9 ** 5)
  state = ema.init(thetas[0])
  for t in thetas[1:]:
    state = ema.update(state, t)
  got = study.ema_over_saved(thetas, 0.9 ** 5)
  np.testing.assert_allclose(got["w"], state.average["w"], rtol=1e-6)
  # Between the first and the last, weighted towards the last.
  assert 2.0 < float(got["w"][0]) < 4.0
  assert study.save_interval([0, 5, 10, 15, 17]) == 5


def test_rows_are_marked_latest_best_and_ema():
  rows = [dict(step=s, meta_valid=v, kind="saved")
          for s, v in ((0, 3.0), (5, 1.0), (10, float("nan")), (15, 2.0))]
  rows.append(dict(step=15, meta_valid=0.5, kind="ema"))
  marked = study.mark_rows(rows)
  assert [r["kind"] for r in rows] == ["saved", "best", "saved", "latest",
                                       "ema"]
  assert (marked["best"]["step"], marked["latest"]["step"],
          marked["ema"]["kind"]) == (5, 15, "ema")


@pytest.mark.slow
def test_quick_study_on_a_tiny_run(tmp_path):
  run_dir = tmp_path / "run"
  proc = cli_utils.run_train(run_dir, *TINY_RUN, config_file=DEMO)
  assert proc.returncode == 0, cli_utils.describe(proc)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.meta_validation_study",
       "--run_dir", str(run_dir), "--quick", "--out", str(out)],
      cwd=cli_utils.REPO, env=cli_utils.subprocess_env(), capture_output=True,
      text=True, timeout=cli_utils.TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  rows = results["thetas"]
  assert [r["step"] for r in rows] == [0, 1, 2, 2]
  kinds = [r["kind"] for r in rows]
  assert kinds == ["saved", *kinds[1:3], "ema"]
  assert {"latest", "best"} <= set("+".join(kinds).split("+"))
  for r in rows:
    assert set(r) == {"step", "minutes", "meta_valid", "heldout_mean_test",
                      "kind"}
    assert np.isfinite(r["meta_valid"]) and np.isfinite(r["heldout_mean_test"])
  assert rows[0]["minutes"] == 0 < rows[1]["minutes"] <= rows[2]["minutes"]
  assert results["rank_correlation"] is None or (
      -1 <= results["rank_correlation"] <= 1)
  # demo.gin saves no EMA: the study says it averaged the saved thetas.
  assert "EMA over the 3 saved thetas" in results["setup"]["ema"]
  summary = (out / "summary.md").read_text()
  assert "Spearman" in summary and "(the run saved no EMA)" in summary
  assert 0 < (out / "curves.png").stat().st_size < 200_000
