"""One chunk's host batches for some of the samples, in LO's reading order.

LO's `training.get_batches(family, (steps, n), numpy=True, split=s)` calls
`next(family.datasets.split(s))` steps * n times, step-major and
sample-minor, and stacks the batches into leaves [steps, n, ...].
`get_batches` here reads the same stream in the same order but builds only
the batches of `samples`; every other sample's batch is skipped. A process
of a multi-process run thus gathers only its own samples' images, while its
copy of the (seeded) stream stays in step with a one-process run's.

An iterator may offer `skip()`: advance exactly as `next()` would, without
building the batch (`data`'s split iterators, `tasks.RoundRobin`,
`validation_task`'s stacks). Any other iterator is advanced by `next()` and
the batch dropped.
"""

from typing import Any, Iterator, Sequence

from learned_optimization import tree_utils
import numpy as np


def skip(iterator: Iterator[Any]):
  """Advances `iterator` by one batch, cheaply where it offers `skip()`."""
  skip_fn = getattr(iterator, "skip", None)
  if skip_fn is None:
    next(iterator)
  else:
    skip_fn()


def get_batches(datasets, split: str, steps: int, num_samples: int,
                samples: Sequence[int]) -> Any:
  """Leaves [steps, len(samples), ...] (numpy): the batches of `samples`.

  Equals `training.get_batches(family, (steps, num_samples), numpy=True,
  split=split)[:, samples]` (with `datasets = family.datasets`, `samples`
  sorted) and leaves the stream where that call leaves it.
  """
  keep = np.zeros([num_samples], bool)
  keep[np.asarray(samples, np.int64)] = True
  iterator = datasets.split(split)
  rows = []
  for _ in range(steps):
    row = []
    for kept in keep:
      if kept:
        row.append(next(iterator))
      else:
        skip(iterator)
    rows.append(tree_utils.tree_zip_onp(row))
  return tree_utils.tree_zip_onp(rows)
