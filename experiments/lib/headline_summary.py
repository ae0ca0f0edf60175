"""E5 --pretrained's summary.md and its meta-validation plot."""

from typing import Any, Dict

from experiments.lib import analysis
from experiments.lib import common


def _pct(x):
  return "n/a" if x is None or isinstance(x, str) else f"{x:.0%}"


def _ratio(x):
  return "never" if x in (None, analysis.NOT_REACHED) else f"{x:.2f}"


def _num(x, spec=".4f"):
  return "n/a" if x is None or isinstance(x, str) else format(x, spec)


def plot_meta_valid_vs_heldout(out_dir, mv: Dict[str, Any]):
  """meta_valid_vs_heldout.png: both over meta-training minutes, and the
  held-out mean test loss against the meta-validation score per theta."""
  plt = common.pyplot()
  rows = sorted(mv["per_theta"], key=lambda r: r["minutes"])
  x = [r["minutes"] for r in rows]
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
  ax0.plot(x, [r["meta_valid"] for r in rows], marker="o", color="C0",
           label="meta-validation (training classes)")
  ax0.set(xlabel="meta-training minutes (2-core CPU)",
          ylabel="meta-validation score (mean final loss)")
  twin = ax0.twinx()
  twin.plot(x, [r["heldout_mean_final_test_loss"] for r in rows], marker="s",
            color="C1", label="held-out mean final test loss")
  twin.set_ylabel("held-out mean final test loss")
  lines = ax0.get_lines() + twin.get_lines()
  ax0.legend(lines, [l.get_label() for l in lines], fontsize=7)
  for r in rows:
    star = r["label"] == mv["argmin_label"]
    ax1.scatter(r["meta_valid"], r["heldout_mean_final_test_loss"],
                marker="*" if star else "o", s=160 if star else 30,
                color="C3" if star else "C0")
    ax1.annotate(r["label"], (r["meta_valid"],
                              r["heldout_mean_final_test_loss"]), fontsize=7)
  rho = mv["spearman_vs_heldout_test_loss"]
  ax1.set(xlabel="meta-validation score", ylabel="held-out mean final test "
          "loss", title=f"Spearman {_num(rho, '.2f')} (star: argmin "
          "meta-validation)")
  common.save_figure(fig, out_dir, "meta_valid_vs_heldout.png")


def _meta_validation_lines(n):
  mv = n["meta_validation"]
  lines = [
      "", "## Selection by meta-validation", "",
      f"Shipped theta selected by: **{n['selected_by']}**. Scores: "
      f"{mv['source']} (theta kind `{mv['kind']}`); the argmin over the "
      f"judged thetas is `{mv['argmin_label']}`"
      + (" (the shipped one)." if mv["shipped_is_argmin"] else
         ", not the shipped one."), "",
      f"Spearman rank correlation over the judged thetas: meta-validation vs "
      "held-out mean test loss "
      f"{_num(mv['spearman_vs_heldout_test_loss'], '.2f')}, vs held-out win "
      "rate (test) "
      f"{_num(mv['spearman_vs_win_rate_test'], '.2f')} (transfer: the first "
      "positive, the second negative).", "",
      "| theta | minutes | step | meta-validation | held-out mean test loss |"
      " wins (test) |", "|---|---|---|---|---|---|"]
  for r in sorted(mv["per_theta"], key=lambda r: r["minutes"]):
    lines.append(f"| {r['label']} | {r['minutes']:.1f} | {r['step']} | "
                 f"{_num(r['meta_valid'])} | "
                 f"{_num(r['heldout_mean_final_test_loss'])} | "
                 f"{_pct(r['win_rate_test'])} |")
  return lines


def _unseen_lines(n):
  v = n["unseen_verdict"]
  lines = ["", "## Tasks never seen in meta-training", "",
           "| family | tasks | wins (test) vs E5's tuned baselines | no worse "
           "than Adam(1e-3) | mean test loss | best baseline |",
           "|---|---|---|---|---|---|"]
  for family, row in n["unseen_tasks"].items():
    lines.append(f"| {family} | {row['num_tasks']} | "
                 f"{_pct(row['win_rate_test'])} | "
                 f"{_pct(row['beats_adam_1e3'])} | "
                 f"{_num(row['mean_final_test_loss'])} | "
                 f"{_num(row['best_baseline_mean_final_test_loss'])} |")
  lines += ["", f"Targets: >= 50% wins, no worse than Adam(1e-3) on >= 75%. "
            f"Over the {v['num_tasks']} unseen tasks ({n['unseen_source']}),"
            f" each family weighted equally: no worse than Adam(1e-3) on "
            f"{_pct(v['beats_adam_1e3'])} (pooled: "
            f"{_pct(v['beats_adam_1e3_pooled'])})"
            + (" -- **loses to Adam(1e-3) on the unseen tasks**"
               if v["loses_to_adam_1e3"] else "") + ". Tuned baselines pick "
            "their rate by the lowest inner_valid loss reached during the "
            "run, and are compared on final test loss."]
  return lines


def summary(n) -> str:
  f = n["shipped"]
  r = n["ratio_to_best_train_loss"]
  lines = [
      f"# E5 headline: shipped `{n['pretrained']}` ({n['learned_optimizer']},"
      f" {n['meta_training_minutes']:.0f} min of meta-training, "
      f"{n['meta_training_outer_steps']} outer steps; shipped: step "
      f"{n['shipped_outer_step']}, selected by {n['selected_by']})", "",
      f"{len(n['task_names'])} held-out tasks ({', '.join(n['task_names'])}),"
      f" {n['config']['inner_steps']} inner steps. Baselines, each tuned per "
      "task over 11 learning rates: E5's (best per task of Adam, RMSProp, "
      "SGD+momentum) and Adam with 5% linear warmup + cosine decay.", "",
      "| | target | learned | tuned baseline |", "|---|---|---|---|",
      f"| wins on final test loss vs E5's baselines | >= 90% | "
      f"{_pct(f['win_rate_test'])} | |",
      f"| wins on final test loss vs warmup-cosine Adam | >= 60% | "
      f"{_pct(f['win_rate_test_vs_cosine_adam'])} | |",
      f"| wins on final training loss vs E5's baselines | | "
      f"{_pct(f['win_rate_train'])} | |",
      f"| mean final test loss (E5's / cosine Adam) | | "
      f"{f['mean_final_test_loss']:.4f} | "
      f"{f['best_baseline_mean_final_test_loss']:.4f} / "
      f"{f['cosine_adam_mean_final_test_loss']:.4f} |",
      f"| mean final training loss (E5's / cosine Adam) | | "
      f"{f['mean_final_train_loss']:.4f} | "
      f"{f['best_baseline_mean_final_train_loss']:.4f} / "
      f"{f['cosine_adam_mean_final_train_loss']:.4f} |",
      f"| steps to {r['best_baseline']}'s final training loss (mean curves) "
      f"| <= 0.5x | {_ratio(r['step_ratio'])} | 1 |",
      f"| wall-clock to the same | | {_ratio(r['wallclock_ratio'])} | "
      "1 |", "", "## Win rate against meta-training minutes", "",
      "| theta | minutes | wins (test) | wins vs cosine Adam (test) | wins "
      "(train) | mean test loss |", "|---|---|---|---|---|---|"]
  for row in n["win_rate_vs_minutes"]:
    lines.append(f"| {row['label']} | {row['minutes']:.1f} | "
                 f"{_pct(row['win_rate_test'])} | "
                 f"{_pct(row.get('win_rate_test_vs_cosine_adam'))} | "
                 f"{_pct(row['win_rate_train'])} | "
                 f"{row['mean_final_test_loss']:.4f} |")
  lines += _meta_validation_lines(n)
  if n["other_learned_optimizers"]:
    lines += ["", "## Other learned optimizers (levers), same tasks", "",
              "| learned optimizer | wins (test) | wins vs cosine Adam | wins "
              "(train) | mean test loss |", "|---|---|---|---|---|"]
    for k, row in n["other_learned_optimizers"].items():
      lines.append(f"| {k} | {_pct(row['win_rate_test'])} | "
                   f"{_pct(row.get('win_rate_test_vs_cosine_adam'))} | "
                   f"{_pct(row['win_rate_train'])} | "
                   f"{row['mean_final_test_loss']:.4f} |")
  lines += _unseen_lines(n)
  speed = n["step_speed_in_scan"]
  if speed:
    lines += ["", "Learned step / Adam's step, CPU time inside a jitted "
              "lax.scan, interleaved (" + speed["source"] + "): " +
              ", ".join(f"{t} {v['cpu_ratio_to_adam']:.2f}x"
                        for t, v in speed["tasks"].items()) + "."]
  lines += ["", f"Evaluation time: {n['seconds']:.0f} s."]
  return "\n".join(lines)
