r"""Outer-step cost of HybridRPES against LO's truncated estimators.

  python -m experiments.bench [--quick] [--samples 8,16,...] [--out FILE]
  python -m experiments.bench --preset gpu --out bench_gpu.md   (one H100)

For every (task, truncation length k, n samples) it runs outer steps of the
library loop (`pathology_fix.runtime.outer_loop.outer_step`: the estimate, then the
paper's outer update of theta) and times the estimate within each
(`compute_gradient_estimate`, blocked on the gradient) of

  HybridRPES (remat)   n antithetic pairs = 2n unrolls, reverse pass recomputes
                       each chunk (rematerialize=True)
  HybridRPES (stored)  the same, keeping each chunk's residuals
                       (rematerialize=False); the default "auto" is this one
                       up to remat_chunk_threshold=10 chunks while the
                       residuals fit remat_memory_budget_mb, remat beyond
  TruncatedGrad        LO, num_tasks = 2n (same number of unrolls)
  TruncatedES          LO, num_tasks = n antithetic pairs, stacked (both signs
                       in one vectorized call, as HybridRPES does)
  TruncatedPES         LO, num_tasks = n, stacked

with MLPLOpt, steps_per_jit = 10, and an inner run long enough that no inner
problem resets during the measurement. Tasks: LO's FixedDimQuadraticFamily(10)
and the paper's 3-layer CNN (`pathology_fix.tasks_and_data.tasks.FashionMnistClassSubsetFamily`
with architecture "conv3"; image size and batch are flags).

The estimators of one (task, k, n) run in one fresh process (multiprocessing
"spawn") with their timed steps interleaved, so drifting load on a shared
machine hits all of them alike. Peak memory: on CPU, the rise of the
process's resident memory during one outer step, measured per estimator
after timing; on a GPU, peak_bytes_in_use of a fresh process per estimator
(device peaks cannot be reset). Children share a persistent XLA compilation
cache, so only the first process of each shape pays full compile time.
--profile adds a part-by-part timing of one HybridRPES chunk with XLA's cost
estimates. The parent prints the Markdown table and, with --out FILE,
writes FILE.md and FILE.json. The children's code is in experiments/lib/
(bench_child, bench_runs, bench_profile, bench_phases, bench_report).
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List

from experiments.lib.bench_report import add_ratios, markdown, profile_markdown
from experiments.lib.bench_report import summary_keys, summary_markdown
from experiments.lib.bench_runs import AUTO, AUTO_WHOLE_CHUNK
from experiments.lib.bench_runs import DEFAULT_CACHE_DIR, ESTIMATORS
from experiments.lib.bench_child import run_in_child
from experiments.lib.bench_runs import EXTRA_ESTIMATORS, REMAT_WHOLE_CHUNK

# The performance table's groups: (task, k, n, estimators). HybridRPES as the
# library runs it ("auto") against forward-only ES on conv3 and the headline
# set-up, each beside the engine without per-step checkpoints; the cost per
# sample on the headline set-up against n; peak memory of the rematerialized
# pass at k = 10 and 1,000.
_SPEED = (AUTO, AUTO_WHOLE_CHUNK, "TruncatedES", "VariationalES")
_REMAT = "HybridRPES (remat)"
# The whole-chunk variants hold every chunk's residuals: 3.7 GiB for conv3 at
# k = 100 and 3.4 GiB for the headline at n = 80, so they run where they fit.
_NO_BREAKDOWN = dict(breakdown=False, repeats=1)
PERF_GROUPS = (
    [("headline", 50, 10, _SPEED, {})] +
    [("cnn", 10, 2, _SPEED + (_REMAT,), {}),
     ("cnn", 100, 2, (AUTO, "TruncatedES", "VariationalES"), {})] +
    [("quadratic:1000", k, 2, (_REMAT, REMAT_WHOLE_CHUNK, "TruncatedES"), {})
     for k in (10, 1000)] +
    [("headline", 50, n, (AUTO, "VariationalES") + (
        (AUTO_WHOLE_CHUNK,) if n <= 20 else ()), {}) for n in (20, 40, 80)] +
    [("cnn", 1000, 2, (_REMAT,), _NO_BREAKDOWN)])

# name -> settings. task_lengths / task_samples override lengths / samples.
PRESETS = {
    # CPU, < 5 minutes on 2 idle cores (the budget skips what does not fit).
    # The CNN runs n=2: one outer step of conv3 at n=8 takes ~9 s here.
    "quick": dict(tasks=("quadratic", "cnn"), lengths=(10, 100),
                  task_lengths={"cnn": (10,)}, samples=(8,),
                  task_samples={"cnn": (2,)}, cnn_image_size=8,
                  cnn_batch_size=8, warmup=2,
                  repeats={"quadratic": 10, "cnn": 3}, mem_steps=1,
                  config_timeout=240, budget_s=280),
    # Everything at CPU-friendly sizes (tens of minutes on 2 cores).
    "full": dict(tasks=("quadratic", "cnn"), lengths=(10, 100, 1000),
                 task_lengths={}, samples=(8,), task_samples={"cnn": (2,)},
                 cnn_image_size=8, cnn_batch_size=8, warmup=3,
                 repeats={"quadratic": 15, "cnn": 5}, mem_steps=2,
                 config_timeout=1800, budget_s=None),
    # One H100, under 4 minutes: the paper's CNN at 28x28, batch 128; the
    # budget cuts what does not fit (k=1000 last) and says so in the table.
    "gpu": dict(tasks=("cnn",), lengths=(10, 100, 1000), task_lengths={},
                samples=(8,), task_samples={}, cnn_image_size=28,
                cnn_batch_size=128, warmup=2,
                repeats={"quadratic": 5, "cnn": 3}, mem_steps=1,
                config_timeout=150, budget_s=215),
    # Seconds on CPU: checks that the GPU script runs end to end.
    "tiny": dict(tasks=("quadratic",), lengths=(10,), task_lengths={},
                 samples=(2,), task_samples={}, cnn_image_size=8,
                 cnn_batch_size=4, warmup=2, repeats={"quadratic": 2, "cnn": 2},
                 mem_steps=1, config_timeout=300, budget_s=None),
    # The performance table (PERF_GROUPS), one core: about 40 minutes.
    "perf": dict(tasks=(), lengths=(), task_lengths={}, samples=(),
                 task_samples={}, cnn_image_size=8, cnn_batch_size=8,
                 warmup=2, repeats={"quadratic": 5, "cnn": 5, "headline": 5},
                 mem_steps=1, config_timeout=1800, budget_s=None,
                 groups=PERF_GROUPS),
}

def _parse_ints(text: str) -> List[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def build_groups(args) -> List[Dict[str, Any]]:
  """One group per (task, k, n): its estimators are timed in one process."""
  preset = PRESETS[args.preset]
  tasks = args.tasks.split(",") if args.tasks else list(preset["tasks"])
  estimators_ = args.estimators.split(",") if args.estimators else list(
      ESTIMATORS)
  known = ESTIMATORS + EXTRA_ESTIMATORS
  for name in estimators_:
    if name not in known:
      raise SystemExit(f"unknown estimator {name!r}; choose from {known}")
  common = dict(kind="group", spj=args.steps_per_jit,
                warmup=args.warmup or preset["warmup"],
                mem_steps=preset["mem_steps"],
                cnn_image_size=args.cnn_image_size or preset["cnn_image_size"],
                cnn_batch_size=args.cnn_batch_size or preset["cnn_batch_size"])
  groups = [{**common, "task": task, "k": k, "n": n, "estimators": list(names),
             "repeats": preset["repeats"][task.partition(":")[0]],
             **options, **({"repeats": args.repeats} if args.repeats else {})}
            for task, k, n, names, options in preset.get("groups", ())
            if not args.tasks or task in tasks]
  for task in tasks if "groups" not in preset else ():
    if args.lengths:
      lengths = _parse_ints(args.lengths)
    else:
      lengths = preset["task_lengths"].get(task, preset["lengths"])
    if args.samples:
      samples = _parse_ints(args.samples)
    else:
      samples = preset["task_samples"].get(task, preset["samples"])
    for k in lengths:
      if k % args.steps_per_jit:
        raise SystemExit(f"k={k} must be a multiple of steps_per_jit")
      for n in samples:
        groups.append(dict(
            kind="group", task=task, k=k, n=n, estimators=estimators_,
            spj=args.steps_per_jit,
            warmup=args.warmup or preset["warmup"],
            repeats=args.repeats or preset["repeats"][task.partition(":")[0]],
            mem_steps=preset["mem_steps"],
            cnn_image_size=args.cnn_image_size or preset["cnn_image_size"],
            cnn_batch_size=args.cnn_batch_size or preset["cnn_batch_size"]))
  return groups


def _error_rows(group, error):
  return [dict({k: v for k, v in group.items() if k != "estimators"},
               estimator=name, error=error) for name in group["estimators"]]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="CPU preset, < 5 min on 2 cores (= --preset quick)")
  p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                 help="quick (CPU), full (CPU, slow), gpu (one H100, < 4 "
                 "min), tiny (smoke test), perf (the performance table)")
  p.add_argument("--samples", default=None,
                 help="comma-separated n (antithetic pairs), e.g. 8,16,32")
  p.add_argument("--lengths", default=None, help="comma-separated k")
  p.add_argument("--tasks", default=None,
                 help="quadratic[:dim],cnn,headline")
  p.add_argument("--estimators", default=None,
                 help="comma-separated subset of: " + ", ".join(
                     ESTIMATORS + EXTRA_ESTIMATORS))
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--warmup", type=int, default=None)
  p.add_argument("--steps-per-jit", type=int, default=10)
  p.add_argument("--cnn-image-size", type=int, default=None)
  p.add_argument("--cnn-batch-size", type=int, default=None)
  p.add_argument("--time-budget", type=float, default=None,
                 help="seconds; later configurations are skipped once spent")
  p.add_argument("--config-timeout", type=float, default=None,
                 help="seconds per configuration (default: the preset's)")
  p.add_argument("--profile", action="store_true",
                 help="also time HybridRPES's chunk functions one by one")
  p.add_argument("--cache-dir", default=None,
                 help="persistent XLA compilation cache shared by the children "
                 f"and by later runs (default {DEFAULT_CACHE_DIR}); 'temp' "
                 "for a fresh one deleted at exit, 'none' to disable")
  p.add_argument("--out", default=None,
                 help="write FILE.md and FILE.json (extension stripped)")
  return p


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.preset is None:
    args.preset = "quick" if args.quick else "full"

  groups = build_groups(args)
  budget = args.time_budget if args.time_budget is not None else PRESETS[
      args.preset]["budget_s"]
  if args.config_timeout is None:
    args.config_timeout = PRESETS[args.preset]["config_timeout"]
  tmp_cache = None
  if args.cache_dir == "temp":
    tmp_cache = cache_dir = tempfile.mkdtemp(prefix="bench_xla_cache_")
  elif args.cache_dir == "none":
    cache_dir = None
  else:
    cache_dir = args.cache_dir or DEFAULT_CACHE_DIR

  t0 = time.perf_counter()
  load_at_start = os.getloadavg()

  def over_budget():
    return budget is not None and time.perf_counter() - t0 > budget - 10

  def timeout():
    # Within a budget no child may outlive it.
    if budget is None:
      return args.config_timeout
    return max(10., min(args.config_timeout,
                        budget - (time.perf_counter() - t0)))

  results, profiles = [], []
  try:
    for i, group in enumerate(groups):
      if over_budget():
        print(f"[bench] time budget {budget:.0f} s spent: skipping "
              f"{len(groups) - i} groups", file=sys.stderr)
        for g in groups[i:]:
          results += _error_rows(g, "skipped (time budget)")
        break
      group = dict(group, cache_dir=cache_dir)
      rows = run_in_child(group, timeout())
      if isinstance(rows, dict):  # the child failed
        rows = _error_rows(group, rows["error"])
      # Device memory cannot be reset: one fresh process per estimator.
      for row in rows:
        if "error" in row or row.get("platform") == "cpu":
          continue
        if over_budget():
          row.update(peak_mem_bytes=None, mem_method="skipped (time budget)")
          continue
        mem = run_in_child(
            dict(group, kind="memory", estimator=row["estimator"]), timeout())
        row.update(mem if "error" not in mem else dict(
            peak_mem_bytes=None, mem_method="error: " + mem["error"]))
      results += rows
      summary_ = ", ".join(
          f"{r['estimator']} " + (r["error"] if "error" in r else
                                  f"{r['median_s']:.4f} s")
          for r in rows)
      print(f"[bench] {i + 1}/{len(groups)} {group['task']} k={group['k']} "
            f"n={group['n']}: {summary_} (t={time.perf_counter() - t0:.0f} s)",
            file=sys.stderr)

    if args.profile:
      for key in dict.fromkeys((g["task"], g["n"]) for g in groups):
        group = next(g for g in groups if (g["task"], g["n"]) == key)
        if over_budget():
          break
        prof = run_in_child(dict(group, kind="profile", cache_dir=cache_dir,
                                 repeats=max(3, group["repeats"])), timeout())
        if "error" in prof:
          prof = dict(task=group["task"], n=group["n"], error=prof["error"])
        profiles.append(prof)
        print(f"[bench] profiled {key}", file=sys.stderr)
  finally:
    if tmp_cache:
      shutil.rmtree(tmp_cache, ignore_errors=True)

  add_ratios(results)
  load_at_end = os.getloadavg()
  summary = (f"preset {args.preset}, steps_per_jit {args.steps_per_jit}, "
             f"load average {load_at_start[0]:.2f} at start and "
             f"{load_at_end[0]:.2f} at end, "
             f"total {time.perf_counter() - t0:.0f} s")
  table = markdown(results, summary) + "\n" + summary_markdown(
      summary_keys(results))
  if profiles:
    table += "\n" + profile_markdown(profiles)
  print(table)
  if args.out:
    stem = pathlib.Path(args.out)
    if stem.suffix in (".md", ".json"):
      stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(table)
    for r in results + profiles:
      r.pop("cache_dir", None)
    stem.with_suffix(".json").write_text(json.dumps(
        dict(preset=args.preset, argv=sys.argv[1:],
             load_average_at_start=load_at_start,
             load_average_at_end=load_at_end, **summary_keys(results),
             results=results, profiles=profiles),
        indent=1, default=str))
    print(f"[bench] wrote {stem.with_suffix('.md')} and "
          f"{stem.with_suffix('.json')}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
