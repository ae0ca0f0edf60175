"""Choosing a theta by meta-validation, and checking that the choice transfers.

A meta-training run's thetas are judged on the run's own validation tasks
(`pathology_fix.runtime.meta_validation`: whole inner runs on the meta-
training classes' held-aside data); the one to ship is the argmin of that
score. Held-out tasks are never looked at for the choice. Whether the choice
transfers is shown afterwards: meta-validation against held-out quality per
saved theta, and their Spearman rank correlation.

Scores come from a run's metrics.jsonl (`meta_valid/<kind>` per validated
outer step, as the training loop logs `MetaValidationResult.metrics`), from
a shipped record, or from `score_thetas` (`MetaValidation.evaluate` on saved
thetas, for runs that only saved snapshots).
"""

import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

META_VALIDATION = "meta_validation"  # record["selected_by"]: argmin score
FINAL_THETA = "final_theta"  # record["selected_by"]: the run's last theta
UNSEEN_THRESHOLD = 0.75  # no worse than Adam(1e-3) on >= 75% of unseen tasks
# metrics.jsonl keys: "meta_valid/<kind>", possibly behind an aggregation
# prefix ("mean||", written "mean__" by TensorBoard's tag rules).
_KEY = re.compile(r"^(?:\w+(?:\|\||__))?meta_valid/(\w+)$")
_BEST = re.compile(r"^(?:\w+(?:\|\||__))?meta_valid_best(_step)?$")


def _finite(x) -> bool:
  return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def meta_valid_from_metrics(path: str, kind: str = "latest"
                           ) -> Dict[int, float]:
  """{outer step: meta-validation score of that step's theta of `kind`}.

  path: a run's metrics.jsonl (or its folder). Non-finite scores (null) are
  kept out: a diverged theta is never chosen. Later lines win (a resumed
  run rewrites steps).
  """
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  out = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line cut short by a kill
      for key, value in row.items():
        m = _KEY.match(key)
        if m and m.group(1) == kind and _finite(value):
          out[int(row["step"])] = float(value)
  return out


def best_from_metrics(path: str) -> Optional[Dict[str, float]]:
  """The run's own running best ({"score", "step"}) from its last line that
  logs `meta_valid_best`; None when it logs none."""
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  best = None
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      found = {}
      for key, value in row.items():
        m = _BEST.match(key)
        if m and _finite(value):
          found["step" if m.group(1) else "score"] = float(value)
      if "score" in found:
        best = dict(score=found["score"], step=int(found.get("step", -1)))
  return best


def argmin(scores: Mapping[Any, Optional[float]]) -> Any:
  """The key of the lowest finite score (ties: the first in order).

  Raises ValueError when no score is finite.
  """
  best, best_score = None, math.inf
  for key, score in scores.items():
    if _finite(score) and score < best_score:
      best, best_score = key, float(score)
  if best is None:
    raise ValueError(f"selection.argmin: no finite score among {dict(scores)}")
  return best


def ranks(x: Sequence[float]) -> np.ndarray:
  """1-based ranks, ties sharing their average rank."""
  x = np.asarray(x, float)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x))
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
      j += 1
    r[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return r


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
  """Spearman's rank correlation: Pearson's correlation of the ranks.

  None with fewer than 3 pairs with both values finite, or a constant side.
  """
  pairs = [(a, b) for a, b in zip(x, y) if _finite(a) and _finite(b)]
  if len(pairs) < 3:
    return None
  rx, ry = (ranks([p[i] for p in pairs]) for i in (0, 1))
  rx, ry = rx - rx.mean(), ry - ry.mean()
  den = math.sqrt(float(rx @ rx) * float(ry @ ry))
  return None if den == 0 else float(rx @ ry) / den


def evenly_spaced(steps: Sequence[int], count: int) -> List[int]:
  """At most `count` of the sorted steps, evenly spaced by position, always
  with the first and the last."""
  steps = sorted(steps)
  if len(steps) <= count:
    return steps
  picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(
      int))
  return [steps[i] for i in picks]


def distribution_from_config(config_path: str, search_path: str):
  """The meta-training distribution of a gin config file (parsed, read, and
  cleared again, so the caller's gin state is left empty)."""
  import gin  # pylint: disable=g-import-not-at-top
  from pathology_fix.runtime import meta_validation  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin.add_config_file_search_path(search_path)
    gin.parse_config_file(config_path)
    return meta_validation.distribution_from_gin()
  finally:
    gin.clear_config()


def score_thetas(lopt, thetas: Mapping[str, Any], distribution,
                 inner_steps: int, num_tasks: int = 10,
                 seed: int = 0) -> Dict[str, Any]:
  """Meta-validation of saved thetas, as a training run would score them.

  distribution: a `MetaTrainingDistribution` (e.g.
  `distribution_from_config`). Returns {"scores": {label: score},
  "per_task": {label: [final loss per task]}, "tasks": names, "seconds",
  "inner_steps", "num_tasks", "split"}.
  """
  from pathology_fix.runtime import meta_validation  # pylint: disable=g-import-not-at-top
  mv = meta_validation.MetaValidation(num_tasks=num_tasks,
                                      inner_steps=inner_steps, seed=seed,
                                      distribution=distribution)
  result = mv.evaluate(lopt, dict(thetas))
  return dict(scores=result.scores,
              per_task={k: [float(x) for x in v]
                        for k, v in result.final_loss.items()},
              tasks=result.task_names, seconds=result.seconds,
              inner_steps=inner_steps, num_tasks=num_tasks, split=mv.split)


def unseen_verdict(unseen: Mapping[str, Mapping[str, Any]],
                   threshold: float = UNSEEN_THRESHOLD) -> Dict[str, Any]:
  """Whether a learned optimizer loses to Adam(1e-3) on unseen tasks.

  unseen: {family: {"beats_adam_1e3": fraction of its tasks, "num_tasks":
  n, ...}}. The fraction of unseen tasks where it is no worse than
  Adam(1e-3) weighs every family equally (families hold different numbers
  of tasks: conv3 runs cost far more than tabular ones); it loses when that
  fraction is below `threshold` (the shipping bar: 75%). None when there
  are no unseen tasks. The fraction over all tasks pooled is reported too.
  """
  rows = {f: r for f, r in unseen.items() if int(r["num_tasks"]) > 0}
  total = sum(int(r["num_tasks"]) for r in rows.values())
  fraction = (float(np.mean([float(r["beats_adam_1e3"])
                             for r in rows.values()])) if rows else None)
  pooled = (sum(float(r["beats_adam_1e3"]) * int(r["num_tasks"])
                for r in rows.values()) / total if total else None)
  loses = None if fraction is None else bool(fraction < threshold)
  below = sorted(f for f, r in rows.items()
                 if float(r["beats_adam_1e3"]) < threshold)
  return dict(loses_to_adam_1e3=loses, beats_adam_1e3=fraction,
              beats_adam_1e3_pooled=pooled, num_tasks=total,
              num_families=len(rows), threshold=threshold,
              families_below_threshold=below,
              rule=(f"marked when no worse than Adam(1e-3) (final test loss)"
                    f" on fewer than {threshold:.0%} of the unseen tasks, "
                    "each family weighted equally"))
