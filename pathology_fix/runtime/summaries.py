"""Per-step summaries: TensorBoard tags and the metrics.jsonl line, written together.

Each outer step's summary is LO's learner summary (`outer_train.
summarize_learner`) plus the estimators' metrics, which LO's own local_train
drops. Every scalar goes to TensorBoard and to metrics.jsonl under the same
tag (`tensorboard_tag`); arrays go to TensorBoard as histograms. Only
process 0 writes; the others get writers that discard everything.
"""

import os
import re
import threading
from typing import Any, MutableMapping

from absl import logging
import jax
import jax.numpy as jnp
from learned_optimization import outer_train
from learned_optimization import summary
from learned_optimization.outer_trainers import gradient_learner
import numpy as onp

from pathology_fix.lo_boundary import lo_api
from pathology_fix.runtime import checkpoints
from pathology_fix.runtime import distributed
from pathology_fix.runtime import outer_loop


def _is_scalar(value: Any) -> bool:
  return onp.ndim(value) == 0


def mark_restart(summary_writer: Any, first_new_step: int):
  """Tells TensorBoard to drop events from `first_new_step` on of the killed run.

  Only our tensorboardX writer (what LO's JaxboardWriter is without
  TensorFlow) can; with TF's writer this is skipped.
  """
  drop_from = getattr(summary_writer, "mark_restart", None)
  if drop_from is not None:
    drop_from(first_new_step)


def close_writer(summary_writer: Any, timeout_s: float = 30.0):
  """Closes the writer (tensorboardX drains its queue only on close).

  Bounded: after a Ctrl-C landed inside the writer its queue may never drain.
  """
  closer = threading.Thread(target=summary_writer.close, daemon=True)
  closer.start()
  closer.join(timeout_s)
  if closer.is_alive():
    logging.warning("Summary writer did not close within %.0f s; the last "
                    "TensorBoard events may be missing.", timeout_s)


def open_summaries(train_log_dir: str,
                    outer_learner: gradient_learner.GradientLearner,
                    learner_state, restored: bool):
  """metrics.jsonl and TensorBoard, continued after a restored step.

  Processes other than 0 get writers that discard everything.
  """
  if not distributed.is_primary():
    return Discard(), Discard()
  step = int(learner_state.theta_opt_state.iteration)
  metrics_log = checkpoints.MetricsLog(
      os.path.join(train_log_dir, checkpoints.METRICS_FILE),
      keep_up_to_step=step if restored else 0)
  summary_writer = summary.JaxboardWriter(train_log_dir)
  if restored:
    mark_restart(summary_writer, step + 1)
  else:
    theta = lo_api.get_meta_params(outer_learner, learner_state)
    shapes = jax.tree_util.tree_map(
        lambda x: (tuple(onp.shape(x)), str(jnp.asarray(x).dtype)), theta)
    summary_writer.text("theta_structure", str(shapes), step=0)
  return metrics_log, summary_writer


class Discard:
  """MetricsLog and summary writer of the processes that do not write."""

  def write(self, *args, **kwargs):
    pass

  scalar = histogram = text = close = flush = write


def step_summary(out: outer_loop.OuterStep,
                  outer_learner: gradient_learner.GradientLearner,
                  worker_ids, with_metrics: bool, delta_time: float,
                  total_inner_steps: int,
                  elapsed_time: float) -> MutableMapping[str, Any]:
  """LO's learner summary of one step, plus the estimators' metrics."""
  # LO's local_train drops the estimators' metrics; keep both.
  with onp.errstate(divide="ignore"):
    to_write = outer_train.summarize_learner(
        step=out.step,
        metrics=out.metrics,
        worker_ids=worker_ids,
        with_metrics=with_metrics,
        theta=lo_api.get_meta_params(outer_learner, out.learner_state),
        delta_time=delta_time,
        total_inner_steps=total_inner_steps,
        delta_inner_steps=onp.asarray(0))
  # gradient_worker_compute does not report inner steps (LO's loop logs 0
  # for them too): leave these out rather than log zeros.
  to_write.pop("inner_steps", None)
  to_write.pop("total_time/inner_steps_per_second", None)
  to_write["elapsed_time"] = elapsed_time + delta_time
  return to_write


_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")


def tensorboard_tag(name: str) -> str:
  """The tag TensorBoard writers store `name` under (theta paths contain '~')."""
  return _INVALID_TAG_CHARACTERS.sub("_", name).lstrip("/")


def write_summaries(summary_writer: Any, metrics_log: checkpoints.MetricsLog,
                     to_write: MutableMapping[str, Any], step: int):
  scalars = {}
  for name, value in to_write.items():
    # Cleaned here, not by the writer, so metrics.jsonl uses the same keys.
    tag = tensorboard_tag(name)
    if _is_scalar(value):
      scalars[tag] = float(value)
      summary_writer.scalar(tag, scalars[tag], step=step)
    else:
      summary_writer.histogram(tag, onp.asarray(value), step=step)
  metrics_log.write(step, scalars)
