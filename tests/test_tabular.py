"""pathology_fix.tasks_and_data.tabular: scikit-learn tables as LO Tasks with four splits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pathology_fix.tasks_and_data import tabular
from pathology_fix.runtime import evaluation

DATASETS = sorted(tabular.DATASETS)


@pytest.mark.parametrize("dataset", DATASETS)
def test_splits_are_disjoint_cover_the_table_and_keep_class_balance(dataset):
  x, t = tabular.load_table(dataset)
  classification = tabular.DATASETS[dataset][0] == "classification"
  parts = tabular.split_indices(t, classification, split_seed=3)
  rows = np.concatenate([parts[s] for s in tabular.SPLITS])
  assert len(rows) == len(set(rows.tolist())) == len(x)  # disjoint, complete
  for s, frac in zip(tabular.SPLITS, tabular.SPLIT_FRACTIONS):
    assert abs(len(parts[s]) - frac * len(x)) <= 2 + (2 if classification
                                                      else 0), s
  if classification:
    overall = t.mean()
    for s in tabular.SPLITS:
      assert abs(t[parts[s]].mean() - overall) < 0.05, s
  other = tabular.split_indices(t, classification, split_seed=4)
  assert not np.array_equal(other["test"], parts["test"])


@pytest.mark.parametrize("dataset", DATASETS)
def test_batches_and_whole_splits_have_the_documented_shapes(dataset):
  ds = tabular.tabular_datasets(dataset, batch_size=16, seed=1, split_seed=2)
  info = ds.extra_info
  x, t = tabular.load_table(dataset)
  assert info["num_features"] == x.shape[1]
  batch = next(ds.train)
  assert batch["x"].shape == (16, x.shape[1]) and batch["x"].dtype == np.float32
  target = "label" if info["kind"] == "classification" else "y"
  assert set(batch) == {"x", target} and batch[target].shape == (16,)
  total = 0
  for s in tabular.SPLITS:
    arrays = ds.split_arrays(s)
    assert arrays["x"].shape == (info["split_sizes"][s], x.shape[1])
    total += len(arrays["x"])
  assert total == len(x)
  train = ds.split_arrays("train")["x"]
  np.testing.assert_allclose(train.mean(0), 0, atol=1e-5)
  # Rows of different splits never coincide (each row of the table is
  # in exactly one split; the table has no duplicate rows).
  test = ds.split_arrays("test")["x"]
  assert not (set(map(bytes, train)) & set(map(bytes, test)))
  # An epoch of batches visits every training row once.
  n = info["split_sizes"]["train"]
  seen = np.concatenate([next(tabular.tabular_datasets(
      dataset, batch_size=n, seed=5, split_seed=2).train)["x"]])
  assert len(set(map(bytes, seen))) == n


@pytest.mark.parametrize("dataset", DATASETS)
def test_adam_lowers_the_training_and_test_loss(dataset):
  task = tabular.tabular_task(dataset, batch_size=32, seed=0, split_seed=0)
  params = task.init(jax.random.PRNGKey(0))
  opt = optax.adam(1e-2)
  state = opt.init(params)
  whole = {s: task.datasets.split_arrays(s) for s in ("train", "test")}
  loss = jax.jit(lambda p, b: task.loss(p, None, b))

  @jax.jit
  def step(params, state, batch):
    grad = jax.grad(task.loss)(params, None, batch)
    updates, state = opt.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  before = {s: float(loss(params, b)) for s, b in whole.items()}
  for _ in range(200):
    params, state = step(params, state, next(task.datasets.train))
  after = {s: float(loss(params, b)) for s, b in whole.items()}
  assert after["train"] < 0.7 * before["train"], (before, after)
  assert after["test"] < before["test"], (before, after)


def test_meta_test_takes_exact_whole_split_losses_of_a_tabular_task():
  task = tabular.tabular_task("breast_cancer", seed=0, split_seed=0)
  test = task.datasets.split_arrays("test")
  # One step at learning rate 0 keeps meta_test's init: task i starts from
  # split(split(key, num_tasks)[i])[0].
  result = evaluation.meta_test(
      [task], None, {"still": optax.sgd(0.0)}, 1, jax.random.PRNGKey(0),
      whole_splits=True, splits=("test",))
  init = task.init(jax.random.split(
      jax.random.split(jax.random.PRNGKey(0), 1)[0])[0])
  logp = jax.nn.log_softmax(task.apply(init, jnp.asarray(test["x"])))
  by_hand = -float(jnp.mean(logp[jnp.arange(len(logp)), test["label"]]))
  assert result["still"]["final_test_loss"] == pytest.approx(by_hand,
                                                             rel=1e-5)


def test_bad_names_are_errors():
  with pytest.raises(ValueError, match="tabular.dataset"):
    tabular.load_table("iris")
  with pytest.raises(ValueError, match="batch_size"):
    tabular.tabular_datasets("diabetes", batch_size=0)
