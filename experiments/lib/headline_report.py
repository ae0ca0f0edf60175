"""E5 --pretrained NAME: the headline table of a shipped learned optimizer.

Judges the shipped theta and its meta-training snapshots (record.json's
`snapshots`, files under <name>/snapshots/) on E5's 16 held-out tasks against
both baseline sets (E5's: best per task of Adam, RMSProp, SGD+momentum; and
warmup-cosine Adam; each tuned per task over 11 rates), and the shipped
theta on tasks it never saw (`unseen`: conv3 at 8x8, mlp3x128 at 14x14,
tabular problems). Shows whether selection by meta-validation transfers:
each judged theta's meta-validation score (from the run's metrics.jsonl, the
record, or scored here with `MetaValidation.evaluate`) against its held-out
mean test loss, with their Spearman rank correlation.

Writes results.json (top-level win_rate_test, win_rate_train,
wallclock_ratio_to_best_train_loss, win_rate_test_vs_cosine_adam, unseen,
selected_by, ...), summary.md (`headline_summary`), win_rate_vs_minutes.png
and meta_valid_vs_heldout.png.
"""

import json
import os
import time
from typing import Any, Dict, List, Optional

from experiments.lib import analysis
from experiments.lib import common
from experiments.lib import headline
from experiments.lib import headline_summary
from experiments.lib import selection
from experiments.lib import unseen
from pathology_fix import pretrained
from pathology_fix.runtime import checkpoints

FULL = dict(headline.EVAL, unseen_tasks=unseen.FULL_TASKS,
            meta_valid_tasks=10)
QUICK = dict(FULL, inner_steps=100, num_fmnist_tasks=2,
             num_digits_tasks=1, eval_every=50, train_eval_examples=500,
             timing_steps=50, timing_repeats=1, unseen_tasks=1,
             meta_valid_tasks=2)

BENCH_STEP = os.path.join(common.RESULTS, "bench_step", "results.json")


class PhaseClock:
  """Wall and process-CPU seconds per phase (CPU: all threads)."""

  def __init__(self):
    self.phases = {}
    self._wall, self._cpu = time.perf_counter(), time.process_time()

  def lap(self, phase: str):
    wall, cpu = time.perf_counter(), time.process_time()
    self.phases[phase] = dict(wall=wall - self._wall, cpu=cpu - self._cpu)
    self._wall, self._cpu = wall, cpu


def shipped_step(rec) -> int:
  return int(rec["params_file"].rsplit("_", 1)[1])


def snapshot_thetas(name, lopt):
  """({"<m> min": theta, ..., "shipped": theta}, minutes, steps): the
  snapshots in meta-training order, then the shipped theta (at the minute
  it was saved: `selected_minutes` when chosen by meta-validation)."""
  folder = pretrained.path(name)
  rec = pretrained.record(name)
  thetas, minutes, steps = {}, [], []
  for snap in rec.get("snapshots", []):
    label = f"{snap['minutes']:.0f} min"
    if label in thetas:
      label = f"{snap['minutes']:.1f} min (step {snap['step']})"
    thetas[label] = checkpoints.load_params(
        os.path.join(folder, "snapshots"), snap["step"], lopt)
    minutes.append(snap["minutes"])
    steps.append(snap["step"])
  thetas["shipped"] = pretrained.load(name)[1]
  minutes.append(rec.get("selected_minutes", rec["meta_training_minutes"]))
  steps.append(shipped_step(rec))
  return thetas, minutes, steps


def step_speed(learned_optimizer):
  """bench_step's CPU-time ratios to Adam (jitted lax.scan, interleaved)."""
  if not os.path.exists(BENCH_STEP):
    return None
  with open(BENCH_STEP) as f:
    bench = json.load(f)
  out = {}
  for t in bench["tasks"]:
    o = t["optimizers"].get(learned_optimizer)
    if o:
      out[t["task"]] = dict(cpu_ratio_to_adam=o["cpu_ratio_to_adam"],
                            wall_ratio_to_adam=o["ratio_to_adam"])
  return dict(source="experiments/results/bench_step/results.json "
                     f"({bench['config']['command']})", tasks=out)


def compared_optimizers(compare):
  """{"<class> (<run>)": (lopt, last theta)} from "CLASS=RUN_DIR" strings: a
  lever's meta-training run (`python -m pathology_fix.train`) of the
  learned optimizer CLASS (MLPLOpt: E5's 1 hidden layer of 32; others: their
  defaults)."""
  from experiments.lib import meta_training  # pylint: disable=g-import-not-at-top
  out = {}
  for spec in compare:
    cls, _, run_dir = spec.partition("=")
    if cls not in pretrained.LEARNED_OPTIMIZERS or not run_dir:
      raise ValueError(f"--compare must be CLASS=RUN_DIR with CLASS in "
                       f"{sorted(pretrained.LEARNED_OPTIMIZERS)}, got {spec!r}")
    lopt = (meta_training.make_lopt() if cls == "MLPLOpt"
            else pretrained.LEARNED_OPTIMIZERS[cls]())
    step = checkpoints.checkpoint_steps(run_dir, "params_")[-1]
    out[f"{cls} ({os.path.basename(os.path.normpath(run_dir))}, step "
        f"{step})"] = (lopt, checkpoints.load_params(run_dir, step, lopt))
  return out


def logged_meta_valid(rec, labels: List[str], steps: List[int],
                      metrics: Optional[str]) -> Dict[str, Optional[float]]:
  """{label: logged meta-validation score or None}: by outer step from the
  run's metrics.jsonl when given, else from the record (snapshots' and the
  selection's candidates' `meta_valid`); the shipped theta's own score from
  the record's selection when it has one (e.g. an averaged theta)."""
  sel = rec.get("selection") or {}
  if metrics:
    by_step = selection.meta_valid_from_metrics(metrics,
                                                sel.get("kind", "latest"))
  else:
    by_step = {int(c["step"]): c.get("meta_valid")
               for c in sel.get("candidates", []) + rec.get("snapshots", [])}
  out = {lab: by_step.get(step) for lab, step in zip(labels, steps)}
  if sel.get("meta_valid") is not None and (
      not metrics or sel.get("kind", "latest") != "latest"):
    out["shipped"] = sel["meta_valid"]
  return out


def meta_validation(rec, lopt, thetas, minutes, steps, rows, cfg,
                    metrics: Optional[str], force_score: bool):
  """Meta-validation vs held-out quality of every judged theta.

  Scores are the logged ones when every theta has one (and not
  force_score); otherwise every theta is scored here, on the recipe's
  validation tasks (`selection.score_thetas`), so all share one scale.
  """
  labels = list(thetas)
  scores = logged_meta_valid(rec, labels, steps, metrics)
  source = ("metrics.jsonl" if metrics else "record")
  scoring = None
  if force_score or any(scores[k] is None for k in labels):
    dist = selection.distribution_from_config(
        os.path.join(str(common.REPO), rec["config"]),
        os.path.join(str(common.REPO), "gin_configs"))
    print(f"[e5] meta-validation of {len(labels)} thetas on "
          f"{cfg['meta_valid_tasks']} validation tasks ...", flush=True)
    scoring = selection.score_thetas(lopt, thetas, dist, cfg["inner_steps"],
                                     cfg["meta_valid_tasks"])
    scores, source = scoring.pop("scores"), "scored here"
  heldout_loss = [r["mean_final_test_loss"] for r in rows]
  win = [r["win_rate_test"] for r in rows]
  mv = [scores[k] for k in labels]
  best = selection.argmin(dict(zip(labels, mv)))
  return dict(
      source=source, kind=(rec.get("selection") or {}).get("kind", "latest"),
      scoring=scoring,
      per_theta=[dict(label=k, step=s, minutes=m, meta_valid=v,
                      heldout_mean_final_test_loss=h, win_rate_test=w)
                 for k, s, m, v, h, w in zip(labels, steps, minutes, mv,
                                             heldout_loss, win)],
      spearman_vs_heldout_test_loss=selection.spearman(mv, heldout_loss),
      spearman_vs_win_rate_test=selection.spearman(mv, win),
      argmin_label=best, shipped_is_argmin=best == "shipped" or (
          scores[best] == scores["shipped"]))


def recorded_unseen(rec, cfg, seed) -> Optional[Dict[str, Any]]:
  """The unseen-task rows `experiments.pretrain` stored in the record for
  the shipped theta, when made with this very cfg and seed (else None)."""
  h = rec.get("headline") or {}
  text = lambda x: json.dumps(common.jsonable(x), sort_keys=True)  # noqa: E731
  if (h.get("unseen_rows") and h.get("seed") == seed
      and text(h.get("config")) == text(cfg)):
    return h["unseen_rows"]
  return None


def run(name, quick, out_dir, seed, compare=(), metrics=None,
        score_meta_valid=False, cfg=None, rerun_unseen=False):
  """Evaluates the shipped optimizer `name`; writes out_dir. cfg overrides
  the QUICK / FULL sizes (tests). The unseen tasks are taken from the record
  when it holds them for the same cfg and seed, unless rerun_unseen."""
  t0 = time.perf_counter()
  clock = PhaseClock()
  cfg = cfg or (QUICK if quick else FULL)
  lopt, _ = pretrained.load(name)
  rec = pretrained.record(name)
  thetas, minutes, steps = snapshot_thetas(name, lopt)
  others = compared_optimizers(compare)
  print(f"[e5] {name}: {len(thetas)} thetas and {len(others)} other learned "
        f"optimizers on held-out tasks, {cfg['inner_steps']} steps ...",
        flush=True)
  evaluated = headline.evaluate(
      lopt, thetas, cfg, seed,
      others={k: lo.opt_fn(th) for k, (lo, th) in others.items()})
  rows = [headline.summary_row(evaluated, n) for n in thetas]
  levers = {k: headline.summary_row(evaluated, k) for k in others}
  final = rows[-1]
  ratio = headline.ratio_to_best_final_train_loss(evaluated, "shipped")
  clock.lap("heldout")
  mv = meta_validation(rec, lopt, thetas, minutes, steps, rows, cfg, metrics,
                       score_meta_valid)
  clock.lap("meta_validation")
  unseen_rows = None if rerun_unseen else recorded_unseen(rec, cfg, seed)
  unseen_source = "record.json (experiments.pretrain, same config and seed)"
  if unseen_rows is None:
    print("[e5] unseen tasks ...", flush=True)
    unseen_rows = unseen.evaluate_all(lopt, thetas["shipped"], cfg, seed,
                                      cfg["unseen_tasks"], clock)
    unseen_source = "evaluated here"
  res, res_cos = evaluated["result"], evaluated["result_cosine"]
  numbers = dict(
      pretrained=name, learned_optimizer=rec["learned_optimizer"],
      meta_training_minutes=rec["meta_training_minutes"],
      meta_training_outer_steps=rec.get("run_outer_steps",
                                        rec["outer_steps"]),
      shipped_outer_step=shipped_step(rec), config=cfg, seed=seed,
      win_rate_test=final["win_rate_test"],
      win_rate_train=final["win_rate_train"],
      win_rate_test_vs_cosine_adam=final["win_rate_test_vs_cosine_adam"],
      wallclock_ratio_to_best_train_loss=ratio["wallclock_ratio"],
      step_ratio_to_best_train_loss=ratio["step_ratio"],
      ratio_to_best_train_loss=ratio,
      shipped=final, steps_per_second=evaluated["steps_per_second"],
      step_speed_in_scan=step_speed(rec["learned_optimizer"]),
      win_rate_vs_minutes=[dict(label=n, minutes=m, step=s, **r)
                           for n, m, s, r in zip(thetas, minutes, steps,
                                                 rows)],
      task_names=evaluated["task_names"],
      per_task=res["per_task"]["test/shipped"],
      per_task_train=res["per_task"]["train/shipped"],
      per_task_vs_cosine_adam=res_cos["per_task"]["test/shipped"],
      chosen_lr=dict(res["chosen_lr"], **res_cos["chosen_lr"]),
      unseen_architectures={k: unseen_rows[k] for k in unseen.ARCHITECTURES},
      unseen_tasks=unseen_rows, other_learned_optimizers=levers)
  numbers = analysis.mark_unreached(numbers)
  # The headline keys: null (not "not reached") when never reached.
  for key in ("wallclock_ratio_to_best_train_loss",
              "step_ratio_to_best_train_loss"):
    if numbers[key] == analysis.NOT_REACHED:
      numbers[key] = None
  numbers.update(
      unseen=unseen.headline_keys(unseen_rows),
      unseen_verdict=selection.unseen_verdict(unseen_rows),
      unseen_source=unseen_source,
      selected_by=rec.get("selected_by", selection.FINAL_THETA),
      selection=rec.get("selection"), meta_validation=mv,
      seconds=time.perf_counter() - t0, phase_seconds=clock.phases)
  headline.plot_win_rate_vs_minutes(out_dir, minutes, rows)
  headline_summary.plot_meta_valid_vs_heldout(out_dir, mv)
  common.finish(out_dir, numbers, headline_summary.summary(numbers), quick)
  return 0
