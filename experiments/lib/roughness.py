"""Roughness of a 1-D curve sampled on a grid (E1, E2)."""

import numpy as np


def roughness(y, jump_threshold=None, rel_tol=1e-6):
  """How rough a 1-D curve sampled on a grid is.

  Returns dict with
    total_variation: sum |y[i+1] - y[i]|;
    tv_over_range: that divided by max - min (1 for monotone, 2 for a valley);
    slope_sign_changes: sign changes of the finite-difference slope, ignoring
      steps smaller than rel_tol * range (flat plateaus hold round-off only);
    jumps: steps larger than jump_threshold (default 10% of the range);
    nonfinite: points that were inf/NaN (dropped before all of the above).
  """
  y = np.asarray(y, np.float64)
  finite = np.isfinite(y)
  y = y[finite]
  if y.size < 2:
    return {"total_variation": 0.0, "tv_over_range": 0.0,
            "slope_sign_changes": 0, "jumps": 0,
            "nonfinite": int((~finite).sum())}
  d = np.diff(y)
  span = float(np.ptp(y))
  tv = float(np.abs(d).sum())
  s = np.sign(d[np.abs(d) > rel_tol * span]) if span > 0 else np.zeros([0])
  threshold = 0.1 * span if jump_threshold is None else jump_threshold
  return {
      "total_variation": tv,
      "tv_over_range": tv / span if span > 0 else 0.0,
      "slope_sign_changes": int(np.sum(s[1:] != s[:-1])),
      "jumps": int(np.sum(np.abs(d) > threshold)) if span > 0 else 0,
      "nonfinite": int((~finite).sum()),
  }


def save_roughness_vs_length(fig, axes, keys, out_dir):
  """E1/E2's roughness-vs-T panels: symlog y from 0, labels, legend, PNG.

  Each panel's curves and x scale are the caller's; `keys` names the panels.
  """
  from experiments.lib import common  # pylint: disable=g-import-not-at-top
  for ax, key in zip(axes, keys):
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("unroll length T")
    ax.set_title(key.replace("_", " "), fontsize=9)
  axes[0].legend(fontsize=7)
  common.save_figure(fig, out_dir, "roughness_vs_T.png")
