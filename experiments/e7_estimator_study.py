r"""E7: which gradient estimator, for which budget (issue 13).

  python -m experiments.e7_estimator_study [--quick] [--out DIR] [--seed S]

Estimators: HybridRPES, VariationalRP, VariationalES, NoiseReuseES (ours) and
LO's TruncatedPES, TruncatedES, TruncatedGrad (built with
`lo_api.build_lo_estimator`, so either LO version works). All of them
meta-train the same MLPLOpt on the same task distribution (mlp2x32, 8x8
Fashion-MNIST, 3-class subsets of classes 0-4) and the same outer objective:
the validation meta-loss of `validation_task.ValidationMetaLossFamily`
(meta_loss_evals outer_valid batches per step, each clipped at max_loss), the
same sigma (LO's std), the same n samples per step and the same outer
optimizer (the paper's Adam, `outer_loop.paper_outer_optimizer`).

Part 2, meta-training at equal wall-clock: every estimator trains for
`train_seconds` (its first, compiling steps not counted) per seed on
`outer_loop.run`; checkpoints along the way are judged by
`evaluation.meta_test` on fixed held-out tasks (classes 5-9): loss vs minutes
and vs inner steps. Part 1, gradient quality, from fixed thetas (init and
HybridRPES's mid-run theta), at points p of the inner run (each draw its own
inner problems, advanced p steps by the estimator's own truncations): cosine
similarity of the mean estimate to a reference gradient of the full-horizon smoothed objective (VariationalES with
k = T and many samples), variance of one estimate, its inner steps and
seconds, at truncation lengths k. Part 3: the best estimator per budget.

Full mode takes about 1.5 hours on one CPU core: start it in the background;
it prints progress and rewrites results.json (mode "partial") after every
run.
"""

import json
import time
import zlib

import jax
import numpy as np

from experiments.lib import common
from experiments.lib import estimator_study as study
from experiments.lib import meta_training
from pathology_fix.runtime import evaluation

NAME = "e7_estimator_study"

FULL = dict(
    batch_size=128, inner_steps=1000, num_tasks=10, steps_per_jit=10,
    sigma=0.01, max_loss=10.0, meta_loss_evals=5, outer_lr=1e-3,
    estimators=study.ESTIMATOR_NAMES, seeds=(0, 1, 2),
    # Part 2: equal wall-clock meta-training.
    # 150 s x 7 estimators x 3 seeds fits one session on one core of this
    # machine; on an accelerator raise it with the same code.
    train_k=100, train_seconds=150.0, num_checkpoints=5, eval_tasks=4,
    untimed_steps=2,  # compilation: run, not counted (see meta_train_timed)
    stagger=True,  # samples start at random points of their inner runs
    # Part 1: gradient quality.
    quality_k=(10, 100, 1000), quality_points=(0, 500), quality_draws=8,
    ref_samples=100, ref_draws=6,
)
QUICK = dict(
    FULL, batch_size=16, inner_steps=40, meta_loss_evals=2, seeds=(0,),
    train_k=10, train_seconds=4.0, num_checkpoints=2, eval_tasks=1,
    # Part 1 reuses part 2's compiled estimators (k = train_k, no stagger).
    stagger=False, quality_k=(10,), quality_points=(0,), quality_draws=3,
    ref_samples=20, ref_draws=2,
)


def _estimator(cache, name, family, lopt, cfg, k, staggered):
  """One instance (one compilation) per (estimator, k, staggered)."""
  if (name, k, staggered) not in cache:
    cache[name, k, staggered] = study.build(name, family, lopt, cfg, k,
                                            staggered)
  return cache[name, k, staggered]


def part2_meta_training(cfg, family, lopt, out_dir, numbers, cache, seed0):
  """{estimator: [per seed: checkpoints' minutes, inner steps, meta-test]}."""
  marks = [cfg["train_seconds"] * j / cfg["num_checkpoints"]
           for j in range(1, cfg["num_checkpoints"] + 1)]
  runs = numbers.setdefault("meta_training", {})
  mids = {}
  for name in cfg["estimators"]:
    for seed in cfg["seeds"]:
      study.progress(f"part 2: {name} seed {seed}, "
                     f"{cfg['train_seconds']:.0f} s")
      est = _estimator(cache, name, family, lopt, cfg, cfg["train_k"],
                       cfg["stagger"])
      run = study.meta_train_timed(est, lopt, cfg, seed, marks)
      thetas = {f"c{j}": c[3] for j, c in enumerate(run["checkpoints"])}
      # Fresh task objects: every run is judged on the same batches.
      result = evaluation.meta_test(study.heldout_tasks(cfg, seed0), lopt,
                                    thetas, cfg["inner_steps"],
                                    jax.random.PRNGKey(1000 + seed0))
      row = dict(
          minutes=[c[0] / 60 for c in run["checkpoints"]],
          outer_steps=[c[1] for c in run["checkpoints"]],
          inner_steps=[c[2] for c in run["checkpoints"]],
          meta_test=[result[f"c{j}"]["final_test_loss"]
                     for j in range(len(thetas))],
          meta_test_train_loss_mean=[result[f"c{j}"]["train_loss_mean"]
                                     for j in range(len(thetas))],
          total_outer_steps=run["outer_steps"],
          train_meta_loss=run["train_meta_loss"])
      runs.setdefault(name, []).append(row)
      if name == "HybridRPES" and seed == cfg["seeds"][0]:
        mids = {"init": run["checkpoints"][0][3],
                "mid": run["checkpoints"][len(run["checkpoints"]) // 2][3]}
      study.progress(f"  meta-test {row['meta_test'][0]:.3f} -> "
                     f"{row['meta_test'][-1]:.3f} after "
                     f"{run['outer_steps']} outer steps")
      common.write_results(out_dir, numbers, "partial results", "partial")
  return runs, mids


def _reference(cfg, family, lopt, theta):
  """Many-sample VariationalES of the full T-step run, from step 0."""
  ref_cfg = dict(cfg, num_tasks=cfg["ref_samples"])
  est = study.build("VariationalES", family, lopt, ref_cfg,
                    cfg["inner_steps"], staggered=False)
  grads, _ = study.gradient_draws(est, theta, 0, cfg["ref_draws"],
                                  jax.random.PRNGKey(6))
  mean = grads.mean(axis=0)
  stderr = np.linalg.norm(grads.std(axis=0, ddof=1)) / np.sqrt(len(grads))
  return mean, float(stderr / max(np.linalg.norm(mean), 1e-30))


def part1_quality(cfg, family, lopt, thetas, out_dir, numbers, cache):
  """Rows: estimator, theta, k, point, cosine, variance, steps, seconds."""
  rows = numbers.setdefault("gradient_quality", [])
  refs = {}
  for label, theta in thetas.items():
    study.progress(f"part 1: reference gradient at theta {label}")
    refs[label] = _reference(cfg, family, lopt, theta)
  numbers["reference_relative_stderr"] = {l: r[1] for l, r in refs.items()}
  for name in cfg["estimators"]:
    for k in cfg["quality_k"]:
      est = _estimator(cache, name, family, lopt, cfg, k, False)
      for label, theta in thetas.items():
        for point in cfg["quality_points"]:
          if point % k or point + k > cfg["inner_steps"]:
            continue
          key = jax.random.PRNGKey(zlib.crc32(f"{name}/{k}/{point}".encode()))
          grads, secs = study.gradient_draws(est, theta, point // k,
                                             cfg["quality_draws"], key)
          rows.append(dict(
              estimator=name, theta=label, k=k, point=point,
              cosine=study.cosine(grads.mean(axis=0), refs[label][0]),
              variance=float(grads.var(axis=0, ddof=1).sum()),
              inner_steps=study.inner_steps_per_estimate(
                  name, cfg["num_tasks"], k),
              seconds=float(np.median(secs))))
          r = rows[-1]
          study.progress(f"  {name} k={k} {label}@{point}: cos "
                         f"{r['cosine']:.3f}, var {r['variance']:.3g}, "
                         f"{r['seconds']:.3f} s")
      common.write_results(out_dir, numbers, "partial results", "partial")
  return rows


def _plot_training(out_dir, runs):
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
    ax.legend(fontsize=7)
    common.save_figure(fig, out_dir, fname)


def _plot_quality(out_dir, rows):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(13, 4))
  for name in sorted({r["estimator"] for r in rows}):
    mine = [r for r in rows if r["estimator"] == name and r["point"] == 0
            and r["theta"] == "init"]
    if not mine:
      continue
    axes[0].plot([r["k"] for r in mine], [r["cosine"] for r in mine],
                 marker="o", label=name)
    axes[1].scatter([r["inner_steps"] for r in mine],
                    [r["variance"] for r in mine], label=name)
    axes[2].scatter([r["seconds"] for r in mine],
                    [r["variance"] for r in mine], label=name)
  axes[0].set(xscale="log", xlabel="truncation length k",
              ylabel="cosine to reference")
  axes[1].set(xscale="log", yscale="log", xlabel="inner steps per estimate",
              ylabel="variance of one estimate")
  axes[2].set(xscale="log", yscale="log", xlabel="seconds per estimate",
              ylabel="variance of one estimate")
  axes[0].legend(fontsize=7)
  common.save_figure(fig, out_dir, "gradient_quality.png")


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
  lines += ["", "## Gradient quality (theta at init, inner step 0)", "",
            "| estimator | k | cosine to reference | variance | inner steps "
            "| seconds |", "|---|---|---|---|---|---|"]
  for r in numbers.get("gradient_quality", []):
    if r["theta"] == "init" and r["point"] == 0:
      lines.append(f"| {r['estimator']} | {r['k']} | {r['cosine']:.3f} | "
                   f"{r['variance']:.3g} | {r['inner_steps']} | "
                   f"{r['seconds']:.3f} |")
  rel = numbers.get("reference_relative_stderr", {})
  lines += ["", "Reference gradient relative standard error: " +
            ", ".join(f"{k} {v:.2f}" for k, v in rel.items()) +
            " (cosines are limited by it)."]
  if mode == "partial":
    lines += ["", "Partial: the run stopped before part 1 finished; the "
              "gradient-quality rows are those it completed."]
  if mode == "quick":
    lines += ["", "Quick mode: CI-sized smoke run; its numbers mean nothing."]
  return "\n".join(lines)


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--finish_partial", action="store_true",
                 help="only finish the tables and plots from the partial "
                      "results.json of a stopped full run")
  p.add_argument("--quality_only", action="store_true",
                 help="rerun only part 1 (smaller, QUALITY_ONLY) on the "
                      "results.json of a full run stopped in part 1")
  args = p.parse_args(argv)
  if args.finish_partial:
    return finish_partial(common.results_dir(NAME, args.out))
  if args.quality_only:
    return quality_only(common.results_dir(NAME, args.out), args.seed)
  cfg = dict(QUICK if args.quick else FULL)
  cfg["seeds"] = tuple(args.seed + s for s in cfg["seeds"])
  mode = "quick" if args.quick else "full"
  out_dir = common.results_dir(NAME, args.out)
  t_start = time.perf_counter()
  family, m = study.validation_family(cfg, seed=args.seed)
  if cfg["num_tasks"] % m or cfg["ref_samples"] % m:
    raise ValueError(f"num_tasks and ref_samples must be multiples of {m}")
  lopt = meta_training.make_lopt()
  numbers = dict(config=cfg, estimators=list(cfg["estimators"]),
                 seeds=list(cfg["seeds"]))
  cache = {}
  runs, thetas = part2_meta_training(cfg, family, lopt, out_dir, numbers,
                                     cache, args.seed)
  part1_quality(cfg, family, lopt, thetas, out_dir, numbers, cache)
  numbers["seconds_total"] = time.perf_counter() - t_start
  finish(out_dir, numbers, mode)
  return 0


def finish(out_dir, numbers, mode):
  """Part 3 (budget table), plots, results.json and summary.md."""
  cfg = numbers["config"]
  budgets = [cfg["train_seconds"] / 60 * j / cfg["num_checkpoints"]
             for j in range(1, cfg["num_checkpoints"] + 1)]
  numbers["budget_table"] = study.budget_table(numbers["meta_training"],
                                               budgets)
  _plot_training(out_dir, numbers["meta_training"])
  _plot_quality(out_dir, numbers.get("gradient_quality", []))
  common.write_results(out_dir, numbers, summary(numbers, mode), mode)
  print(summary(numbers, mode))
  study.progress(f"wrote {out_dir}")


# Part 1 alone, sized to finish within ~40 minutes on one core after part 2:
# theta at init only, from inner step 0, fewer draws and reference samples.
QUALITY_ONLY = dict(quality_points=(0,), quality_draws=6, ref_samples=50,
                    ref_draws=4)


def quality_only(out_dir, seed):
  """Reruns part 1 (QUALITY_ONLY sizes) on a results.json holding part 2,
  then finishes; the sizes used are stored as config["part1"]."""
  from pathology_fix.runtime import outer_loop  # pylint: disable=g-import-not-at-top
  numbers = json.loads((out_dir / "results.json").read_text())
  for key in ("mode", "date", "gradient_quality", "reference_relative_stderr"):
    numbers.pop(key, None)
  cfg = dict(numbers["config"], **QUALITY_ONLY)
  numbers["config"]["part1"] = QUALITY_ONLY
  family, _ = study.validation_family(cfg, seed=seed)
  lopt = meta_training.make_lopt()
  learner = outer_loop.learner(
      lopt, outer_loop.paper_outer_optimizer(cfg["outer_lr"]))
  # The initial theta of the first seed's runs (as in meta_train_timed).
  k_init = jax.random.split(jax.random.PRNGKey(cfg["seeds"][0]), 3)[1]
  theta = outer_loop.theta(learner, learner.init(k_init))
  t0 = time.perf_counter()
  part1_quality(cfg, family, lopt, {"init": theta}, out_dir, numbers, {})
  numbers["seconds_part1"] = time.perf_counter() - t0
  finish(out_dir, numbers, "full")
  return 0


def finish_partial(out_dir):
  """Finishes from the partial results.json of a full run that was stopped
  (e.g. out of time) during part 1: everything it holds, mode "partial"."""
  numbers = json.loads((out_dir / "results.json").read_text())
  for key in ("mode", "date"):
    numbers.pop(key, None)
  finish(out_dir, numbers, "partial")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
