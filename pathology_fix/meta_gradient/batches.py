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

import jax
import numpy as np


def skip(iterator: Iterator[Any]):
  """Advances `iterator` by one batch, cheaply where it offers `skip()`."""
  skip_fn = getattr(iterator, "skip", None)
  if skip_fn is None:
    next(iterator)
  else:
    skip_fn()


def get_batches(datasets, split: str, steps: int, num_samples: int,
                samples: Sequence[int], out: Any = None) -> Any:
  """Leaves [steps, len(samples), ...] (numpy): the batches of `samples`.

  Equals `training.get_batches(family, (steps, num_samples), numpy=True,
  split=split)[:, samples]` (with `datasets = family.datasets`, `samples`
  sorted) and leaves the stream where that call leaves it. Each batch is
  copied once, into arrays allocated at the first batch (LO stacks every
  step, then the steps); `out`, leaves [steps, len(samples), ...] shaped
  like the result (e.g. a view into a larger array), receives them instead.
  """
  keep = np.zeros([num_samples], bool)
  keep[np.asarray(samples, np.int64)] = True
  kept = int(keep.sum())
  iterator = datasets.split(split)
  out_leaves, treedef = (None, None) if out is None else jax.tree_util.tree_flatten(out)
  for step in range(steps):
    j = 0
    for is_kept in keep:
      if not is_kept:
        skip(iterator)
        continue
      leaves, batch_def = jax.tree_util.tree_flatten(next(iterator))
      if out_leaves is None:
        treedef = batch_def
        out_leaves = [np.empty((steps, kept) + np.shape(x), np.asarray(x).dtype)
                      for x in leaves]
      for dst, x in zip(out_leaves, leaves, strict=True):
        dst[step, j] = x
      j += 1
  return jax.tree_util.tree_unflatten(treedef, out_leaves)
