"""What `experiments.pretrain` needs to ship a theta: choosing it, its tables.

Choosing (`choose_theta`), among the thetas a meta-training run saved within
its time limit:
- "final": the last one (selected_by "final_theta");
- "meta_validation": the argmin of the meta-validation score. Scores are the
  run's own (metrics.jsonl's `meta_valid/latest` per outer step, and its
  `params_best` with the logged `meta_valid_best`) when it logged any;
  otherwise up to `selection_candidates` saved thetas (evenly spaced, plus
  the snapshots and the last) are scored after training with
  `MetaValidation.evaluate` on the run's own meta-training distribution.
  Held-out tasks are never looked at.

Tables (`headline_tables`): the chosen theta on E5's held-out tasks against
both tuned baseline sets, and on the unseen task families, with the verdict
whether it loses to Adam(1e-3) there (`selection.unseen_verdict`).
"""

import os
from typing import Any, Dict, List, Optional, Sequence

from experiments.lib import selection

PARAMS_BEST = "params_best"


def load_param_file(path: str, lopt):
  """(theta, step) of a ParameterCheckpoint file (e.g. params_best)."""
  import jax  # pylint: disable=g-import-not-at-top
  from learned_optimization import checkpoints  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  template = gradient_learner.ParameterCheckpoint(
      lopt.init(jax.random.PRNGKey(0)), "", 0)
  loaded = checkpoints.load_state(path, template)
  return loaded.params, int(loaded.step)


def snapshot_steps(saved: Sequence[int], elapsed: Dict[int, float],
                   minutes: Sequence[float]) -> List[int]:
  """Per m in (0,) + minutes, the last of `saved` within m minutes of
  training (elapsed: {step: minutes}); distinct, in order."""
  out = []
  for m in (0,) + tuple(minutes):
    within = [s for s in saved if s in elapsed and elapsed[s] <= m]
    if within and max(within) not in out:
      out.append(max(within))
  return out


def _scored_after_training(run_dir, lopt, steps, recipe, quick):
  """{step: score} from MetaValidation.evaluate of params_<step>."""
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import meta_validation  # pylint: disable=g-import-not-at-top
  settings = dict(recipe, **recipe.get("quick", {})) if quick else recipe
  thetas = {str(s): checkpoints.load_params(run_dir, s, lopt)
            for s in steps}
  print(f"[pretrain] meta-validation of {len(steps)} saved thetas ...",
        flush=True)
  out = selection.score_thetas(
      lopt, thetas, meta_validation.distribution_from_gin(),
      inner_steps=settings.get("meta_valid_inner_steps", 1000),
      num_tasks=settings.get("meta_valid_tasks", 10))
  scores = {int(k): v for k, v in out.pop("scores").items()}
  return scores, out


def choose_theta(run_dir: str, last: int, elapsed: Dict[int, float],
                 lopt, recipe: Dict[str, Any], quick: bool) -> Dict[str, Any]:
  """The theta to ship and how it was chosen (see the module docstring).

  Returns {"step", "path" (its file), "selected_by", "selection" (None for
  "final"; else source, kind, candidates [{step, minutes, meta_valid}],
  selected_step, meta_valid), "snapshot_steps" (per recipe
  `snapshot_minutes`, none without), "scores" ({step: score})}.
  """
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  saved = [s for s in checkpoints.checkpoint_steps(run_dir, "params_")
           if s <= last]
  minutes = recipe.get("snapshot_minutes", ())
  snaps = snapshot_steps(saved, elapsed, minutes) if minutes else []
  params = lambda s: os.path.join(run_dir, f"params_{s}")  # noqa: E731
  how = recipe.get("selection", "final")
  if how not in ("final", "meta_validation"):
    raise ValueError(f"recipe selection {how!r}: allowed 'final', "
                     "'meta_validation'")
  if how == "final":
    return dict(step=last, path=params(last),
                selected_by=selection.FINAL_THETA, selection=None,
                snapshot_steps=snaps, scores={})
  metrics = os.path.join(run_dir, "metrics.jsonl")
  logged = (selection.meta_valid_from_metrics(metrics)
            if os.path.exists(metrics) else {})
  scores = {s: v for s, v in logged.items() if s in saved}
  scoring = None
  if scores:
    source = "metrics.jsonl (logged during meta-training)"
    snaps = (snapshot_steps(sorted(scores), elapsed, minutes) if minutes
             else [])
  else:
    source = "scored after meta-training (MetaValidation.evaluate)"
    candidates = sorted(set(selection.evenly_spaced(
        saved, recipe.get("selection_candidates", 24))) | set(snaps)
                        | {last})
    scores, scoring = _scored_after_training(run_dir, lopt, candidates,
                                             recipe, quick)
  step = selection.argmin(scores)
  chosen = dict(step=step, path=params(step), kind="latest",
                meta_valid=scores[step])
  best = (selection.best_from_metrics(metrics)
          if os.path.exists(os.path.join(run_dir, PARAMS_BEST)) and logged
          else None)
  if best is not None and best["score"] < scores[step]:
    # The run's own best (e.g. its theta average) beats every saved theta.
    _, best_step = load_param_file(os.path.join(run_dir, PARAMS_BEST), lopt)
    chosen = dict(step=best_step, path=os.path.join(run_dir, PARAMS_BEST),
                  kind="best (params_best)", meta_valid=best["score"])
  return dict(
      step=chosen["step"], path=chosen["path"],
      selected_by=selection.META_VALIDATION, snapshot_steps=snaps,
      scores=scores,
      selection=dict(
          source=source, kind=chosen["kind"], selected_step=chosen["step"],
          meta_valid=chosen["meta_valid"], scoring=scoring,
          rule="argmin of the meta-validation score (mean final loss on "
               "validation tasks from the meta-training classes); held-out "
               "tasks are not used",
          candidates=[dict(step=s, minutes=(round(elapsed[s], 2) if s in elapsed
                                             else None),
                           meta_valid=v) for s, v in sorted(scores.items())]))


def _unseen_table(row: Dict[str, Any]) -> Dict[str, Any]:
  """One unseen family's compact table for the record."""
  return dict(
      win_rate_test=row["win_rate_test"],
      beats_adam_1e3=row["beats_adam_1e3"], num_tasks=row["num_tasks"],
      per_task=[dict(task=p["task"], learned_test_loss=p["lopt_final"],
                     best_baseline_test_loss=p["baseline_final"],
                     adam_1e3_test_loss=a)
                for p, a in zip(row["per_task"],
                                row["adam_1e3_final_test_loss"])])


def headline_tables(lopt, theta, quick: bool, seed: int) -> Dict[str, Any]:
  """The shipped theta's held-out tables: E5's 16 tasks against E5's tuned
  baselines and tuned warmup-cosine Adam, and the unseen task families
  against E5's tuned baselines and Adam(1e-3); plus the unseen verdict."""
  from experiments.lib import baselines  # pylint: disable=g-import-not-at-top
  from experiments.lib import headline  # pylint: disable=g-import-not-at-top
  from experiments.lib import headline_report  # pylint: disable=g-import-not-at-top
  from experiments.lib import unseen  # pylint: disable=g-import-not-at-top
  cfg = headline_report.QUICK if quick else headline_report.FULL
  print(f"[pretrain] headline tables: E5's held-out tasks, "
        f"{cfg['inner_steps']} steps ...", flush=True)
  ev = headline.evaluate(lopt, {"shipped": theta}, cfg, seed,
                         measure_speed=False)
  row = headline.summary_row(ev, "shipped")
  e5 = ev["result"]["per_task"]["test/shipped"]
  cos = ev["result_cosine"]["per_task"]["test/shipped"]
  adam = headline.final_test_losses(ev, "Adam", baselines.adam_1e3_index())
  per_task = [dict(task=a["task"], learned_test_loss=a["lopt_final"],
                   best_baseline=a["best_baseline"],
                   best_baseline_test_loss=a["baseline_final"],
                   cosine_adam_test_loss=c["baseline_final"],
                   adam_1e3_test_loss=float(x))
              for a, c, x in zip(e5, cos, adam)]
  rows = unseen.evaluate_all(lopt, theta, cfg, seed, cfg["unseen_tasks"])
  ratio = headline.ratio_to_best_final_train_loss(ev, "shipped")
  return dict(
      tasks=f"E5's held-out tasks ({len(per_task)}), {cfg['inner_steps']} "
            "inner steps, batch 128, whole-split losses",
      seed=seed, baselines=(
          "E5's: best per task of Adam, RMSProp, SGD+momentum; and Adam "
          f"with {baselines.WARMUP_FRACTION:.0%} linear warmup + cosine decay"
          "; each tuned per task over 11 rates 1e-4..10 on inner_valid"),
      metric="final test loss (lower is better); a win is strictly lower",
      win_rate_test=row["win_rate_test"],
      win_rate_test_vs_cosine_adam=row["win_rate_test_vs_cosine_adam"],
      win_rate_train=row["win_rate_train"],
      step_ratio_to_best_train_loss=ratio["step_ratio"],
      means=row, per_task=per_task,
      unseen={f: _unseen_table(r) for f, r in rows.items()},
      unseen_verdict=selection.unseen_verdict(rows),
      # E5 --pretrained reuses these rows (same config and seed).
      config=cfg, unseen_rows=rows)


def mark(record: Dict[str, Any], verdict: Optional[Dict[str, Any]]):
  """Marks a record whose optimizer loses to Adam(1e-3) on unseen tasks:
  `loses_to_adam_1e3_on_unseen` (True / False; None when not judged) and,
  when True, a `warning` line for users."""
  loses = None if verdict is None else verdict["loses_to_adam_1e3"]
  record["loses_to_adam_1e3_on_unseen"] = loses
  if loses:
    record["warning"] = (
        "Loses to plain Adam(1e-3) on tasks never seen in meta-training: no "
        f"worse than it on only {verdict['beats_adam_1e3']:.0%} of the "
        f"unseen tasks ({verdict['num_families']} families, "
        f"{verdict['num_tasks']} tasks; bar: "
        f"{verdict['threshold']:.0%}). Prefer Adam outside the meta-training "
        "task family.")
  else:
    record.pop("warning", None)
  return record
