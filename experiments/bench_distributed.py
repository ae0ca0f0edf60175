r"""Outer-step time on 1 process vs 2 processes (jax.distributed) on this machine.

  python -m experiments.bench_distributed [--quick] [--samples 8,16,32]
                                          [--steps 5] [--processes 2] [--out DIR]

One outer step of HybridRPES (validation meta-objective, 3-class digits
mlp2x32 tasks, batch 32, truncations of 10 steps, paper outer optimizer),
for n = 8, 16, 32 samples, run by one process (one device) and by
--processes local processes (one device each, gloo collectives over
127.0.0.1, the samples split between them: `pathology_fix.runtime.distributed`).
Each configuration compiles and runs one warm-up step, then times --steps
outer steps; reported is the median step time, and the ratio
t(P processes) / t(1 process) in one run. The processes share this
machine's cores, so on a 2-core CPU no speed-up is expected: the ratio
measures correctness's overhead (collectives, per-process data). On several
GPUs or hosts, each process adds a device and the ratio is the speed-up's
inverse (see experiments/bench_gpu.sh).

Writes DIR/results.json and DIR/summary.md (default
experiments/results/bench_distributed/). --quick: n = 8, 16 and 3 steps.
--gpus: process i uses GPU i only (the 1-process baseline GPU 0).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from experiments.lib import common

NAME = "bench_distributed"
TIMEOUT_S = 900


def _args(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--samples", default="8,16,32",
                 help="comma-separated numbers of samples n")
  p.add_argument("--steps", type=int, default=5, help="timed outer steps")
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--gpus", action="store_true",
                 help="one GPU per process (CUDA_VISIBLE_DEVICES=i) instead "
                 "of one CPU device each")
  # Internal: one process of a measurement.
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  p.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.samples, args.steps = "8,16", 3
  args.samples = [int(n) for n in args.samples.split(",")]
  return args


def _time_steps(num_samples: int, steps: int, seed: int) -> dict:
  """Median wall time of `steps` outer steps after one warm-up step."""
  import jax  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncation_schedule  # pylint: disable=g-import-not-at-top
  from pathology_fix.meta_gradient import estimators  # pylint: disable=g-import-not-at-top
  from pathology_fix.optimizers import paper_lopt  # pylint: disable=g-import-not-at-top
  from pathology_fix.tasks_and_data import tasks  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import outer_loop  # pylint: disable=g-import-not-at-top

  family = tasks.DigitsClassSubsetFamily(
      architecture="mlp2x32", batch_size=32, num_classes_per_task=3)
  lopt = paper_lopt.PaperMLPLOpt()
  est = estimators.HybridRPES(
      family, lopt, truncation_schedule.ConstantTruncationSchedule(200),
      num_tasks=num_samples, unroll_length=10, steps_per_jit=10,
      meta_loss_split="outer_valid")
  learner = outer_loop.learner(lopt)
  run = outer_loop.run(learner, [est], learner.init(jax.random.PRNGKey(seed)),
                       steps + 1, jax.random.PRNGKey(seed + 1),
                       unroll_key=jax.random.PRNGKey(seed + 2))
  times, cpu_times = [], []
  start, cpu_start = time.perf_counter(), time.process_time()
  for out in run:
    jax.block_until_ready(outer_loop.theta(learner, out.learner_state))
    now, cpu_now = time.perf_counter(), time.process_time()
    times.append(now - start)
    cpu_times.append(cpu_now - cpu_start)
    start, cpu_start = now, cpu_now
  return {"n": num_samples, "warmup_s": times[0],
          "median_step_s": statistics.median(times[1:]),
          "median_step_cpu_s": statistics.median(cpu_times[1:]),
          "split": est.sharding.active}


def _worker(args):
  from pathology_fix.runtime import distributed  # pylint: disable=g-import-not-at-top
  if args.coordinator:
    distributed.initialize(args.coordinator, args.processes, args.process_id)
  rows = [_time_steps(n, args.steps, args.seed) for n in args.samples]
  with open(f"{args.worker}.{args.process_id}", "w") as f:
    json.dump(rows, f)


def _worker_env(gpus: bool, process_id: int) -> dict:
  if gpus:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": str(process_id)}
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _measure(args, num_processes: int, tmp: str) -> list:
  """Runs the workers of one process count.

  Returns process 0's rows, with CPU time summed over the processes.
  """
  import portpicker  # pylint: disable=g-import-not-at-top
  out = f"{tmp}/p{num_processes}.json"
  base = [sys.executable, "-m", "experiments.bench_distributed", "--worker",
          out, f"--samples={','.join(map(str, args.samples))}",
          f"--steps={args.steps}", f"--seed={args.seed}",
          f"--processes={num_processes}"]
  if num_processes > 1:
    base.append(f"--coordinator=127.0.0.1:{portpicker.pick_unused_port()}")
  common.run_processes(base, num_processes,
                       lambda i: _worker_env(args.gpus, i), TIMEOUT_S)
  per_process = []
  for i in range(num_processes):
    with open(f"{out}.{i}") as f:
      per_process.append(json.load(f))
  rows = per_process[0]
  for i, row in enumerate(rows):
    row["median_step_cpu_s"] = sum(p[i]["median_step_cpu_s"]
                                   for p in per_process)
  return rows


def _summary(rows, args) -> str:
  lines = [
      f"# Outer-step time: 1 process vs {args.processes} processes",
      "",
      f"HybridRPES, validation objective, digits mlp2x32 tasks; median of "
      f"{args.steps} outer steps after a warm-up step; one CPU device per "
      "process, all on this machine (they share its cores).",
      "",
      "Wall: process 0's step time. CPU: the step's CPU time summed over "
      "the processes (robust to other jobs on a shared machine; a ratio "
      "above 1 is the cost of splitting: collectives, per-process data).",
      "",
      f"| n | wall, 1 process (s) | wall, {args.processes} processes (s) | "
      "wall ratio | CPU, 1 process (s) | CPU, all processes (s) | CPU ratio |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['n']} | {r['one_process_s']:.3f} | "
                 f"{r['multi_process_s']:.3f} | {r['ratio']:.2f} | "
                 f"{r['one_process_cpu_s']:.3f} | "
                 f"{r['multi_process_cpu_s']:.3f} | {r['cpu_ratio']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  args = _args(argv)
  if args.worker:
    _worker(args)
    return
  out_dir = common.results_dir(NAME, args.out)
  with tempfile.TemporaryDirectory() as tmp:
    one = _measure(args, 1, tmp)
    many = _measure(args, args.processes, tmp)
  rows = [{"n": a["n"], "one_process_s": a["median_step_s"],
           "multi_process_s": b["median_step_s"],
           "ratio": b["median_step_s"] / a["median_step_s"],
           "one_process_cpu_s": a["median_step_cpu_s"],
           "multi_process_cpu_s": b["median_step_cpu_s"],
           "cpu_ratio": b["median_step_cpu_s"] / a["median_step_cpu_s"],
           "multi_process_split": b["split"]} for a, b in zip(one, many)]
  common.finish(out_dir, {"rows": rows, "processes": args.processes,
                          "steps": args.steps}, _summary(rows, args),
                args.quick)


if __name__ == "__main__":
  main()
