"""Share of a HybridRPES outer step spent in the offline data pipeline.

  python -m experiments.bench_data [--quick] [--out DIR]

Real outer steps of the library loop (`pathology_fix.runtime.outer_loop`;
validation meta-objective, MLPLOpt) on the offline
Fashion-MNIST tasks; the time inside the unroller's batch fetching (drawing
train and outer_valid batches from the numpy iterators and stacking them per
chunk) is clocked within those same steps, so the share needs no second run.
Writes experiments/results/bench_data/{results.json,summary.md}.
"""

import time

import jax

from experiments.lib import common
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.outer_trainers import truncation_schedule
from pathology_fix.meta_gradient import estimators
from pathology_fix.runtime import outer_loop
from pathology_fix.tasks_and_data import tasks

NAME = "bench_data"
# (architecture, image size, batch size, n, k, meta_loss_evals): the cheapest
# task (largest share) at the demo's settings, then the paper's CNN with the
# paper's 5 validation batches (at 8px: 28px takes minutes a step on 2 cores).
SETUPS = (("mlp2x32", 8, 64, 8, 20, 2), ("conv3", 8, 64, 2, 10, 5))


class _Clocked:
  """Calls `fn` and adds the wall time it took to `seconds`."""

  def __init__(self, fn):
    self.fn = fn
    self.seconds = 0.0
    self.calls = 0

  def __call__(self, *args, **kwargs):
    start = time.perf_counter()
    out = self.fn(*args, **kwargs)
    self.seconds += time.perf_counter() - start
    self.calls += 1
    return out


def measure(architecture, image_size, batch_size, n, k, evals, steps, seed):
  """Seconds per outer step and data seconds within it, after one warm-up."""
  family = tasks.FashionMnistClassSubsetFamily(
      architecture=architecture, image_size=image_size, batch_size=batch_size,
      seed=seed)
  lopt = mlp_lopt.MLPLOpt(compute_summary=False)
  estimator = estimators.HybridRPES(
      family, lopt,
      truncation_schedule.ConstantTruncationSchedule(k * (steps + 2)),
      num_tasks=n, unroll_length=k, steps_per_jit=10,
      meta_loss_split="outer_valid", meta_loss_evals=evals)
  learner = outer_loop.learner(lopt)
  state = learner.init(jax.random.PRNGKey(seed))
  # Clocks the inner problems' public data function inside real steps
  # (wrapped, not changed: it still runs as before).
  data = _Clocked(estimator.unroller.problems.chunk_data)
  estimator.unroller.problems.chunk_data = data
  total = 0.0
  start = time.perf_counter()
  for out in outer_loop.run(learner, [estimator], state, steps + 1,
                            jax.random.PRNGKey(seed),
                            unroll_key=jax.random.PRNGKey(seed + 1)):
    jax.block_until_ready((out.learner_state, out.unroll_states))
    total += time.perf_counter() - start
    if out.step == 1:  # step 0 compiles
      data.seconds, data.calls, total = 0.0, 0, 0.0
    start = time.perf_counter()
  return {"task": f"{architecture} {image_size}px b{batch_size}", "n": n,
          "k": k, "meta_loss_evals": evals, "steps": steps,
          "step_s": total / steps, "data_s": data.seconds / steps,
          "data_share": data.seconds / total,
          "chunks_per_step": data.calls / steps}


def main(argv=None):
  args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
  out_dir = common.results_dir(NAME, args.out)
  steps = 3 if args.quick else 10
  rows = [measure(*setup, steps=steps, seed=args.seed) for setup in SETUPS]
  lines = ["# Data-pipeline share of a HybridRPES outer step", "",
           f"{steps} timed outer steps after one warm-up; validation "
           "meta-objective; MLPLOpt; steps_per_jit 10.", "",
           "| task | n | k | meta_loss_evals | outer step | data | share |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['task']} | {r['n']} | {r['k']} | "
                 f"{r['meta_loss_evals']} | {r['step_s'] * 1e3:.1f} ms | "
                 f"{r['data_s'] * 1e3:.1f} ms | {r['data_share']:.1%} |")
  common.finish(out_dir, {"rows": rows}, "\n".join(lines), quick=args.quick)


if __name__ == "__main__":
  main()
