"""E7's files: what each process writes, and how they come back together.

Part 1 writes part1_<theta>.json and part 2 part2_<estimator>.json, each
rewritten as it goes (complete: false until done), so parts can run in
separate processes sharing one folder; `collect_parts` merges them.
The mid-training theta of part 1 is mid_theta.msgpack plus its record.
"""

import json

from experiments.lib import common
from experiments.lib import estimator_study as study

# Theta "mid" of part 1 and where it came from (seed, seconds, outer steps).
MID_THETA_FILES = ("mid_theta.msgpack", "mid_theta.json")


def part_file(out_dir, part, label):
  """part1_<theta>.json / part2_<estimator>.json: one process's share."""
  return out_dir / f"{part}_{label}.json"


def reference_file(out_dir, label):
  """reference_<theta>.npz: part 1's reference draws (es_draws, rp_draws)."""
  return out_dir / f"reference_{label}.npz"


def write_part(out_dir, part, label, content):
  part_file(out_dir, part, label).write_text(
      json.dumps(common.jsonable(content), indent=1) + "\n")


def read_parts(out_dir, part):
  """The part's files in out_dir, and the labels of those not complete."""
  parts = [json.loads(path.read_text())
           for path in sorted(out_dir.glob(f"{part}_*.json"))]
  return parts, [p.get("theta", p.get("estimator")) for p in parts
                 if not p["complete"]]


def collect_parts(out_dir, numbers):
  """Every part file in out_dir into numbers: part 1's rows, references and
  seconds per theta; part 2's runs per estimator (in ESTIMATOR_NAMES order;
  a results.json from before part 2 files existed keeps its own); and the
  labels of unfinished parts; the mid theta's record."""
  parts, incomplete1 = read_parts(out_dir, "part1")
  numbers.update(
      gradient_quality=[r for p in parts for r in p["rows"]],
      reference={p["theta"]: p["reference"] for p in parts},
      seconds_part1={p["theta"]: p.get("seconds") for p in parts},
      part1_incomplete=incomplete1)
  parts, incomplete2 = read_parts(out_dir, "part2")
  if parts:
    by_name = {p["estimator"]: p["runs"] for p in parts}
    numbers["meta_training"] = {n: by_name[n] for n in study.ESTIMATOR_NAMES
                                if n in by_name}
    numbers["estimators"] = list(numbers["meta_training"])
    numbers["config"] = dict(numbers["config"],
                             estimators=numbers["estimators"])
  numbers["part2_incomplete"] = incomplete2
  merge_quality = out_dir / "merge_quality.json"
  if merge_quality.exists():
    numbers["merge_quality"] = json.loads(merge_quality.read_text())["rows"]
  mid_record = out_dir / MID_THETA_FILES[1]
  if mid_record.exists():
    numbers["mid_theta"] = json.loads(mid_record.read_text())


def save_mid_theta(out_dir, checkpoint, seed):
  """Writes a (seconds, outer step, inner steps, theta) checkpoint."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  seconds, step, inner, theta = checkpoint
  (out_dir / MID_THETA_FILES[0]).write_bytes(
      flax.serialization.to_bytes(theta))
  (out_dir / MID_THETA_FILES[1]).write_text(json.dumps(dict(
      seed=seed, seconds=seconds, outer_steps=step,
      inner_steps=inner)) + "\n")


def load_mid_theta(out_dir, template):
  """The saved mid theta, shaped like `template` (None if not saved)."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  path = out_dir / MID_THETA_FILES[0]
  if not path.exists():
    return None
  return flax.serialization.from_bytes(template, path.read_bytes())


def stored(out_dir):
  """results.json without what `collect_parts` and the writer derive."""
  numbers = json.loads((out_dir / "results.json").read_text())
  for key in ("mode", "date", "gradient_quality", "reference",
              "reference_relative_stderr", "seconds_part1",
              "part1_incomplete", "part2_incomplete", "mid_theta",
              "merge_quality"):
    numbers.pop(key, None)
  return numbers
