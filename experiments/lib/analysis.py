"""E5's analysis: tuned baselines, wall-clock ratios, win rates; JSON marks."""

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np

from experiments.lib.baselines import BASELINES, LRS
from experiments.lib.meta_training import NUM_CLASSES


SPLITS = ("train", "inner_valid", "test")  # E5's curves' last axis, in order


def stack_curves(result, names: Sequence[str],
                 splits: Sequence[str] = SPLITS) -> np.ndarray:
  """float [tasks, len(names), evals, len(splits)] from a `meta_test` result
  run with eval_every: the split losses at steps 0, eval_every, ..."""
  return np.stack([np.stack([result.curves[n][f"{s}_loss"] for s in splits],
                            axis=-1) for n in names], axis=1)


def _nan_to_inf(a):
  return np.where(np.isfinite(a), a, np.inf)


def tune(curves: np.ndarray, select_split: int) -> np.ndarray:
  """Index of the best hyper per task: lowest loss reached on a split.

  curves: [tasks, H, evals, splits] -> int [tasks].
  """
  return np.argmin(_nan_to_inf(curves[..., select_split]).min(axis=2), axis=1)


def time_to_reach(curve: np.ndarray, times: np.ndarray,
                  target: float) -> Optional[float]:
  """First time at which `curve` <= target (None if never)."""
  hit = np.nonzero(_nan_to_inf(curve) <= target)[0]
  return float(times[hit[0]]) if hit.size else None


def wallclock_ratio(lopt_curve, lopt_times, base_curve, base_times):
  """(learned time to reach the baseline's best loss) / (baseline's time)."""
  base = _nan_to_inf(base_curve)
  best = float(base.min())
  t_base = float(base_times[int(np.argmin(base))])
  t_lopt = time_to_reach(lopt_curve, lopt_times, best)
  if t_lopt is None or t_base <= 0:
    return None, best, t_base, t_lopt
  return t_lopt / t_base, best, t_base, t_lopt


def _cap(a, cap):
  return np.where(np.isfinite(a), np.minimum(a, cap), cap)


def analyse(curves: Dict[str, np.ndarray], lopt_names: Sequence[str],
            steps_axis: np.ndarray, rates: Dict[str, float],
            task_names: Sequence[str],
            baselines: Sequence[str] = BASELINES) -> Dict[str, Any]:
  """Tuned baselines, wall-clock ratios, final losses and win rates.

  curves: optimizer -> [tasks, H, evals, splits] (H = 11 learning rates for
  baselines, 1 for a learned optimizer).
  baselines: the hand-designed set compared against (the best of them per
  task); default E5's.
  """
  i_train, i_valid, i_test = (SPLITS.index(s) for s in SPLITS)
  cap = 2.0 * math.log(NUM_CLASSES)  # for plots/means: diverged runs
  tuned = {}  # (objective, optimizer) -> [tasks, evals] curve
  chosen_lr = {}
  for name in baselines:
    c = curves[name]
    for objective, select, report in (("train", i_train, i_train),
                                      ("test", i_valid, i_test)):
      best = tune(c, select)
      chosen_lr[f"{name}/{objective}"] = [LRS[b] for b in best]
      tuned[(objective, name)] = np.stack(
          [c[t, best[t], :, report] for t in range(c.shape[0])])
  for name in lopt_names:
    for objective, report in (("train", i_train), ("test", i_test)):
      tuned[(objective, name)] = curves[name][:, 0, :, report]

  times = {name: steps_axis / rates[name if name in baselines else "learned"]
           for name in list(baselines) + list(lopt_names)}
  out = {"chosen_lr": chosen_lr, "per_task": {}, "mean_curves": {},
         "ratio": {}, "final": {}, "best": {}, "win_rate": {}}
  num_tasks = len(task_names)
  for objective in ("train", "test"):
    # Best baseline per task: lowest loss reached by its tuned curve.
    best_base = []
    for t in range(num_tasks):
      mins = [_nan_to_inf(tuned[(objective, b)][t]).min() for b in baselines]
      best_base.append(baselines[int(np.argmin(mins))])
    mean_curves = {name: _cap(tuned[(objective, name)], cap).mean(0)
                   for name in list(baselines) + list(lopt_names)}
    out["mean_curves"][objective] = mean_curves
    mean_best = baselines[int(np.argmin([mean_curves[b].min()
                                         for b in baselines]))]
    for name in lopt_names:
      lc = tuned[(objective, name)]
      ratios, reached, wins_final, wins_best, rows = [], 0, 0, 0, []
      for t in range(num_tasks):
        b = best_base[t]
        bc = tuned[(objective, b)][t]
        r, target, t_base, t_lopt = wallclock_ratio(lc[t], times[name], bc,
                                                    times[b])
        final_l, final_b = float(_cap(lc[t, -1], cap)), float(_cap(bc[-1], cap))
        best_l = float(_nan_to_inf(lc[t]).min())
        best_b = float(_nan_to_inf(bc).min())
        wins_final += final_l < final_b
        wins_best += best_l < best_b
        if r is not None:
          ratios.append(r)
          reached += 1
        rows.append(dict(task=task_names[t], best_baseline=b,
                         lopt_final=final_l, baseline_final=final_b,
                         lopt_best=best_l, baseline_best=best_b,
                         baseline_best_seconds=t_base,
                         lopt_seconds_to_baseline_best=t_lopt,
                         wallclock_ratio=r))
      r_mean, target, t_base, t_lopt = wallclock_ratio(
          mean_curves[name], times[name], mean_curves[mean_best],
          times[mean_best])
      # The same in inner steps: what the ratio would be at equal step cost.
      s_mean = wallclock_ratio(mean_curves[name], steps_axis,
                               mean_curves[mean_best], steps_axis)[0]
      s_task = [wallclock_ratio(lc[t], steps_axis,
                                tuned[(objective, best_base[t])][t],
                                steps_axis)[0] for t in range(num_tasks)]
      s_task = [x for x in s_task if x is not None]
      key = f"{objective}/{name}"
      out["per_task"][key] = rows
      out["ratio"][key] = dict(
          mean_curve_ratio=r_mean, mean_curve_reached=r_mean is not None,
          mean_curve_best_baseline=mean_best, mean_curve_target=target,
          mean_curve_baseline_seconds=t_base,
          mean_curve_lopt_seconds=t_lopt,
          per_task_reached_fraction=reached / num_tasks,
          per_task_median_ratio=(float(np.median(ratios)) if ratios else None),
          mean_curve_step_ratio=s_mean,
          per_task_median_step_ratio=(float(np.median(s_task)) if s_task
                                      else None))
      out["final"][key] = dict(
          lopt=float(mean_curves[name][-1]),
          best_baseline_per_task=float(np.mean([r["baseline_final"]
                                                for r in rows])),
          **{b: float(mean_curves[b][-1]) for b in baselines})
      out["best"][key] = dict(
          lopt=float(np.mean([r["lopt_best"] for r in rows])),
          best_baseline_per_task=float(np.mean([r["baseline_best"]
                                                for r in rows])))
      out["win_rate"][key] = dict(final=wins_final / num_tasks,
                                  best=wins_best / num_tasks)
  out["times"] = times
  return out


NOT_REACHED = "not reached"


def fmt(x, spec=".2f"):
  return "n/a" if x is None or isinstance(x, str) else format(x, spec)


def mark_unreached(tree):
  """None (a loss never reached) -> NOT_REACHED, so that in results.json a
  null can only mean a non-finite number (common.jsonable's mapping)."""
  if isinstance(tree, dict):
    return {k: mark_unreached(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [mark_unreached(v) for v in tree]
  return NOT_REACHED if tree is None else tree
