"""E5 --pretrained NAME: the headline table for a shipped optimizer.

Judges the shipped theta and its meta-training snapshots (record.json's
`snapshots`, files under <name>/snapshots/) on E5's 16 held-out tasks, and
the shipped theta on two task kinds it never saw (conv3 at 8x8, mlp3x128 at
14x14, Fashion-MNIST classes 5-9). Writes results.json (top-level
win_rate_test, win_rate_train, wallclock_ratio_to_best_train_loss, ...),
summary.md and win_rate_vs_minutes.png.
"""

import json
import os
import time

from experiments.lib import analysis
from experiments.lib import common
from experiments.lib import headline
from pathology_fix import pretrained
from pathology_fix.runtime import checkpoints

QUICK = dict(headline.EVAL, inner_steps=100, num_fmnist_tasks=2,
             num_digits_tasks=1, eval_every=50, train_eval_examples=500,
             timing_steps=50, timing_repeats=1)
TRANSFER = (("conv3", 8), ("mlp3x128", 14))  # never seen in meta-training
TRANSFER_TASKS = 3

BENCH_STEP = os.path.join(common.RESULTS, "bench_step", "results.json")


def snapshot_thetas(name, lopt):
  """{"<m> min": theta} in meta-training order, ending with the shipped one."""
  folder = pretrained.path(name)
  rec = pretrained.record(name)
  thetas, minutes = {}, []
  for snap in rec.get("snapshots", []):
    label = f"{snap['minutes']:.0f} min"
    thetas[label] = checkpoints.load_params(
        os.path.join(folder, "snapshots"), snap["step"], lopt)
    minutes.append(snap["minutes"])
  thetas["shipped"] = pretrained.load(name)[1]
  minutes.append(rec["meta_training_minutes"])
  return thetas, minutes


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


def transfer(lopt, theta, cfg, seed):
  """The shipped theta vs tuned baselines on unseen architectures."""
  rows = {}
  for arch, size in TRANSFER:
    specs = headline.heldout_specs(1 if cfg is QUICK else TRANSFER_TASKS, 0,
                                   seed)
    # Whole-split losses 4 times a run (not every 50 steps): conv3's 34 runs
    # per task would otherwise spend most of their time in evaluation.
    every = max(cfg["eval_every"], cfg["inner_steps"] // 4)
    evaluated = headline.evaluate(lopt, {"shipped": theta},
                                  dict(cfg, eval_every=every,
                                       train_eval_examples=1000), seed,
                                  specs=specs, arch=arch, image_size=size,
                                  measure_speed=False)
    rows[f"{arch}@{size}px"] = dict(
        headline.summary_row(evaluated, "shipped"),
        tasks=evaluated["task_names"],
        per_task=evaluated["result"]["per_task"]["test/shipped"])
  return rows


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


def run(name, quick, out_dir, seed, compare=()):
  t0 = time.perf_counter()
  cfg = QUICK if quick else headline.EVAL
  lopt, _ = pretrained.load(name)
  thetas, minutes = snapshot_thetas(name, lopt)
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
  print("[e5] unseen architectures ...", flush=True)
  other = transfer(lopt, thetas["shipped"], cfg, seed)
  rec = pretrained.record(name)
  numbers = dict(
      pretrained=name, learned_optimizer=rec["learned_optimizer"],
      meta_training_minutes=rec["meta_training_minutes"],
      meta_training_outer_steps=rec["outer_steps"], config=cfg, seed=seed,
      win_rate_test=final["win_rate_test"],
      win_rate_train=final["win_rate_train"],
      wallclock_ratio_to_best_train_loss=ratio["wallclock_ratio"],
      step_ratio_to_best_train_loss=ratio["step_ratio"],
      ratio_to_best_train_loss=ratio,
      shipped=final, steps_per_second=evaluated["steps_per_second"],
      step_speed_in_scan=step_speed(rec["learned_optimizer"]),
      win_rate_vs_minutes=[dict(label=n, minutes=m, **r)
                           for n, m, r in zip(thetas, minutes, rows)],
      task_names=evaluated["task_names"],
      per_task=evaluated["result"]["per_task"]["test/shipped"],
      per_task_train=evaluated["result"]["per_task"]["train/shipped"],
      chosen_lr=evaluated["result"]["chosen_lr"],
      unseen_architectures=other, other_learned_optimizers=levers,
      seconds=time.perf_counter() - t0)
  headline.plot_win_rate_vs_minutes(out_dir, minutes, rows)
  numbers = analysis.mark_unreached(numbers)
  # The keys: null (not "not reached") when never reached.
  for key in ("wallclock_ratio_to_best_train_loss",
              "step_ratio_to_best_train_loss"):
    if numbers[key] == analysis.NOT_REACHED:
      numbers[key] = None
  common.finish(out_dir, numbers, summary(numbers), quick)
  return 0


def _pct(x):
  return "n/a" if x is None else f"{x:.0%}"


def _ratio(x):
  return "never" if x in (None, analysis.NOT_REACHED) else f"{x:.2f}"


def summary(n) -> str:
  f = n["shipped"]
  r = n["ratio_to_best_train_loss"]
  lines = [
      f"# E5 headline: shipped `{n['pretrained']}` ({n['learned_optimizer']},"
      f" {n['meta_training_minutes']:.0f} min of meta-training, "
      f"{n['meta_training_outer_steps']} outer steps)", "",
      f"{len(n['task_names'])} held-out tasks ({', '.join(n['task_names'])}),"
      f" {n['config']['inner_steps']} inner steps; baseline = best per task of"
      " Adam, RMSProp, SGD+momentum, each tuned over 11 learning rates.", "",
      "| | target | learned | best tuned baseline |", "|---|---|---|---|",
      f"| wins on final test loss | >= 90% | {_pct(f['win_rate_test'])} | |",
      f"| wins on final training loss | | {_pct(f['win_rate_train'])} | |",
      f"| mean final test loss | | {f['mean_final_test_loss']:.4f} | "
      f"{f['best_baseline_mean_final_test_loss']:.4f} |",
      f"| mean final training loss | | {f['mean_final_train_loss']:.4f} | "
      f"{f['best_baseline_mean_final_train_loss']:.4f} |",
      f"| steps to {r['best_baseline']}'s final training loss (mean curves) "
      f"| <= 0.5x | {_ratio(r['step_ratio'])} | 1 |",
      f"| wall-clock to the same | | {_ratio(r['wallclock_ratio'])} | "
      "1 |", "", "## Win rate against meta-training minutes", "",
      "| theta | minutes | wins (test) | wins (train) | mean test loss |",
      "|---|---|---|---|---|"]
  for row in n["win_rate_vs_minutes"]:
    lines.append(f"| {row['label']} | {row['minutes']:.1f} | "
                 f"{_pct(row['win_rate_test'])} | "
                 f"{_pct(row['win_rate_train'])} | "
                 f"{row['mean_final_test_loss']:.4f} |")
  if n["other_learned_optimizers"]:
    lines += ["", "## Other learned optimizers (levers), same tasks", "",
              "| learned optimizer | wins (test) | wins (train) | mean test "
              "loss |", "|---|---|---|---|"]
    for k, row in n["other_learned_optimizers"].items():
      lines.append(f"| {k} | {_pct(row['win_rate_test'])} | "
                   f"{_pct(row['win_rate_train'])} | "
                   f"{row['mean_final_test_loss']:.4f} |")
  lines += ["", "## Tasks never seen in meta-training (no target)", "",
            "| task | wins (test) | wins (train) | mean test loss | best "
            "baseline |", "|---|---|---|---|---|"]
  for task, row in n["unseen_architectures"].items():
    lines.append(f"| {task} ({len(row['tasks'])} tasks) | "
                 f"{_pct(row['win_rate_test'])} | "
                 f"{_pct(row['win_rate_train'])} | "
                 f"{row['mean_final_test_loss']:.4f} | "
                 f"{row['best_baseline_mean_final_test_loss']:.4f} |")
  speed = n["step_speed_in_scan"]
  if speed:
    lines += ["", "Learned step / Adam's step, CPU time inside a jitted "
              "lax.scan, interleaved (" + speed["source"] + "): " +
              ", ".join(f"{t} {v['cpu_ratio_to_adam']:.2f}x"
                        for t, v in speed["tasks"].items()) + "."]
  return "\n".join(lines)
