"""The meta-validation cost bound and the best-theta tracker."""

import math

import flax
import numpy as np
import pytest

from pathology_fix.runtime import model_selection as ms


def _nan_argmin_first(scores):
  """Reference: index of the first smallest finite score, -1 if none."""
  best, where = math.inf, -1
  for i, s in enumerate(scores):
    if math.isfinite(s) and s < best:
      best, where = s, i
  return where


def test_first_validation_always_runs_and_then_every_n_steps():
  clock = ms.ValidationClock()
  d = clock.decide(0, 0.0, every_n_steps=10, max_time_fraction=0.15)
  assert d.validate and d.due and d.fraction == 0.0
  clock = clock.record(0, seconds=1.0)
  # Cheap validations (1 s against 100 s of training per 10 steps).
  runs = []
  for step in range(1, 60):
    d = clock.decide(step, train_seconds=10.0 * step, every_n_steps=10,
                     max_time_fraction=0.15)
    if d.validate:
      runs.append(step)
      clock = clock.record(step, 1.0)
  assert runs == [10, 20, 30, 40, 50]
  assert clock.fraction(590.0) == pytest.approx(6.0 / 596.0)


def test_expensive_validations_are_postponed_to_keep_the_bound():
  f = 0.15
  clock = ms.ValidationClock().record(0, seconds=30.0, compile_seconds=20.0)
  assert float(clock.last_seconds) == 10.0  # next estimate excludes compiling
  train, runs, fractions = 0.0, [], []
  for step in range(1, 400):
    train += 1.0  # 1 s per outer step
    d = clock.decide(step, train, every_n_steps=5, max_time_fraction=f)
    if d.due and not d.validate:
      assert d.projected > f
    if d.validate:
      assert d.projected <= f
      runs.append(step)
      clock = clock.record(step, 10.0)
    fractions.append(clock.fraction(train))
  # The first (30 s with compiling) is paid off at 226.7 s of training:
  # (30 + 10) / (t + 40) <= 0.15. Then each 10 s validation needs 10 / f -
  # 10 = 56.7 s of training: the bound, not every_n_steps, sets the pace.
  assert runs[0] == 227
  assert np.all((np.diff(runs) >= 56) & (np.diff(runs) <= 58))
  # The fraction never exceeds the bound once the compile cost is paid off.
  assert max(fractions[runs[0]:]) <= f + 1e-12
  assert fractions[-1] > 0.12  # and the budget is used, not wasted


def test_postponed_validation_stays_due():
  clock = ms.ValidationClock().record(0, 10.0)
  d = clock.decide(7, train_seconds=20.0, every_n_steps=5,
                   max_time_fraction=0.15)
  assert d.due and not d.validate
  d = clock.decide(8, train_seconds=200.0, every_n_steps=5,
                   max_time_fraction=0.15)
  assert d.due and d.validate


@pytest.mark.parametrize("kwargs,match", [
    ({"every_n_steps": 0}, r"MetaValidation\.every_n_steps=0; allowed: an "
                           r"integer >= 1"),
    ({"every_n_steps": 2.0}, r"every_n_steps=2\.0; allowed"),
    ({"max_time_fraction": 0.0}, r"MetaValidation\.max_time_fraction=0\.0; "
                                 r"allowed: a float in \(0, 1\]"),
    ({"max_time_fraction": 1.5}, r"max_time_fraction=1\.5"),
])
def test_bad_budget_values_raise(kwargs, match):
  args = dict(every_n_steps=5, max_time_fraction=0.15)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    ms.ValidationClock().decide(0, 0.0, **args)


def test_bad_recorded_seconds_raise():
  with pytest.raises(ValueError, match="compile_seconds"):
    ms.ValidationClock().record(0, seconds=1.0, compile_seconds=2.0)


@pytest.mark.parametrize("seed", range(5))
def test_best_is_the_argmin_with_nan_and_ties(seed):
  rng = np.random.default_rng(seed)
  scores = np.round(rng.uniform(0.1, 1.0, size=60), 1)  # many ties
  scores[rng.choice(60, 10, replace=False)] = np.nan
  scores[rng.choice(60, 3, replace=False)] = np.inf
  kinds = ["latest", "ema"] * 30
  steps = np.repeat(np.arange(30) * 5, 2)
  best = ms.BestTheta()
  improvements = []
  for i, (step, kind, s) in enumerate(zip(steps, kinds, scores)):
    best, improved = best.update(int(step), kind, float(s))
    if improved:
      improvements.append(i)
    j = _nan_argmin_first(scores[:i + 1])
    assert (best.step, best.kind) == ((int(steps[j]), kinds[j]) if j >= 0
                                      else (-1, ""))
  j = _nan_argmin_first(scores)
  assert best.score == scores[j] and improvements[-1] == j
  assert best.num_entries == 60


def test_nan_never_becomes_best():
  best = ms.BestTheta()
  best, improved = best.update(0, "latest", float("nan"))
  assert not improved and not best.found and best.score == math.inf
  best, improved = best.update(5, "ema", 0.5)
  best, improved2 = best.update(10, "latest", float("nan"))
  assert improved and not improved2 and best.step == 5


def test_tracker_and_clock_roundtrip_and_resume():
  entries = [(0, "latest", 0.9), (5, "latest", 0.7), (5, "ema", 0.8),
             (10, "latest", 0.75), (10, "ema", 0.6), (15, "latest", 0.65)]
  whole = ms.BestTheta()
  for e in entries:
    whole, _ = whole.update(*e)
  part = ms.BestTheta()
  for e in entries[:3]:
    part, _ = part.update(*e)
  clock = ms.ValidationClock().record(0, 3.0, 2.0).record(5, 1.5)
  data = flax.serialization.to_bytes({"best": part, "clock": clock})
  restored = flax.serialization.from_bytes(
      {"best": ms.BestTheta(), "clock": ms.ValidationClock()}, data)
  assert restored["best"] == part and restored["clock"] == clock
  assert ms.BestTheta.from_dict(part.to_dict()) == part
  resumed = restored["best"]
  for e in entries[3:]:
    resumed, _ = resumed.update(*e)
  assert resumed == whole
  assert (whole.step, whole.kind, whole.score) == (10, "ema", 0.6)
