r"""E7 part 1, merge quality: the hybrid's variance against the better estimator.

  python -m experiments.e7_merge_quality [--theta init|mid] [--k K]
      [--draws 40] [--quick] [--replay_only] [--out DIR]

On E7's task distribution and settings (its results.json: MLPLOpt, 8x8
Fashion-MNIST, sigma, n samples, validation meta-loss), at E7's two thetas
(init and mid_theta.msgpack), inner steps 0 and 500 and truncations of
k = 10, 100, 1000 steps (from step 500 the 1,000-step truncation is clipped
to the 500 steps left in the 1,000-step inner run), one fixed inner state
per setting gives `--draws` antithetic truncations with every per-sample RP
and ES gradient kept (`merge_quality.collect_draws`; saved to
merge_draws/<theta>_p<step>_k<k>.npz, not committed). Each row replays the
hybrid's merge (`pathology_fix_core.combine`) on every draw: the total
variance over draws of the merged gradient, over the smaller of RP's and
ES's, beside the same ratio for oracle per-coordinate weights.

Rows go to merge_quality.json in the E7 folder, and `--finish` of
e7_estimator_study puts them into results.json's `merge_quality`. One
process per theta uses one core each (about 30 minutes each here).
"""

import json
import time

import jax
import numpy as np

from experiments.lib import common
from experiments.lib import estimator_study as study
from experiments.lib import estimator_study_files as files
from experiments.lib import merge_quality as mq
from experiments.lib import meta_training
from pathology_fix_core import combine

NAME = "e7_estimator_study"
THETAS = ("init", "mid")
FULL = dict(ks=(10, 100, 1000), points=(0, 500), draws=40)
QUICK = dict(ks=(10,), points=(0,), draws=4)


def draws_file(out_dir, theta, point, k):
  return out_dir / "merge_draws" / f"{theta}_p{point}_k{k}.npz"


def thetas(cfg, out_dir, labels):
  """E7's init theta (seed 0's first) and its saved mid theta."""
  lopt = meta_training.make_lopt()
  theta0 = study.init_theta(cfg, lopt)
  found = {"init": theta0}
  if "mid" in labels:
    mid = files.load_mid_theta(out_dir, theta0)
    if mid is None:
      raise SystemExit(f"error: {out_dir}/mid_theta.msgpack missing: run E7 "
                       "part 2 first, or --theta init")
    found["mid"] = mid
  return lopt, {label: found[label] for label in labels}


def collect(cfg, out_dir, labels, sizes, seed):
  family, _ = study.validation_family(cfg, seed=seed)
  lopt, found = thetas(cfg, out_dir, labels)
  for label, theta in found.items():
    np.save(out_dir / "merge_draws" / "leaf_sizes.npy", mq.leaf_sizes(theta))
    for k in sizes["ks"]:
      # Residuals above 1 GiB are recomputed (the same gradients): two
      # processes at k = 1000 otherwise outgrow a 24 GiB machine.
      est = study.build("HybridRPES", family, lopt, cfg, k, staggered=False,
                        remat_memory_budget_mb=1024)
      for point in sizes["points"]:
        path = draws_file(out_dir, label, point, k)
        if path.exists():
          continue
        study.progress(f"{label} step {point} k={k}: {sizes['draws']} draws")
        key = jax.random.PRNGKey(1000 * k + point + (label == "mid"))
        d = mq.collect_draws(est, theta, point, k, sizes["draws"], key,
                             log=study.progress)
        np.savez(path, seconds=d["seconds"],
                 **{name: d[name].astype(np.float32)
                    for name in ("rp_pos", "rp_neg", "es")})


def replay(out_dir, labels, sizes_cfg):
  """Rows of merge quality from every saved draw file of `labels`."""
  leaf_sizes = np.load(out_dir / "merge_draws" / "leaf_sizes.npy")
  rows = []
  for label in labels:
    for k in sizes_cfg["ks"]:
      for point in sizes_cfg["points"]:
        path = draws_file(out_dir, label, point, k)
        if not path.exists():
          continue
        d = np.load(path)
        row = dict(theta=label, inner_step=point, k=k,
                   draws=int(d["es"].shape[0]))
        row.update(mq.replay(d["rp_pos"].astype(np.float64),
                             d["rp_neg"].astype(np.float64),
                             d["es"].astype(np.float64), leaf_sizes,
                             combine.inverse_variance_merge))
        row["meets_target"] = mq.meets_target(row)
        row["oracle_above_target"] = row["oracle_over_best"] > 1.1
        rows.append(row)
  return rows


def write(out_dir, rows, mode):
  """merge_quality.json (read by e7_estimator_study's finish) and a table."""
  (out_dir / "merge_quality.json").write_text(json.dumps(
      common.jsonable(dict(mode=mode, rows=rows)), indent=1) + "\n")
  print(mq.table(rows))


def main(argv=None):
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--theta", choices=THETAS, action="append",
                 help="only this theta (repeatable; default both)")
  p.add_argument("--k", type=int, choices=FULL["ks"], action="append",
                 help="only this truncation length (repeatable; default all)")
  p.add_argument("--draws", type=int, default=None,
                 help="truncations per setting (default 40; quick 4)")
  p.add_argument("--replay_only", action="store_true",
                 help="only replay the merge on the saved draws")
  args = p.parse_args(argv)
  sizes = dict(QUICK if args.quick else FULL)
  if args.draws is not None:
    if args.draws < 3:
      p.error(f"--draws must be >= 3, got {args.draws}")
    sizes["draws"] = args.draws
  if args.k:
    sizes["ks"] = tuple(k for k in sizes["ks"] if k in args.k)
  out_dir = common.results_dir(NAME, args.out)
  (out_dir / "merge_draws").mkdir(exist_ok=True)
  cfg = dict(files.stored(out_dir)["config"])
  labels = tuple(args.theta or THETAS)
  t0 = time.perf_counter()
  if not args.replay_only:
    collect(cfg, out_dir, labels, sizes, args.seed)
  study.progress(f"collected in {time.perf_counter() - t0:.0f} s")
  # Every theta and length with draws on disk, so one process per theta (or
  # per length) ends complete.
  rows = replay(out_dir, THETAS, FULL)
  write(out_dir, rows, "quick" if args.quick else "full")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
