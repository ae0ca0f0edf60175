"""The headline: a shipped learned optimizer against tuned baselines.

E5's evaluation (`evaluate`): the held-out tasks (every 3-class subset of
Fashion-MNIST classes 5-9 and 3-class subsets of scikit-learn's digits,
mlp2x32 at 8x8), 1,000 inner steps, against two baseline sets, each tuned
per task over 11 log-spaced learning rates (`baselines`):
- E5's: the best per task of Adam, RMSProp and SGD+momentum;
- Adam with linear warmup and cosine decay (`baselines.COSINE_ADAM`).
Several thetas of one learned optimizer (snapshots along its meta-training)
are judged side by side on the same inits and batches.
"""

import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from experiments.lib import analysis
from experiments.lib import baselines
from experiments.lib import heldout
from experiments.lib.baselines import BASELINES, COSINE_ADAM
from experiments.lib.meta_training import ARCH, IMAGE_SIZE, NUM_CLASSES
from learned_optimization.optimizers import base as opt_base
from pathology_fix.tasks_and_data import tasks
from pathology_fix.runtime import evaluation

EVAL = dict(batch_size=128, inner_steps=1000, num_fmnist_tasks=10,
            num_digits_tasks=6, eval_every=50, train_eval_examples=3000,
            timing_steps=300, timing_repeats=5)


def heldout_specs(num_fmnist: int, num_digits: int, seed: int):
  """E5's held-out tasks: the first `num_fmnist` 3-class subsets of classes
  5-9 (10 = all), plus `num_digits` random 3-class digits subsets."""
  fm = list(itertools.combinations(tasks.HELDOUT_CLASSES, NUM_CLASSES))
  rng = np.random.default_rng(seed + 1000)
  specs = [("fashion_mnist", c, seed + 100 + i)
           for i, c in enumerate(fm[:num_fmnist])]
  for i in range(num_digits):
    c = tuple(sorted(int(x) for x in rng.choice(10, NUM_CLASSES, False)))
    specs.append(("digits", c, seed + 200 + i))
  return specs


def _speed(task, lopt, theta, cfg, cosine: bool) -> Dict[str, float]:
  """Inner steps per second of the learned optimizer and each baseline."""
  steps = cfg["timing_steps"]
  optimizers = {"learned": lopt.opt_fn(theta),
                "Adam": opt_base.Adam(1e-3), "RMSProp": opt_base.RMSProp(1e-3),
                "SGDM": opt_base.SGDM(1e-2)}
  if cosine:
    optimizers[COSINE_ADAM] = opt_base.OptaxOptimizer(
        baselines.cosine_adam(1e-3, steps))
  return heldout.measure_steps_per_second(task, optimizers, steps,
                                          cfg["timing_repeats"])


def evaluate(lopt, thetas: Dict[str, Any], cfg: Dict[str, Any], seed: int,
             specs: Optional[Sequence[heldout.Spec]] = None,
             arch: str = ARCH, image_size: int = IMAGE_SIZE,
             measure_speed: bool = True,
             others: Optional[Dict[str, Any]] = None,
             made_tasks: Optional[Tuple[List[str], List[Any]]] = None,
             cosine: bool = True) -> Dict[str, Any]:
  """Every theta and every tuned baseline on the held-out tasks.

  others: more optimizers ({name: LO Optimizer}, e.g. another learned
  optimizer's `opt_fn(theta)`), analysed like the thetas.
  made_tasks: (names, LO Tasks) to use instead of `specs` (e.g. tabular
  tasks); they must share one model.
  cosine: also run the warmup-cosine Adam baseline set.
  Returns dict: task_names, steps_axis, steps_per_second (learned = the last
  theta; None when not measured: then times assume equal step costs),
  `analysis.analyse`'s result against E5's baselines with `thetas`' (and
  `others`') names as learned optimizers, the same against warmup-cosine
  Adam (result_cosine; None without cosine), and the raw curves
  ({name: [tasks, H, evals, splits]}).
  """
  others = others or {}
  if made_tasks is None:
    if specs is None:
      specs = heldout_specs(cfg["num_fmnist_tasks"], cfg["num_digits_tasks"],
                            seed)
    made_tasks = heldout.make_tasks(specs, cfg["batch_size"], image_size,
                                    arch)
  task_names, heldout_tasks = made_tasks
  names = BASELINES + ((COSINE_ADAM,) if cosine else ())
  entries = dict(baselines.sweeps(names, num_steps=cfg["inner_steps"]))
  entries.update(thetas)
  entries.update(others)
  evaluated = evaluation.meta_test(
      heldout_tasks, lopt, entries, cfg["inner_steps"],
      jax.random.PRNGKey(seed + 300), eval_every=cfg["eval_every"],
      splits=analysis.SPLITS, whole_splits=True,
      max_eval_examples={"train": cfg["train_eval_examples"]},
      same_model=True)
  curves = {n: analysis.stack_curves(evaluated, evaluation.sweep_names(
      n, entries[n])) for n in names}
  learned = list(thetas) + list(others)
  curves.update({n: analysis.stack_curves(evaluated, [n]) for n in learned})
  if measure_speed:
    rates = _speed(heldout_tasks[0], lopt, list(thetas.values())[-1], cfg,
                   cosine)
  else:
    rates = {n: 1.0 for n in ("learned",) + names}
  steps_axis = np.arange(curves["Adam"].shape[2]) * cfg["eval_every"]
  result = analysis.analyse(curves, learned, steps_axis, rates, task_names)
  result_cosine = (analysis.analyse(curves, learned, steps_axis, rates,
                                    task_names, baselines=(COSINE_ADAM,))
                   if cosine else None)
  return dict(task_names=task_names, steps_axis=steps_axis,
              steps_per_second=rates if measure_speed else None,
              result=result, result_cosine=result_cosine, curves=curves)


def final_test_losses(evaluated: Dict[str, Any], name: str,
                      lr_index: int = 0) -> np.ndarray:
  """float [tasks]: final test loss of entry `name` (a learned optimizer, or
  a baseline at grid position lr_index), non-finite as inf."""
  c = evaluated["curves"][name][:, lr_index, -1,
                                analysis.SPLITS.index("test")]
  return np.where(np.isfinite(c), c, np.inf)


def beats_adam_1e3(evaluated: Dict[str, Any], name: str) -> List[bool]:
  """Per task: the learned final test loss is no worse than Adam(1e-3)'s
  (the Adam sweep's 1e-3 entry: LO's Adam defaults, same init and batches).
  A diverged (non-finite) learned run never counts as no worse."""
  learned = final_test_losses(evaluated, name)
  adam = final_test_losses(evaluated, "Adam", baselines.adam_1e3_index())
  return [bool(np.isfinite(l) and l <= a) for l, a in zip(learned, adam)]


def ratio_to_best_final_train_loss(evaluated: Dict[str, Any],
                                   name: str) -> Dict[str, Any]:
  """When the learned mean training curve first reaches the best tuned
  baseline's final mean training loss, as a fraction of that baseline's
  steps and of its wall-clock (None: never reached within the run)."""
  curves = evaluated["result"]["mean_curves"]["train"]
  steps = np.asarray(evaluated["steps_axis"], float)
  best = min(BASELINES, key=lambda b: curves[b][-1])
  target = float(curves[best][-1])
  hit = np.nonzero(np.asarray(curves[name]) <= target)[0]
  step_ratio = float(steps[hit[0]] / steps[-1]) if hit.size else None
  rates = evaluated["steps_per_second"]
  wallclock = (step_ratio * rates[best] / rates["learned"]
               if step_ratio is not None and rates else None)
  return dict(best_baseline=best, target_train_loss=target,
              step_ratio=step_ratio, wallclock_ratio=wallclock)


def summary_row(evaluated: Dict[str, Any], name: str) -> Dict[str, Any]:
  """Win rates and mean final losses of one theta (against warmup-cosine
  Adam too when it ran)."""
  r = evaluated["result"]
  row = dict(
      win_rate_test=r["win_rate"][f"test/{name}"]["final"],
      win_rate_train=r["win_rate"][f"train/{name}"]["final"],
      mean_final_test_loss=r["final"][f"test/{name}"]["lopt"],
      best_baseline_mean_final_test_loss=(
          r["final"][f"test/{name}"]["best_baseline_per_task"]),
      mean_final_train_loss=r["final"][f"train/{name}"]["lopt"],
      best_baseline_mean_final_train_loss=(
          r["final"][f"train/{name}"]["best_baseline_per_task"]))
  rc = evaluated.get("result_cosine")
  if rc is not None:
    row.update(
        win_rate_test_vs_cosine_adam=rc["win_rate"][f"test/{name}"]["final"],
        win_rate_train_vs_cosine_adam=(
            rc["win_rate"][f"train/{name}"]["final"]),
        cosine_adam_mean_final_test_loss=(
            rc["final"][f"test/{name}"]["best_baseline_per_task"]),
        cosine_adam_mean_final_train_loss=(
            rc["final"][f"train/{name}"]["best_baseline_per_task"]))
  return row


def plot_win_rate_vs_minutes(out_dir, minutes, rows, target=0.9,
                             cosine_target=0.6):
  """win_rate_vs_minutes.png: win rates and mean test loss per theta, in
  meta-training order; the last row (the shipped theta) starred."""
  from experiments.lib import common  # pylint: disable=g-import-not-at-top
  plt = common.pyplot()
  order = sorted(range(len(rows)), key=lambda i: minutes[i])
  x = [minutes[i] for i in order]
  col = lambda key: [rows[i].get(key) for i in order]  # noqa: E731
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
  ax0.plot(x, col("win_rate_test"), marker="o",
           label="test loss vs E5's baselines")
  ax0.plot(x, col("win_rate_train"), marker="s",
           label="training loss vs E5's baselines")
  if "win_rate_test_vs_cosine_adam" in rows[-1]:
    ax0.plot(x, col("win_rate_test_vs_cosine_adam"), marker="^",
             label="test loss vs warmup-cosine Adam")
    ax0.axhline(cosine_target, color="gray", ls=":",
                label=f"target {cosine_target:.0%} (cosine Adam)")
  ax0.axhline(target, color="gray", ls="--", label=f"target {target:.0%}")
  ax0.plot([minutes[-1]], [rows[-1]["win_rate_test"]], marker="*", ms=14,
           color="k", ls="none", label="shipped")
  ax0.set(xlabel="meta-training minutes (2-core CPU)",
          ylabel="win rate (final loss)", ylim=(-0.02, 1.02))
  ax0.legend(fontsize=7)
  ax1.plot(x, col("mean_final_test_loss"), marker="o",
           label="learned optimizer")
  ax1.plot([minutes[-1]], [rows[-1]["mean_final_test_loss"]], marker="*",
           ms=14, color="k", ls="none", label="shipped")
  ax1.axhline(rows[-1]["best_baseline_mean_final_test_loss"], color="gray",
              ls="--", label="best of E5's tuned baselines per task")
  if "cosine_adam_mean_final_test_loss" in rows[-1]:
    ax1.axhline(rows[-1]["cosine_adam_mean_final_test_loss"], color="gray",
                ls=":", label="tuned warmup-cosine Adam")
  ax1.set(xlabel="meta-training minutes (2-core CPU)",
          ylabel="mean final test loss (held-out tasks)")
  ax1.legend(fontsize=7)
  common.save_figure(fig, out_dir, "win_rate_vs_minutes.png")
