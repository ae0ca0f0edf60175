"""One process of the same-answer test (tests/test_distributed.py).

  python tests/distributed_worker.py OUT.json [COORDINATOR NUM_PROCESSES ID]

HybridRPES with the validation meta-objective on a small digits MLP task:
the first outer gradient and theta after NUM_STEPS outer steps with the
paper's outer optimizer, this process's samples and how many batches it
built. Writes them as JSON to OUT.json.<process index>.
"""

import json
import sys

from pathology_fix.runtime import distributed

NUM_SAMPLES = 6
NUM_STEPS = 3


def main(argv):
  out_path = argv[1]
  if len(argv) > 2:
    distributed.initialize(argv[2], int(argv[3]), int(argv[4]),
                           heartbeat_timeout_s=10)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from learned_optimization.learned_optimizers import base as lopt_base  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncation_schedule  # pylint: disable=g-import-not-at-top
  from pathology_fix.meta_gradient import estimators  # pylint: disable=g-import-not-at-top
  from pathology_fix.tasks_and_data import tasks  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import outer_loop  # pylint: disable=g-import-not-at-top

  # Counts the batches built (images gathered); skipped ones are not.
  from pathology_fix.tasks_and_data import data  # pylint: disable=g-import-not-at-top
  gathered = [0]
  gather = data._SplitData.gather  # pylint: disable=protected-access

  def counting_gather(self, positions):
    gathered[0] += 1
    return gather(self, positions)

  data._SplitData.gather = counting_gather  # pylint: disable=protected-access
  family = tasks.DigitsClassSubsetFamily(
      architecture="mlp2x32", batch_size=8, num_classes_per_task=3)
  lopt = lopt_base.LearnableSGDM()
  est = estimators.HybridRPES(
      family, lopt, truncation_schedule.ConstantTruncationSchedule(8),
      num_tasks=NUM_SAMPLES, unroll_length=4, steps_per_jit=2,
      meta_loss_split="outer_valid", meta_loss_evals=2)
  learner = outer_loop.learner(lopt)
  state = learner.init(jax.random.PRNGKey(0))
  weights = gradient_learner.WorkerWeights(
      theta=outer_loop.theta(learner, state), theta_model_state=None,
      outer_state=gradient_learner.OuterState(0))
  first, _ = est.compute_gradient_estimate(
      weights, jax.random.PRNGKey(7), est.init_worker_state(
          weights, jax.random.PRNGKey(8)))
  steps = list(outer_loop.run(learner, [est], state, NUM_STEPS,
                              jax.random.PRNGKey(1),
                              unroll_key=jax.random.PRNGKey(2)))
  theta = outer_loop.theta(learner, steps[-1].learner_state)
  flat = lambda tree: {  # pylint: disable=g-long-lambda
      jax.tree_util.keystr(k): np.asarray(v).tolist()
      for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  result = dict(process_index=jax.process_index(),
                process_count=jax.process_count(),
                devices=len(jax.devices()),
                split=est.sharding.active,
                local_samples=est.sharding.local_samples.tolist(),
                gathered=gathered[0],
                grad=flat(first.grad), theta=flat(theta),
                losses=[float(s.mean_loss) for s in steps])
  with open(f"{out_path}.{jax.process_index()}", "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv)
