"""The headline's evaluation machinery: the warmup-cosine Adam baseline,
selection by meta-validation, the unseen-task verdict and results keys."""

import json
import math
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lib import baselines
from experiments.lib import headline
from experiments.lib import selection
from experiments.lib import shipping


def _cosine_formula(t, num_steps, warmup):
  """Linear warmup from 0 to 1 over `warmup` updates, then cosine to 0."""
  if t < warmup:
    return t / warmup
  u = min(t, num_steps) - warmup
  return 0.5 * (1 + math.cos(math.pi * u / (num_steps - warmup)))


@pytest.mark.parametrize("num_steps", [1000, 100, 7])
def test_cosine_schedule_is_warmup_then_cosine_to_zero(num_steps):
  warmup = max(1, round(0.05 * num_steps))
  assert baselines.warmup_steps(num_steps) == warmup
  schedule = baselines.unit_cosine_schedule(num_steps)
  for t in range(num_steps + 3):
    assert float(schedule(t)) == pytest.approx(
        _cosine_formula(t, num_steps, warmup), abs=1e-6), t
  assert float(schedule(warmup)) == pytest.approx(1.0)
  assert float(schedule(num_steps)) == pytest.approx(0.0, abs=1e-7)


def test_cosine_adam_is_adam_at_the_scheduled_rate_with_a_vmapped_peak():
  num_steps, warmup = 40, 2
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(num_steps, 5)).astype(np.float32)
  peaks = jnp.asarray([1e-3, 0.3], jnp.float32)

  def run(lr):
    opt = baselines.cosine_adam(lr, num_steps)
    params = jnp.zeros(5)
    state = opt.init(params)
    for g in grads:
      updates, state = opt.update(jnp.asarray(g), state, params)
      params = params + updates
    return params

  got = jax.jit(jax.vmap(run))(peaks)
  for i, lr in enumerate(np.asarray(peaks, np.float64)):
    p, m, v = np.zeros(5), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads.astype(np.float64)):
      m = 0.9 * m + 0.1 * g
      v = 0.999 * v + 0.001 * g * g
      m_hat, v_hat = m / (1 - 0.9**(t + 1)), v / (1 - 0.999**(t + 1))
      rate = lr * _cosine_formula(t, num_steps, warmup)
      p = p - rate * m_hat / (np.sqrt(v_hat + 1e-8) + 1e-8)
    np.testing.assert_allclose(got[i], p, rtol=2e-4, atol=1e-7)


def test_cosine_sweep_and_the_adam_1e3_entry_of_the_grid():
  sweeps = baselines.sweeps((baselines.COSINE_ADAM,), num_steps=100)
  assert list(sweeps[baselines.COSINE_ADAM].labels) == [
      f"lr={lr:.3g}" for lr in baselines.LRS]
  assert baselines.LRS[baselines.adam_1e3_index()] == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="lacks 1e-3"):
    baselines.adam_1e3_index((1e-2, 1e-1))
  with pytest.raises(ValueError, match="num_steps"):
    baselines.warmup_steps(1)


def _evaluated(learned_final, adam_final):
  """A headline.evaluate-like dict with final test losses per task."""
  tasks, evals = len(learned_final), 3
  curves = {"Adam": np.ones((tasks, len(baselines.LRS), evals, 3)),
            "shipped": np.ones((tasks, 1, evals, 3))}
  curves["Adam"][:, baselines.adam_1e3_index(), -1, 2] = adam_final
  curves["Adam"][:, 0, -1, 2] = 0.0  # another rate: not Adam(1e-3)
  curves["shipped"][:, 0, -1, 2] = learned_final
  return {"curves": curves}


def test_beats_adam_1e3_compares_final_test_losses_ties_counting():
  ev = _evaluated([0.5, 0.7, 0.9, np.nan], [0.6, 0.7, 0.8, 0.8])
  assert headline.beats_adam_1e3(ev, "shipped") == [True, True, False, False]


def _unseen(fractions_and_counts):
  return {f"family{i}": dict(beats_adam_1e3=b, num_tasks=n, win_rate_test=0.)
          for i, (b, n) in enumerate(fractions_and_counts)}


def test_an_optimizer_that_loses_to_adam_1e3_on_unseen_tasks_is_marked():
  # No worse than Adam(1e-3) on 1 of 2 and on 3 of 4 tasks: families
  # weigh equally, (0.5 + 0.75) / 2 = 62.5% < 75%; pooled 4 of 6.
  verdict = selection.unseen_verdict(_unseen([(0.5, 2), (0.75, 4)]))
  assert verdict["beats_adam_1e3"] == pytest.approx(0.625)
  assert verdict["beats_adam_1e3_pooled"] == pytest.approx(4 / 6)
  assert verdict["loses_to_adam_1e3"] is True
  assert verdict["families_below_threshold"] == ["family0"]
  record = shipping.mark({"name": "x"}, verdict)
  assert record["loses_to_adam_1e3_on_unseen"] is True
  assert "Adam(1e-3)" in record["warning"]
  assert "2 families, 6 tasks" in record["warning"]


def test_an_optimizer_no_worse_on_75_percent_is_not_marked():
  # Equal weights: (1.0 + 0.5) / 2 = 75%, the bar (pooled 9 of 10 is not
  # what counts: the 8-task family would outweigh the other).
  verdict = selection.unseen_verdict(_unseen([(1.0, 8), (0.5, 2)]))
  assert verdict["beats_adam_1e3"] == pytest.approx(0.75)
  assert verdict["loses_to_adam_1e3"] is False
  verdict_low = selection.unseen_verdict(_unseen([(0.5, 8), (1.0, 2),
                                                  (0.5, 2)]))
  assert verdict_low["loses_to_adam_1e3"] is True  # 2/3 < 75%
  record = shipping.mark({"warning": "old"}, verdict)
  assert record["loses_to_adam_1e3_on_unseen"] is False
  assert "warning" not in record
  assert shipping.mark({}, None)["loses_to_adam_1e3_on_unseen"] is None
  assert selection.unseen_verdict({})["loses_to_adam_1e3"] is None


def test_argmin_skips_non_finite_scores_and_keeps_the_first_of_ties():
  assert selection.argmin({"a": 0.3, "b": 0.1, "c": 0.1, "d": None,
                           "e": float("nan")}) == "b"
  assert selection.argmin({5: float("inf"), 10: 2.0}) == 10
  with pytest.raises(ValueError, match="no finite score"):
    selection.argmin({"a": float("nan"), "b": None})


def test_spearman_matches_a_hand_computed_value_and_scipy():
  # No ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); d = (0, -1, 1, 0).
  assert selection.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(
      1 - 6 * 2 / (4 * 15))
  assert selection.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert selection.spearman([1, 2], [1, 2]) is None
  assert selection.spearman([1, 1, 1], [1, 2, 3]) is None
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  for n in (5, 9, 30):
    x = rng.integers(0, 4, n).astype(float)  # with ties
    y = x + rng.normal(size=n)
    assert selection.spearman(x, y) == pytest.approx(
        stats.spearmanr(x, y).statistic, abs=1e-12)
  # Non-finite pairs are left out.
  assert selection.spearman([1, 2, 3, float("nan")], [1, 2, 3, 0]) == (
      pytest.approx(1.0))


def test_meta_valid_scores_are_read_from_metrics_jsonl(tmp_path):
  rows = [{"step": 0, "elapsed_time": 0.0, "meta_valid/latest": 0.5},
          {"step": 5, "elapsed_time": 30.0, "mean_loss": 1.0},
          {"step": 10, "elapsed_time": 60.0, "mean__meta_valid/latest": 0.4,
           "mean__meta_valid/ema": 0.3, "meta_valid_best": 0.3,
           "meta_valid_best_step": 10},
          {"step": 20, "elapsed_time": 90.0, "meta_valid/latest": None}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 3")
  assert selection.meta_valid_from_metrics(str(path)) == {0: 0.5, 10: 0.4}
  assert selection.meta_valid_from_metrics(str(tmp_path), "ema") == {10: 0.3}
  assert selection.best_from_metrics(str(path)) == {"score": 0.3, "step": 10}


def _fake_run(tmp_path, scores):
  """A run folder: params_<step> (ProgressAdam thetas whose first knot is
  the step) and metrics.jsonl logging `scores` ({step: meta_valid})."""
  from learned_optimization.outer_trainers import gradient_learner
  from pathology_fix.optimizers import progress_lopt
  lopt = progress_lopt.ProgressAdam()
  theta0 = lopt.init(jax.random.PRNGKey(0))
  lines = []
  for step in range(0, 35, 5):
    theta = jax.tree_util.tree_map(lambda a: np.asarray(a), theta0)
    theta["log_lr"] = np.full_like(theta["log_lr"], step)
    (tmp_path / f"params_{step}").write_bytes(flax.serialization.to_bytes(
        gradient_learner.ParameterCheckpoint(theta, "", step)))
    row = {"step": step, "elapsed_time": 6.0 * step}
    if step in scores:
      row["meta_valid/latest"] = scores[step]
    lines.append(json.dumps(row))
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  return lopt


def test_choose_theta_ships_the_argmin_of_logged_meta_validation(tmp_path):
  scores = {0: 0.9, 10: 0.5, 20: 0.3, 30: 0.4}
  lopt = _fake_run(tmp_path, scores)
  elapsed = {s: 0.1 * s for s in range(0, 35, 5)}  # minutes
  recipe = dict(selection="meta_validation", snapshot_minutes=(1, 2))
  chosen = shipping.choose_theta(str(tmp_path), 30, elapsed, lopt, recipe,
                                 quick=True)
  assert chosen["selected_by"] == selection.META_VALIDATION == (
      "meta_validation")
  assert chosen["step"] == 20 and chosen["path"].endswith("params_20")
  sel = chosen["selection"]
  assert sel["meta_valid"] == 0.3 and sel["selected_step"] == 20
  assert [c["step"] for c in sel["candidates"]] == [0, 10, 20, 30]
  assert "metrics.jsonl" in sel["source"]
  # Snapshots are drawn from the scored steps (within 0, 1 and 2 minutes).
  assert chosen["snapshot_steps"] == [0, 10, 20]
  # The limit: thetas after `last` are never candidates.
  early = shipping.choose_theta(str(tmp_path), 10, elapsed, lopt, recipe,
                                quick=True)
  assert early["step"] == 10
  final = shipping.choose_theta(str(tmp_path), 30, elapsed, lopt,
                                dict(recipe, selection="final"), quick=True)
  assert final["step"] == 30 and final["selected_by"] == "final_theta"
  assert final["selection"] is None
  theta, step = shipping.load_param_file(chosen["path"], lopt)
  assert step == 20 and float(np.asarray(theta["log_lr"])[0]) == 20.0


HEADLINE_KEYS = ("win_rate_test", "win_rate_train",
                 "wallclock_ratio_to_best_train_loss",
                 "win_rate_test_vs_cosine_adam", "unseen", "selected_by")


def _fake_evaluate(lopt, thetas, cfg, seed, specs=None, arch=None,
                   image_size=None, measure_speed=True, others=None,
                   made_tasks=None, cosine=True):
  """headline.evaluate's output from random curves (no training)."""
  del lopt, cfg, specs, arch, image_size
  names = list(thetas) + list(others or {})
  tasks = made_tasks[0] if made_tasks else ["t0", "t1", "t2", "t3"]
  rng = np.random.default_rng(seed + len(tasks) + 7 * len(names))
  sets = baselines.BASELINES + ((baselines.COSINE_ADAM,) if cosine else ())
  curves = {b: rng.uniform(0.1, 1.0, (len(tasks), len(baselines.LRS), 4, 3))
            for b in sets}
  curves.update({n: rng.uniform(0.1, 1.0, (len(tasks), 1, 4, 3))
                 for n in names})
  steps_axis = np.arange(4) * 10
  rates = {n: 100.0 for n in ("learned",) + sets}
  analyse = lambda b: headline.analysis.analyse(  # noqa: E731
      curves, names, steps_axis, rates, tasks, baselines=b)
  return dict(task_names=tasks, steps_axis=steps_axis,
              steps_per_second=rates if measure_speed else None,
              result=analyse(baselines.BASELINES),
              result_cosine=(analyse((baselines.COSINE_ADAM,)) if cosine
                             else None), curves=curves)


@pytest.fixture
def fake_headline(monkeypatch):
  """headline_report.run without training: random curves, fake scores."""
  from experiments.lib import headline_report
  from experiments.lib import unseen
  monkeypatch.setattr(headline, "evaluate", _fake_evaluate)
  monkeypatch.setattr(unseen, "family_tasks", lambda spec, n, cfg, seed: (
      [f"{spec.get('arch', spec.get('dataset'))}_{i}" for i in range(n)],
      [None] * n))
  scored = []

  def score_thetas(lopt, thetas, distribution, inner_steps, num_tasks=10,
                   seed=0):
    scored.append(list(thetas))
    return dict(scores={k: 1.0 / (i + 2) for i, k in enumerate(thetas)},
                inner_steps=inner_steps, num_tasks=num_tasks)

  monkeypatch.setattr(selection, "score_thetas", score_thetas)
  monkeypatch.setattr(selection, "distribution_from_config",
                      lambda *a: "distribution")
  return headline_report, scored


def _check_headline_keys(results):
  from experiments.lib import unseen
  for key in HEADLINE_KEYS:
    assert key in results, key
  for key in ("win_rate_test", "win_rate_train",
              "win_rate_test_vs_cosine_adam"):
    assert 0.0 <= results[key] <= 1.0, (key, results[key])
  ratio = results["wallclock_ratio_to_best_train_loss"]
  assert ratio is None or ratio > 0
  assert set(results["unseen"]) == {f for f, _ in unseen.FAMILIES}
  for family, row in results["unseen"].items():
    assert set(row) == {"win_rate_test", "beats_adam_1e3"}, family
    assert all(0.0 <= v <= 1.0 for v in row.values()), (family, row)
  # The old keys stay.
  for key in ("shipped", "per_task", "per_task_train", "chosen_lr",
              "win_rate_vs_minutes", "unseen_architectures",
              "step_ratio_to_best_train_loss", "steps_per_second"):
    assert key in results, key
  assert set(results["unseen_architectures"]) == set(unseen.ARCHITECTURES)
  assert results["win_rate_vs_minutes"][-1]["label"] == "shipped"
  assert results["win_rate_vs_minutes"][-1]["win_rate_test"] == (
      results["win_rate_test"])


def test_headline_results_carry_the_keys_and_scored_selection(
    fake_headline, tmp_path):
  headline_report, scored = fake_headline
  cfg = dict(headline_report.QUICK, unseen_tasks=3)
  assert headline_report.run("nnadam_fmnist8", True, tmp_path, 0,
                             cfg=cfg) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  _check_headline_keys(results)
  assert results["selected_by"] == "final_theta"  # the record says nothing
  mv = results["meta_validation"]
  labels = [r["label"] for r in results["win_rate_vs_minutes"]]
  assert scored == [labels]  # the record logs no scores: all scored here
  assert mv["source"] == "scored here"
  assert mv["argmin_label"] == labels[-1] == "shipped"  # 1 / (i + 2)
  heldout = [r["heldout_mean_final_test_loss"] for r in mv["per_theta"]]
  assert mv["spearman_vs_heldout_test_loss"] == pytest.approx(
      selection.spearman([1.0 / (i + 2) for i in range(len(labels))],
                         heldout))
  assert results["unseen_verdict"]["num_tasks"] == 3 * 4
  assert results["unseen_verdict"]["num_families"] == 4
  for png in ("win_rate_vs_minutes.png", "meta_valid_vs_heldout.png"):
    assert (tmp_path / png).stat().st_size > 0, png


def test_headline_takes_logged_scores_from_the_record_or_metrics(
    fake_headline, tmp_path, monkeypatch):
  headline_report, scored = fake_headline
  from pathology_fix import pretrained
  rec = dict(pretrained.record("nnadam_fmnist8"))
  scores = {s["step"]: 0.5 - 0.01 * i for i, s in enumerate(rec["snapshots"])}
  rec["snapshots"] = [dict(s, meta_valid=scores[s["step"]])
                      for s in rec["snapshots"]]
  rec.update(selected_by="meta_validation",
             selection=dict(kind="latest", meta_valid=0.2, candidates=[]))
  monkeypatch.setattr(headline_report.pretrained, "record", lambda n: rec)
  for sub in "abc":
    (tmp_path / sub).mkdir()
  headline_report.run("nnadam_fmnist8", True, tmp_path / "a", 0)
  results = json.loads((tmp_path / "a" / "results.json").read_text())
  assert not scored
  assert results["selected_by"] == "meta_validation"
  mv = results["meta_validation"]
  assert mv["source"] == "record"
  assert [r["meta_valid"] for r in mv["per_theta"]] == (
      list(scores.values()) + [0.2])
  assert mv["argmin_label"] == "shipped" and mv["shipped_is_argmin"]
  # A run's metrics.jsonl instead: scores by outer step.
  metrics = tmp_path / "metrics.jsonl"
  steps = [s["step"] for s in rec["snapshots"]] + [rec["outer_steps"]]
  metrics.write_text("".join(json.dumps({"step": s, "meta_valid/latest": 0.1
                                         + 0.01 * i}) + "\n"
                             for i, s in enumerate(steps)))
  headline_report.run("nnadam_fmnist8", True, tmp_path / "b", 0,
                      metrics=str(metrics))
  mv = json.loads((tmp_path / "b" / "results.json").read_text())[
      "meta_validation"]
  assert mv["source"] == "metrics.jsonl" and not scored
  assert mv["argmin_label"] == "0 min" and not mv["shipped_is_argmin"]
  # A theta without a logged score: every theta is scored here instead.
  metrics.write_text(json.dumps({"step": 0, "meta_valid/latest": 0.1}))
  headline_report.run("nnadam_fmnist8", True, tmp_path / "c", 0,
                      metrics=str(metrics))
  assert len(scored) == 1


def test_e5_headline_flags_give_one_error_line(capsys):
  from experiments import e5_headline
  for argv, flag in ((["--quick", "--score_meta_valid"], "--score_meta_valid"),
                     (["--pretrained", "nnadam_fmnist8", "--meta_valid",
                       "/nonexistent/metrics.jsonl"], "--meta_valid"),
                     (["--pretrained", "nope"], "--pretrained")):
    with pytest.raises(SystemExit) as e:
      e5_headline.main(argv)
    assert e.value.code == 2
    errors = [l for l in capsys.readouterr().err.splitlines()
              if "error:" in l]
    assert len(errors) == 1 and flag in errors[0], errors


@pytest.mark.slow
def test_a_tiny_headline_run_writes_every_headline_key(tmp_path):
  """E5 --pretrained at toy sizes: the keys, the fractions, both plots."""
  from experiments.lib import headline_report
  from experiments.lib import unseen
  from pathology_fix import pretrained
  name = "nnadam_fmnist8"
  cfg = dict(headline_report.QUICK, inner_steps=20, eval_every=10,
             num_fmnist_tasks=1, num_digits_tasks=1, train_eval_examples=100,
             timing_steps=5, timing_repeats=1, unseen_tasks=1,
             meta_valid_tasks=1)
  assert headline_report.run(name, True, tmp_path, 0, cfg=cfg) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  _check_headline_keys(results)
  record = pretrained.record(name)
  assert results["selected_by"] == record.get("selected_by", "final_theta")
  # Selection shown: one meta-validation score per judged theta (scored
  # here: the record logs none), and the argmin among them.
  mv = results["meta_validation"]
  assert [r["label"] for r in mv["per_theta"]] == [
      r["label"] for r in results["win_rate_vs_minutes"]]
  assert mv["source"] == "scored here"
  scores = {r["label"]: r["meta_valid"] for r in mv["per_theta"]}
  assert mv["argmin_label"] == min(scores, key=scores.get)
  rho = mv["spearman_vs_heldout_test_loss"]
  assert rho is None or -1.0 <= rho <= 1.0
  verdict = results["unseen_verdict"]
  assert verdict["num_tasks"] == len(unseen.FAMILIES)
  for png in ("win_rate_vs_minutes.png", "meta_valid_vs_heldout.png"):
    assert (tmp_path / png).stat().st_size > 0, png
  assert "warmup-cosine Adam" in (tmp_path / "summary.md").read_text()


def test_the_progress_recipe_selects_by_meta_validation_and_cites_no_issue():
  from experiments import pretrain
  from pathology_fix import pretrained
  recipe = pretrain.RECIPES["progress_fmnist8"]
  assert recipe["config"] == "gin_configs/headline_progress_fmnist8.gin"
  assert os.path.isfile(os.path.join(pretrain.REPO, recipe["config"]))
  assert recipe["learned_optimizer"] == "ProgressAdam"
  assert recipe["learned_optimizer"] in pretrained.LEARNED_OPTIMIZERS
  assert recipe["selection"] == "meta_validation" and recipe["headline"]
  for name, r in pretrain.RECIPES.items():
    assert "issue" not in r["description"].lower(), name


@pytest.mark.slow
def test_pretrain_quick_of_the_progress_recipe_records_its_selection(
    tmp_path):
  import subprocess
  import sys
  import cli_utils
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.pretrain", "progress_fmnist8",
       "--quick", "--out_dir", str(out), "--run_dir", str(tmp_path / "run")],
      cwd=cli_utils.REPO, env=cli_utils.subprocess_env(), capture_output=True,
      text=True, timeout=3 * cli_utils.TIMEOUT_S)  # + headline tables
  assert proc.returncode == 0, cli_utils.describe(proc)
  record = json.loads((out / "record.json").read_text())
  assert record["license"] == "Apache-2.0"
  assert record["selected_by"] == "meta_validation"
  sel = record["selection"]
  scores = {c["step"]: c["meta_valid"] for c in sel["candidates"]}
  assert sel["selected_step"] == min(scores, key=scores.get)
  assert record["params_file"] == f"params_{sel['selected_step']}"
  assert (out / record["params_file"]).is_file()
  h = record["headline"]
  for key in ("win_rate_test", "win_rate_test_vs_cosine_adam", "unseen",
              "unseen_verdict", "per_task"):
    assert key in h, key
  assert isinstance(record["loses_to_adam_1e3_on_unseen"], bool)
  assert ("warning" in record) == record["loses_to_adam_1e3_on_unseen"]
  assert "issue" not in json.dumps(record).lower()


def test_headline_reuses_the_records_unseen_rows_of_the_same_config(
    fake_headline, tmp_path, monkeypatch):
  headline_report, _ = fake_headline
  from experiments.lib import unseen
  from pathology_fix import pretrained
  made = []
  monkeypatch.setattr(unseen, "evaluate_family",
                      lambda *a, **k: made.append(a) or {})
  rows = {f: dict(win_rate_test=0.5, beats_adam_1e3=1.0, num_tasks=2,
                  mean_final_test_loss=0.1,
                  best_baseline_mean_final_test_loss=0.2)
          for f, _ in unseen.FAMILIES}
  rec = dict(pretrained.record("nnadam_fmnist8"),
             headline=dict(seed=0, config=headline_report.QUICK,
                           unseen_rows=rows))
  monkeypatch.setattr(headline_report.pretrained, "record", lambda n: rec)
  for sub in ("same", "seed", "rerun"):
    (tmp_path / sub).mkdir()
  headline_report.run("nnadam_fmnist8", True, tmp_path / "same", 0)
  results = json.loads((tmp_path / "same" / "results.json").read_text())
  assert not made and results["unseen_source"].startswith("record.json")
  assert results["unseen"]["conv3@8px"] == {"win_rate_test": 0.5,
                                            "beats_adam_1e3": 1.0}
  assert results["unseen_verdict"]["loses_to_adam_1e3"] is False
  # Another seed, or --rerun_unseen: evaluated (here: fake empty rows,
  # which the report then rejects).
  with pytest.raises(KeyError):
    headline_report.run("nnadam_fmnist8", True, tmp_path / "seed", 1)
  assert len(made) == len(unseen.FAMILIES)
  made.clear()
  with pytest.raises(KeyError):
    headline_report.run("nnadam_fmnist8", True, tmp_path / "rerun", 0,
                        rerun_unseen=True)
  assert len(made) == len(unseen.FAMILIES)
