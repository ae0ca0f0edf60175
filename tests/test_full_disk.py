"""A full disk during a checkpoint: one error line, the last checkpoint intact.

Runs on a small tmpfs (skipped where mounting is not allowed): a short run
saves checkpoint 2, the disk is then filled so that the next checkpoint
cannot be written, and the resumed run must stop with one `error:` line,
leave checkpoint 2 and no `.tmp` file; with space again it resumes.
"""

import os
import subprocess

import pytest

import cli_utils
from pathology_fix.runtime import checkpoints

# A wide MLPLOpt: checkpoints far larger than a step's metrics and events.
FAST = ("run_train.summary_every_n = 1", "resumable_local_train.seed = 0",
        "resumable_local_train.checkpoint_every_n_steps = 1",
        "MLPLOpt.hidden_size = 256", "MLPLOpt.hidden_layers = 2")
ROOM_FOR_A_STEPS_LOGS = 128 * 1024


@pytest.fixture
def small_disk(tmp_path):
  path = tmp_path / "disk"
  path.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs",
                     str(path)], capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  yield path
  subprocess.run(["umount", str(path)], check=True)


def _fill(path, leave_bytes):
  """A file taking all but about `leave_bytes` of the file system's space."""
  stat = os.statvfs(path)
  free = stat.f_bavail * stat.f_frsize
  with open(path / "filler", "wb") as f:
    f.write(b"\0" * max(free - leave_bytes, 0))
  return path / "filler"


@pytest.mark.slow  # three short training runs: minutes on 2 busy cores
def test_full_disk_during_a_checkpoint(small_disk):
  log_dir = small_disk / "run"
  proc = cli_utils.run_train(log_dir, *FAST, "run_train.num_steps = 2")
  assert proc.returncode == 0, cli_utils.describe(proc)
  intact = (log_dir / "checkpoint_2").read_bytes()

  # Room for step 3's metrics and events (and config.gin), not for its
  # checkpoint.
  assert (log_dir / "params_2").stat().st_size > 2 * ROOM_FOR_A_STEPS_LOGS
  filler = _fill(small_disk, leave_bytes=ROOM_FOR_A_STEPS_LOGS)
  proc = cli_utils.run_train(log_dir, *FAST, "run_train.num_steps = 4")
  assert proc.returncode == 1, cli_utils.describe(proc)
  errors = cli_utils.error_lines(proc.stderr)
  assert len(errors) == 1, cli_utils.describe(proc)
  assert "cannot write checkpoint 3" in errors[0], errors[0]
  assert "No space left on device" in errors[0], errors[0]
  assert "checkpoint_2, is intact" in errors[0], errors[0]
  assert "Traceback" not in proc.stderr
  assert checkpoints.checkpoint_steps(str(log_dir))[-1] == 2
  assert (log_dir / "checkpoint_2").read_bytes() == intact
  assert not [p for p in os.listdir(log_dir) if p.endswith(".tmp")]

  filler.unlink()
  proc = cli_utils.run_train(log_dir, *FAST, "run_train.num_steps = 4")
  assert proc.returncode == 0, cli_utils.describe(proc)
  assert f"Resuming from {log_dir}/checkpoint_2" in proc.stdout
  assert checkpoints.checkpoint_steps(str(log_dir))[-1] == 4
  assert [r["step"] for r in cli_utils.read_metrics(log_dir)] == [1, 2, 3, 4]
