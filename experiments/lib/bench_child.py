"""Benchmark children: run one configuration in a fresh spawned process.

The dispatcher that both kinds of child use, kept apart from `bench_runs`
and `bench_profile` so that neither imports the other back.
"""

import multiprocessing
import traceback
from typing import Any, Dict

from experiments.lib import bench_profile
from experiments.lib import bench_runs


def _child(cfg, queue):
  try:
    fn = {"profile": bench_profile.run_profile, "memory": bench_runs.run_memory,
          "group": bench_runs.run_group}[cfg["kind"]]
    queue.put(("ok", fn(cfg)))
  except BaseException as e:  # pylint: disable=broad-except
    queue.put(("error", f"{e!r}\n{traceback.format_exc()}"))


def run_in_child(cfg: Dict[str, Any], timeout_s: float) -> Any:
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_child, args=(cfg, queue))
  proc.start()
  try:
    status, payload = queue.get(timeout=timeout_s)
  except Exception:  # pylint: disable=broad-except
    status, payload = "error", f"no result within {timeout_s:.0f} s"
  proc.join(timeout=30)
  if proc.is_alive():
    proc.kill()
    proc.join()
  if status == "ok":
    return payload
  return dict(error=payload.splitlines()[0] if payload else "?",
              error_detail=payload)
