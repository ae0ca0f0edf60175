"""The headline recipe's set-up for the benchmarks (gin_configs/headline_nnadam_fmnist8.gin).

NNAdam meta-trained on mlp2x32 at 8x8 Fashion-MNIST, every 3-class subset of
classes 0-4 (sample i on subset i mod 10), batch 128, against the validation
loss averaged over 2 clipped outer_valid batches per inner step, sigma 0.01,
max_loss 10. Built here in Python so a benchmark can time it beside LO's
estimators in one process; the recipe's outer optimizer and curriculum are
not part of one outer step's cost.
"""

LABEL = "NNAdam, mlp2x32 8px b128, every 3-of-5-class subset, outer_valid x2"
ESTIMATOR_KWARGS = dict(sigma=0.01, max_loss=10.0,
                        meta_loss_split="outer_valid", meta_loss_evals=2)


def family(seed: int = 0):
  from pathology_fix.tasks_and_data import tasks  # pylint: disable=g-import-not-at-top
  return tasks.every_subset_family(
      class_pool="train", num_classes_per_task=3, dataset="fashion_mnist",
      architecture="mlp2x32", image_size=8, batch_size=128, seed=seed)


def learned_optimizer():
  from learned_optimization.learned_optimizers import nn_adam  # pylint: disable=g-import-not-at-top
  return nn_adam.NNAdam(initial_learning_rate=1e-2)
