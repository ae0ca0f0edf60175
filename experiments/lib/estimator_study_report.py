"""E7's report: plots and the Markdown summary of results.json's numbers."""

import numpy as np

from experiments.lib import common
from experiments.lib import merge_quality

def plot_training(out_dir, runs):
  plt = common.pyplot()
  for x_key, fname, xlabel in (("minutes", "meta_test_vs_minutes.png",
                                "meta-training minutes"),
                               ("inner_steps", "meta_test_vs_inner_steps.png",
                                "inner steps per sample")):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, seeds in runs.items():
      n = min(len(r[x_key]) for r in seeds)
      x = np.mean([r[x_key][:n] for r in seeds], axis=0)
      y = np.array([r["meta_test"][:n] for r in seeds], float)
      ax.plot(x, y.mean(axis=0), marker="o", label=name)
      if len(seeds) > 1:
        ax.fill_between(x, y.min(axis=0), y.max(axis=0), alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("meta-test loss (held-out classes)")
    ax.set_yscale("log")  # a diverging seed sits at 1-5, the rest near 0.1
    ax.legend(fontsize=7)
    common.save_figure(fig, out_dir, fname)


def plot_quality(out_dir, rows):
  """One row of panels per theta: cosine vs k, variance vs inner steps and
  vs seconds; point 0 solid with circles, later points dashed with squares."""
  if not rows:
    return
  plt = common.pyplot()
  labels = sorted({r["theta"] for r in rows})
  fig, axes = plt.subplots(len(labels), 3, figsize=(13, 4 * len(labels)),
                           squeeze=False)
  names = sorted({r["estimator"] for r in rows})
  colors = {n: f"C{i}" for i, n in enumerate(names)}
  for ax_row, label in zip(axes, labels):
    for name in names:
      for point in sorted({r["point"] for r in rows}):
        mine = [r for r in rows if r["estimator"] == name and
                r["theta"] == label and r["point"] == point]
        if not mine:
          continue
        style = dict(color=colors[name], marker="o" if point == 0 else "s",
                     linestyle="-" if point == 0 else "--",
                     label=name if point == 0 else None)
        ax_row[0].plot([r["k"] for r in mine], [r["cosine"] for r in mine],
                       **style)
        ax_row[1].plot([r["inner_steps"] for r in mine],
                       [r["variance"] for r in mine], **style)
        ax_row[2].plot([r["seconds"] for r in mine],
                       [r["variance"] for r in mine], **style)
    ax_row[0].set(xscale="log", xlabel="truncation length k",
                  ylabel=f"cosine to reference (theta {label})")
    ax_row[1].set(xscale="log", yscale="log",
                  xlabel="inner steps per estimate",
                  ylabel="variance of one estimate")
    ax_row[2].set(xscale="log", yscale="log", xlabel="seconds per estimate",
                  ylabel="variance of one estimate")
    ax_row[0].legend(fontsize=7, title="solid: step 0; dashed: later",
                     title_fontsize=7)
  common.save_figure(fig, out_dir, "gradient_quality.png")


def quality_lines(numbers):
  """Part 1's summary: the gradient-quality table and the references."""
  lines = ["", "## Gradient quality", "",
           "Cosine of the mean of the draws (bias plus the noise left) and "
           "median cosine of one "
           "estimate to the reference gradient of the full-horizon smoothed "
           "objective; variance of one estimate (sum over coordinates).", "",
           "| theta | inner step | estimator | k | cosine (mean) | "
           "cosine (one) | variance | inner steps | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(numbers.get("gradient_quality", []),
                  key=lambda r: (r["theta"], r["point"], r["estimator"],
                                 r["k"])):
    lines.append(f"| {r['theta']} | {r['point']} | {r['estimator']} | "
                 f"{r['k']} | {r['cosine']:.3f} | "
                 f"{r.get('cosine_single', float('nan')):.3f} | "
                 f"{r['variance']:.3g} | {r['inner_steps']} | "
                 f"{r['seconds']:.3f} |")
  lines += ["", "Reference gradients (ES and RP of the full run, merged per "
            "coordinate by inverse variance):", "",
            "| theta | relative stderr | ES alone | RP alone | cos(ES, RP) | "
            "expected if both unbiased |", "|---|---|---|---|---|---|"]
  for label, ref in numbers.get("reference", {}).items():
    c = ref["consistency"]
    lines.append(f"| {label} | {ref['relative_stderr']:.3f} | "
                 f"{ref['es_relative_stderr']:.3f} | "
                 f"{ref['rp_relative_stderr']:.3f} | "
                 f"{c['cosine_es_rp']:.3f} | {c['expected_if_unbiased']:.3f} |")
  mid = numbers.get("mid_theta")
  if mid:
    lines += ["", f"Theta mid: HybridRPES seed {mid['seed']} after "
              f"{mid['seconds']:.0f} s, {mid['outer_steps']} outer steps."]
  return lines


def summary(numbers, mode) -> str:
  lines = [f"# E7: estimator study ({mode} mode)", "",
           "## Best estimator per wall-clock budget (meta-test loss, "
           "held-out classes 5-9; mean and spread over seeds)", "",
           "| minutes | best (mean) | loss | spread | runner-up | margin | "
           "best (median) | its median |",
           "|---|---|---|---|---|---|---|---|"]
  for r in numbers["budget_table"]:
    lines.append(f"| {r['minutes']:.2f} | {r['best']} | {r['best_loss']:.4f}"
                 f" | {r['best_spread']:.4f} | {r['runner_up']} | "
                 f"{r['margin']:.4f} | {r['best_by_median']} | "
                 f"{r['medians'][r['best_by_median']]:.4f} |")
  lines += ["", "Final meta-test loss per seed:", "",
            "| estimator | seeds | outer steps |", "|---|---|---|"]
  for name, seeds in numbers["meta_training"].items():
    lines.append(f"| {name} | " + ", ".join(
        f"{r['meta_test'][-1]:.3f}" for r in seeds) + " | " + ", ".join(
            str(r["total_outer_steps"]) for r in seeds) + " |")
  if numbers.get("median_final_meta_test"):
    lines += ["", "Median over seeds of the final meta-test loss: " + ", ".join(
        f"{n} {v:.4f}" for n, v in sorted(
            numbers["median_final_meta_test"].items(), key=lambda kv: kv[1]))]
  if numbers.get("merge_quality"):
    lines += ["", "## Merge quality: total variance over draws from one inner "
              "state, as a multiple of the better of RP and ES alone", "",
              merge_quality.table(numbers["merge_quality"])]
  if numbers.get("gradient_quality"):
    lines += quality_lines(numbers)
  if numbers.get("part1_incomplete"):
    lines += ["", "Partial: part 1 did not finish at theta " +
              ", ".join(numbers["part1_incomplete"]) + "; the rows are those "
              "it completed."]
  if numbers.get("part2_incomplete"):
    lines += ["", "Partial: part 2 did not finish for " +
              ", ".join(numbers["part2_incomplete"]) + "; the seeds are "
              "those it completed."]
  if mode == "quick":
    lines += ["", "Quick mode: CI-sized smoke run; its numbers mean nothing."]
  return "\n".join(lines)
