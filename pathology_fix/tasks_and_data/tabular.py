"""Small tabular problems from data scikit-learn ships, as LO Tasks.

A kind of problem other than the image classifiers of `tasks.py`, for
judging learned optimizers on inputs they never saw in meta-training. No
download: scikit-learn installs these tables with the package.

  breast_cancer   569 examples, 30 features, binary classification
                  (malignant / benign); loss: mean softmax cross-entropy.
  diabetes        442 examples, 10 features, regression (disease progression
                  after one year); loss: mean squared error of the target
                  standardized on the train split.

Splits ("train", "inner_valid", "outer_valid", "test", as everywhere in the
package): a seeded permutation (`split_seed`; per class for classification,
so each split keeps the class balance) cut at SPLIT_FRACTIONS. Features are
standardized with the train split's per-feature mean and standard deviation.

Batches: {"x": float32 [B, F]} plus "label" int32 [B] (classification) or
"y" float32 [B] (regression), drawn by per-epoch seeded permutations of a
split (every example once per epoch; batches may straddle epochs).
`TabularDatasets.split_arrays(split)` returns a whole split, so
`evaluation.meta_test(..., whole_splits=True)` takes exact split losses.

The model (`TabularMLPTask`): ReLU MLP, hidden sizes configurable, linear
output (2 logits, or 1 value); weights ~ truncated normal with standard
deviation 1 / sqrt(fan_in), biases 0.
"""

import threading
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from learned_optimization.tasks import base
from learned_optimization.tasks.datasets import base as datasets_base
import numpy as np

SPLITS = ("train", "inner_valid", "outer_valid", "test")
SPLIT_FRACTIONS = (0.6, 0.1, 0.1, 0.2)
# name -> (kind, scikit-learn loader's name)
DATASETS = {"breast_cancer": ("classification", "load_breast_cancer"),
            "diabetes": ("regression", "load_diabetes")}


def load_table(dataset: str) -> Tuple[np.ndarray, np.ndarray]:
  """(features float64 [N, F], targets [N]) of a scikit-learn table."""
  if dataset not in DATASETS:
    raise ValueError(f"tabular.dataset must be one of {tuple(DATASETS)}, "
                     f"got {dataset!r}")
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  bunch = getattr(sk_datasets, DATASETS[dataset][1])()
  return np.asarray(bunch.data, np.float64), np.asarray(bunch.target)


def _cut(indices: np.ndarray) -> Dict[str, np.ndarray]:
  """indices (already shuffled) cut at SPLIT_FRACTIONS, in SPLITS order."""
  n = len(indices)
  bounds = np.round(np.cumsum((0.0,) + SPLIT_FRACTIONS) * n).astype(int)
  return {s: indices[bounds[i]:bounds[i + 1]] for i, s in enumerate(SPLITS)}


def split_indices(targets: np.ndarray, classification: bool,
                  split_seed: int) -> Dict[str, np.ndarray]:
  """{split: sorted int64 row indices}: disjoint, covering every row."""
  rng = np.random.default_rng([int(split_seed), 0x7AB])
  if not classification:
    return {s: np.sort(v) for s, v in _cut(rng.permutation(len(targets)))
            .items()}
  parts = {s: [] for s in SPLITS}
  for c in np.unique(targets):
    rows = np.flatnonzero(targets == c)
    for s, v in _cut(rows[rng.permutation(len(rows))]).items():
      parts[s].append(v)
  return {s: np.sort(np.concatenate(v)) for s, v in parts.items()}


class _EpochBatches:
  """Infinite batches of one split over seeded per-epoch permutations."""

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int,
               seed: Sequence[int]):
    self._arrays = dict(arrays)
    self._n = len(next(iter(arrays.values())))
    self._batch_size = batch_size
    self._rng = np.random.default_rng(list(seed))
    self._order = np.zeros([0], np.int64)
    self._lock = threading.Lock()

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    with self._lock:
      while len(self._order) < self._batch_size:
        self._order = np.concatenate([self._order,
                                      self._rng.permutation(self._n)])
      rows, self._order = (self._order[:self._batch_size],
                           self._order[self._batch_size:])
    return {k: v[rows] for k, v in self._arrays.items()}


class TabularDatasets(datasets_base.Datasets):
  """LO `Datasets` over one table's four splits, with `split_arrays`.

  extra_info: "dataset", "kind" ("classification" / "regression"),
  "num_features", "num_outputs" (2 logits or 1 value), "split_sizes",
  "batch_size", "seed" (batch order), "split_seed".
  """

  def __init__(self, splits: Mapping[str, Mapping[str, np.ndarray]],
               batch_size: int, seed: int, extra_info: Mapping[str, Any]):
    self._splits = {s: dict(v) for s, v in splits.items()}
    iters = {s: _EpochBatches(self._splits[s], batch_size,
                              (int(seed), SPLITS.index(s))) for s in SPLITS}
    abstract = {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype)
                for k, v in self._splits["train"].items()}
    super().__init__(train=iters["train"], inner_valid=iters["inner_valid"],
                     outer_valid=iters["outer_valid"], test=iters["test"],
                     extra_info=dict(extra_info), abstract_batch=abstract)

  def split_arrays(self, split: str) -> Dict[str, np.ndarray]:
    """The whole split (copies), rows in the table's order."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return {k: v.copy() for k, v in self._splits[split].items()}


def tabular_datasets(dataset: str, batch_size: int = 32, seed: int = 0,
                     split_seed: int = 0) -> TabularDatasets:
  """One scikit-learn table split, standardized on its train split."""
  if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
    raise ValueError(f"tabular_datasets.batch_size must be an integer >= 1, "
                     f"got {batch_size!r}")
  x, t = load_table(dataset)
  kind = DATASETS[dataset][0]
  classification = kind == "classification"
  parts = split_indices(t, classification, split_seed)
  train = parts["train"]
  mean, std = x[train].mean(0), x[train].std(0)
  std = np.where(std > 0, std, 1.0)
  if classification:
    classes = np.unique(t)
    target = ("label", np.searchsorted(classes, t).astype(np.int32))
    outputs = len(classes)
  else:
    target = ("y", ((t - t[train].mean()) / t[train].std()).astype(np.float32))
    outputs = 1
  splits = {s: {"x": ((x[rows] - mean) / std).astype(np.float32),
                target[0]: target[1][rows]} for s, rows in parts.items()}
  info = dict(dataset=dataset, kind=kind, num_features=x.shape[1],
              num_outputs=outputs, batch_size=int(batch_size), seed=int(seed),
              split_seed=int(split_seed),
              split_sizes={s: int(len(r)) for s, r in parts.items()})
  return TabularDatasets(splits, int(batch_size), seed, info)


class TabularMLPTask(base.Task):
  """ReLU MLP on a `TabularDatasets`: cross-entropy or squared error."""

  def __init__(self, datasets: TabularDatasets,
               hidden_sizes: Sequence[int] = (32, 32),
               name: Optional[str] = None):
    self.datasets = datasets
    info = datasets.extra_info
    self._classification = info["kind"] == "classification"
    self._sizes = ((info["num_features"],) + tuple(int(h) for h in
                                                   hidden_sizes)
                   + (info["num_outputs"],))
    hidden = tuple(int(h) for h in hidden_sizes)
    arch = (f"mlp{len(hidden)}x{hidden[0]}" if len(set(hidden)) == 1
            else "mlp" + "-".join(map(str, hidden)))
    self._name = name or f"{info['dataset']}_{arch}_s{info['split_seed']}"

  @property
  def name(self):
    return self._name

  def init(self, key) -> Dict[str, Dict[str, jax.Array]]:
    params = {}
    keys = jax.random.split(key, len(self._sizes) - 1)
    for i, (k, fan_in, fan_out) in enumerate(
        zip(keys, self._sizes[:-1], self._sizes[1:])):
      w = jax.random.truncated_normal(k, -2.0, 2.0, (fan_in, fan_out))
      params[f"layer_{i}"] = {"w": w / np.sqrt(fan_in),
                              "b": jnp.zeros([fan_out], jnp.float32)}
    return params

  def apply(self, params, x: jax.Array) -> jax.Array:
    """Outputs [B, num_outputs]."""
    n = len(params)
    for i in range(n):
      layer = params[f"layer_{i}"]
      x = x @ layer["w"] + layer["b"]
      if i < n - 1:
        x = jax.nn.relu(x)
    return x

  def loss(self, params, key, data) -> jax.Array:
    del key
    out = self.apply(params, data["x"])
    if self._classification:
      logp = jax.nn.log_softmax(out)
      return -jnp.mean(jnp.take_along_axis(
          logp, data["label"][:, None].astype(jnp.int32), axis=1))
    return jnp.mean(jnp.square(out[:, 0] - data["y"]))


def tabular_task(dataset: str, hidden_sizes: Sequence[int] = (32, 32),
                 batch_size: int = 32, seed: int = 0,
                 split_seed: int = 0) -> TabularMLPTask:
  """An MLP on one split of a scikit-learn table (batch order `seed`)."""
  return TabularMLPTask(tabular_datasets(dataset, batch_size, seed,
                                         split_seed), hidden_sizes)
