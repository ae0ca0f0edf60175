"""E2: 1-D slices of a learned optimizer's meta-loss get rougher with unroll length.

Learned optimizer: LO's MLPLOpt with 1 hidden layer of 32 (the paper's size;
LO's 19 input features). Inner problem: an MLP with one hidden layer of 32 on
8x8 digits (scikit-learn's), from one fixed initialization, on T fixed
training batches of 64, so every slice is deterministic. Meta-loss: mean over
the T steps of the training loss before each update (LO's convention), each
clipped at 10 like the plugin's objective (non-finite -> 10).

Slices L(theta_c + alpha d) over alpha, for T = 5, 10, 20, 50, along
  * a random unit direction d (the same for every T), alpha in [-30, 30];
  * the normalized meta-gradient at theta_c for that T, alpha in [-10, 10]
    (it is far steeper, so a narrower range);
at two centres theta_c: MLPLOpt's random init (it barely moves the weights:
step_mult 1e-3), and a "trained" theta after a few Adam steps on the T = 20
meta-loss (exact gradient; same batches), where the inner problem trains.

  python -m experiments.e2_metaloss_slices [--quick] [--out DIR]
"""

import time

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments.lib import common
from experiments.lib.roughness import roughness
from experiments.lib.roughness import save_roughness_vs_length
from learned_optimization.learned_optimizers import mlp_lopt
from pathology_fix.tasks_and_data import data
from pathology_fix.tasks_and_data import tasks

NAME = "e2_metaloss_slices"
LENGTHS = (5, 10, 20, 50)
TRAIN_LENGTH = 20
MAX_LOSS = 10.0
RANGES = {"random": 30.0, "gradient": 10.0}
# Slope sign changes count only steps above this many nats: float32
# round-off of a mean loss ~2 is ~1e-6, far below it.
SIGN_TOL = 1e-4


def build_problem(seed):
  """(meta_losses(flat_theta) -> [len(LENGTHS)], flat theta at MLPLOpt init).

  One scan of max(LENGTHS) steps yields the meta-loss for every T at once
  (mean of the first T clipped losses), so each function compiles once:
  compiling the unroll costs far more than running it here.
  """
  datasets = data.digits_datasets(batch_size=64, image_size=8, seed=seed)
  task = tasks.MLPTask(datasets, hidden_sizes=(32,))
  params0 = task.init(jax.random.PRNGKey(seed))
  batches = [next(datasets.train) for _ in range(max(LENGTHS))]
  batches = jax.tree_util.tree_map(lambda *x: np.stack(x), *batches)
  lopt = mlp_lopt.MLPLOpt(hidden_size=32, hidden_layers=1,
                          compute_summary=False)
  theta0 = lopt.init(jax.random.PRNGKey(seed + 1))
  flat0, unravel = flatten_util.ravel_pytree(theta0)
  task_key = jax.random.PRNGKey(0)  # the MLP has no randomness; fixed anyway
  ends = np.asarray(LENGTHS) - 1

  def meta_losses(flat):
    opt = lopt.opt_fn(unravel(flat), is_training=True)
    state = opt.init(params0, num_steps=max(LENGTHS))

    def step(state, batch):
      loss, grad = jax.value_and_grad(task.loss)(opt.get_params(state),
                                                 task_key, batch)
      state = opt.update(state, grad, loss=loss)
      clipped = jnp.minimum(jnp.nan_to_num(loss, nan=MAX_LOSS,
                                           posinf=MAX_LOSS), MAX_LOSS)
      return state, clipped

    _, losses = jax.lax.scan(step, state, batches)
    return (jnp.cumsum(losses) / jnp.arange(1, losses.shape[0] + 1))[ends]

  return meta_losses, flat0


def train_center(weighted, flat0, num_steps):
  """A few Adam steps on the T=TRAIN_LENGTH meta-loss; returns theta, curve."""
  onehot = jnp.asarray(np.asarray(LENGTHS) == TRAIN_LENGTH, jnp.float32)
  opt = optax.adam(3e-2)
  flat, state, curve = flat0, opt.init(flat0), []
  for _ in tqdm(range(num_steps), desc=f"meta-train theta (T={TRAIN_LENGTH})"):
    loss, grad = weighted(flat, onehot)
    updates, state = opt.update(grad, state)
    flat = optax.apply_updates(flat, updates)
    curve.append(float(loss))
  curve.append(float(weighted(flat, onehot)[0]))
  return flat, curve


def _plot(out_dir, centers, slices, metrics):
  """slices.png (the meta-loss along each direction) and roughness_vs_T.png."""
  plt = common.pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
  colors = dict(zip(LENGTHS, ["C0", "C1", "C2", "C3"]))
  for i, center in enumerate(centers):
    for j, name in enumerate(RANGES):
      ax = axes[i, j]
      for t in LENGTHS:
        alphas, y = slices[(center, name, t)]
        ax.plot(alphas, y, lw=0.7, color=colors[t], label=f"T={t}")
      ax.set_title(f"theta = {center}, {name} direction", fontsize=9)
      ax.set_xlabel("step size alpha along unit direction")
      ax.set_ylabel("meta-loss (mean train loss)")
  axes[0, 0].legend(fontsize=7)
  common.save_figure(fig, out_dir, "slices.png")

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
  keys = ("total_variation", "slope_sign_changes")
  for ax, key in zip(axes, keys):
    for center in centers:
      for name in RANGES:
        vals = [metrics[center][name][str(t)][key] for t in LENGTHS]
        ax.plot(LENGTHS, vals, "-o", ms=3, label=f"{center}, {name}")
    ax.set_xscale("log")
    ax.set_xticks(LENGTHS, [str(t) for t in LENGTHS])
    ax.minorticks_off()
  save_roughness_vs_length(fig, axes, keys, out_dir)


def main(argv=None):
  args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
  out_dir = common.results_dir(NAME, args.out)
  start = time.time()
  num_points, train_steps = (201, 40) if args.quick else (801, 100)

  meta_losses, flat0 = build_problem(args.seed)
  # d (w . meta_losses) / d theta: the gradient for T = LENGTHS[i] is w = e_i.
  weighted = jax.jit(jax.value_and_grad(
      lambda f, w: jnp.dot(w, meta_losses(f))))
  along = jax.jit(jax.vmap(lambda a, c, d: meta_losses(c + a * d),
                           in_axes=(0, None, None)))
  trained, train_curve = train_center(weighted, flat0, train_steps)
  centers = {"init": flat0, "trained": trained}
  random_dir = jax.random.normal(jax.random.PRNGKey(args.seed + 2),
                                 flat0.shape)
  random_dir = random_dir / jnp.linalg.norm(random_dir)

  slices, metrics = {}, {}
  random_cache = {}
  jobs = [(c, i, t) for c in centers for i, t in enumerate(LENGTHS)]
  for center, i, t in tqdm(jobs, desc="slices"):
    theta_c = centers[center]
    _, grad = weighted(theta_c, jnp.eye(len(LENGTHS))[i])
    alphas = {name: jnp.asarray(np.linspace(-r, r, num_points), jnp.float32)
              for name, r in RANGES.items()}
    if center not in random_cache:  # one pass gives every T
      random_cache[center] = np.asarray(
          along(alphas["random"], theta_c, random_dir))
    curves = {"random": random_cache[center][:, i],
              "gradient": np.asarray(along(
                  alphas["gradient"], theta_c,
                  grad / jnp.linalg.norm(grad)))[:, i]}
    for name, y in curves.items():
      r = roughness(y)
      dy = np.diff(y[np.isfinite(y)])
      signs = np.sign(dy[np.abs(dy) > SIGN_TOL])
      r["slope_sign_changes"] = int(np.sum(signs[1:] != signs[:-1]))
      r["meta_loss_at_center"] = float(y[num_points // 2])
      r["grad_norm"] = float(jnp.linalg.norm(grad))
      slices[(center, name, t)] = (np.asarray(alphas[name]), y)
      metrics.setdefault(center, {}).setdefault(name, {})[str(t)] = r

  _plot(out_dir, centers, slices, metrics)

  def trend(center, name, key):
    vals = [metrics[center][name][str(t)][key] for t in LENGTHS]
    return vals, vals[-1] > vals[0], all(
        a <= b for a, b in zip(vals, vals[1:]))

  verdicts = {}
  for center in centers:
    for name in RANGES:
      tv, tv_up, tv_mono = trend(center, name, "total_variation")
      sc, sc_up, sc_mono = trend(center, name, "slope_sign_changes")
      verdicts[f"{center}/{name}"] = {
          "tv_grows": tv_up, "tv_monotone": tv_mono,
          "sign_changes_grow": sc_up, "sign_changes_monotone": sc_mono}
  elapsed = time.time() - start
  numbers = {
      "unroll_lengths": list(LENGTHS),
      "grid_points": num_points,
      "alpha_ranges": RANGES,
      "sign_change_tolerance": SIGN_TOL,
      "theta_size": int(flat0.size),
      "center_training": {"steps": train_steps, "adam_lr": 3e-2,
                          "meta_loss_length": TRAIN_LENGTH,
                          "meta_loss_first": train_curve[0],
                          "meta_loss_last": train_curve[-1]},
      "roughness": metrics,
      "verdicts": verdicts,
      "runtime_s": elapsed,
  }

  lines = []
  for center in centers:
    for name in RANGES:
      m = metrics[center][name]
      lines.append(
          f"| {center} | {name} | " + " | ".join(
              f"{m[str(t)]['total_variation']:.2f} / "
              f"{m[str(t)]['slope_sign_changes']}" for t in LENGTHS) + " |")
  n_grow = sum(v["tv_grows"] and v["sign_changes_grow"]
               for v in verdicts.values())
  n_mono = sum(v["tv_monotone"] for v in verdicts.values())
  held = ("Held" if n_grow == len(verdicts) else
          "Partly held" if n_grow else "Did not hold")
  first, last = str(LENGTHS[0]), str(LENGTHS[-1])
  growth = {
      f"{c}/{n}": metrics[c][n][last]["total_variation"] /
                  max(metrics[c][n][first]["total_variation"], 1e-12)
      for c in centers for n in RANGES}
  numbers["tv_growth_first_to_last"] = growth
  sign_sum = {c: sum(metrics[c][n][str(t)]["slope_sign_changes"]
                     for n in RANGES for t in LENGTHS) for c in centers}
  verdict_rows = "\n".join(
      f"| {k} | {growth[k]:.1f}x | {v['tv_monotone']} | "
      f"{v['sign_changes_grow']} | {v['sign_changes_monotone']} |"
      for k, v in verdicts.items())
  summary = f"""# E2: meta-loss slices of MLPLOpt vs unroll length

Measured: the meta-loss (mean training loss over T inner steps, clipped at
{MAX_LOSS:g}) of LO's MLPLOpt (1 hidden layer of 32, {flat0.size} parameters)
training a 64-32-10 MLP on 8x8 digits (fixed init, fixed batches of 64),
along 1-D slices theta_c + alpha d with {num_points} points: d = a random unit
direction (alpha in +-{RANGES['random']:g}) or the normalized meta-gradient at
theta_c for that T (alpha in +-{RANGES['gradient']:g}); T = {list(LENGTHS)}.
Centres: MLPLOpt's random init, and theta after {train_steps} Adam(3e-2) steps
on the exact T = {TRAIN_LENGTH} meta-loss (meta-loss {train_curve[0]:.3f} ->
{train_curve[-1]:.3f}), where the optimizer actually trains the MLP.
Roughness as in E1: total variation (TV) and sign changes of the
finite-difference slope (steps below {SIGN_TOL:g} nats ignored).

TV / slope sign changes:

| centre | direction | {' | '.join(f'T={t}' for t in LENGTHS)} |
|---|---|{'---|' * len(LENGTHS)}
{chr(10).join(lines)}

| slice | TV(T={last}) / TV(T={first}) | TV monotone in T | sign changes grow | sign changes monotone |
|---|---|---|---|---|
{verdict_rows}

Plots: `slices.png` (the slices, one colour per T), `roughness_vs_T.png`.

## Paper's expectation (docs/method.md §2): slices get rougher with unroll length

- {held}: both TV and slope sign changes are larger at T = {last} than at
  T = {first} in {n_grow} of {len(verdicts)} (centre, direction) slices; TV
  rises monotonically over all {len(LENGTHS)} lengths in {n_mono} of
  {len(verdicts)}.
- Part of the TV growth is the loss range itself widening with T (longer
  unrolls reach both lower and clipped losses); the slope sign changes (local
  wiggles) are the range-free measure. Summed over T and both directions
  they number {sign_sum['init']} at MLPLOpt's random init (its steps are
  ~1e-3, so the inner MLP barely moves) and {sign_sum['trained']} at the
  trained centre, where the inner MLP actually trains.

Run time: {elapsed:.1f} s ({'quick' if args.quick else 'full'} mode).
"""
  common.finish(out_dir, numbers, summary, quick=args.quick)
  return numbers


if __name__ == "__main__":
  main()
