"""E4: variance of the RP, ES and hybrid gradient estimators vs unroll length.

For each unroll length L, R repeated draws (new eps, inner keys and data
batches each) from ONE fixed starting inner state: every draw runs the
antithetic unrolls once (`AntitheticUnroller.unroll`) and turns them into the
three estimates with `combine_samples` (RP, ES and their inverse-variance
merge), so all three see the same unrolls. Per coordinate of theta we take
the variance of each estimate over the R draws, then the median over
coordinates.

Learned optimizer: LO's MLPLOpt, 1 hidden layer of 32 (the paper's size).
Task: an MLP (64-16-10) on 8x8 digits, batch 32 (small so L = 1000 fits a CPU
budget). Three thetas: MLPLOpt's random init; a "partially trained" theta after a
few dozen HybridRPES outer steps (Adam, beta1 0.5, clip 0.1, as in the paper
but a larger learning rate so a short run moves theta) on the same task with
20-step truncations; and "large steps": the random init with its output layer
scaled by 10, i.e. an optimizer whose steps are 10x larger (the regime a
learned optimizer reaches as it learns to train fast, where the paper sees RP
explode).

  python -m experiments.e4_variance [--quick] [--out DIR]
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.lib import common
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.outer_trainers import gradient_learner
from learned_optimization.outer_trainers import truncation_schedule
from pathology_fix.meta_gradient import estimators
from pathology_fix.optimizers import outer_optimizer
from pathology_fix.runtime import outer_loop
from pathology_fix.tasks_and_data import tasks

NAME = "e4_variance"
SIGMA = 0.1  # the paper's smoothing scale
HIDDEN = (16,)
STEPS_PER_JIT = 10  # shorter lengths run as masked (inactive) steps
OUTER_LR = 1e-2
TRAIN_TRUNCATION = 20
LARGE_STEP_SCALE = 10.0


class SmallDigitsMLPFamily(tasks.ClassSubsetFamily):
  """ClassSubsetFamily on digits whose task is a one-hidden-layer MLP."""

  def __init__(self, hidden_sizes=HIDDEN, batch_size=32, seed=0):
    super().__init__(classes=tuple(range(10)), dataset="digits",
                     architecture="mlp2x32", image_size=8,
                     batch_size=batch_size, seed=seed,
                     name=f"Digits8_mlp{'x'.join(map(str, hidden_sizes))}")
    self.task = tasks.MLPTask(self.datasets, hidden_sizes=hidden_sizes,
                              name=self._name)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x))
                         for x in jax.tree_util.tree_leaves(tree)])


def scale_output_layer(theta, factor):
  """theta with MLPLOpt's last linear layer (direction, magnitude) scaled."""
  last = sorted(theta)[-1]  # haiku names: mlp/~/linear_0, mlp/~/linear_1
  out = dict(theta)
  out[last] = jax.tree_util.tree_map(lambda x: x * factor, theta[last])
  return out


def train_theta(estimator, lopt, num_steps, seed):
  """num_steps HybridRPES outer steps from lopt.init(PRNGKey(seed)).

  The library loop with the paper's outer optimizer at OUTER_LR. Returns
  theta and the meta-losses.
  """
  learner = outer_loop.learner(
      lopt, outer_optimizer.paper_outer_optimizer(OUTER_LR))
  state = learner.init(jax.random.PRNGKey(seed))
  losses = []
  steps = outer_loop.run(learner, [estimator], state, num_steps,
                         jax.random.PRNGKey(seed * 7919),
                         unroll_key=jax.random.PRNGKey(seed + 10))
  for out in tqdm(steps, total=num_steps, desc="HybridRPES outer steps"):
    state = out.learner_state
    losses.append(out.mean_loss)
  return outer_loop.theta(learner, state), losses


def measure(estimator, theta, start_state, lengths, num_draws, seed, label):
  """Per-coordinate variance over draws of the three estimates, per length."""
  unroller = estimator.unroller
  n = estimator.num_samples
  results = {}
  jobs = [(length, r) for length in lengths for r in range(num_draws)]
  draws = {length: {m: [] for m in estimators.MERGES} for length in lengths}
  mean_losses = {length: [] for length in lengths}
  rp_nonfinite = {length: 0 for length in lengths}
  rp_weight = {length: [] for length in lengths}
  for length, r in tqdm(jobs, desc=f"draws ({label})"):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1000 * length + r)
    key_eps, key_unroll = jax.random.split(key)
    eps = estimator.perturbations(key_eps, theta)
    out = unroller.unroll(theta, eps, start_state, key_unroll, length,
                          with_rp_grads=True)
    mean_losses[length].append(float(jnp.mean(out.losses)))
    for mode in estimators.MERGES:
      grad, diag = estimators.combine_samples(
          out.losses, out.rp_grads, eps, SIGMA,
          merge_fn=estimators.MERGES[mode])
      draws[length][mode].append(_flat(grad))
      if mode == "hybrid":
        # Non-finite RP samples are dropped by the merge (and by "rp").
        rp_nonfinite[length] += int(diag["rp_nonfinite"])
        rp_weight[length].append(float(diag["rp_weight_mean"]))
  for length in lengths:
    row = {}
    var = {}
    for mode in estimators.MERGES:
      # float64: exploded RP variances overflow float32.
      g = np.stack(draws[length][mode]).astype(np.float64)  # [R, P]
      finite = np.all(np.isfinite(g), axis=1)
      row[f"{mode}_nonfinite_draws"] = int((~finite).sum())
      g = g[finite]
      var[mode] = (np.var(g, axis=0, ddof=1) if g.shape[0] > 1
                   else np.full(g.shape[1:], np.nan))
      row[f"{mode}_var_median"] = float(np.median(var[mode]))
    lower = np.minimum(var["rp"], var["es"])
    ok = lower > 0  # coordinates theta's loss does not depend on are dropped
    ratio = var["hybrid"][ok] / lower[ok]
    row["hybrid_over_min_median"] = float(np.median(ratio))
    row["frac_hybrid_le_1.5x_min"] = float(np.mean(ratio <= 1.5))
    row["rp_over_es_median"] = float(np.median(var["rp"][ok] / var["es"][ok]))
    row["mean_meta_loss"] = float(np.mean(mean_losses[length]))
    row["rp_nonfinite_samples"] = rp_nonfinite[length]
    row["hybrid_rp_weight_mean"] = float(np.mean(rp_weight[length]))
    results[str(length)] = row
  return results


def _plot(out_dir, results, lengths):
  """variance_vs_length.png: median variance per estimate, one panel a theta."""
  plt = common.pyplot()
  # Own y-axis per panel: exploded RP would flatten the others.
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8))
  styles = {"rp": ("C3", "s", "RP"), "es": ("C0", "o", "ES"),
            "hybrid": ("k", "^", "hybrid")}
  for ax, label in zip(axes, results):
    for mode, (color, marker, name) in styles.items():
      vals = [results[label][str(l)][f"{mode}_var_median"] for l in lengths]
      ax.plot(lengths, vals, "-", color=color, marker=marker, ms=4,
              label=name, lw=2 if mode == "hybrid" else 1,
              alpha=0.8 if mode == "hybrid" else 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("unroll length L")
    ax.set_title(f"theta = {label}" + (
        f" (init, output layer x{LARGE_STEP_SCALE:g})"
        if label == "large_steps" else ""), fontsize=9)
  axes[0].set_ylabel("median over coords of Var[gradient estimate]")
  axes[0].legend(fontsize=8)
  common.save_figure(fig, out_dir, "variance_vs_length.png")


def _slope(results, lengths, label, mode):
  """log-log slope of the median variance over the lengths."""
  y = np.array([results[label][str(l)][f"{mode}_var_median"]
                for l in lengths])
  ok = np.isfinite(y) & (y > 0)
  if ok.sum() < 2:
    return float("nan")
  return float(np.polyfit(np.log(np.asarray(lengths)[ok]), np.log(y[ok]),
                          1)[0])


def _crossover(results, lengths, label):
  """First length where RP's median variance exceeds ES's, or None."""
  for l in lengths:
    r = results[label][str(l)]
    if not r["rp_var_median"] <= r["es_var_median"]:  # also catches NaN
      return l
  return None


def _verdicts(results, lengths, label):
  longest = str(max(lengths))
  r = results[label]
  ratios = [r[str(l)]["hybrid_over_min_median"] for l in lengths]
  return {
      "rp_exceeds_es_at": _crossover(results, lengths, label),
      "rp_growth": r[longest]["rp_var_median"] /
                   r[str(lengths[0])]["rp_var_median"],
      "es_growth": r[longest]["es_var_median"] /
                   r[str(lengths[0])]["es_var_median"],
      "hybrid_at_or_below_lower_all_lengths": bool(
          np.all(np.asarray(ratios) <= 1.5)),
      "hybrid_over_min_worst": float(np.max(ratios)),
  }


def _findings(results, lengths, gaps, slopes, numbers):
  """(per-theta lines, paper-claim lines); adds verdicts and tails to numbers."""
  longest = str(max(lengths))
  checks = {label: _verdicts(results, lengths, label) for label in results}
  numbers["verdicts"] = {
      label: dict(v, rp_exceeds_es_at=v["rp_exceeds_es_at"] or 0)
      for label, v in checks.items()}  # 0 = never
  lines = []
  for label in results:
    v, g, s = checks[label], gaps[label], slopes[label]
    cross = (f"RP's variance exceeds ES's from L = {v['rp_exceeds_es_at']}"
             if v["rp_exceeds_es_at"] else
             f"RP's variance stays below ES's at every length")
    lines.append(
        f"- theta = {label}: {cross}. From L = {lengths[0]} to {longest} the "
        f"median variance grows {v['rp_growth']:.3g}x for RP (log-log slope "
        f"{s['rp']:.2f}) and {v['es_growth']:.3g}x for ES (slope "
        f"{s['es']:.2f}). At L = {longest}: RP {g['rp_var']:.3g}, ES "
        f"{g['es_var']:.3g}, hybrid {g['hybrid_var']:.3g} (RP/ES = "
        f"10^{g['log10_rp_over_es']:.1f}); median per-coordinate "
        f"var(hybrid) / min(var RP, var ES) is at most "
        f"{v['hybrid_over_min_worst']:.2f} over the lengths.")
  explode = [l for l in results if checks[l]["rp_exceeds_es_at"]]
  hybrid_ok = all(v["hybrid_at_or_below_lower_all_lengths"]
                  for v in checks.values())
  es_flat = [l for l in results if checks[l]["es_growth"] < 10]
  # ES at the two longest lengths: does it level off where RP does not?
  tail = {l: results[l][longest]["es_var_median"] /
             results[l][str(lengths[-2])]["es_var_median"] for l in results}
  rp_tail = {l: results[l][longest]["rp_var_median"] /
                results[l][str(lengths[-2])]["rp_var_median"] for l in results}
  numbers["es_growth_last_step"] = tail
  numbers["rp_growth_last_step"] = rp_tail
  held_lines = [
      f"- RP variance explodes past ES: "
      f"{'held for theta = ' + ', '.join(explode) if explode else 'did not hold'}"
      f"{'; not for ' + ', '.join(l for l in results if l not in explode) if explode and len(explode) < len(results) else ''}.",
      f"- ES variance roughly flat in L (< 10x over the range): "
      f"{'held for ' + ', '.join(es_flat) if es_flat else 'did not hold'}"
      f"{'' if len(es_flat) == len(results) else ' (elsewhere ES variance also grows with L, since the loss difference between the antithetic unrolls grows as the perturbed optimizer acts for longer)'}."
      f" From L = {lengths[-2]} to {longest} ES changes "
      f"{', '.join(f'{tail[l]:.2g}x ({l})' for l in results)}, RP "
      f"{', '.join(f'{rp_tail[l]:.2g}x ({l})' for l in results)}.",
      f"- Hybrid at or below the lower of the two (median ratio <= 1.5 at "
      f"every length and theta): {'held' if hybrid_ok else 'did not hold'}.",
  ]
  return lines, held_lines


def _summary(numbers, results, lengths, task_name, train_steps, num_draws,
             num_samples, lines, held_lines, mode):
  """summary.md of E4."""
  longest = str(max(lengths))
  elapsed = numbers["runtime_s"]
  rows = []
  for label in results:
    for l in lengths:
      r = results[label][str(l)]
      rows.append(
          f"| {label} | {l} | {r['rp_var_median']:.3g} | "
          f"{r['es_var_median']:.3g} | {r['hybrid_var_median']:.3g} | "
          f"{r['hybrid_over_min_median']:.2f} | "
          f"{r['frac_hybrid_le_1.5x_min']:.2f} | "
          f"{r['hybrid_rp_weight_mean']:.2f} | {r['rp_nonfinite_samples']} | "
          f"{r['mean_meta_loss']:.3f} |")

  t = numbers["theta_training"]
  summary = f"""# E4: estimator variance vs unroll length

Measured: per-coordinate variance, over {num_draws} draws from one fixed
starting inner state (fresh inner problems at step 0), of three estimates
of grad L~ built from the same antithetic unrolls (`AntitheticUnroller` +
`combine_samples`): RP, ES and the inverse-variance hybrid, each averaging
n = {num_samples} samples; sigma = {SIGMA}. The table gives the median over
the {numbers['theta_size']} coordinates of theta. Learned optimizer: MLPLOpt
(1 hidden layer of 32); task: {task_name} (MLP 64-16-10, batch 32);
meta-objective: validation loss after each inner update (one batch of 32 from
the outer_valid split), clipped at 10. "trained" theta: {train_steps}
HybridRPES outer steps ({TRAIN_TRUNCATION}-step truncations,
{t['optimizer']}), meta-loss {t['meta_loss_first5']:.3f} (first 5 steps) ->
{t['meta_loss_last5']:.3f} (last 5; inner runs also progress), |delta theta|
= {t['theta_change_norm']:.3g}. Lengths below {STEPS_PER_JIT} run inside one
{STEPS_PER_JIT}-step compiled chunk with the extra steps masked off.

| theta | L | var RP | var ES | var hybrid | hybrid / min(RP, ES), median over coords | fraction of coords with hybrid <= 1.5 min | mean RP weight in hybrid | non-finite RP samples | mean meta-loss |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Plot: `variance_vs_length.png` (log-log).

## Paper's expectation (docs/method.md §5): RP variance explodes with length, ES stays flat, the hybrid is at or below the lower of the two

{chr(10).join(held_lines)}

{chr(10).join(lines)}

Variance from {num_draws} draws is itself noisy (per coordinate, relative
error ~sqrt(2/{num_draws - 1})); the medians over coordinates are much
steadier. The hybrid's weights come from n = {num_samples} samples per draw
(paper: 128), so its merge is noisier than the paper's.

Run time: {elapsed:.1f} s ({mode} mode).
"""
  return summary


def main(argv=None):
  args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
  out_dir = common.results_dir(NAME, args.out)
  start = time.time()
  if args.quick:
    lengths, num_samples, num_draws, train_steps = (1, 10, 100, 300), 4, 4, 10
  else:
    lengths, num_samples, num_draws, train_steps = (
        (1, 3, 10, 30, 100, 300, 1000), 8, 6, 40)

  family = SmallDigitsMLPFamily(seed=args.seed)
  lopt = mlp_lopt.MLPLOpt(hidden_size=32, hidden_layers=1,
                          compute_summary=False)
  # One estimator (hence one compiled unroll) serves training and measuring;
  # inner runs last max(lengths) steps so every length fits in one.
  estimator = estimators.HybridRPES(
      family, lopt,
      truncation_schedule.ConstantTruncationSchedule(max(lengths)),
      num_tasks=num_samples, unroll_length=TRAIN_TRUNCATION,
      steps_per_jit=STEPS_PER_JIT, sigma=SIGMA,
      # Validation loss after each update: with LO's training-loss convention
      # (loss before the update) an L = 1 unroll does not depend on theta.
      meta_loss_split="outer_valid", meta_loss_evals=1)
  theta_init = lopt.init(jax.random.PRNGKey(args.seed))
  theta_trained, train_losses = train_theta(estimator, lopt, train_steps,
                                            args.seed)
  start_state = estimator.unroller.init_state(
      theta_init, gradient_learner.OuterState(0),
      jax.random.PRNGKey(args.seed + 1))

  results = {}
  thetas = (("init", theta_init), ("trained", theta_trained),
            ("large_steps", scale_output_layer(theta_init, LARGE_STEP_SCALE)))
  for label, theta in thetas:
    results[label] = measure(estimator, theta, start_state, lengths,
                             num_draws, args.seed + 2, label)

  _plot(out_dir, results, lengths)
  longest = str(max(lengths))
  gaps = {label: {
      "rp_var": results[label][longest]["rp_var_median"],
      "es_var": results[label][longest]["es_var_median"],
      "hybrid_var": results[label][longest]["hybrid_var_median"],
      "log10_rp_over_es": float(np.log10(
          results[label][longest]["rp_var_median"] /
          results[label][longest]["es_var_median"])),
      "hybrid_over_min_median": results[label][longest][
          "hybrid_over_min_median"],
  } for label in results}

  slopes = {label: {m: _slope(results, lengths, label, m)
                    for m in estimators.MERGES} for label in results}
  elapsed = time.time() - start
  numbers = {
      "unroll_lengths": list(lengths),
      "num_samples": num_samples,
      "num_draws": num_draws,
      "sigma": SIGMA,
      "task": family.name,
      "learned_optimizer": "MLPLOpt(hidden_size=32, hidden_layers=1)",
      "theta_size": int(_flat(theta_init).size),
      "theta_training": {
          "outer_steps": train_steps, "truncation": TRAIN_TRUNCATION,
          "optimizer": f"clip(0.1) + Adam({OUTER_LR}, b1=0.5)",
          "meta_loss_first5": float(np.mean(train_losses[:5])),
          "meta_loss_last5": float(np.mean(train_losses[-5:])),
          "theta_change_norm": float(np.linalg.norm(
              _flat(theta_trained) - _flat(theta_init)))},
      "results": results,
      "gap_at_longest": gaps,
      "loglog_slopes": slopes,
      "runtime_s": elapsed,
  }

  lines, held_lines = _findings(results, lengths, gaps, slopes, numbers)
  summary = _summary(numbers, results, lengths, family.name, train_steps,
                     num_draws, num_samples, lines, held_lines,
                     "quick" if args.quick else "full")
  common.finish(out_dir, numbers, summary, quick=args.quick)
  return numbers


if __name__ == "__main__":
  main()
