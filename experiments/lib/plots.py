"""E5's plots: mean loss curves of learned optimizers vs tuned baselines."""

import numpy as np

from experiments.lib import common
from experiments.lib.baselines import BASELINES


COLORS = {"Adam": "tab:blue", "RMSProp": "tab:orange", "SGDM": "tab:green",
          "learned (valid obj.)": "tab:red",
          "learned (train obj.)": "tab:purple"}


def plot_curves(out_dir, analysis, steps_axis, lopt_names, x_kind):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, objective in zip(axes, ("train", "test")):
    for name in list(BASELINES) + list(lopt_names):
      x = (steps_axis if x_kind == "steps" else analysis["times"][name])
      # Log time axis: leave out t = 0 (the shared initial loss).
      ax.plot(x[1:], analysis["mean_curves"][objective][name][1:],
              color=COLORS.get(name), label=name,
              lw=2 if name in lopt_names else 1.2,
              ls="-" if name in lopt_names else "--")
    ax.set_xlabel("inner steps (log)" if x_kind == "steps"
                  else "wall-clock seconds (steps / measured steps per s)")
    ax.set_ylabel(f"{objective} loss (mean over held-out tasks)")
    ax.set_title(f"{objective} loss; baselines tuned for "
                 f"{'train' if objective == 'train' else 'inner_valid'} loss",
                 fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=8)
  return common.save_figure(fig, out_dir, f"loss_vs_{x_kind}.png")


def plot_wins(out_dir, analysis, task_names, lopt_name):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, objective in zip(axes, ("train", "test")):
    rows = analysis["per_task"][f"{objective}/{lopt_name}"]
    diff = np.array([r["lopt_final"] - r["baseline_final"] for r in rows])
    ax.bar(range(len(rows)), diff,
           color=["tab:green" if d < 0 else "tab:red" for d in diff])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(task_names, rotation=70, fontsize=7)
    wr = analysis["win_rate"][f"{objective}/{lopt_name}"]["final"]
    ax.set_title(f"final {objective} loss: learned - best tuned baseline\n"
                 f"(< 0 = learned wins; win rate {wr:.0%})", fontsize=9)
  return common.save_figure(fig, out_dir, "win_bars.png")
