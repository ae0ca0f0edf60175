"""Smoke tests: each experiment script runs with --quick and writes finite results.

The runs are slow (each script takes 1-3 minutes on 2 CPU cores):
`./run.sh test -m slow`. The default run only imports every script.
To cover another script, append (module, PNG names) to QUICK_SCRIPTS.
"""

import importlib
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# (script module, PNGs it must write). Extend this list for new scripts.
QUICK_SCRIPTS = [
    ("experiments.e1_chaos_toy",
     ("final_loss_vs_momentum.png", "roughness_vs_T.png")),
    ("experiments.e2_metaloss_slices", ("slices.png", "roughness_vs_T.png")),
    ("experiments.e3_truncation_bias", ("learning_rate_trajectories.png",)),
    ("experiments.e4_variance", ("variance_vs_length.png",)),
    ("experiments.e5_headline",
     ("loss_vs_steps.png", "loss_vs_time.png", "win_bars.png")),
    ("experiments.e6_ablations",
     ("meta_loss_vs_outer_step.png", "meta_loss_vs_wallclock.png")),
    ("experiments.e7_estimator_study",
     ("meta_test_vs_minutes.png", "meta_test_vs_inner_steps.png",
      "gradient_quality.png")),
    ("experiments.bench_data", ()),
    ("experiments.bench_distributed", ()),
    ("experiments.bench_headline", ()),
]
# Only stops hangs: a cold start compiles for a minute on busy cores.
TIMEOUT_S = 900


def json_numbers(tree, path="$"):
  """Yields (json path, value) for every number and null in a JSON tree.

  Booleans are not numbers here; nulls are yielded because
  common.write_results stores NaN / inf as null.
  """
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from json_numbers(v, f"{path}.{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from json_numbers(v, f"{path}[{i}]")
  elif tree is None or (isinstance(tree, (int, float)) and
                        not isinstance(tree, bool)):
    yield path, tree


def non_finite(tree):
  """JSON paths whose value is null or a non-finite number."""
  return [p for p, v in json_numbers(tree) if v is None or not math.isfinite(v)]


def test_non_finite_walks_nested_json():
  tree = {"a": [1, 2.5, {"b": None}], "c": {"d": True, "e": float("inf")},
          "f": "text"}
  assert non_finite(tree) == ["$.a[2].b", "$.c.e"]
  assert [p for p, _ in json_numbers(tree)] == [
      "$.a[0]", "$.a[1]", "$.a[2].b", "$.c.e"]


class _StopBeforeWork(Exception):
  pass


@pytest.mark.parametrize("module", [m for m, _ in QUICK_SCRIPTS])
def test_script_imports_and_parses_its_flags(module, monkeypatch):
  script = importlib.import_module(module)
  seen = {}

  def results_dir(name, out):
    seen.update(name=name, out=out)
    raise _StopBeforeWork  # main() asks for its folder before any work

  monkeypatch.setattr(script.common, "results_dir", results_dir)
  with pytest.raises(_StopBeforeWork):
    script.main(["--quick", "--out", "/nonexistent/results"])
  assert seen == {"name": script.NAME, "out": "/nonexistent/results"}


@pytest.mark.slow
@pytest.mark.parametrize("module,pngs", QUICK_SCRIPTS,
                         ids=[m for m, _ in QUICK_SCRIPTS])
def test_quick_mode_writes_plots_and_finite_results(module, pngs, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, "-m", module, "--quick", "--out", str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for png in pngs:
    path = tmp_path / png
    assert path.is_file(), f"{png} missing"
    assert 0 < path.stat().st_size < 200_000, f"{png}: {path.stat().st_size} B"
  assert (tmp_path / "summary.md").read_text().strip()
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["mode"] == "quick"
  assert list(json_numbers(results))
  bad = non_finite(results)
  assert not bad, f"non-finite numbers: {bad[:10]}"


def test_stack_curves_puts_names_and_splits_on_their_axes():
  # E5 / E6 read meta_test's curves as [tasks, names, evals, splits].
  from experiments.lib import analysis  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  class Result:
    curves = {n: {f"{s}_loss": np.random.default_rng(i * 10 + j).random(
        (2, 5)) for j, s in enumerate(("train", "test"))}
              for i, n in enumerate(("a", "b", "c"))}

  out = analysis.stack_curves(Result, ["c", "a"], ("test", "train"))
  assert out.shape == (2, 2, 5, 2)
  for h, name in enumerate(["c", "a"]):
    for k, split in enumerate(("test", "train")):
      np.testing.assert_array_equal(out[:, h, :, k],
                                    Result.curves[name][f"{split}_loss"])
