"""TensorBoard event files written without TensorFlow read back with tensorboard."""

import json
import time

import numpy as np

import pathology_fix  # pylint: disable=unused-import  # compat before LO
from learned_optimization import summary  # pylint: disable=g-bad-import-order
from pathology_fix.runtime import checkpoints
from pathology_fix.runtime import summaries

import cli_utils


def test_lo_jaxboard_writer_scalars_round_trip(tmp_path):
  writer = summary.JaxboardWriter(str(tmp_path))
  for step in range(1, 4):
    writer.scalar("mean_loss", 10.0 / step, step=step)
    writer.scalar("family/grad_norm", np.float32(step), step=step)
  writer.histogram("collected", np.arange(5.0), step=1)
  writer.close()

  scalars = cli_utils.read_scalars(tmp_path)
  assert set(scalars) == {"mean_loss", "family/grad_norm"}
  assert [s for s, _ in scalars["mean_loss"]] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in scalars["mean_loss"]],
                             [10.0, 5.0, 10.0 / 3], rtol=1e-6)
  assert scalars["family/grad_norm"] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_flushed_events_are_on_disk_before_close(tmp_path):
  # What a checkpoint written right after flush() relies on: a SIGKILL then
  # loses none of the step's events (tensorboardX's own flush leaves events
  # queued for its writer thread).
  writer = summary.JaxboardWriter(str(tmp_path))
  for step in range(1, 6):
    for i in range(20):
      writer.scalar(f"tag{i}", float(step), step=step)
    writer.flush()
    scalars = cli_utils.read_scalars(tmp_path)
    assert all(scalars[f"tag{i}"][-1] == (step, float(step))
               for i in range(20)), step
  writer.close()


def test_training_summaries_match_metrics_jsonl(tmp_path):
  """The loop's writer path: same tags/values in TensorBoard and the jsonl."""
  writer = summary.JaxboardWriter(str(tmp_path))
  log = checkpoints.MetricsLog(str(tmp_path / "m.jsonl"), keep_up_to_step=0)
  to_write = {
      "mean_loss": np.float32(1.5),
      "theta_mean//mlp/~/linear_0/b": np.float32(0.25),  # LO's theta names
      "FixedDimQuadraticFamily/grad_norm": 2.0,
      "loss_histogram": np.arange(4.0),  # not a scalar: histogram only
  }
  summaries.write_summaries(writer, log, to_write, step=7)
  writer.close()
  log.close()

  record = json.loads((tmp_path / "m.jsonl").read_text())
  assert record == {
      "step": 7,
      "mean_loss": 1.5,
      "theta_mean//mlp/_/linear_0/b": 0.25,
      "FixedDimQuadraticFamily/grad_norm": 2.0,
  }
  scalars = cli_utils.read_scalars(tmp_path)
  assert {k: v for k, v in scalars.items()} == {
      k: [(7, v)] for k, v in record.items() if k != "step"}


def test_resumed_run_replaces_the_killed_runs_later_steps(tmp_path):
  killed = summary.JaxboardWriter(str(tmp_path))
  for step in range(1, 6):
    killed.scalar("mean_loss", float(step), step=step)
  killed.close()
  # Event file names carry the creation second; a resumed process never
  # starts within the same second, so don't here either.
  time.sleep(1.1)

  resumed = summary.JaxboardWriter(str(tmp_path))
  summaries.mark_restart(resumed, 4)
  for step in range(4, 7):
    resumed.scalar("mean_loss", 100.0 + step, step=step)
  resumed.close()

  assert len(cli_utils.event_files(tmp_path)) == 2
  assert cli_utils.read_scalars(tmp_path)["mean_loss"] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]
