r"""E7: which gradient estimator, for which budget.

  python -m experiments.e7_estimator_study [--quick] [--out DIR] [--seed S]

Estimators: HybridRPES, VariationalRP, VariationalES, NoiseReuseES (ours) and
LO's TruncatedPES, TruncatedES, TruncatedGrad (built with
`lo_api.build_lo_estimator`, so either LO version works). All of them
meta-train the same MLPLOpt on the same task distribution (mlp2x32, 8x8
Fashion-MNIST, 3-class subsets of classes 0-4) and the same outer objective:
the validation meta-loss of `validation_task.ValidationMetaLossFamily`
(meta_loss_evals outer_valid batches per step, each clipped at max_loss), the
same sigma (LO's std), the same n samples per step and the same outer
optimizer (the paper's Adam, `outer_optimizer.paper_outer_optimizer`).

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
from experiments.lib import estimator_study_files as files
from experiments.lib import estimator_study_report as report
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

THETA_LABELS = ("init", "mid")  # part 1's thetas


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
      # Part 1's mid theta; a part-2-only rerun keeps the one part 1 used.
      if (name == "HybridRPES" and seed == cfg["seeds"][0] and
          not cfg["part2_only"]):
        files.save_mid_theta(out_dir, run["checkpoints"][_mid_index(cfg)], seed)
      study.progress(f"  meta-test {row['meta_test'][0]:.3f} -> "
                     f"{row['meta_test'][-1]:.3f} after "
                     f"{run['outer_steps']} outer steps")
      files.write_part(out_dir, "part2", name, part)
      # The config on disk, for --finish after a stop.
      common.write_results(out_dir, numbers, "partial results", "partial")
    part["complete"] = True
    files.write_part(out_dir, "part2", name, part)
  return runs


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
  np.savez(files.reference_file(out_dir, label), es_draws=es_draws,
           rp_draws=rp_draws)
  return study.merged_reference(es_draws, rp_draws)


def part1_quality(cfg, family, lopt, label, theta, out_dir, cache,
                  resume=False):
  """Part 1 at one theta: rows (estimator, k, point, cosines, variance,
  inner steps, seconds) and the reference's account, rewritten to
  part1_<label>.json after every estimator (complete: false until done).

  resume: keep that file's rows and the reference from its saved draws
  (reference_<label>.npz); only the estimators without rows are run.
  """
  t0 = time.perf_counter()
  path = files.part_file(out_dir, "part1", label)
  draws = files.reference_file(out_dir, label)
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
    files.write_part(out_dir, "part1", label, result)
  result["complete"] = True
  files.write_part(out_dir, "part1", label, result)
  return result


def _mid_index(cfg):
  """Part 2's middle checkpoint (index 0 is the initial theta)."""
  return (cfg["num_checkpoints"] + 1) // 2


def mid_theta(cfg, family, lopt, out_dir, template, cache):
  """HybridRPES's theta from the first seed's run at its middle checkpoint.

  Read from out_dir/mid_theta.msgpack when part 2 (or an earlier call) saved
  it; otherwise meta-trained again up to that checkpoint's wall-clock mark
  (on a slower or busier core that is fewer outer steps) and saved.
  """
  theta = files.load_mid_theta(out_dir, template)
  if theta is None:
    seconds = (cfg["train_seconds"] * _mid_index(cfg) /
               cfg["num_checkpoints"])
    study.progress(f"part 1: theta mid, HybridRPES {seconds:.0f} s")
    est = _estimator(cache, "HybridRPES", family, lopt, cfg, cfg["train_k"],
                     cfg["stagger"])
    run = study.meta_train_timed(est, lopt, dict(cfg, train_seconds=seconds),
                                 cfg["seeds"][0], [seconds])
    files.save_mid_theta(out_dir, run["checkpoints"][-1], cfg["seeds"][0])
    theta = files.load_mid_theta(out_dir, template)
  return theta


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
  p.add_argument("--clock", choices=sorted(study.CLOCKS), default="wall",
                 help="part 2's budget in wall-clock seconds or in this "
                      "process's CPU seconds (pin it to one core with "
                      "taskset: then equal on an idle core, and other jobs "
                      "do not shrink its budget)")
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
  cfg["clock"] = args.clock
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
  stale = [files.part_file(out_dir, "part2", n) for n in cfg["estimators"]]
  if not args.part2_only:
    stale += (list(out_dir.glob("part1_*.json")) +
              [out_dir / f for f in files.MID_THETA_FILES])
  for path in stale:
    path.unlink(missing_ok=True)
  cache = {}
  part2_meta_training(cfg, family, lopt, out_dir, numbers, cache, args.seed)
  if args.part2_only:
    finish(out_dir, numbers, mode)
    return 0
  thetas = {"init": study.init_theta(cfg, lopt)}
  thetas["mid"] = mid_theta(cfg, family, lopt, out_dir, thetas["init"],
                            cache)
  for label, theta in thetas.items():
    part1_quality(cfg, family, lopt, label, theta, out_dir, cache)
  numbers["seconds_total"] = time.perf_counter() - t_start
  finish(out_dir, numbers, mode)
  return 0


def finish(out_dir, numbers, mode):
  """Part 1's files, part 3 (budget table), plots, results.json, summary.md."""
  cfg = numbers["config"]
  files.collect_parts(out_dir, numbers)
  if (numbers["part1_incomplete"] or numbers["part2_incomplete"]) and (
      mode != "quick"):
    mode = "partial"
  budgets = [cfg["train_seconds"] / 60 * j / cfg["num_checkpoints"]
             for j in range(1, cfg["num_checkpoints"] + 1)]
  numbers["budget_table"] = study.budget_table(numbers["meta_training"],
                                               budgets)
  numbers["median_final_meta_test"] = study.median_final(
      numbers["meta_training"])
  report.plot_training(out_dir, numbers["meta_training"])
  report.plot_quality(out_dir, numbers["gradient_quality"])
  summary = report.summary(numbers, mode)
  common.write_results(out_dir, numbers, summary, mode)
  print(summary)
  study.progress(f"wrote {out_dir}")


# Part 1 alone, sized to finish within ~40 minutes per theta on one core.
QUALITY_ONLY = dict(quality_points=(0, 500), quality_draws=6, ref_samples=50,
                    ref_draws=4, rp_ref_draws=6)


def quality_only(out_dir, seed, labels, resume=False):
  """Reruns part 1 (QUALITY_ONLY sizes) at the thetas `labels` on a
  results.json holding part 2, then finishes with every part1_*.json there.
  The sizes used are stored as config["part1"]."""
  cfg = dict(files.stored(out_dir)["config"], **QUALITY_ONLY)
  family, _ = study.validation_family(cfg, seed=seed)
  lopt = meta_training.make_lopt()
  cache = {}
  theta0 = study.init_theta(cfg, lopt)
  for label in labels:
    theta = theta0 if label == "init" else mid_theta(
        cfg, family, lopt, out_dir, theta0, cache)
    part1_quality(cfg, family, lopt, label, theta, out_dir, cache, resume)
  # Re-read: another process may have finished part 1 meanwhile.
  numbers = files.stored(out_dir)
  numbers["config"]["part1"] = QUALITY_ONLY
  finish(out_dir, numbers, "full")
  return 0


def finish_stored(out_dir):
  """Finishes from what out_dir holds (e.g. after a run stopped out of time,
  or after parts ran in separate processes)."""
  numbers = files.stored(out_dir)
  missing = [t for t in THETA_LABELS
             if not files.part_file(out_dir, "part1", t).exists()]
  if numbers["config"].get("part2_only"):
    missing = []
  finish(out_dir, numbers, "partial" if missing else "full")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
