r"""Builds a shipped pretrained optimizer from scratch: pathology_fix/pretrained/NAME/.

  python -m experiments.pretrain NAME [--quick] [--out_dir DIR] [--run_dir DIR]
      [--reuse_run]

1. Meta-trains with the library's own loop (`python -m pathology_fix.train`,
   fresh run folder under runs/pretrain/) on the recipe's gin config.
2. Chooses the theta to ship among those saved within the recipe's time
   limit (`experiments/lib/shipping.py`): the last one, or (recipe
   `selection="meta_validation"`) the argmin of meta-validation -- the
   run's logged scores, or saved thetas scored after training on the run's
   own validation tasks. Never by held-out results.
3. Writes the chosen theta (`params_<N>`, LO's ParameterCheckpoint),
   `lopt.gin` (its architecture's constructor arguments), snapshots along
   the run (`snapshots/params_<N>`, with their meta-validation scores) and
   `record.json` (license, command, seed, meta-training minutes and steps,
   how the theta was selected, git commit, held-out tables) into the output
   folder (default: the package's pretrained/NAME/).
4. Held-out check: new tasks on Fashion-MNIST classes 5-9 (never seen in
   meta-training), trained from scratch by the shipped theta, Adam(1e-3) and
   Adam tuned per task over 11 rates (picked on each task's validation loss),
   with the same data and keys (`pathology_fix.demo.heldout_comparison`).
5. Recipes with `headline=True`: the headline tables (`record["headline"]`):
   E5's 16 held-out tasks against E5's tuned baselines and tuned warmup-
   cosine Adam, and the unseen task families against the tuned baselines and
   Adam(1e-3). An optimizer that loses to Adam(1e-3) on the unseen tasks is
   marked (`loses_to_adam_1e3_on_unseen`, `warning`).

--quick (for CI): a few outer steps, small held-out checks, written to
runs/pretrain/NAME-quick/ unless --out_dir is given (the shipped folder is
never overwritten by a quick run).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(REPO, "pathology_fix", "pretrained")

RECIPES = {
    "mlp_lopt_demo_fmnist8": dict(
        description=(
            "Demo-scale: LO's MLPLOpt (1 hidden layer of 32) meta-trained "
            "with HybridRPES for a few CPU-minutes on gin_configs/demo.gin's "
            "tasks (mlp2x32, 8x8 Fashion-MNIST, 3-class subsets of classes "
            "0-4, validation meta-objective, 300-step inner runs), with a "
            "longer run and curriculum than the demo. Not the headline "
            "optimizer (>= 90% wins over tuned baselines): see `heldout`."),
        config="gin_configs/demo.gin",
        learned_optimizer="MLPLOpt",
        seed=0,
        outer_steps=350, k_min=10, k_max=50,
        heldout_tasks=8, heldout_steps=300,
        quick=dict(outer_steps=3, heldout_tasks=2, heldout_steps=50)),
    "nnadam_fmnist8": dict(
        description=(
            "The first headline recipe: LO's NNAdam (Adam with per-tensor "
            "hyperparameters moved by an LSTM; starts as Adam(1e-2)) "
            "meta-trained with HybridRPES for at most 60 minutes on every "
            "3-class subset of Fashion-MNIST classes 0-4 (mlp2x32, 8x8, "
            "1,000-step inner runs, truncations 50 -> 1,000, validation "
            "meta-objective). Judged on E5's 16 held-out tasks against the "
            "best of Adam, RMSProp and SGD+momentum tuned per task."),
        config="gin_configs/headline_nnadam_fmnist8.gin",
        learned_optimizer="NNAdam",
        seed=0, minutes=60, snapshot_minutes=(5, 10, 20, 40),
        family_fn="sample_every_subset_family",
        bindings=["run_train.num_seconds = 3600"],
        heldout_tasks=8, heldout_steps=1000,
        quick=dict(bindings=["run_train.num_seconds = 60",
                             "run_train.num_steps = 3",
                             "LinearTruncationCurriculum.k_min = 10",
                             "LinearTruncationCurriculum.k_max = 20",
                             "ConstantTruncationSchedule.total_length = 40",
                             "VariationalEstimator.random_initial_iteration_offset = 40"],
                   heldout_tasks=2, heldout_steps=50)),
    "progress_fmnist8": dict(
        description=(
            "The headline recipe with a learned schedule: ProgressAdam (Adam "
            "whose learning rate follows a learned curve over training "
            "progress t / T, with learned betas and weight decay; starts as "
            "Adam(1e-2) at a constant rate) meta-trained with HybridRPES for "
            "at most 60 minutes on every 3-class subset of Fashion-MNIST "
            "classes 0-4 (mlp2x32, 8x8, 1,000-step inner runs, truncations "
            "50 -> 1,000, validation meta-objective). The shipped theta is "
            "the one with the best meta-validation score. Judged on E5's 16 "
            "held-out tasks against E5's tuned baselines and tuned "
            "warmup-cosine Adam, and on unseen task families."),
        config="gin_configs/headline_progress_fmnist8.gin",
        learned_optimizer="ProgressAdam",
        seed=0, minutes=60, snapshot_minutes=(5, 10, 20, 40),
        family_fn="sample_every_subset_family",
        bindings=["run_train.num_seconds = 3600"],
        selection="meta_validation", selection_candidates=24,
        meta_valid_tasks=10, meta_valid_inner_steps=1000,
        heldout_tasks=8, heldout_steps=1000, headline=True,
        quick=dict(bindings=["run_train.num_seconds = 60",
                             "run_train.num_steps = 3",
                             "LinearTruncationCurriculum.k_min = 10",
                             "LinearTruncationCurriculum.k_max = 20",
                             "ConstantTruncationSchedule.total_length = 40",
                             "VariationalEstimator.random_initial_iteration_offset = 40"],
                   meta_valid_tasks=2, meta_valid_inner_steps=40,
                   heldout_tasks=2, heldout_steps=50)),
}


def _git_commit():
  def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
  return {"commit": git("rev-parse", "HEAD") or None,
          "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def training_bindings(recipe):
  """The gin bindings a recipe adds to its config file."""
  if "bindings" in recipe:
    return list(recipe["bindings"])
  return [
      f"run_train.num_steps = {recipe['outer_steps']}",
      f"resumable_local_train.seed = {recipe['seed']}",
      f"LinearTruncationCurriculum.k_min = {recipe['k_min']}",
      f"LinearTruncationCurriculum.k_max = {recipe['k_max']}",
      f"LinearTruncationCurriculum.num_iterations = {recipe['outer_steps']}"]


def training_command(recipe, run_dir):
  command = [sys.executable, "-m", "pathology_fix.train",
             "--train_log_dir", run_dir,
             "--config_file", os.path.join(REPO, recipe["config"])]
  for b in training_bindings(recipe):
    command += ["--gin_bindings", b]
  return command


def meta_train(recipe, run_dir, reuse=False):
  """Runs pathology_fix.train afresh in run_dir; returns (command, minutes).

  reuse: keep a finished run already in run_dir (e.g. started by hand with
  the same command); minutes is then None (main reads them from
  metrics.jsonl, `elapsed_minutes`).
  """
  command = training_command(recipe, run_dir)
  if reuse and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
    print(f"[pretrain] reusing the meta-training run in {run_dir}", flush=True)
    return command, None
  if os.path.isdir(run_dir):
    shutil.rmtree(run_dir)  # from scratch: the CLI would otherwise resume
  print(f"[pretrain] meta-training: {recipe.get('summary', '')}", flush=True)
  start = time.time()
  subprocess.run(command, cwd=REPO, check=True)
  return command, (time.time() - start) / 60


def elapsed_minutes(run_dir):
  """{outer step: training minutes when it ended} (metrics.jsonl's
  elapsed_time, compilation included); step 0 at 0."""
  elapsed = {0: 0.0}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      elapsed[row["step"]] = row["elapsed_time"] / 60
  return elapsed


def final_step(run_dir, limit_minutes=None):
  """The last saved params_<N>, or the last saved within limit_minutes."""
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  saved = checkpoints.checkpoint_steps(run_dir, "params_")
  if limit_minutes is None:
    return saved[-1]
  elapsed = elapsed_minutes(run_dir)
  return max(s for s in saved if elapsed.get(s, float("inf")) <= limit_minutes)


def gin_value(name):
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.query_parameter(name)
  except ValueError:
    return None


def copy_snapshots(run_dir, out_dir, steps, elapsed, scores=None):
  """Copies params_<step> for each of `steps` to out_dir/snapshots; returns
  [{minutes, step}] (plus meta_valid when `scores` has the step): the
  win-rate-vs-minutes curve's thetas besides the shipped one."""
  folder = os.path.join(out_dir, "snapshots")
  shutil.rmtree(folder, ignore_errors=True)
  if not steps:
    return []
  os.makedirs(folder)
  out = []
  for step in steps:
    shutil.copyfile(os.path.join(run_dir, f"params_{step}"),
                    os.path.join(folder, f"params_{step}"))
    row = dict(minutes=round(elapsed.get(step, float("nan")), 2), step=step)
    if scores and step in scores:
      row["meta_valid"] = scores[step]
    out.append(row)
  return out


def architecture_gin(lopt_name):
  """lopt.gin text: every constructor argument of the gin-configured class."""
  import inspect  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from pathology_fix import pretrained  # pylint: disable=g-import-not-at-top
  cls = pretrained.LEARNED_OPTIMIZERS[lopt_name]
  bound = gin.get_bindings(lopt_name)
  lines = [f"# Architecture of a shipped learned optimizer (read by "
           f"pathology_fix.pretrained.load).", ""]
  for name, p in inspect.signature(cls.__init__).parameters.items():
    if name == "self":
      continue
    value = bound.get(name, p.default)
    lines.append(f"{lopt_name}.{name} = {value!r}")
  return "\n".join(lines) + "\n"


def evaluate(out_dir, recipe, quick, seed):
  """Held-out table of the shipped theta vs Adam(1e-3) and tuned Adam."""
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from pathology_fix.cli import demo  # pylint: disable=g-import-not-at-top
  from pathology_fix import pretrained  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  lopt = pretrained.read_architecture(os.path.join(out_dir, "lopt.gin"))
  step = checkpoints.checkpoint_steps(out_dir, "params_")[-1]
  theta = checkpoints.load_params(out_dir, step, lopt)
  settings = dict(recipe, **recipe["quick"]) if quick else recipe
  num_tasks, num_steps = settings["heldout_tasks"], settings["heldout_steps"]
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), num_tasks + 1)
  # The recipe's task family (architecture, image size, batch), held-out classes.
  family_fn = recipe.get("family_fn", "sample_fashion_mnist_family")
  family = {k: gin.query_parameter(f"{family_fn}.{k}")
            for k in ("num_classes_per_task", "architecture", "image_size",
                      "batch_size")}
  make_tasks = demo.heldout_tasks(keys[1:], **family)
  print(f"[pretrain] held-out check: {num_tasks} tasks on classes 5-9, "
        f"{num_steps} steps; learned vs Adam 1e-3 vs Adam tuned over "
        f"{len(demo.ADAM_LRS)} rates ...", flush=True)
  res = demo.heldout_comparison(make_tasks, lopt, {"learned": theta},
                                num_steps, keys[0])
  rows = {}
  for r in res["per_task"]:
    rows.setdefault(r["task"], {})[r["name"]] = r
  table = []
  for task, by_name in rows.items():
    row = {"task": task}
    for name in ("learned", "adam_1e-3", "adam_tuned"):
      row[f"{name}_test_loss"] = by_name[name]["final_test_loss"]
      row[f"{name}_train_loss"] = by_name[name]["final_train_loss"]
    row["adam_tuned_lr"] = by_name["adam_tuned"]["learning_rate"]
    table.append(row)
  wins = {b: sum(r["learned_test_loss"] < r[f"{b}_test_loss"] for r in table)
          for b in ("adam_1e-3", "adam_tuned")}
  return dict(
      tasks=f"{num_tasks} new {family['num_classes_per_task']}-class tasks on "
            f"Fashion-MNIST classes 5-9 ({family['architecture']}, "
            f"{family['image_size']}px), fresh inits",
      inner_steps=num_steps, seed=seed + 1,
      adam_tuned_on="each task's outer_valid loss after the run "
                    f"(grid {[round(x, 6) for x in demo.ADAM_LRS]})",
      metric="final test loss (lower is better)",
      wins_vs_adam_1e3=f"{wins['adam_1e-3']}/{num_tasks}",
      wins_vs_adam_tuned=f"{wins['adam_tuned']}/{num_tasks}",
      means={n: res[n] for n in ("learned", "adam_1e-3", "adam_tuned")},
      per_task=table), step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("name", choices=sorted(RECIPES))
  parser.add_argument("--quick", action="store_true",
                      help="a few outer steps and a small held-out check (CI)")
  parser.add_argument("--out_dir", default=None)
  parser.add_argument("--run_dir", default=None,
                      help="meta-training folder (default runs/pretrain/...)")
  parser.add_argument("--reuse_run", action="store_true",
                      help="keep a meta-training run already in --run_dir "
                           "(started by hand with the same command)")
  args = parser.parse_args(argv)
  recipe = dict(RECIPES[args.name])
  if args.quick:
    recipe.update({k: v for k, v in recipe["quick"].items()
                   if k in ("outer_steps", "bindings")})
  out_dir = args.out_dir or (
      os.path.join(REPO, "runs", "pretrain", f"{args.name}-quick")
      if args.quick else os.path.join(PRETRAINED, args.name))
  run_dir = args.run_dir or os.path.join(
      REPO, "runs", "pretrain",
      args.name + ("-quick-run" if args.quick else "-run"))
  git = _git_commit()
  command, minutes = meta_train(recipe, run_dir, reuse=args.reuse_run)

  import gin  # pylint: disable=g-import-not-at-top
  from experiments.lib import common  # pylint: disable=g-import-not-at-top
  from experiments.lib import shipping  # pylint: disable=g-import-not-at-top
  from pathology_fix import pretrained  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  # config.gin binds resumable_local_train, the loop's gin name.
  from pathology_fix.runtime import local_training  # pylint: disable=g-import-not-at-top,unused-import
  gin.clear_config()
  gin.add_config_file_search_path(os.path.join(REPO, "gin_configs"))
  gin.parse_config_file(os.path.join(run_dir, "config.gin"))
  os.makedirs(out_dir, exist_ok=True)
  for old in checkpoints.checkpoint_steps(out_dir, "params_"):
    os.remove(os.path.join(out_dir, f"params_{old}"))
  # A run past its time limit (e.g. reused) ships a theta of the limit.
  last = final_step(run_dir, recipe.get("minutes"))
  elapsed = elapsed_minutes(run_dir)
  minutes = elapsed.get(last, minutes)
  with open(os.path.join(out_dir, "lopt.gin"), "w") as f:
    f.write(architecture_gin(recipe["learned_optimizer"]))
  lopt = pretrained.read_architecture(os.path.join(out_dir, "lopt.gin"))
  chosen = shipping.choose_theta(run_dir, last, elapsed, lopt, recipe,
                                 args.quick)
  shutil.copyfile(chosen["path"],
                  os.path.join(out_dir, f"params_{chosen['step']}"))
  snapshots = copy_snapshots(
      run_dir, out_dir,
      # The run's last theta too, when it is not the one shipped.
      sorted({s for s in chosen["snapshot_steps"] + [last] * bool(
          chosen["snapshot_steps"]) if s != chosen["step"]}),
      elapsed, chosen["scores"])
  heldout, step = evaluate(out_dir, recipe, args.quick, recipe["seed"])
  record = dict(
      name=args.name, description=recipe["description"],
      license=pretrained.LICENSE,
      learned_optimizer=recipe["learned_optimizer"],
      params_file=f"params_{step}",
      command=" ".join(["python -m experiments.pretrain", args.name]
                       + (["--quick"] if args.quick else [])),
      train_command=" ".join(["python"] + [
          os.path.relpath(c, REPO) if c.startswith(REPO) else c
          for c in command[1:]]),
      config=recipe["config"], seed=recipe["seed"], outer_steps=step,
      truncation_curriculum=[
          gin_value("LinearTruncationCurriculum.k_min"),
          gin_value("LinearTruncationCurriculum.k_max")],
      meta_training_minutes=round(minutes, 2),
      run_outer_steps=last, selected_by=chosen["selected_by"],
      selected_minutes=round(elapsed.get(chosen["step"], minutes), 2),
      selection=chosen["selection"], snapshots=snapshots,
      machine=f"{os.cpu_count()} CPU cores (shared)",
      git_commit=git["commit"], git_dirty=git["dirty"], heldout=heldout)
  gin.clear_config()
  if recipe.get("headline"):
    theta = checkpoints.load_params(out_dir, step, lopt)
    record["headline"] = shipping.headline_tables(lopt, theta, args.quick,
                                                  recipe["seed"])
    shipping.mark(record, record["headline"]["unseen_verdict"])
  with open(os.path.join(out_dir, "record.json"), "w") as f:
    json.dump(common.jsonable(record), f, indent=2, allow_nan=False)
  report(record, out_dir)
  return 0


def report(record, out_dir):
  """Prints what was shipped and how it did."""
  heldout = record["heldout"]
  print(f"[pretrain] meta-training: {record['meta_training_minutes']:.1f} "
        f"min, {record['run_outer_steps']} outer steps; shipped step "
        f"{record['outer_steps']} (selected by {record['selected_by']})")
  print(f"[pretrain] held-out wins (test loss): vs Adam 1e-3 "
        f"{heldout['wins_vs_adam_1e3']}, vs tuned Adam "
        f"{heldout['wins_vs_adam_tuned']}")
  for name, m in heldout["means"].items():
    print(f"  {name:12s} mean test loss {m['final_test_loss']:.4f}  "
          f"train loss {m['final_train_loss']:.4f}")
  h = record.get("headline")
  if h:
    print(f"[pretrain] headline: wins vs E5's baselines "
          f"{h['win_rate_test']:.0%}, vs warmup-cosine Adam "
          f"{h['win_rate_test_vs_cosine_adam']:.0%}; unseen: " + ", ".join(
              f"{f} {r['win_rate_test']:.0%} wins / no worse than Adam(1e-3) "
              f"{r['beats_adam_1e3']:.0%}" for f, r in h["unseen"].items()))
  if record.get("warning"):
    print(f"[pretrain] WARNING: {record['warning']}")
  print(f"[pretrain] wrote {out_dir}")


if __name__ == "__main__":
  sys.exit(main())
