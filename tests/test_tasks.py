"""pathology_fix.tasks_and_data.tasks: the paper's networks and class-subset task families."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pathology_fix.tasks_and_data import data
from pathology_fix.tasks_and_data import tasks
from learned_optimization import training
from learned_optimization.tasks import base
from learned_optimization.tasks import test_utils

needs_fashion = pytest.mark.skipif(
    not all(
        os.path.isfile(os.path.join(data.resolve_fashion_mnist_dir(), f))
        for f in data.FASHION_MNIST_FILES.values()),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _train_adam(task, steps, lr=3e-3, seed=0):
  """Plain Adam on the task's train split; returns the per-step losses."""
  params, state = task.init_with_state(jax.random.PRNGKey(seed))
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, state, opt_state, key, batch):
    (loss, state), grad = jax.value_and_grad(
        task.loss_with_state, has_aux=True)(params, state, key, batch)
    updates, opt_state = opt.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  losses = []
  for i in range(steps):
    params, state, opt_state, loss = step(params, state, opt_state,
                                          jax.random.PRNGKey(i),
                                          next(task.datasets.train))
    losses.append(float(loss))
  return np.asarray(losses)


# (architecture, dataset, image size, classes, steps)
TRAIN_CASES = [
    pytest.param("conv3", "fashion_mnist", 28, (0, 1, 2), 40,
                 marks=needs_fashion, id="conv3-fashion28-3way"),
    pytest.param("conv6", "fashion_mnist", 28, None, 60, marks=needs_fashion,
                 id="conv6-fashion28-10way"),
    pytest.param("mlp2x32", "fashion_mnist", 14, None, 60, marks=needs_fashion,
                 id="mlp2x32-fashion14-10way"),
    pytest.param("mlp3x128", "fashion_mnist", 14, None, 60,
                 marks=needs_fashion, id="mlp3x128-fashion14-10way"),
    pytest.param("conv3", "digits", 8, (3, 8), 40, id="conv3-digits8-2way"),
]


@pytest.mark.parametrize("architecture, dataset, size, classes, steps",
                         TRAIN_CASES)
def test_trains_below_chance_with_adam(architecture, dataset, size, classes,
                                       steps):
  task = tasks.paper_task(architecture, dataset=dataset, classes=classes,
                          image_size=size, batch_size=64)
  k = task.datasets.extra_info["num_classes"]
  losses = _train_adam(task, steps)
  assert np.all(np.isfinite(losses))
  assert abs(losses[0] - np.log(k)) < 0.3 * np.log(k)  # starts near chance
  assert losses[-5:].mean() < 0.8 * np.log(k), losses[-5:]


def _conv_strides(task):
  """Window strides of every conv in the loss's jaxpr, in order."""
  params, state = task.init_with_state(jax.random.PRNGKey(0))
  batch = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                 task.datasets.abstract_batch)
  jaxpr = jax.make_jaxpr(task.loss_with_state)(params, state,
                                               jax.random.PRNGKey(0), batch)
  return [tuple(e.params["window_strides"]) for e in jaxpr.jaxpr.eqns
          if e.primitive.name == "conv_general_dilated"]


@pytest.mark.parametrize("architecture, strides", [
    ("conv3", [2, 2, 1]),
    ("conv6", [2, 1, 2, 1, 1, 1]),
])
def test_conv_architectures(architecture, strides):
  task = tasks.make_task(architecture,
                         data.digits_datasets(batch_size=4, image_size=28,
                                              classes=(0, 1, 2, 3)))
  assert _conv_strides(task) == [(s, s) for s in strides]
  params = task.init(jax.random.PRNGKey(0))
  shapes = sorted(v["w"].shape for v in params.values())
  n = len(strides)
  assert shapes.count((3, 3, 32, 32)) == n - 1
  assert (3, 3, 1, 32) in shapes and (32, 4) in shapes  # head to k classes
  assert len(shapes) == n + 1


@pytest.mark.parametrize("architecture, hidden", [
    ("mlp2x32", [32, 32]),
    ("mlp3x128", [128, 128, 128]),
])
def test_mlp_architectures(architecture, hidden):
  task = tasks.make_task(architecture,
                         data.digits_datasets(batch_size=4, image_size=14))
  params = task.init(jax.random.PRNGKey(0))
  widths = [196] + hidden + [10]
  want = sorted(zip(widths[:-1], widths[1:]))
  assert sorted(v["w"].shape for v in params.values()) == want


def test_loss_is_mean_cross_entropy_and_normalizer_identity():
  task = tasks.make_task("mlp2x32", data.digits_datasets(batch_size=8))
  params = task.init(jax.random.PRNGKey(0))
  # Zero weights -> uniform logits -> loss exactly ln 10.
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  batch = next(task.datasets.train)
  np.testing.assert_allclose(task.loss(zero, jax.random.PRNGKey(0), batch),
                             np.log(10), rtol=1e-6)
  for x in (0.5, 37.0, 1e6):
    assert float(task.normalizer(jnp.asarray(x))) == x


def test_mlp_task_vmaps_over_params():
  # The conv task is vmapped the same way in test_family_tasks_vmap_like_lo.
  task = tasks.make_task("mlp2x32",
                         data.digits_datasets(batch_size=8, image_size=8))
  n = 3
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  batch = next(task.datasets.train)
  # Per-task data too, as LO's truncated estimators feed it.
  batches = jax.tree_util.tree_map(lambda *x: np.stack(x),
                                   *[next(task.datasets.train) for _ in keys])

  @jax.jit
  def run(keys, batch, batches):
    params, states = jax.vmap(task.init_with_state)(keys)
    losses = jax.vmap(task.loss_with_state, in_axes=(0, 0, 0, None))(
        params, states, keys, batch)[0]
    grads = jax.vmap(jax.grad(task.loss))(params, keys, batches)
    return params, losses, grads

  params, losses, grads = run(keys, batch, batches)
  assert losses.shape == (n,)
  assert len(set(np.asarray(losses).round(6).tolist())) == n  # distinct inits
  for p, g in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(grads)):
    assert p.shape[0] == n and g.shape == p.shape
    assert np.all(np.isfinite(g))


def test_lo_smoketest():
  task = tasks.make_task("mlp2x32", data.digits_datasets(batch_size=4))
  test_utils.smoketest_task(task)
  family = tasks.ClassSubsetFamily((1, 7), dataset="digits",
                                   architecture="mlp2x32", batch_size=4)
  test_utils.smoketest_task_family(family)


def test_bad_architecture():
  with pytest.raises(ValueError, match="architecture must be one of"):
    tasks.make_task("resnet", data.digits_datasets())


# --- task families ----------------------------------------------------------


def test_class_pools_disjoint():
  assert not set(tasks.META_TRAIN_CLASSES) & set(tasks.HELDOUT_CLASSES)
  assert set(tasks.META_TRAIN_CLASSES) | set(tasks.HELDOUT_CLASSES) == set(
      range(10))
  assert not set(tasks.META_TRAIN_ARCHITECTURES) & set(
      tasks.HELDOUT_ARCHITECTURES)


def _family_original_classes(family):
  """Original class ids of every example in every split of the family."""
  source = data.load_fashion_mnist()
  out = set()
  for split in data.SPLITS:
    part, idx = family.datasets.split_indices(split)
    out |= set(source.parts[part][1][idx].tolist())
  return out


@needs_fashion
@pytest.mark.parametrize("pool, pool_classes", [
    ("train", tasks.META_TRAIN_CLASSES),
    ("heldout", tasks.HELDOUT_CLASSES),
])
def test_sampled_families_stay_in_their_pool(pool, pool_classes):
  subsets = set()
  for i in range(12):
    family = tasks.sample_fashion_mnist_family(
        jax.random.PRNGKey(i), class_pool=pool, num_classes_per_task=3,
        image_size=8)
    assert isinstance(family, base.TaskFamily)
    assert len(family.classes) == 3 and set(family.classes) <= set(
        pool_classes)
    subsets.add(frozenset(family.classes))
    if i < 2:
      assert _family_original_classes(family) == set(family.classes)
  assert len(subsets) > 1  # keys draw different subsets
  # Same key -> same family.
  a = tasks.sample_fashion_mnist_family(jax.random.PRNGKey(5), class_pool=pool)
  b = tasks.sample_fashion_mnist_family(jax.random.PRNGKey(5), class_pool=pool)
  assert a.classes == b.classes and a.name == b.name


@needs_fashion
def test_family_tasks_vmap_like_lo():
  family = tasks.FashionMnistClassSubsetFamily(
      classes_pool="train", num_classes_per_task=3, image_size=14,
      batch_size=16, seed=1)
  n = 4
  keys = jax.random.split(jax.random.PRNGKey(0), n)

  # As LO's common.init_truncation_state: sample, then init, under vmap.
  def init(key):
    k1, k2 = jax.random.split(key)
    cfg = family.sample(k1)
    params, state = family.task_fn(cfg).init_with_state(k2)
    return cfg, params, state

  cfgs, params, states = jax.jit(jax.vmap(init))(keys)
  assert cfgs.shape == (n, 3) and cfgs.dtype == jnp.int32
  np.testing.assert_array_equal(cfgs, np.tile(family.classes, (n, 1)))

  # Data as LO's truncated estimators fetch it: one batch per task
  # (vec_get_batch takes the same keywords on LO 0.0.1 and main).
  train = training.vec_get_batch(family, n, split="train", numpy=True)
  assert train["image"].shape == (n, 16, 14, 14, 1)
  meta = training.vec_get_batch(family, n, split="outer_valid", numpy=True)
  assert meta["label"].shape == (n, 16) and meta["label"].max() < 3

  def loss(p, cfg, s, key, b):
    return family.task_fn(cfg).loss_with_state(p, s, key, b)[0]

  losses, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(
      params, cfgs, states, keys, train)
  assert losses.shape == (n,) and np.all(np.isfinite(losses))
  assert len(set(np.asarray(losses).round(6).tolist())) == n  # distinct inits
  for p, g in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(grads)):
    assert p.shape[0] == n and g.shape == p.shape
  assert family.eval_task_fn(cfgs[0]) is family.task
  assert family.task.datasets is family.datasets


def test_digits_family_and_explicit_classes():
  family = tasks.sample_digits_family(jax.random.PRNGKey(0),
                                      num_classes_per_task=4,
                                      architecture="mlp2x32")
  assert family.num_classes == 4 and family.datasets.extra_info[
      "image_size"] == 14
  assert family.name.startswith("Digits14_mlp2x32_c")
  explicit = tasks.ClassSubsetFamily((9, 0), dataset="digits",
                                     architecture="conv3", image_size=8)
  np.testing.assert_array_equal(explicit.sample(jax.random.PRNGKey(3)), [9, 0])
  assert explicit.task.datasets.extra_info["num_classes"] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes_per_task=6), "num_classes_per_task"),
    (dict(num_classes_per_task=1), "num_classes_per_task"),
    (dict(classes_pool="test"), "classes_pool"),
    (dict(architecture="vgg"), "architecture"),
])
def test_family_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tasks.FashionMnistClassSubsetFamily(**kwargs)
