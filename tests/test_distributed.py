"""One run over two processes (jax.distributed, gloo on 127.0.0.1).

The same-answer test runs `tests/distributed_worker.py` (HybridRPES, the
validation meta-objective, digits MLP tasks): 2 processes x 1 device must
give the first outer gradient and theta after 3 outer steps of 1 process x 1
device (default run) and of 1 process x 2 forced devices (slow), with each
process building only its own samples' batches. The CLI
tests (slow) check that only process 0 writes the run directory, that a
killed process makes the other stop with one error line instead of hanging,
and that rerunning both resumes.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from pathology_fix.runtime import distributed
from pathology_fix.cli import train

import cli_utils

REPO = cli_utils.REPO
WORKER = REPO / "tests" / "distributed_worker.py"
HYBRID = REPO / "gin_configs" / "hybrid_quadratic.gin"
TIMEOUT_S = 600  # only stops hangs: a cold start compiles for ~30 s


def _env(devices=1):
  env = cli_utils.subprocess_env()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO)  # the worker script is run by path
  env["XLA_FLAGS"] = " ".join(
      [f for f in env.get("XLA_FLAGS", "").split()
       if "device_count" not in f] +
      [f"--xla_force_host_platform_device_count={devices}"])
  return env


@contextlib.contextmanager
def _processes(commands, env, **kwargs):
  """Starts all commands; on exit, kills whatever still runs and reaps it."""
  procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)
           for c in commands]
  try:
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.communicate(timeout=60)


def _finish(procs, timeout_s=TIMEOUT_S):
  """(returncode, stdout, stderr) of each, waiting at most timeout_s overall."""
  deadline = time.time() + timeout_s
  results = []
  for p in procs:
    out, err = p.communicate(timeout=max(1, deadline - time.time()))
    results.append((p.returncode, out, err))
  return results


def _coordinator_flags(port, process_id, num_processes=2):
  return [f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={num_processes}", f"--process_id={process_id}"]


def _run_workers(tmp_path, name, num_processes, devices):
  out = tmp_path / name
  port = portpicker.pick_unused_port()
  commands = [
      [sys.executable, str(WORKER), str(out)] +
      ([] if num_processes == 1 else
       [f"127.0.0.1:{port}", str(num_processes), str(i)])
      for i in range(num_processes)
  ]
  with _processes(commands, _env(devices)) as procs:
    results = _finish(procs)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  return [json.loads((tmp_path / f"{name}.{i}").read_text())
          for i in range(num_processes)]


def _assert_same(got, want, what):
  for part in ("grad", "theta"):
    for name, value in want[part].items():
      np.testing.assert_allclose(got[part][name], value, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{what}: {part} {name}")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  return _run_workers(tmp_path_factory.mktemp("two"), "two", 2, 1)


def test_two_processes_give_the_one_process_answer(two_processes, tmp_path):
  single, = _run_workers(tmp_path, "single", 1, 1)
  assert not single["split"] and single["devices"] == 1
  for i, result in enumerate(two_processes):
    assert result["process_index"] == i
    assert result["process_count"] == 2 and result["devices"] == 2
    assert result["split"]  # the 6 samples really are split over 2 processes
    assert result["local_samples"] == [[0, 1, 2], [3, 4, 5]][i]
    # Each process builds only its own samples' batches (it skips the
    # others'): half of what the single process builds.
    assert single["gathered"] > 0
    assert 2 * result["gathered"] == single["gathered"]
    _assert_same(result, single, f"process {i} vs 1 process")
  # theta (and the outer optimizer) stay identical on both processes.
  assert two_processes[0]["theta"] == two_processes[1]["theta"]
  assert two_processes[0]["grad"] == two_processes[1]["grad"]


@pytest.mark.slow
def test_two_processes_give_the_two_device_answer(two_processes, tmp_path):
  forced, = _run_workers(tmp_path, "forced", 1, 2)
  assert forced["split"] and forced["devices"] == 2
  for i, result in enumerate(two_processes):
    _assert_same(result, forced, f"process {i} vs 1 process x 2 devices")


# Flags and settings, in this process.


@pytest.mark.parametrize("flags,expected", [
    (["--num_processes=2"], ["--coordinator_address", "--process_id",
                             "missing"]),
    (["--coordinator_address=nohost", "--num_processes=2", "--process_id=0"],
     ["--coordinator_address", "'nohost'", "HOST:PORT"]),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=2",
      "--process_id=2"], ["--process_id (2)", "[0, 2)"]),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=0",
      "--process_id=0"], ["--num_processes (0)", ">= 1"]),
    (["--heartbeat_timeout_s=0"], ["--heartbeat_timeout_s (0)", ">= 1"]),
])
def test_bad_distributed_flags_give_one_error_line(tmp_path, capsys, flags,
                                                   expected):
  run_dir = tmp_path / "run"
  status = train.execute(["pathology_fix.train", f"--train_log_dir={run_dir}",
                          f"--config_file={HYBRID}"] + flags)
  err = capsys.readouterr().err
  assert status == train.USAGE_EXIT_CODE, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for text in expected:
    assert text in lines[0]
  assert not run_dir.exists()


def test_cluster_detection_only_for_multi_process_launches():
  assert distributed.cluster_detected({}) is None
  assert distributed.cluster_detected(
      {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.cluster_detected(
      {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "SLURM"
  assert distributed.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
  assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a"}) is None
  assert distributed.cluster_detected(
      {"TPU_WORKER_HOSTNAMES": "a,b"}) == "Cloud TPU"


def test_single_process_by_default(monkeypatch):
  # No flags and no launcher: nothing joins, the run stays one process.
  for name in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize("127.0.0.1:1234", 1, 0) is False
  assert distributed.is_primary()


# The CLI on two processes.

BINDINGS = ("run_train.num_steps = {steps}",
            "VariationalEstimator.num_tasks = 6",
            "VariationalEstimator.unroll_length = 10",
            "run_train.summary_every_n = 1",
            "resumable_local_train.checkpoint_every_n_steps = 1",
            "resumable_local_train.seed = 3")


def _cli(run_dir, port, steps):
  bindings = [b.format(steps=steps) for b in BINDINGS]
  return [
      cli_utils.train_command(
          run_dir, *bindings, config_file=HYBRID,
          extra_flags=_coordinator_flags(port, i) +
          ["--heartbeat_timeout_s=5"]) for i in range(2)
  ]


def _wait_for_metrics(run_dir, num_lines, procs, timeout_s=TIMEOUT_S):
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= num_lines:
      return
    assert all(p.poll() is None for p in procs), "a process ended early"
    time.sleep(0.5)
  raise AssertionError(f"no {num_lines} metrics lines in {timeout_s} s")


@pytest.mark.slow
def test_killed_process_stops_the_other_and_rerun_resumes(tmp_path):
  run_dir = tmp_path / "run"
  with _processes(_cli(run_dir, portpicker.pick_unused_port(), 1000),
                  _env()) as procs:
    _wait_for_metrics(run_dir, 3, procs)
    procs[1].send_signal(signal.SIGKILL)
    # Bounded: gloo sees the closed connection (the heartbeat, 5 s here,
    # catches a silent peer); 120 s only guards against a hang.
    (code, _, err), _ = _finish(procs, timeout_s=120)
  errors = cli_utils.error_lines(err)
  assert code == 1, err[-3000:]
  assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]
  assert "another process is gone" in errors[0]
  assert "rerun every process to resume" in errors[0]
  assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
  reached = max(int(n.split("_")[1]) for n in os.listdir(run_dir)
                if n.startswith("checkpoint_"))
  assert reached >= 3

  # Rerunning both resumes from process 0's last checkpoint.
  with _processes(_cli(run_dir, portpicker.pick_unused_port(), reached + 2),
                  _env()) as procs:
    results = _finish(procs)
  for code, out, err in results:
    assert code == 0, err[-3000:]
  assert f"Resuming from {run_dir}/checkpoint_{reached}" in results[0][1]
  # Process 1 prints nothing (but the C++ gloo library's connection line).
  assert not [l for l in results[1][1].splitlines()
              if l.strip() and not l.startswith("[Gloo]")], results[1][1]
  steps = [r["step"] for r in cli_utils.read_metrics(run_dir)]
  assert steps == list(range(1, reached + 3))
  assert len(cli_utils.event_files(run_dir)) == 2  # one per run, process 0's


@pytest.mark.slow
@pytest.mark.parametrize("stopped", [1, 0])
def test_stopped_process_stops_the_other_with_one_line(tmp_path, stopped):
  # SIGSTOP keeps the stopped process's sockets open: no collective fails,
  # only silence tells. The other must stop with our line within the
  # heartbeat (5 s here), before JAX's own heartbeat would end it.
  run_dir = tmp_path / "run"
  other = 1 - stopped
  with _processes(_cli(run_dir, portpicker.pick_unused_port(), 1000),
                  _env()) as procs:
    _wait_for_metrics(run_dir, 2, procs)
    procs[stopped].send_signal(signal.SIGSTOP)
    start = time.monotonic()
    try:
      _, err = procs[other].communicate(timeout=120)
    finally:
      procs[stopped].kill()
    elapsed = time.monotonic() - start
  errors = cli_utils.error_lines(err)
  assert procs[other].returncode == 1, err[-3000:]
  assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]
  assert (f"process {other} of 2 stopped: process {stopped} has not "
          "responded for 5 s") in errors[0]
  assert "rerun them to resume" in errors[0]
  # 5 s of silence, plus up to a second of polling each side, plus slack
  # for two busy cores; JAX's own heartbeat is set to 20 s.
  assert elapsed < 15, elapsed
