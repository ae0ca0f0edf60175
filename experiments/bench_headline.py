r"""Outer steps per minute of the headline recipe, engine variants side by side.

  python -m experiments.bench_headline [--lengths 50,1000] [--steps 3]
                                       [--processes 1] [--out DIR]
  taskset -c 1 python -m experiments.bench_headline          (one core)
  python -m experiments.bench_headline --processes 2         (two processes)

The recipe of gin_configs/headline_nnadam_fmnist8.gin (`lib/bench_headline`:
NNAdam, mlp2x32 at 8x8 Fashion-MNIST, every 3-class subset of classes 0-4,
n = 10, validation meta-loss over 2 batches, 1,000-step inner runs started
at random offsets, the paper's outer optimizer), at fixed truncation lengths
k (the curriculum grows k from 50 to 1,000 over 200 outer steps, so k = 50
is its start and k = 1,000 the rest of a 60-minute run). Variants, each with
its own theta and inner problems, the same keys, timed steps interleaved in
one process:

  whole-chunk   the reverse pass keeping every intermediate of a chunk
                (`InnerProblems.step_checkpoint = None`; the engine before
                per-step checkpoints), remat_chunk_threshold 10 (default)
  step          per-step checkpoints (the default), threshold 10
  step-thr120   the same with remat_chunk_threshold = 120: truncations up
                to the curriculum's longest keep their residuals instead of
                recomputing each chunk (a setting of the recipe's config)

--processes 2 runs the same in two processes of one jax.distributed run (the
project's 2-process run, `pathology_fix.distributed`; samples split 5 + 5),
process i pinned to core i. Reported: median seconds per outer step after
two warm-up steps, outer steps per minute, and the steps a 60-minute run
would take, projected by interpolating the seconds per step linearly in k
along the curriculum (no jitter, no clipping at inner-run ends).
Writes DIR/results.json and DIR/summary.md (default
experiments/results/bench_headline/, one folder per process count).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from experiments.lib import bench_headline
from experiments.lib import common

NAME = "bench_headline"
VARIANTS = {"whole-chunk": (None, 10), "step": ("default", 10),
            "step-thr120": ("default", 120)}
TIMEOUT_S = 3600
# Steps 0 and 1 compile (the second one the learner's update and the inner
# problems' reset again, with the types of a first step's outputs).
WARMUP = 2


def _args(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--lengths", default="50,1000",
                 help="comma-separated truncation lengths k")
  p.add_argument("--steps", type=int, default=3, help="timed outer steps")
  p.add_argument("--processes", type=int, default=1, choices=(1, 2))
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  p.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.lengths, args.steps = "50", 2
  args.lengths = [int(k) for k in args.lengths.split(",")]
  args.variants = args.variants.split(",")
  return args


def _estimator(variant: str, k: int):
  from learned_optimization.outer_trainers import truncation_schedule  # pylint: disable=g-import-not-at-top
  from pathology_fix.meta_gradient import estimators  # pylint: disable=g-import-not-at-top
  from pathology_fix.meta_gradient import schedules  # pylint: disable=g-import-not-at-top
  checkpoint, threshold = VARIANTS[variant]
  est = estimators.HybridRPES(
      bench_headline.family(), bench_headline.learned_optimizer(),
      truncation_schedule.ConstantTruncationSchedule(1000), num_tasks=10,
      steps_per_jit=10, truncation_length=schedules.ConstantTruncationLength(k),
      random_initial_iteration_offset=1000, remat_chunk_threshold=threshold,
      **bench_headline.ESTIMATOR_KWARGS)
  if checkpoint is None:
    est.unroller.problems.step_checkpoint = None
  return est


def _time_variants(variants, k: int, steps: int, seed: int) -> dict:
  """Median seconds per outer step of each variant, steps interleaved."""
  import jax  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import outer_loop  # pylint: disable=g-import-not-at-top
  lopt = bench_headline.learned_optimizer()
  learner = outer_loop.learner(lopt)
  runs = {}
  for v in variants:
    est = _estimator(v, k)
    state = learner.init(jax.random.PRNGKey(seed))
    runs[v] = [est, state, outer_loop.init_unroll_states(
        learner, state, [est], jax.random.PRNGKey(seed + 1)), [], []]
  base_key = jax.random.PRNGKey(seed + 2)
  for step in range(steps + WARMUP):
    for i in range(len(variants)):
      v = variants[(step + i) % len(variants)]
      est, state, unroll_states, wall, cpu = runs[v]
      t, c = time.perf_counter(), time.process_time()
      out = outer_loop.outer_step(learner, [est], unroll_states, state,
                                  outer_loop.step_keys(base_key, step))
      jax.block_until_ready((out.learner_state, out.unroll_states))
      if step >= WARMUP:
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
      runs[v][1:3] = [out.learner_state, out.unroll_states]
  return {v: {"k": k, "median_step_s": statistics.median(r[3]),
              "median_step_cpu_s": statistics.median(r[4]), "step_s": r[3],
              "split": r[0].unroller.sharding.active}
          for v, r in runs.items()}


def _worker(args):
  from pathology_fix.runtime import distributed  # pylint: disable=g-import-not-at-top
  if args.coordinator:
    os.sched_setaffinity(0, {args.process_id % os.cpu_count()})
    distributed.initialize(args.coordinator, args.processes, args.process_id)
  rows = [_time_variants(args.variants, k, args.steps, args.seed)
          for k in args.lengths]
  with open(f"{args.worker}.{args.process_id}", "w") as f:
    json.dump(rows, f)


def _measure(args, tmp: str) -> list:
  """Runs the worker processes; returns process 0's rows."""
  import portpicker  # pylint: disable=g-import-not-at-top
  out = f"{tmp}/rows.json"
  base = [sys.executable, "-m", "experiments.bench_headline", "--worker", out,
          f"--lengths={','.join(map(str, args.lengths))}",
          f"--steps={args.steps}", f"--seed={args.seed}",
          f"--processes={args.processes}",
          f"--variants={','.join(args.variants)}"]
  if args.processes > 1:
    base.append(f"--coordinator=127.0.0.1:{portpicker.pick_unused_port()}")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  common.run_processes(base, args.processes, lambda i: env, TIMEOUT_S)
  with open(f"{out}.0") as f:
    return json.load(f)


def projected_steps(seconds_at_k: dict, minutes: float = 60., k_min=50,
                    k_max=1000, ramp=200) -> float:
  """Outer steps in `minutes` along the curriculum, s(k) linear in k."""
  ks = sorted(seconds_at_k)
  if len(ks) < 2:
    return None
  (k0, s0), (k1, s1) = (ks[0], seconds_at_k[ks[0]]), (ks[-1],
                                                      seconds_at_k[ks[-1]])
  budget, step = minutes * 60., 0
  while True:
    k = k_min + (k_max - k_min) * min(step, ramp) / ramp
    cost = s0 + (s1 - s0) * (k - k0) / (k1 - k0)
    if budget < cost:
      return step + budget / cost
    budget -= cost
    step += 1


def _summary(rows, args, load) -> str:
  lines = [f"# Headline recipe: outer steps per minute, {args.processes} "
           "process(es)", "",
           f"Median of {args.steps} outer steps after {WARMUP} warm-up steps, "
           "variants interleaved in one process; load average "
           f"{load[0]:.2f} at start and {load[1]:.2f} at end. Command: "
           f"`python -m experiments.bench_headline --processes "
           f"{args.processes} --lengths {','.join(map(str, args.lengths))} "
           f"--steps {args.steps} --variants {','.join(args.variants)}`, on "
           "cores "
           f"{sorted(os.sched_getaffinity(0))} (process i of a 2-process run "
           "pinned to core i).",
           "", "| variant | k | s per outer step | CPU s (process 0) | "
           "outer steps / min | vs whole-chunk |", "|---|---|---|---|---|---|"]
  for per_k in rows:
    base = per_k.get("whole-chunk", {}).get("median_step_s")
    for v, r in per_k.items():
      speed = f"{base / r['median_step_s']:.2f}x" if base else "n/a"
      lines.append(f"| {v} | {r['k']} | {r['median_step_s']:.2f} | "
                   f"{r['median_step_cpu_s']:.2f} | "
                   f"{60 / r['median_step_s']:.1f} | {speed} |")
  projected = {v: projected_steps({per_k[v]["k"]: per_k[v]["median_step_s"]
                                   for per_k in rows}) for v in args.variants}
  projected = {v: p for v, p in projected.items() if p is not None}
  if projected:
    lines += ["", "Projected outer steps in 60 minutes (curriculum k = 50 -> "
              "1,000 over 200 steps, then 1,000): " + ", ".join(
                  f"{v}: {p:.0f}" for v, p in projected.items())]
  return "\n".join(lines), projected


def main(argv=None):
  args = _args(argv)
  if args.worker:
    _worker(args)
    return
  out_dir = common.results_dir(NAME, args.out or str(
      common.RESULTS / NAME / f"p{args.processes}"))
  load_start = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    rows = _measure(args, tmp)
  load = (load_start[0], os.getloadavg()[0])
  summary, projected = _summary(rows, args, load)
  common.finish(out_dir, {"rows": rows, "processes": args.processes,
                          "steps": args.steps, "load_average": load,
                          "projected_steps_60_min": projected},
                summary, args.quick)


if __name__ == "__main__":
  main()
