"""Skipped batches keep streams in step; a block read is a slice.

A process of a multi-process run reads only its own samples' batches
(`batches.get_batches`) and skips the others'; its stream must stay exactly
where LO's `training.get_batches` of all samples leaves it.
"""

import numpy as np
import pytest

import jax
from learned_optimization import training
from learned_optimization.tasks import base as tasks_base
from learned_optimization.tasks.datasets import base as datasets_base
from pathology_fix.meta_gradient import batches
from pathology_fix.tasks_and_data import data
from pathology_fix.tasks_and_data import tasks
from pathology_fix.tasks_and_data import validation_task


def _digits():
  return data.digits_datasets(batch_size=64, image_size=8, seed=5)


def _round_robin():
  return tasks.every_subset_family(
      "train", 3, dataset="digits", architecture="mlp2x32", image_size=8,
      batch_size=8, seed=2).datasets


def _stacked():
  return validation_task.wrap_datasets(_digits(), 3)


def _plain():
  """LO-style datasets whose iterators have no `skip`."""

  def stream():
    rng = np.random.default_rng(0)
    while True:
      yield {"x": rng.standard_normal(3).astype(np.float32)}

  return datasets_base.Datasets(train=stream(), inner_valid=stream(),
                                outer_valid=stream(), test=stream())


DATASETS = {"digits": _digits, "round_robin": _round_robin,
            "stacked": _stacked, "plain": _plain}


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("make", [_digits, _round_robin, _stacked],
                         ids=["digits", "round_robin", "stacked"])
@pytest.mark.parametrize("split", ["train", "outer_valid"])
def test_skip_advances_like_next_without_gathering(make, split, monkeypatch):
  gathered = []
  split_data = data._SplitData  # pylint: disable=protected-access
  gather = split_data.gather
  monkeypatch.setattr(split_data, "gather",
                      lambda self, p: gathered.append(1) or gather(self, p))
  reference, skipping = make().split(split), make().split(split)
  # 40 reads of 64 digits cross epoch borders (~380 train examples).
  for i in range(40):
    want = next(reference)
    if i % 3 == 1:
      before = len(gathered)
      skipping.skip()
      assert len(gathered) == before  # no image was gathered
    else:
      _assert_trees_equal(next(skipping), want)


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("samples", [[0, 1, 2, 3, 4, 5], [2, 3], [0, 4, 5]])
def test_block_read_is_the_slice_of_lo_get_batches(name, samples):
  steps, n = 3, 6
  split = "outer_valid" if name == "stacked" else "train"
  lo_family, own = tasks_base.TaskFamily(), DATASETS[name]()
  lo_family.datasets = DATASETS[name]()
  for _ in range(2):  # the second chunk checks where the first left the stream
    want = training.get_batches(lo_family, (steps, n), numpy=True, split=split)
    got = batches.get_batches(own, split, steps, n, samples)
    _assert_trees_equal(got, jax.tree_util.tree_map(lambda x: x[:, samples],
                                                    want))


def test_block_read_fills_given_arrays():
  want = batches.get_batches(_digits(), "train", 3, 4, [1, 2])
  out = jax.tree_util.tree_map(lambda x: np.zeros((2,) + x.shape, x.dtype),
                               want)
  got = batches.get_batches(_digits(), "train", 3, 4, [1, 2],
                            out=jax.tree_util.tree_map(lambda x: x[1], out))
  _assert_trees_equal(got, want)
  _assert_trees_equal(jax.tree_util.tree_map(lambda x: x[1], out), want)


def test_chunk_data_is_lo_get_batches_stacked_over_evaluations():
  """Train batches, then each evaluation's outer_valid batches, LO's order."""
  from pathology_fix.meta_gradient import inner_problems  # pylint: disable=g-import-not-at-top
  from pathology_fix.meta_gradient import sharding  # pylint: disable=g-import-not-at-top
  steps, n, evals = 3, 10, 2
  problems = inner_problems.InnerProblems(
      tasks_base.TaskFamily(), None, None, n, steps, "outer_valid", evals,
      10.0, "per_batch", sharding.SampleSharding(n, enabled=False))
  problems.task_family.datasets = _round_robin()
  lo_family = tasks_base.TaskFamily()
  lo_family.datasets = _round_robin()
  for _ in range(2):
    train, meta = problems.chunk_data()
    want_train = training.get_batches(lo_family, (steps, n), numpy=True)
    want_meta = [training.get_batches(lo_family, (steps, n), numpy=True,
                                      split="outer_valid")
                 for _ in range(evals)]
    _assert_trees_equal(train, want_train)
    _assert_trees_equal(meta, jax.tree_util.tree_map(
        lambda *xs: np.stack(xs, axis=2), *want_meta))
