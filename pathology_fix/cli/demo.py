"""`./run.sh demo`: a short offline meta-training run, a held-out check, a plot.

  python -m pathology_fix.demo [--train_log_dir runs/demo] [--num_steps N]

Runs `python -m pathology_fix.train` with gin_configs/meta_validation.gin:
demo.gin's meta-training (HybridRPES, validation meta-objective, 3-class
Fashion-MNIST MLP tasks on classes 0-4) with meta-validation every 10 outer
steps, params_best, the theta EMA and a cosine outer learning rate; its
meta-validation curve is printed at the end (`--config_file
gin_configs/demo.gin` runs without them).
Then a held-out check: the starting theta (params_0), the trained one, Adam at
1e-3 and Adam tuned per task over 11 log-spaced rates (1e-4..10, picked on
each task's validation loss) each train new tasks on the held-out classes 5-9
from scratch, with the same data and keys (`evaluation.meta_test`). Writes
heldout_eval.json and meta_loss.png beside the run's logs. Rerunning resumes from the last checkpoint; pass a
larger --num_steps to train on.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

# The checkout: pathology_fix/cli/demo.py is three levels down.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(REPO, "gin_configs", "demo.gin")
# demo.gin plus meta-validation, params_best, the EMA and an outer schedule.
META_VALIDATION_CONFIG = os.path.join(REPO, "gin_configs",
                                      "meta_validation.gin")
HELDOUT_TASKS = 4
HELDOUT_FILE = "heldout_eval.json"
REPORTED = (("final_outer_valid_loss", "validation loss after the run"),
            ("final_test_loss", "test loss after the run"),
            ("train_loss_mean", "training loss, mean over the run"))


# Adam's learning-rate grid (E5's): 11 rates log-spaced 1e-4 .. 10.
ADAM_LRS = tuple(float(x) for x in np.logspace(-4, 1, 11))
ADAM_DEFAULT_LR = 1e-3
# Which split of each held-out task picks tuned Adam's rate.
TUNING_SPLIT = "final_outer_valid_loss"


def _adam_by_learning_rate():
  """LO's Adam as a `LearnedOptimizer` whose theta is the learning rate.

  `meta_test` compiles one run per task and learned optimizer, shared by its
  thetas; so the whole grid costs one compilation per task, not eleven.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from learned_optimization.learned_optimizers import base as lopt_base  # pylint: disable=g-import-not-at-top
  from learned_optimization.optimizers import base as opt_base  # pylint: disable=g-import-not-at-top

  class AdamByLearningRate(lopt_base.LearnedOptimizer):

    def init(self, key):
      del key
      return jnp.asarray(ADAM_DEFAULT_LR, jnp.float32)

    def opt_fn(self, theta, is_training=False):
      del is_training
      return opt_base.Adam(theta)

  return AdamByLearningRate()


def heldout_comparison(make_tasks, lopt, thetas, num_steps, key):
  """Learned thetas vs Adam(1e-3) and per-task tuned Adam, same data and keys.

  Args:
    make_tasks: () -> fresh list of tasks; called twice (once for the thetas,
      once for Adam) so both see the same batches from fresh iterators.
    lopt, thetas, num_steps, key: as in `evaluation.meta_test`.

  Returns:
    {name: means} for every theta name, "adam_1e-3" and "adam_tuned" (the
    rate of `ADAM_LRS` with the lowest `TUNING_SPLIT` loss, per task), plus
    "per_task": rows {"task", "name", metrics..., ["learning_rate"]} and
    "adam": {"learning_rates", "tuned_learning_rate_per_task",
    "tuned_on": TUNING_SPLIT}.
  """
  from pathology_fix.runtime import evaluation  # pylint: disable=g-import-not-at-top

  learned = evaluation.meta_test(make_tasks(), lopt, thetas, num_steps, key)
  grid = {f"adam lr={lr:.3g}": np.float32(lr) for lr in ADAM_LRS}
  adam = evaluation.meta_test(make_tasks(), _adam_by_learning_rate(), grid,
                              num_steps, key)
  by_task = {}
  for row in adam.per_task:
    row = dict(row, learning_rate=float(grid[row["name"]]))
    by_task.setdefault(row["task"], []).append(row)
  default_name = f"adam lr={ADAM_DEFAULT_LR:.3g}"
  chosen = {"adam_1e-3": [], "adam_tuned": []}
  for rows in by_task.values():
    chosen["adam_1e-3"].append(
        next(r for r in rows if r["name"] == default_name))
    chosen["adam_tuned"].append(min(rows, key=lambda r: np.nan_to_num(
        r[TUNING_SPLIT], nan=np.inf)))
  out = {name: dict(means) for name, means in learned.items()}
  per_task = list(learned.per_task)
  for label, rows in chosen.items():
    metrics = [k for k in rows[0] if k not in ("task", "name", "learning_rate")]
    out[label] = {k: float(np.mean([r[k] for r in rows])) for k in metrics}
    per_task += [dict(r, name=label) for r in rows]
  out["per_task"] = per_task
  out["adam"] = {
      "learning_rates": list(ADAM_LRS),
      "tuned_learning_rate_per_task": {
          r["task"]: r["learning_rate"] for r in chosen["adam_tuned"]},
      "tuned_on": TUNING_SPLIT}
  return out


def heldout_check(train_log_dir, config_file=DEMO_CONFIG, seed=0):
  """Starting vs latest theta vs Adam on new tasks from the held-out classes.

  Returns `heldout_comparison`'s dict for thetas "initial" (params_0) and
  "trained" (the latest params), plus "setup"; the tasks are the config's,
  on class pool "heldout".
  """
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  # demo.gin binds resumable_local_train, the loop's gin name.
  from pathology_fix.runtime import local_training  # pylint: disable=g-import-not-at-top,unused-import

  gin.clear_config()
  gin.add_config_file_search_path(os.path.dirname(os.path.abspath(config_file)))
  gin.parse_config_file(config_file)
  lopt = mlp_lopt.MLPLOpt()
  latest = checkpoints.checkpoint_steps(
      train_log_dir, checkpoints.PARAMS_PREFIX)[-1]
  thetas = {"initial": checkpoints.load_params(train_log_dir, 0, lopt),
            "trained": checkpoints.load_params(train_log_dir, latest, lopt)}
  num_steps = int(
      gin.query_parameter("ConstantTruncationSchedule.total_length"))
  keys = jax.random.split(jax.random.PRNGKey(seed), HELDOUT_TASKS + 1)
  make_tasks = heldout_tasks(keys[1:])
  results = heldout_comparison(make_tasks, lopt, thetas, num_steps, keys[0])
  task_names = [t.name for t in make_tasks()]
  gin.clear_config()
  results["setup"] = {
      "tasks": task_names, "inner_steps": num_steps,
      "initial_params": "params_0", "trained_params": f"params_{latest}"}
  return results


def heldout_tasks(keys, **family_kwargs):
  """() -> new tasks on the held-out classes 5-9, one per key (same each call).

  The family's other arguments come from gin (the config's tasks) unless given.
  """
  from pathology_fix.tasks_and_data import tasks  # pylint: disable=g-import-not-at-top

  def make():
    out = []
    for k in keys:
      family = tasks.sample_fashion_mnist_family(
          k, class_pool="heldout", **family_kwargs)
      out.append(family.task_fn(family.sample(k)))
    return out

  return make


def plot_meta_loss(train_log_dir, out_path, heldout):
  """Left: the run's meta-loss per outer step. Right: the held-out check."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  rows = checkpoints.read_metrics(train_log_dir)
  steps = np.array([r["step"] for r in rows])
  loss = np.array([r["mean_loss"] for r in rows])
  window = max(1, len(loss) // 10)
  smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  left.plot(steps, loss, alpha=0.35, label="per outer step")
  left.plot(steps[window - 1:], smooth, label=f"running mean ({window})")
  left.set_xlabel("outer step")
  left.set_ylabel("meta-loss (validation, over the truncation)")
  left.set_title("HybridRPES meta-training MLPLOpt (classes 0-4)")
  left.legend()
  x = np.arange(len(REPORTED))
  setup = heldout["setup"]
  bars = (("initial", f"initial theta ({setup['initial_params']})"),
          ("trained", f"trained theta ({setup['trained_params']})"),
          ("adam_1e-3", "Adam, lr 1e-3"),
          ("adam_tuned", "Adam, lr tuned per task (on validation)"))
  width = 0.8 / len(bars)
  for i, (name, label) in enumerate(bars):
    right.bar(x + (i - (len(bars) - 1) / 2) * width,
              [heldout[name][k] for k, _ in REPORTED], width=width,
              label=label)
  right.set_xticks(x, [label.replace(", ", ",\n") for _, label in REPORTED],
                   fontsize=8)
  right.set_ylabel("loss (mean over tasks)")
  right.set_title(f"{len(heldout['setup']['tasks'])} new tasks on held-out "
                  f"classes 5-9, {heldout['setup']['inner_steps']} steps")
  right.set_yscale("log")
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path


def meta_validation_curve(train_log_dir):
  """Lines of the run's logged meta-validation (none if it did not run)."""
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  rows = [r for r in checkpoints.read_metrics(train_log_dir)
          if r.get("meta_valid/latest") is not None]
  if not rows:
    return []
  fmt = lambda x: "       n/a" if x is None else f"{x:10.4f}"  # noqa: E731
  lines = ["Meta-validation (fixed tasks from the training classes 0-4, "
           "trained from scratch; lower is better):",
           f"  {'outer step':>10s} {'minutes':>8s} {'latest':>10s} "
           f"{'EMA':>10s}"]
  for r in rows:
    lines.append(f"  {r['step']:10d} {r['elapsed_time'] / 60:8.2f} "
                 f"{fmt(r.get('meta_valid/latest'))} "
                 f"{fmt(r.get('meta_valid/ema'))}")
  last = rows[-1]
  best = ("none finite" if last.get("meta_valid_best") is None else
          f"{last['meta_valid_best']:.4f} at outer step "
          f"{int(last['meta_valid_best_step'])} (params_best)")
  lines.append(f"  best: {best}; meta-validation took "
               f"{last['meta_valid_time_fraction']:.1%} of the wall time")
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train_log_dir", default=os.path.join(REPO, "runs", "demo"))
  parser.add_argument("--num_steps", type=int, default=None,
                      help="outer steps (default: the config's)")
  parser.add_argument("--config_file", default=META_VALIDATION_CONFIG,
                      help="gin config (default: gin_configs/"
                      "meta_validation.gin)")
  args = parser.parse_args(argv)

  command = [sys.executable, "-m", "pathology_fix.train",
             "--train_log_dir", args.train_log_dir,
             "--config_file", args.config_file]
  if args.num_steps is not None:
    command += ["--gin_bindings", f"run_train.num_steps = {args.num_steps}"]
  code = subprocess.call(command)
  if code != 0:
    return code
  print("Held-out check: the starting and the trained theta, Adam at 1e-3 "
        "and Adam tuned over 11 rates each train "
        f"{HELDOUT_TASKS} new tasks on Fashion-MNIST classes 5-9 (never seen "
        "in meta-training) from scratch, same data and keys ...", flush=True)
  heldout = heldout_check(args.train_log_dir)
  json_path = os.path.join(args.train_log_dir, HELDOUT_FILE)
  with open(json_path, "w") as f:
    json.dump(heldout, f, indent=2)
  png = plot_meta_loss(args.train_log_dir,
                       os.path.join(args.train_log_dir, "meta_loss.png"),
                       heldout)
  setup = heldout["setup"]
  columns = (("initial", setup["initial_params"]),
             ("trained", setup["trained_params"]),
             ("adam_1e-3", "Adam 1e-3"), ("adam_tuned", "Adam tuned"))
  print(f"  {'':34s}" + "".join(f"{title:>12s}" for _, title in columns))
  for key, label in REPORTED:
    print(f"  {label:34s}" + "".join(f"{heldout[name][key]:12.3f}"
                                      for name, _ in columns))
  print("  (Adam tuned: per task, the rate of "
        f"{len(ADAM_LRS)} log-spaced in 1e-4..10 with the lowest validation "
        "loss after the run; the learned optimizer gets no such tuning)")
  for line in meta_validation_curve(args.train_log_dir):
    print(line)
  print(f"  held-out results: {json_path}")
  print(f"  plot:             {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
