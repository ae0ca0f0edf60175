"""The README's main job: a short offline meta-training run, then a plot.

  python -m pathology_fix.demo [--train_log_dir runs/demo] [--num_steps N]

Runs `python -m pathology_fix.train` with gin_configs/demo.gin (HybridRPES,
validation meta-objective, 3-class Fashion-MNIST MLP tasks on classes 0-4).
Then a held-out check: the starting theta (params_0) and the trained one each
train new tasks on the held-out classes 5-9 from scratch, with the same data
and keys (`evaluation.meta_test`). Writes heldout_eval.json and meta_loss.png
beside the run's logs. Rerunning resumes from the last checkpoint; pass a
larger --num_steps to train on.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "gin_configs", "demo.gin")
HELDOUT_TASKS = 4
HELDOUT_FILE = "heldout_eval.json"
REPORTED = (("final_outer_valid_loss", "validation loss after the run"),
            ("final_test_loss", "test loss after the run"),
            ("train_loss_mean", "training loss, mean over the run"))


def read_metrics(train_log_dir):
  path = os.path.join(train_log_dir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def heldout_check(train_log_dir, config_file=DEMO_CONFIG, seed=0):
  """Starting vs latest theta on new tasks from the held-out classes.

  Returns {"initial": {...}, "trained": {...}, "setup": {...}} (see
  `evaluation.meta_test`); the tasks are the config's, on class pool "heldout".
  """
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import pathology_fix  # pylint: disable=g-import-not-at-top,unused-import
  from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import evaluation  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import local_training  # pylint: disable=g-import-not-at-top
  from pathology_fix import tasks  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  gin.add_config_file_search_path(os.path.dirname(os.path.abspath(config_file)))
  gin.parse_config_file(config_file)
  lopt = mlp_lopt.MLPLOpt()
  latest = local_training.checkpoint_steps(
      train_log_dir, local_training.PARAMS_PREFIX)[-1]
  thetas = {"initial": local_training.load_params(train_log_dir, 0, lopt),
            "trained": local_training.load_params(train_log_dir, latest, lopt)}
  num_steps = int(
      gin.query_parameter("ConstantTruncationSchedule.total_length"))
  keys = jax.random.split(jax.random.PRNGKey(seed), HELDOUT_TASKS + 1)
  heldout = []
  for k in keys[1:]:
    family = tasks.sample_fashion_mnist_family(k, class_pool="heldout")
    heldout.append(family.task_fn(family.sample(k)))
  results = evaluation.meta_test(heldout, lopt, thetas, num_steps, keys[0])
  gin.clear_config()
  results["setup"] = {
      "tasks": [t.name for t in heldout], "inner_steps": num_steps,
      "initial_params": "params_0", "trained_params": f"params_{latest}"}
  return results


def plot_meta_loss(train_log_dir, out_path, heldout):
  """Left: the run's meta-loss per outer step. Right: the held-out check."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = read_metrics(train_log_dir)
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
  for offset, name in ((-0.2, "initial"), (0.2, "trained")):
    right.bar(x + offset, [heldout[name][k] for k, _ in REPORTED], width=0.4,
              label=f"{name} theta ({heldout['setup'][name + '_params']})")
  right.set_xticks(x, [label.replace(", ", ",\n") for _, label in REPORTED],
                   fontsize=8)
  right.set_ylabel("loss (mean over tasks)")
  right.set_title(f"{len(heldout['setup']['tasks'])} new tasks on held-out "
                  f"classes 5-9, {heldout['setup']['inner_steps']} steps")
  right.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train_log_dir", default=os.path.join(REPO, "runs", "demo"))
  parser.add_argument("--num_steps", type=int, default=None,
                      help="outer steps (default: demo.gin's)")
  args = parser.parse_args(argv)

  command = [sys.executable, "-m", "pathology_fix.train",
             "--train_log_dir", args.train_log_dir,
             "--config_file", DEMO_CONFIG]
  if args.num_steps is not None:
    command += ["--gin_bindings", f"run_train.num_steps = {args.num_steps}"]
  code = subprocess.call(command)
  if code != 0:
    return code
  print("Held-out check: the starting and the trained theta each train "
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
  print(f"  {'':34s}{setup['initial_params']:>12s}"
        f"{setup['trained_params']:>12s}")
  for key, label in REPORTED:
    print(f"  {label:34s}{heldout['initial'][key]:12.3f}"
          f"{heldout['trained'][key]:12.3f}")
  print(f"  held-out results: {json_path}")
  print(f"  plot:             {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
