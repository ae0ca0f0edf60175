"""E7's reference gradient (ES and RP draws merged, and its own account),
its part files from separate processes, and its flags."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import e7_estimator_study as e7
from experiments.lib import estimator_study as study
from experiments.lib import estimator_study_files as files

D = 4000


def _draws(rng, g, scale, n):
  return g + scale * rng.standard_normal((n, g.size))


@pytest.fixture
def truth():
  return np.random.default_rng(0).standard_normal(D) * 0.1


def test_merge_is_closer_to_the_truth_than_either_side(truth):
  rng = np.random.default_rng(1)
  es, rp = _draws(rng, truth, 3.0, 8), _draws(rng, truth, 0.05, 6)
  mean, account = study.merged_reference(es, rp)
  err = np.linalg.norm(mean - truth)
  assert err < np.linalg.norm(rp.mean(0) - truth)
  assert err < 0.1 * np.linalg.norm(es.mean(0) - truth)
  # The stated relative stderr is the actual relative error, within 20%.
  assert account["relative_stderr"] == pytest.approx(
      err / np.linalg.norm(mean), rel=0.2)
  assert account["rp_finite_draws"] == 6


def test_consistency_matches_two_unbiased_sides_and_flags_a_biased_one(truth):
  rng = np.random.default_rng(2)
  es, rp = _draws(rng, truth, 0.4, 8), _draws(rng, truth, 0.2, 6)
  _, account = study.merged_reference(es, rp)
  c = account["consistency"]
  assert 0.3 < c["expected_if_unbiased"] < 0.95
  assert c["cosine_es_rp"] == pytest.approx(c["expected_if_unbiased"],
                                            abs=0.05)
  # RP aimed elsewhere (same noise, a bias twice as large as g): the observed
  # cosine falls well below what two unbiased estimates would give.
  bias = np.random.default_rng(3).standard_normal(D) * 0.2
  _, biased = study.merged_reference(es, rp + bias)
  c = biased["consistency"]
  assert c["cosine_es_rp"] < c["expected_if_unbiased"] - 0.2


def test_reference_is_es_alone_when_rp_draws_are_not_finite(truth):
  rng = np.random.default_rng(4)
  es, rp = _draws(rng, truth, 1.0, 4), _draws(rng, truth, 0.01, 3)
  rp[1:, 5] = np.nan  # only one finite RP draw left
  mean, account = study.merged_reference(es, rp)
  np.testing.assert_allclose(mean, es.mean(0), rtol=1e-6)
  assert account["rp_finite_draws"] == 1


def test_collect_parts_merges_thetas_and_names_unfinished_ones(tmp_path):
  for label, complete in (("init", True), ("mid", False)):
    files.part_file(tmp_path, "part1", label).write_text(
        '{"theta": "%s", "complete": %s, "seconds": 1.0, "reference": '
        '{"relative_stderr": 0.1}, "rows": [{"theta": "%s", "k": 10}]}'
        % (label, str(complete).lower(), label))
  numbers = {}
  files.collect_parts(tmp_path, numbers)
  assert [r["theta"] for r in numbers["gradient_quality"]] == ["init", "mid"]
  assert set(numbers["reference"]) == {"init", "mid"}
  assert numbers["part1_incomplete"] == ["mid"]


def test_collect_parts_orders_estimators_and_names_unfinished_ones(
    tmp_path):
  for name, complete in (("TruncatedGrad", True), ("HybridRPES", False)):
    files.part_file(tmp_path, "part2", name).write_text(
        '{"estimator": "%s", "complete": %s, "runs": [{"meta_test": [1.0]}]}'
        % (name, str(complete).lower()))
  numbers = {"config": {"estimators": ["TruncatedGrad"]},
             "meta_training": {"stale": []}}
  files.collect_parts(tmp_path, numbers)
  assert list(numbers["meta_training"]) == ["HybridRPES", "TruncatedGrad"]
  assert numbers["estimators"] == numbers["config"]["estimators"] == [
      "HybridRPES", "TruncatedGrad"]
  assert numbers["part2_incomplete"] == ["HybridRPES"]
  assert numbers["gradient_quality"] == [] and numbers["reference"] == {}


def test_results_json_without_part2_files_keeps_its_runs(tmp_path):
  numbers = {"config": {}, "meta_training": {"TruncatedES": [{}]}}
  files.collect_parts(tmp_path, numbers)
  assert numbers["meta_training"] == {"TruncatedES": [{}]}


@pytest.mark.parametrize("argv,message", [
    (["--theta", "mid"], "--theta and --resume need --quality_only"),
    (["--resume"], "--theta and --resume need --quality_only"),
    (["--quality_only", "--theta", "end"], "invalid choice: 'end'"),
    (["--estimator", "PES"], "invalid choice: 'PES'"),
    (["--quality_only", "--estimator", "TruncatedGrad"],
     "--quality_only reuses part 2's"),
    (["--train_minutes", "0"], "--train_minutes must be > 0, got 0.0"),
])
def test_bad_theta_flags_are_errors_naming_the_flag(argv, message, capsys):
  with pytest.raises(SystemExit):
    e7.main(argv + ["--out", "/nonexistent/e7"])
  assert message in capsys.readouterr().err


@pytest.mark.slow
def test_part2_in_two_processes_sharing_one_folder(tmp_path):
  """Each process writes its own estimators' file; the last one to end
  finishes the tables with both, in ESTIMATOR_NAMES order."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(repo))
  for name in ("TruncatedGrad", "TruncatedES"):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.e7_estimator_study", "--quick",
         "--part2_only", "--estimator", name, "--train_minutes", "0.03",
         "--out", str(tmp_path)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["estimators"] == ["TruncatedES", "TruncatedGrad"]
  assert results["config"]["train_seconds"] == pytest.approx(1.8)
  assert results["part2_incomplete"] == []
  assert results["gradient_quality"] == []
  assert set(results["budget_table"][-1]["losses"]) == {"TruncatedES",
                                                        "TruncatedGrad"}
  assert (tmp_path / "meta_test_vs_minutes.png").stat().st_size > 0
  assert not (tmp_path / "gradient_quality.png").exists()
