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
HybridRPES's theta at the middle checkpoint of its first seed's run, saved as
mid_theta.msgpack), at points p of the inner run (each draw its own inner
problems, advanced p steps by the estimator's own truncations): cosine
similarity to a reference gradient of the full-horizon smoothed objective
(ES and RP with k = T and many samples, merged per coordinate by inverse
variance; their agreement is reported), variance of one estimate, its inner
steps and seconds, at truncation lengths k. Part 3: the best estimator per
budget.

Full mode takes about 1.5 hours on one CPU core plus part 1 (about 40
minutes per theta): start it in the background; it prints progress and
rewrites results.json (mode "partial") after every run. Part 1 alone, one
process per theta (one core each), on a finished part 2:

  python -m experiments.e7_estimator_study --quality_only --theta init &
  python -m experiments.e7_estimator_study --quality_only --theta mid
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
    ref_samples=100, ref_draws=6,  # ES reference: draws x samples
    rp_ref_draws=6,  # RP reference: draws x num_tasks samples
)
QUICK = dict(
    FULL, batch_size=16, inner_steps=40, meta_loss_evals=2, seeds=(0,),
    train_k=10, train_seconds=4.0, num_checkpoints=2, eval_tasks=1,
    # Part 1 reuses part 2's compiled estimators (k = train_k, no stagger).
    stagger=False, quality_k=(10,), quality_points=(0,), quality_draws=3,
    ref_samples=20, ref_draws=2, rp_ref_draws=2,
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
  for name in cfg["estimators"]:
    part = dict(estimator=name, runs=[], complete=False)
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
      part["runs"].append(row)
      runs[name] = part["runs"]
      if name == "HybridRPES" and seed == cfg["seeds"][0]:
        save_mid_theta(out_dir, run["checkpoints"][_mid_index(cfg)], seed)
      study.progress(f"  meta-test {row['meta_test'][0]:.3f} -> "
                     f"{row['meta_test'][-1]:.3f} after "
                     f"{run['outer_steps']} outer steps")
      _write_part(out_dir, "part2", name, part)
      # The config on disk, for --finish after a stop.
      common.write_results(out_dir, numbers, "partial results", "partial")
    part["complete"] = True
    _write_part(out_dir, "part2", name, part)
  return runs


def _reference_file(out_dir, label):
  return out_dir / f"reference_{label}.npz"


def _reference(cfg, family, lopt, theta, cache, out_dir, label):
  """The full-horizon smoothed objective's gradient at theta, and its account.

  Two unbiased estimates of it from step 0 with k = T: VariationalES with
  ref_samples x ref_draws pairs and VariationalRP with num_tasks x
  rp_ref_draws pairs, merged by `study.merged_reference`. Their draws are
  saved to reference_<label>.npz.
  """
  T = cfg["inner_steps"]
  es = study.build("VariationalES", family, lopt,
                   dict(cfg, num_tasks=cfg["ref_samples"]), T,
                   staggered=False)
  es_draws, _ = study.gradient_draws(es, theta, 0, cfg["ref_draws"],
                                     jax.random.PRNGKey(6))
  rp = _estimator(cache, "VariationalRP", family, lopt, cfg, T, False)
  rp_draws, _ = study.gradient_draws(rp, theta, 0, cfg["rp_ref_draws"],
                                     jax.random.PRNGKey(7))
  np.savez(_reference_file(out_dir, label), es_draws=es_draws,
           rp_draws=rp_draws)
  return study.merged_reference(es_draws, rp_draws)


def part_file(out_dir, part, label):
  """part1_<theta>.json / part2_<estimator>.json: one process's share."""
  return out_dir / f"{part}_{label}.json"


def _write_part(out_dir, part, label, content):
  part_file(out_dir, part, label).write_text(
      json.dumps(common.jsonable(content), indent=1) + "\n")


def _read_parts(out_dir, part):
  """The part's files in out_dir, and the labels of those not complete."""
  parts = [json.loads(path.read_text())
           for path in sorted(out_dir.glob(f"{part}_*.json"))]
  return parts, [p.get("theta", p.get("estimator")) for p in parts
                 if not p["complete"]]


def part1_quality(cfg, family, lopt, label, theta, out_dir, cache,
                  resume=False):
  """Part 1 at one theta: rows (estimator, k, point, cosines, variance,
  inner steps, seconds) and the reference's account, rewritten to
  part1_<label>.json after every estimator (complete: false until done).

  resume: keep that file's rows and the reference from its saved draws
  (reference_<label>.npz); only the estimators without rows are run.
  """
  t0 = time.perf_counter()
  path, draws = part_file(out_dir, "part1", label), _reference_file(
      out_dir, label)
  if resume and path.exists() and draws.exists():
    result = json.loads(path.read_text())
    saved = np.load(draws)
    ref, _ = study.merged_reference(saved["es_draws"], saved["rp_draws"])
    t0 -= result.get("seconds", 0.0)
  else:
    study.progress(f"part 1: reference gradient at theta {label}")
    ref, account = _reference(cfg, family, lopt, theta, cache, out_dir,
                              label)
    result = dict(theta=label, reference=account, rows=[], complete=False)
  study.progress(f"  reference {label}: {result['reference']}")
  done = {r["estimator"] for r in result["rows"]}
  for name in cfg["estimators"]:
    if name in done:
      continue
    for k in cfg["quality_k"]:
      est = _estimator(cache, name, family, lopt, cfg, k, False)
      for point in cfg["quality_points"]:
        if point % k or point + k > cfg["inner_steps"]:
          continue
        key = jax.random.PRNGKey(zlib.crc32(f"{name}/{k}/{point}".encode()))
        grads, secs = study.gradient_draws(est, theta, point // k,
                                           cfg["quality_draws"], key)
        r = dict(
            estimator=name, theta=label, k=k, point=point,
            cosine=study.cosine(grads.mean(axis=0), ref),
            cosine_single=float(np.median([study.cosine(g, ref)
                                           for g in grads])),
            variance=float(grads.var(axis=0, ddof=1).sum()),
            inner_steps=study.inner_steps_per_estimate(
                name, cfg["num_tasks"], k),
            seconds=float(np.median(secs)))
        result["rows"].append(r)
        study.progress(f"  {name} k={k} {label}@{point}: cos "
                       f"{r['cosine']:.3f} (one: {r['cosine_single']:.3f}),"
                       f" var {r['variance']:.3g}, {r['seconds']:.3f} s")
    result["seconds"] = time.perf_counter() - t0
    _write_part(out_dir, "part1", label, result)
  result["complete"] = True
  _write_part(out_dir, "part1", label, result)
  return result


def collect_parts(out_dir, numbers):
  """Every part file in out_dir into numbers: part 1's rows, references and
  seconds per theta; part 2's runs per estimator (in ESTIMATOR_NAMES order;
  a results.json from before part 2 files existed keeps its own); and the
  labels of unfinished parts."""
  parts, incomplete1 = _read_parts(out_dir, "part1")
  numbers.update(
      gradient_quality=[r for p in parts for r in p["rows"]],
      reference={p["theta"]: p["reference"] for p in parts},
      seconds_part1={p["theta"]: p.get("seconds") for p in parts},
      part1_incomplete=incomplete1)
  parts, incomplete2 = _read_parts(out_dir, "part2")
  if parts:
    by_name = {p["estimator"]: p["runs"] for p in parts}
    numbers["meta_training"] = {n: by_name[n] for n in study.ESTIMATOR_NAMES
                                if n in by_name}
    numbers["estimators"] = list(numbers["meta_training"])
    numbers["config"] = dict(numbers["config"],
                             estimators=numbers["estimators"])
  numbers["part2_incomplete"] = incomplete2


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
    ax.set_yscale("log")  # a diverging seed sits at 1-5, the rest near 0.1
    ax.legend(fontsize=7)
    common.save_figure(fig, out_dir, fname)


def _plot_quality(out_dir, rows):
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


def _quality_lines(numbers):
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
  if numbers.get("gradient_quality"):
    lines += _quality_lines(numbers)
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


# Theta "mid" of part 1 and where it came from (seed, seconds, outer steps).
MID_THETA_FILES = ("mid_theta.msgpack", "mid_theta.json")


def _mid_index(cfg):
  """Part 2's middle checkpoint (index 0 is the initial theta)."""
  return (cfg["num_checkpoints"] + 1) // 2


def mid_theta(cfg, family, lopt, out_dir, template, cache):
  """HybridRPES's theta from the first seed's run at its middle checkpoint.

  Read from out_dir/mid_theta.msgpack when part 2 (or an earlier call) saved
  it; otherwise meta-trained again up to that checkpoint's wall-clock mark
  (on a slower or busier core that is fewer outer steps) and saved.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  path = out_dir / MID_THETA_FILES[0]
  if not path.exists():
    seconds = (cfg["train_seconds"] * _mid_index(cfg) /
               cfg["num_checkpoints"])
    study.progress(f"part 1: theta mid, HybridRPES {seconds:.0f} s")
    est = _estimator(cache, "HybridRPES", family, lopt, cfg, cfg["train_k"],
                     cfg["stagger"])
    run = study.meta_train_timed(est, lopt, dict(cfg, train_seconds=seconds),
                                 cfg["seeds"][0], [seconds])
    save_mid_theta(out_dir, run["checkpoints"][-1], cfg["seeds"][0])
  return flax.serialization.from_bytes(template, path.read_bytes())


def save_mid_theta(out_dir, checkpoint, seed):
  """Writes a (seconds, outer step, inner steps, theta) checkpoint."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  seconds, step, inner, theta = checkpoint
  (out_dir / MID_THETA_FILES[0]).write_bytes(
      flax.serialization.to_bytes(theta))
  (out_dir / MID_THETA_FILES[1]).write_text(json.dumps(dict(
      seed=seed, seconds=seconds, outer_steps=step,
      inner_steps=inner)) + "\n")


def init_theta(cfg, lopt):
  """The initial theta of the first seed's runs (as in meta_train_timed)."""
  from pathology_fix.runtime import outer_loop  # pylint: disable=g-import-not-at-top
  learner = outer_loop.learner(
      lopt, outer_loop.paper_outer_optimizer(cfg["outer_lr"]))
  k_init = jax.random.split(jax.random.PRNGKey(cfg["seeds"][0]), 3)[1]
  return outer_loop.theta(learner, learner.init(k_init))


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--finish", action="store_true",
                 help="only finish the tables and plots from the results in "
                      "the folder (results.json and every part file); mode "
                      "partial if a part is missing or unfinished")
  p.add_argument("--quality_only", action="store_true",
                 help="rerun only part 1 on the results.json of a full run "
                      "(part 2 done)")
  p.add_argument("--resume", action="store_true",
                 help="with --quality_only: keep the rows and reference "
                      "already in part1_<theta>.json; run only the "
                      "estimators it lacks")
  p.add_argument("--theta", choices=THETA_LABELS, action="append",
                 help="with --quality_only: only this theta (repeatable; "
                      "default all). Run one process per theta to use one "
                      "core each; the last to end finishes the tables.")
  p.add_argument("--part2_only", action="store_true",
                 help="only meta-train and judge (part 2), e.g. at a longer "
                      "budget in its own --out folder")
  p.add_argument("--estimator", choices=study.ESTIMATOR_NAMES,
                 action="append",
                 help="only this estimator (repeatable; default all). "
                      "Processes sharing one --out folder each write their "
                      "own estimators' part2_<name>.json; the last to end "
                      "finishes the tables with all of them.")
  p.add_argument("--train_minutes", type=float, default=None,
                 help="meta-training minutes per run (default: the mode's)")
  args = p.parse_args(argv)
  if (args.theta or args.resume) and not args.quality_only:
    p.error("--theta and --resume need --quality_only")
  if (args.estimator or args.train_minutes) and args.quality_only:
    p.error("--estimator and --train_minutes are part 2 settings; "
            "--quality_only reuses part 2's")
  if args.train_minutes is not None and args.train_minutes <= 0:
    p.error(f"--train_minutes must be > 0, got {args.train_minutes}")
  out_dir = common.results_dir(NAME, args.out)
  if args.finish:
    return finish_stored(out_dir)
  if args.quality_only:
    return quality_only(out_dir, args.seed, args.theta or THETA_LABELS,
                        args.resume)
  cfg = dict(QUICK if args.quick else FULL)
  cfg["seeds"] = tuple(args.seed + s for s in cfg["seeds"])
  if args.estimator:
    cfg["estimators"] = tuple(n for n in study.ESTIMATOR_NAMES
                              if n in args.estimator)
  if args.train_minutes:
    cfg["train_seconds"] = 60.0 * args.train_minutes
  cfg["part2_only"] = args.part2_only
  mode = "quick" if args.quick else "full"
  t_start = time.perf_counter()
  family, m = study.validation_family(cfg, seed=args.seed)
  if cfg["num_tasks"] % m or cfg["ref_samples"] % m:
    raise ValueError(f"num_tasks and ref_samples must be multiples of {m}")
  lopt = meta_training.make_lopt()
  numbers = dict(config=cfg, estimators=list(cfg["estimators"]),
                 seeds=list(cfg["seeds"]))
  # Files of this run's own share only: other processes may share out_dir.
  stale = [part_file(out_dir, "part2", n) for n in cfg["estimators"]]
  if not args.part2_only:
    stale += (list(out_dir.glob("part1_*.json")) +
              [out_dir / f for f in MID_THETA_FILES])
  for path in stale:
    path.unlink(missing_ok=True)
  cache = {}
  part2_meta_training(cfg, family, lopt, out_dir, numbers, cache, args.seed)
  if args.part2_only:
    finish(out_dir, numbers, mode)
    return 0
  thetas = {"init": init_theta(cfg, lopt)}
  thetas["mid"] = mid_theta(cfg, family, lopt, out_dir, thetas["init"],
                            cache)
  for label, theta in thetas.items():
    part1_quality(cfg, family, lopt, label, theta, out_dir, cache)
  numbers["seconds_total"] = time.perf_counter() - t_start
  finish(out_dir, numbers, mode)
  return 0


THETA_LABELS = ("init", "mid")


def finish(out_dir, numbers, mode):
  """Part 1's files, part 3 (budget table), plots, results.json, summary.md."""
  cfg = numbers["config"]
  collect_parts(out_dir, numbers)
  mid_record = out_dir / MID_THETA_FILES[1]
  if mid_record.exists():
    numbers["mid_theta"] = json.loads(mid_record.read_text())
  if (numbers["part1_incomplete"] or numbers["part2_incomplete"]) and (
      mode != "quick"):
    mode = "partial"
  budgets = [cfg["train_seconds"] / 60 * j / cfg["num_checkpoints"]
             for j in range(1, cfg["num_checkpoints"] + 1)]
  numbers["budget_table"] = study.budget_table(numbers["meta_training"],
                                               budgets)
  _plot_training(out_dir, numbers["meta_training"])
  _plot_quality(out_dir, numbers["gradient_quality"])
  common.write_results(out_dir, numbers, summary(numbers, mode), mode)
  print(summary(numbers, mode))
  study.progress(f"wrote {out_dir}")


# Part 1 alone, sized to finish within ~40 minutes per theta on one core.
QUALITY_ONLY = dict(quality_points=(0, 500), quality_draws=6, ref_samples=50,
                    ref_draws=4, rp_ref_draws=6)


def _stored(out_dir):
  numbers = json.loads((out_dir / "results.json").read_text())
  for key in ("mode", "date", "gradient_quality", "reference",
              "reference_relative_stderr", "seconds_part1",
              "part1_incomplete", "part2_incomplete", "mid_theta"):
    numbers.pop(key, None)
  return numbers


def quality_only(out_dir, seed, labels, resume=False):
  """Reruns part 1 (QUALITY_ONLY sizes) at the thetas `labels` on a
  results.json holding part 2, then finishes with every part1_*.json there.
  The sizes used are stored as config["part1"]."""
  cfg = dict(_stored(out_dir)["config"], **QUALITY_ONLY)
  family, _ = study.validation_family(cfg, seed=seed)
  lopt = meta_training.make_lopt()
  cache = {}
  theta0 = init_theta(cfg, lopt)
  for label in labels:
    theta = theta0 if label == "init" else mid_theta(
        cfg, family, lopt, out_dir, theta0, cache)
    part1_quality(cfg, family, lopt, label, theta, out_dir, cache, resume)
  # Re-read: another process may have finished part 1 meanwhile.
  numbers = _stored(out_dir)
  numbers["config"]["part1"] = QUALITY_ONLY
  finish(out_dir, numbers, "full")
  return 0


def finish_stored(out_dir):
  """Finishes from what out_dir holds (e.g. after a run stopped out of time,
  or after parts ran in separate processes)."""
  numbers = _stored(out_dir)
  missing = [t for t in THETA_LABELS
             if not part_file(out_dir, "part1", t).exists()]
  if numbers["config"].get("part2_only"):
    missing = []
  finish(out_dir, numbers, "partial" if missing else "full")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
