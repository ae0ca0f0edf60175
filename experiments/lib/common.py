"""What every experiment script shares: arguments, the results folder, writers.

Each experiment writes to experiments/results/<name>/: PNG plots, one JSON file
of its numbers (results.json) and a short Markdown summary (summary.md).
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import pathology_fix  # noqa: F401  (compat layer before any LO import)

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true",
                 help="small sizes: finishes within 5 minutes on 2 CPU cores")
  p.add_argument("--out", default=None,
                 help="results folder (default experiments/results/<name>)")
  p.add_argument("--seed", type=int, default=0)
  return p


def results_dir(name: str, out: Optional[str] = None) -> pathlib.Path:
  path = pathlib.Path(out) if out else RESULTS / name
  path.mkdir(parents=True, exist_ok=True)
  return path


def jsonable(x: Any) -> Any:
  """numpy / jax scalars and arrays to plain JSON; non-finite floats to null."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, "tolist"):
    return jsonable(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_results(out_dir: pathlib.Path, numbers: Mapping[str, Any],
                  summary_markdown: str, mode: str) -> None:
  """results.json (numbers + mode + date) and summary.md."""
  payload = {"mode": mode, "date": time.strftime("%Y-%m-%d"), **numbers}
  (out_dir / "results.json").write_text(
      json.dumps(jsonable(payload), indent=1, sort_keys=True) + "\n")
  (out_dir / "summary.md").write_text(summary_markdown.rstrip() + "\n")


def finish(out_dir: pathlib.Path, numbers: Mapping[str, Any],
           summary_markdown: str, quick: bool) -> None:
  """Writes results.json and summary.md, and shows the summary."""
  write_results(out_dir, numbers, summary_markdown,
                "quick" if quick else "full")
  print(summary_markdown)


def save_figure(fig, out_dir: pathlib.Path, filename: str) -> pathlib.Path:
  path = out_dir / filename
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)
  return path


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def run_processes(command: Sequence[str], num_processes: int,
                  env_of: Callable[[int], Mapping[str, str]],
                  timeout_s: float):
  """Runs `command --process_id=i` for every i at once, from the repository.

  Raises if one exits non-zero or outlives timeout_s; the others are killed.
  """
  procs = [subprocess.Popen(list(command) + [f"--process_id={i}"], cwd=REPO,
                            env=dict(env_of(i))) for i in range(num_processes)]
  try:
    for p in procs:
      if p.wait(timeout=timeout_s):
        raise RuntimeError(f"worker exited with status {p.returncode}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
