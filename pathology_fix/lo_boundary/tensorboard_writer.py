"""TensorBoard event files without TensorFlow.

Same interface as `flax.metrics.tensorboard.SummaryWriter` (which LO 0.0.1's
`summary.JaxboardWriter` is) and LO main's `summary.TensorboardWriter`
(adds `tensor`), written through tensorboardX, so that
`tensorboard --logdir DIR` works on runs made without TensorFlow installed.
"""

import threading

import numpy as np


def _write_synchronously(event_file_writer):
  """Events go to the file in the caller's thread, not a background queue.

  tensorboardX queues events for a thread, and its flush() does not drain
  that queue: a process killed right after checkpoint N could lose step N's
  events. Written here, flush() means on disk (in the OS) before the
  checkpoint is. Left as is if this tensorboardX is built differently.
  """
  records = getattr(event_file_writer, "_ev_writer", None)
  if records is None or not hasattr(records, "write_event"):
    return
  lock = threading.Lock()  # the writer thread still flushes the same file

  def add_event(event):
    if not event_file_writer._closed:  # pylint: disable=protected-access
      with lock:
        records.write_event(event)

  def flush():
    if not event_file_writer._closed:  # pylint: disable=protected-access
      with lock:
        records.flush()

  event_file_writer.add_event = add_event
  event_file_writer.flush = flush


class SummaryWriter:
  """Writes scalars, histograms and text as TensorBoard event files."""

  def __init__(self, log_dir, auto_flush=True):
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "Writing TensorBoard summaries without TensorFlow needs tensorboardX:"
          " pip install tensorboardX") from e
    self._writer = tensorboardX.SummaryWriter(logdir=log_dir)
    self._auto_flush = auto_flush
    _write_synchronously(self._writer.file_writer.event_writer)

  def _maybe_flush(self):
    if self._auto_flush:
      self._writer.flush()

  def scalar(self, tag, value, step):
    self._writer.add_scalar(tag, float(np.asarray(value)), global_step=int(step))
    self._maybe_flush()

  def histogram(self, tag, values, step, bins=None):
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size:
      self._writer.add_histogram(
          tag, values, global_step=int(step), bins=bins or "tensorflow")
      self._maybe_flush()

  def text(self, tag, textdata, step):
    self._writer.add_text(tag, str(textdata), global_step=int(step))
    self._maybe_flush()

  def image(self, tag, image, step):
    self._writer.add_image(
        tag, np.asarray(image), global_step=int(step), dataformats="HWC")
    self._maybe_flush()

  def hparams(self, hparams):
    self.text("hparams", repr(dict(hparams)), step=0)

  def write(self, tag, tensor, step):
    self.scalar(tag, tensor, step)

  def tensor(self, tag, value, step):
    """LO main's writer: scalars as scalars, anything larger as a histogram."""
    if np.ndim(value) == 0:
      self.scalar(tag, value, step)
    else:
      self.histogram(tag, value, step)

  def mark_restart(self, first_new_step):
    """A SessionLog START: TensorBoard drops this run's events from the step on.

    Used when a run resumes from a checkpoint older than its last summaries.
    """
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._writer.file_writer.add_event(
        event_pb2.Event(
            step=int(first_new_step),
            session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()
