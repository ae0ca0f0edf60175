"""One run over several processes with JAX's multi-controller runtime.

Every process runs the same command; `initialize` joins them into one JAX
cluster (`jax.distributed.initialize`), after which `jax.devices()` lists
every process's devices and `sharding.SampleSharding` splits each
estimator's samples over all of them. Only process 0 writes files
(`is_primary`); all of them read its checkpoints.

Where the three settings come from:
  explicit   coordinator_address ("host:port" of process 0), num_processes
             and process_id, all three (the --flags of `pathology_fix.train`);
  detected   none given, and the environment is a multi-process SLURM step,
             an Open MPI launch or a multi-host Cloud TPU: JAX's own
             detection fills them in (`jax.distributed.initialize()`);
  neither    a single process, as without this module.

On CPU the cross-process collectives use gloo. A dead process is noticed by
the coordination service's heartbeat (`heartbeat_timeout_s`); the others
then stop instead of waiting forever in a collective.
"""

import os
import threading
import time
from typing import Callable, Mapping, Optional

import jax

DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_INITIALIZATION_TIMEOUT_S = 120


def _int_env(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env.get(name, "0"))
  except ValueError:
    return 0


def cluster_detected(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """The multi-process launcher JAX can configure itself from, or None.

  Checked the way `jax.distributed.initialize()` detects clusters, but only
  for launches of more than one process, so a plain `srun -n1` or a
  single-host TPU VM stays a single-process run.
  """
  env = os.environ if env is None else env
  if _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  if "SLURM_JOB_ID" in env and _int_env(env, "SLURM_NTASKS") > 1:
    return "SLURM"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "Cloud TPU"
  return None


def validate(coordinator_address: Optional[str], num_processes: Optional[int],
             process_id: Optional[int]):
  """Raises ValueError naming the flag for an incomplete or bad combination."""
  given = {"coordinator_address": coordinator_address,
           "num_processes": num_processes, "process_id": process_id}
  missing = [f"--{k}" for k, v in given.items() if v is None]
  if len(missing) not in (0, 3):
    raise ValueError(
        f"{', '.join(missing)} missing: give all three of --coordinator_address, "
        "--num_processes and --process_id, or none of them (single process, "
        "or auto-detected under SLURM / Open MPI / Cloud TPU)")
  if missing:
    return
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address ({coordinator_address!r}) must "
                     "be HOST:PORT of process 0, e.g. 127.0.0.1:12345")
  if num_processes < 1:
    raise ValueError(f"--num_processes ({num_processes}) must be >= 1")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id ({process_id}) must be in "
                     f"[0, --num_processes) = [0, {num_processes})")


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               initialization_timeout_s: int = DEFAULT_INITIALIZATION_TIMEOUT_S
              ) -> bool:
  """Joins the JAX cluster if configured or detected; True if multi-process.

  Must run before any JAX computation. Without arguments and without a
  detected launcher this does nothing (one process).
  """
  validate(coordinator_address, num_processes, process_id)
  if coordinator_address is None:
    if cluster_detected() is None:
      return False
    kwargs = {}
  elif num_processes == 1:
    return False
  else:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  # CPU collectives across processes need gloo (harmless on GPU/TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      # JAX's own heartbeat ends the process with its fatal message; ours
      # (`watch_peers`) fires first and says what happened in one line.
      heartbeat_timeout_seconds=2 * int(heartbeat_timeout_s) + 10,
      initialization_timeout=int(initialization_timeout_s), **kwargs)
  return jax.process_count() > 1


def is_primary() -> bool:
  """True in the process that writes checkpoints, metrics and summaries."""
  return jax.process_index() == 0


def broadcast_int(value: int) -> int:
  """Process 0's value on every process (e.g. a seed drawn at random)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def barrier(name: str):
  """Waits until every process gets here (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class DistributedError(RuntimeError):
  """The processes could not join, or one of them died during the run."""


_BEAT_KEY = "pathology_fix/beat/{}"


def watch_peers(timeout_s: float, on_silent_peer: Callable[[str], None],
                period_s: float = 1.0) -> Optional[threading.Thread]:
  """Calls on_silent_peer(message) once a process has been silent timeout_s.

  Each process bumps a counter in the coordination service's key-value store
  every period_s, from a thread, and reads the others'. A process that is
  stopped (SIGSTOP, a hung host) keeps its sockets open, so collectives wait
  on it forever; its counter stops. When process 0 (the store) is the one
  stopped, the reads themselves hang: that counts as silence too. No-op
  (None) in a single process.
  """
  if jax.process_count() == 1:
    return None
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  me, count = jax.process_index(), jax.process_count()
  last_change = {p: time.monotonic() for p in range(count) if p != me}
  last_seen = {}
  progress = [time.monotonic()]  # when the store last answered

  def beat():
    beats = 0
    while True:
      beats += 1
      try:
        client.key_value_set(_BEAT_KEY.format(me), str(beats),
                             allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except
        progress[0] = None  # the client is shut down: the run is over
        return
      for peer in last_change:
        try:
          value = client.key_value_try_get(_BEAT_KEY.format(peer))
        except Exception:  # pylint: disable=broad-except  # not written yet
          value = None
        if value != last_seen.get(peer):
          last_seen[peer], last_change[peer] = value, time.monotonic()
      progress[0] = time.monotonic()
      time.sleep(period_s)

  def judge():
    while True:
      time.sleep(period_s)
      if progress[0] is None:
        return
      now = time.monotonic()
      silent = [p for p, t in last_change.items() if now - t > timeout_s]
      if now - progress[0] > timeout_s:
        silent = [0] if me != 0 else silent
      if silent:
        on_silent_peer(
            f"process {me} of {count} stopped: process "
            f"{', '.join(map(str, silent))} has not responded for "
            f"{timeout_s:g} s (--heartbeat_timeout_s); stopped or hung")
        return

  for target in (beat, judge):
    threading.Thread(target=target, daemon=True,
                     name=f"pathology_fix_{target.__name__}").start()
  return None
