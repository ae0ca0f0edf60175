r"""Does meta-validation pick thetas that are good on held-out tasks?

  python -m experiments.meta_validation_study --run_dir RUN [--quick]
      [--out DIR] [--max_thetas 24] [--heldout_tasks 8] [--ema_decay 0.99]

RUN is a finished run directory of `python -m pathology_fix.train` that saved
its thetas as params_<N> every few outer steps. Up to --max_thetas of them,
evenly spread over the run (always the first and the last), are scored

* on meta-validation (`meta_valid`): `runtime.meta_validation.MetaValidation`
  on the run's own meta-training distribution (read from RUN/config.gin),
  whole inner runs from fixed keys, mean final inner_valid loss; never a
  held-out class. Its settings are the run's `MetaValidation.*` bindings if
  it had any, else 10 tasks of the run's inner length;
* on held-out tasks (`heldout_mean_test`): --heldout_tasks new tasks of the
  run's architecture on Fashion-MNIST classes 5-9, trained from scratch for
  the run's inner length, mean final test loss (whole split); the same tasks,
  data and keys for every theta (`evaluation.meta_test`).

Besides the saved thetas, one averaged theta is scored: the run's own
params_ema if it saved one, else an EMA over the saved thetas (all of them,
in order) with the per-outer-step --ema_decay converted to the save
interval (decay ** interval), which the output says.

Rows are marked latest (the last saved theta), best (the argmin of
meta_valid over the saved thetas: what a run selecting by meta-validation
keeps) and ema. `rank_correlation` is Spearman's between meta_valid and
heldout_mean_test over the saved thetas. Minutes are metrics.jsonl's
elapsed_time of each step.

Writes results.json, curves.png and summary.md to
experiments/results/meta_validation/ (or --out). --quick: at most 4 thetas,
2 validation tasks and 2 held-out tasks of 20 inner steps (smoke test).
"""

import json
import math
import os
import sys
from typing import Any, Dict, List, Sequence

import numpy as np

from experiments.lib import common
from experiments.lib import selection

NAME = "meta_validation"
QUICK = dict(max_thetas=4, meta_valid_tasks=2, inner_steps=20,
             heldout_tasks=2)


def elapsed_minutes(run_dir: str) -> Dict[int, float]:
  """{outer step: minutes of the run when it ended}; step 0 at 0."""
  out = {0: 0.0}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line cut short (a kill, or a run still writing)
      if row.get("elapsed_time") is not None:
        out[int(row["step"])] = float(row["elapsed_time"]) / 60
  return out


def _bound(name: str, default: Any) -> Any:
  from pathology_fix.lo_boundary import lo_api  # pylint: disable=g-import-not-at-top
  try:
    return lo_api.query_binding(name)
  except ValueError:
    return default


def read_run_config(run_dir: str) -> Dict[str, Any]:
  """The run's learned optimizer, distribution and inner length (config.gin)."""
  import gin  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import local_training  # pylint: disable=g-import-not-at-top,unused-import
  from pathology_fix.runtime import meta_validation  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(run_dir, "config.gin"))
    lopt = gin.query_parameter("run_train.lopt").scoped_configurable_fn()
    inner = int(_bound("ConstantTruncationSchedule.total_length", 1000))
    return dict(
        lopt=lopt, distribution=meta_validation.distribution_from_gin(),
        inner_steps=inner,
        meta_valid_tasks=int(_bound("MetaValidation.num_tasks", 10)),
        meta_valid_inner_steps=int(_bound("MetaValidation.inner_steps",
                                          inner)),
        meta_valid_seed=int(_bound("MetaValidation.seed", 0)),
        saved_ema_decay=_bound("ThetaEMA.decay", None))
  finally:
    gin.clear_config()


def save_interval(steps: Sequence[int]) -> int:
  """The typical number of outer steps between saved thetas (the median)."""
  gaps = np.diff(sorted(steps))
  return max(1, int(np.median(gaps))) if len(gaps) else 1


def ema_over_saved(thetas: Sequence[Any], decay: float) -> Any:
  """The bias-corrected EMA (`runtime.theta_averaging`) over `thetas`."""
  from pathology_fix.runtime import theta_averaging  # pylint: disable=g-import-not-at-top
  ema = theta_averaging.ThetaEMA(decay)
  state = ema.init(thetas[0])
  for theta in thetas[1:]:
    state = ema.update(state, theta)
  return state.average


def averaged_theta(run_dir: str, saved: Sequence[int], lopt,
                   ema_decay: float, saved_decay) -> Dict[str, Any]:
  """{"theta", "step", "source"}: params_ema, else the EMA over `saved`."""
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, checkpoints.PARAMS_EMA)
  if os.path.isfile(path):
    from experiments.lib import shipping  # pylint: disable=g-import-not-at-top
    theta, step = shipping.load_param_file(path, lopt)
    return dict(theta=theta, step=step, source=(
        f"the run's own EMA of theta (params_ema, decay {saved_decay} per "
        "outer step, updated every outer step)"))
  interval = save_interval(saved)
  decay = ema_decay ** interval
  theta = ema_over_saved(
      [checkpoints.load_params(run_dir, s, lopt) for s in saved], decay)
  return dict(theta=theta, step=max(saved), source=(
      f"EMA over the {len(saved)} saved thetas (the run saved no EMA): "
      f"decay {ema_decay} per outer step = {decay:.4g} per saved theta "
      f"(saved every {interval} outer steps)"))


def heldout_scores(lopt, thetas: Dict[str, Any], distribution, num_tasks: int,
                   num_steps: int, seed: int) -> Dict[str, Any]:
  """{"scores": {label: mean final test loss}, "tasks": names} on held-out
  classes 5-9, the same tasks, data and keys for every theta."""
  import jax  # pylint: disable=g-import-not-at-top
  from pathology_fix.cli import demo  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import evaluation  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), num_tasks + 1)
  make_tasks = demo.heldout_tasks(
      keys[1:], num_classes_per_task=distribution.num_classes_per_task,
      architecture=distribution.architecture,
      image_size=distribution.image_size,
      batch_size=distribution.batch_size,
      normalization=distribution.normalization)
  tasks = make_tasks()
  result = evaluation.meta_test(tasks, lopt, thetas, num_steps, keys[0],
                                splits=("test",), whole_splits=True,
                                same_model=True)
  return dict(scores={k: float(result[k]["final_test_loss"])
                      for k in thetas},
              tasks=[t.name for t in tasks])


def mark_rows(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
  """Sets each row's kind; returns {latest, best, ema} rows."""
  saved = [r for r in rows if r["kind"] != "ema"]
  latest = saved[-1]
  best = saved[[r["step"] for r in saved].index(selection.argmin(
      {r["step"]: r["meta_valid"] for r in saved}))]
  for r in saved:
    marks = [m for m, row in (("latest", latest), ("best", best)) if row is r]
    r["kind"] = "+".join(marks) if marks else "saved"
  return dict(latest=latest, best=best,
              ema=next(r for r in rows if r["kind"] == "ema"))


def plot(out_dir, rows, marked, rank_correlation):
  plt = common.pyplot()
  saved = [r for r in rows if r["kind"] != "ema"]
  minutes = [r["minutes"] for r in saved]
  fig, left = plt.subplots(figsize=(8, 4.5))
  right = left.twinx()
  left.plot(minutes, [r["meta_valid"] for r in saved], "o-", color="C0",
            label="meta-validation (training classes 0-4)")
  right.plot(minutes, [r["heldout_mean_test"] for r in saved], "s--",
             color="C1", label="held-out test loss (classes 5-9)")
  for name, marker in (("latest", "v"), ("best", "*"), ("ema", "D")):
    r = marked[name]
    left.plot([r["minutes"]], [r["meta_valid"]], marker, color="k", ms=10,
              label=f"{name} (step {r['step']})")
    right.plot([r["minutes"]], [r["heldout_mean_test"]], marker, color="k",
               ms=10, fillstyle="none")
  left.set_xlabel("meta-training minutes")
  left.set_ylabel("meta_valid (mean final inner_valid loss)", color="C0")
  right.set_ylabel("held-out mean final test loss", color="C1")
  rho = "n/a" if rank_correlation is None else f"{rank_correlation:.2f}"
  left.set_title(f"Saved thetas: meta-validation vs held-out (Spearman {rho})")
  handles = sum((a.get_legend_handles_labels()[0] for a in (left, right)), [])
  labels = sum((a.get_legend_handles_labels()[1] for a in (left, right)), [])
  left.legend(handles, labels, fontsize=7, loc="upper right")
  return common.save_figure(fig, out_dir, "curves.png")


def summary(run_dir, rows, marked, rho, setup) -> str:
  lines = [f"# Meta-validation vs held-out quality: {run_dir}", "",
           f"{len(rows) - 1} saved thetas (of {setup['saved_thetas']}) and "
           f"one averaged theta ({setup['ema']}).", "",
           f"- meta_valid: {setup['meta_validation']}",
           f"- heldout_mean_test: {setup['heldout']}", "",
           "| kind | step | minutes | meta_valid | heldout_mean_test |",
           "|---|---|---|---|---|"]
  for name in ("latest", "best", "ema"):
    r = marked[name]
    lines.append(f"| {name} | {r['step']} | {r['minutes']:.1f} | "
                 f"{r['meta_valid']:.4f} | {r['heldout_mean_test']:.4f} |")
  ranked = sorted((r for r in rows if r["kind"] != "ema"),
                  key=lambda r: _key(r["heldout_mean_test"]))
  position = ranked.index(marked["best"]) + 1
  lines += ["", f"Spearman rank correlation (meta_valid, heldout_mean_test) "
            f"over the saved thetas: "
            f"{'n/a' if rho is None else f'{rho:.3f}'}.",
            f"The theta selected by meta-validation (step "
            f"{marked['best']['step']}) ranks {position} of {len(ranked)} on "
            "held-out tasks (1 = best); the latest theta ranks "
            f"{ranked.index(marked['latest']) + 1}.", "",
            "![curves](curves.png)"]
  return "\n".join(lines)


def _key(x):
  return x if x is not None and math.isfinite(x) else math.inf


def _settings(args, config) -> Dict[str, int]:
  quick = QUICK if args.quick else {}
  return dict(
      max_thetas=quick.get("max_thetas", args.max_thetas),
      meta_valid_tasks=quick.get("meta_valid_tasks",
                                 config["meta_valid_tasks"]),
      meta_valid_inner_steps=quick.get("inner_steps",
                                       config["meta_valid_inner_steps"]),
      heldout_tasks=quick.get("heldout_tasks", args.heldout_tasks),
      heldout_steps=quick.get("inner_steps", args.heldout_steps or
                              config["inner_steps"]))


def study(args) -> Dict[str, Any]:
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import meta_validation  # pylint: disable=g-import-not-at-top
  run_dir = os.path.abspath(args.run_dir)
  config = read_run_config(run_dir)
  lopt, s = config["lopt"], _settings(args, config)
  elapsed = elapsed_minutes(run_dir)
  saved = [n for n in checkpoints.checkpoint_steps(run_dir, "params_")
           if n in elapsed]
  if len(saved) < 2:
    raise SystemExit(f"{run_dir}: {len(saved)} saved params_<N> with a "
                     "metrics.jsonl line; the study needs at least 2")
  picked = selection.evenly_spaced(saved, s["max_thetas"])
  thetas = {str(n): checkpoints.load_params(run_dir, n, lopt) for n in picked}
  ema = averaged_theta(run_dir, saved, lopt, args.ema_decay,
                       config["saved_ema_decay"])
  thetas["ema"] = ema["theta"]
  print(f"[meta_validation_study] {len(picked)} saved thetas + EMA: "
        "meta-validation ...", flush=True)
  validator = meta_validation.MetaValidation(
      num_tasks=s["meta_valid_tasks"], inner_steps=s["meta_valid_inner_steps"],
      seed=config["meta_valid_seed"], distribution=config["distribution"])
  valid = validator.evaluate(lopt, thetas)
  print(f"[meta_validation_study] held-out: {s['heldout_tasks']} tasks on "
        f"classes 5-9, {s['heldout_steps']} steps ...", flush=True)
  heldout = heldout_scores(lopt, thetas, config["distribution"],
                           s["heldout_tasks"], s["heldout_steps"], args.seed)
  rows = [dict(step=int(n), minutes=round(elapsed[int(n)], 3),
               meta_valid=valid.scores[n],
               heldout_mean_test=heldout["scores"][n], kind="saved")
          for n in map(str, picked)]
  rows.append(dict(step=int(ema["step"]),
                   minutes=round(elapsed.get(int(ema["step"]),
                                             elapsed[max(saved)]), 3),
                   meta_valid=valid.scores["ema"],
                   heldout_mean_test=heldout["scores"]["ema"], kind="ema"))
  marked = mark_rows(rows)
  saved_rows = [r for r in rows if r["kind"] != "ema"]
  rho = selection.spearman([r["meta_valid"] for r in saved_rows],
                           [r["heldout_mean_test"] for r in saved_rows])
  setup = dict(
      run_dir=run_dir, saved_thetas=len(saved), ema=ema["source"],
      meta_validation=(
          f"{s['meta_valid_tasks']} tasks of the run's distribution "
          f"({config['distribution']}), {s['meta_valid_inner_steps']} inner "
          f"steps, mean final {validator.split} loss; tasks "
          f"{valid.task_names}"),
      heldout=(f"{s['heldout_tasks']} new tasks on Fashion-MNIST classes "
               f"5-9, {s['heldout_steps']} inner steps, mean final test loss "
               f"(whole split); tasks {heldout['tasks']}"),
      **s)
  return dict(thetas=rows, rank_correlation=rho, setup=setup,
              latest=marked["latest"], best=marked["best"],
              ema=marked["ema"], marked=marked)


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--run_dir", required=True,
                 help="a finished run of python -m pathology_fix.train")
  p.add_argument("--max_thetas", type=int, default=24)
  p.add_argument("--heldout_tasks", type=int, default=8)
  p.add_argument("--heldout_steps", type=int, default=None,
                 help="default: the run's inner length")
  p.add_argument("--ema_decay", type=float, default=0.99,
                 help="per outer step, when the run saved no params_ema")
  args = p.parse_args(argv)
  out_dir = common.results_dir(NAME, args.out)
  numbers = study(args)
  marked = numbers.pop("marked")
  png = plot(out_dir, numbers["thetas"], marked, numbers["rank_correlation"])
  common.finish(out_dir, numbers,
                summary(numbers["setup"]["run_dir"], numbers["thetas"],
                        marked, numbers["rank_correlation"],
                        numbers["setup"]), args.quick)
  print(f"[meta_validation_study] {out_dir}/results.json, {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
