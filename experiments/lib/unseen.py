"""Tasks never seen in meta-training: other architectures, other kinds.

Families (several tasks each, with their own inits and batch orders):
- conv3 at 8x8 and mlp3x128 at 14x14 on Fashion-MNIST classes 5-9 (the
  first 3-class subsets): architectures and an image size the headline
  recipes never meta-train on;
- an MLP (2 hidden layers of 32) on scikit-learn's breast-cancer table
  (binary classification) and on its diabetes table (regression, squared
  error): tabular problems (`pathology_fix.tasks_and_data.tabular`), each task another
  seeded split of the table.

On each family, the learned optimizer's final test loss against the tuned
baselines (E5's: best per task of Adam, RMSProp, SGD+momentum, each tuned
over 11 rates on inner_valid) and against untuned Adam(1e-3) (same init and
batches), as fractions of the family's tasks. Families hold different
numbers of tasks (`FULL_TASKS`, by cost); `selection.unseen_verdict` weighs
them equally.
"""

from typing import Any, Dict, List, Mapping, Tuple, Union

from experiments.lib import baselines
from experiments.lib import headline
from experiments.lib import heldout

# (family, how its tasks are made)
FAMILIES = (
    ("conv3@8px", dict(kind="image", arch="conv3", image_size=8)),
    ("mlp3x128@14px", dict(kind="image", arch="mlp3x128", image_size=14)),
    ("breast_cancer_mlp2x32", dict(kind="tabular", dataset="breast_cancer")),
    ("diabetes_mlp2x32", dict(kind="tabular", dataset="diabetes")),
)
ARCHITECTURES = ("conv3@8px", "mlp3x128@14px")  # other architectures only
# Tasks per family in a full evaluation, sized by cost (CPU seconds per task
# at 1,000 steps with the 33 tuned-baseline runs, 2 shared cores): conv3 at
# 8x8 ~400 s (its convolutions cost ~10 ms a step at batch 128 on this
# CPU), mlp3x128 at 14x14 ~20 s, a tabular task ~1-2 s.
FULL_TASKS = {"conv3@8px": 3, "mlp3x128@14px": 4,
              "breast_cancer_mlp2x32": 8, "diabetes_mlp2x32": 8}
TABULAR_HIDDEN = (32, 32)
TABULAR_BATCH = 32  # a few hundred training rows: smaller batches than E5's


def family_tasks(spec: Dict[str, Any], num_tasks: int, cfg: Dict[str, Any],
                 seed: int) -> Tuple[List[str], List[Any]]:
  """(names, LO Tasks) of one family; they share one model."""
  if spec["kind"] == "image":
    specs = headline.heldout_specs(num_tasks, 0, seed)
    return heldout.make_tasks(specs, cfg["batch_size"], spec["image_size"],
                              spec["arch"])
  from pathology_fix.tasks_and_data import tabular  # pylint: disable=g-import-not-at-top
  made = [tabular.tabular_task(spec["dataset"], TABULAR_HIDDEN,
                               TABULAR_BATCH, seed=seed + 600 + i,
                               split_seed=seed + 500 + i)
          for i in range(num_tasks)]
  return [t.name for t in made], made


def evaluate_family(lopt, theta, spec: Dict[str, Any], num_tasks: int,
                    cfg: Dict[str, Any], seed: int) -> Dict[str, Any]:
  """One family's row: win rates vs E5's tuned baselines, beats_adam_1e3
  (fraction of tasks where the learned final test loss is no worse than
  Adam(1e-3)'s), mean losses, per-task rows."""
  run_cfg = dict(cfg)
  if spec["kind"] == "image":
    # Whole-split losses 4 times a run (not every 50 steps): conv3's 34 runs
    # per task would otherwise spend most of their time in evaluation.
    run_cfg.update(eval_every=max(cfg["eval_every"], cfg["inner_steps"] // 4),
                   train_eval_examples=1000)
  made = family_tasks(spec, num_tasks, run_cfg, seed)
  evaluated = headline.evaluate(lopt, {"shipped": theta}, run_cfg, seed,
                                made_tasks=made, measure_speed=False,
                                cosine=False)
  beats = headline.beats_adam_1e3(evaluated, "shipped")
  adam = headline.final_test_losses(evaluated, "Adam",
                                    baselines.adam_1e3_index())
  return dict(
      headline.summary_row(evaluated, "shipped"),
      beats_adam_1e3=sum(beats) / len(beats),
      beats_adam_1e3_per_task=beats, num_tasks=len(beats),
      adam_1e3_final_test_loss=[float(a) for a in adam],
      tasks=evaluated["task_names"],
      per_task=evaluated["result"]["per_task"]["test/shipped"])


def evaluate_all(lopt, theta, cfg: Dict[str, Any], seed: int,
                 num_tasks: Union[int, Mapping[str, int]],
                 clock=None) -> Dict[str, Dict[str, Any]]:
  """{family: `evaluate_family` row} for every family of FAMILIES.

  num_tasks: tasks per family (an int for all, or {family: count}).
  clock: optional, its `lap("unseen/<family>")` is called after each.
  """
  out = {}
  for family, spec in FAMILIES:
    n = num_tasks[family] if isinstance(num_tasks, Mapping) else num_tasks
    print(f"[unseen] {family}: {n} tasks ...", flush=True)
    out[family] = evaluate_family(lopt, theta, spec, n, cfg, seed)
    if clock is not None:
      clock.lap(f"unseen/{family}")
  return out


def headline_keys(rows: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
  """{family: {"win_rate_test", "beats_adam_1e3"}}: results.json's `unseen`."""
  return {f: dict(win_rate_test=r["win_rate_test"],
                  beats_adam_1e3=r["beats_adam_1e3"])
          for f, r in rows.items()}
