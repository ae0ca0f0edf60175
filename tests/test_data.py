"""pathology_fix.tasks_and_data.data: offline Fashion-MNIST / digits as LO Datasets."""

import hashlib
import os

import gin
import numpy as np
import pytest

from pathology_fix.tasks_and_data import data
from learned_optimization.tasks.datasets import base as datasets_base

SIZES = (8, 14, 28)


def _have_fashion_mnist():
  directory = data.resolve_fashion_mnist_dir()
  return all(os.path.isfile(os.path.join(directory, f))
             for f in data.FASHION_MNIST_FILES.values())


needs_fashion = pytest.mark.skipif(
    not _have_fashion_mnist(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _hashes(images):
  return {hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
          for x in images}


def _raw(ds, split):
  """Raw source images / labels of one split (via its example indices)."""
  part, idx = ds.split_indices(split)
  if ds.extra_info["dataset"] == "digits":
    source = data.load_digits_source()
  else:
    source = data.load_fashion_mnist()
  images, labels = source.parts[part]
  return images[idx], labels[idx]


def _fns():
  fns = [pytest.param(data.digits_datasets, id="digits")]
  fns.append(pytest.param(data.fashion_mnist_datasets, id="fashion",
                          marks=needs_fashion))
  return fns


# --- splits ---------------------------------------------------------------


@pytest.mark.parametrize("fn", _fns())
def test_splits_disjoint_by_index_and_image_hash(fn):
  ds = fn(image_size=28)
  by_part = {}
  for split in data.SPLITS:
    part, idx = ds.split_indices(split)
    assert len(np.unique(idx)) == len(idx)
    by_part.setdefault(part, []).append(set(idx.tolist()))
  for sets in by_part.values():
    for i in range(len(sets)):
      for j in range(i + 1, len(sets)):
        assert not sets[i] & sets[j]
  # The raw data has no duplicate images, so hashes must be disjoint too.
  hashes = {s: _hashes(_raw(ds, s)[0]) for s in data.SPLITS}
  for i, a in enumerate(data.SPLITS):
    assert len(hashes[a]) == ds.extra_info["split_sizes"][a]
    for b in data.SPLITS[i + 1:]:
      assert not hashes[a] & hashes[b], (a, b)
  # ... and so must the hashes of the images the iterators serve.
  served = {s: _hashes(ds.split_arrays(s)["image"]) for s in data.SPLITS}
  for i, a in enumerate(data.SPLITS):
    for b in data.SPLITS[i + 1:]:
      assert not served[a] & served[b], (a, b)


@needs_fashion
def test_fashion_split_sizes():
  ds = data.fashion_mnist_datasets()
  assert ds.extra_info["split_sizes"] == {
      "train": 48000, "inner_valid": 6000, "outer_valid": 6000, "test": 10000}
  # The three train-like splits cover the official train set exactly.
  union = np.concatenate(
      [ds.split_indices(s)[1] for s in ("train", "inner_valid", "outer_valid")])
  np.testing.assert_array_equal(np.sort(union), np.arange(60000))
  assert ds.split_indices("test")[0] == "test"
  sub = data.fashion_mnist_datasets(classes=(1, 3))
  assert sub.extra_info["split_sizes"] == {
      "train": 9600, "inner_valid": 1200, "outer_valid": 1200, "test": 2000}


def test_digits_split_sizes():
  ds = data.digits_datasets()
  assert ds.extra_info["split_sizes"] == {
      "train": 1269, "inner_valid": 176, "outer_valid": 176, "test": 176}
  union = np.concatenate([ds.split_indices(s)[1] for s in data.SPLITS])
  np.testing.assert_array_equal(np.sort(union), np.arange(1797))
  # Per class: floor(10%) to each of inner_valid / outer_valid / test.
  labels = data.load_digits_source().parts["all"][1]
  for c in range(10):
    n = int((labels == c).sum())
    for split in ("inner_valid", "outer_valid", "test"):
      idx = ds.split_indices(split)[1]
      assert (labels[idx] == c).sum() == n // 10


@pytest.mark.parametrize("fn", _fns())
def test_split_membership_independent_of_classes(fn):
  full = fn()
  sub = fn(classes=(4, 2))
  for split in data.SPLITS:
    assert set(sub.split_indices(split)[1]) <= set(full.split_indices(split)[1])


# --- shapes, normalization, remapping -------------------------------------


@pytest.mark.parametrize("fn", _fns())
@pytest.mark.parametrize("size", SIZES)
def test_shapes_and_unit_normalization(fn, size):
  ds = fn(batch_size=32, image_size=size, normalization="unit")
  assert isinstance(ds, datasets_base.Datasets)
  assert ds.extra_info["num_classes"] == 10
  for split in data.SPLITS:
    batch = next(ds.split(split))
    assert batch["image"].shape == (32, size, size, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    for k in ("image", "label"):
      assert ds.abstract_batch[k].shape == batch[k].shape
      assert ds.abstract_batch[k].dtype == batch[k].dtype
  x = ds.split_arrays("train")["image"]
  assert x.min() >= 0.0 and x.max() <= 1.0
  assert x.max() > 0.9  # uses the range, not e.g. [0, 1/255]
  assert 0.2 < x.mean() < 0.4


@pytest.mark.parametrize("fn", _fns())
@pytest.mark.parametrize("size", SIZES)
def test_standard_normalization_uses_train_statistics(fn, size):
  unit = fn(image_size=size)
  std = fn(image_size=size, normalization="standard")
  x = std.split_arrays("train")["image"].astype(np.float64)
  assert abs(x.mean()) < 1e-4 and abs(x.std() - 1.0) < 1e-4
  # Other splits get the same affine map (train statistics), not their own.
  u = unit.split_arrays("train")["image"].astype(np.float64)
  mean, sd = u.mean(), u.std()
  for split in ("outer_valid", "test"):
    np.testing.assert_allclose(
        std.split_arrays(split)["image"],
        (unit.split_arrays(split)["image"] - mean) / sd, atol=1e-4)


def test_resize_area_and_bilinear():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
  half = data.resize_images(x, 14, "area")
  want = x.astype(np.float64).reshape(5, 14, 2, 14, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(half, want, atol=1e-3)
  # Box averaging preserves the mean for any ratio, e.g. 28 -> 8.
  np.testing.assert_allclose(data.resize_images(x, 8, "area").mean(axis=(1, 2)),
                             x.mean(axis=(1, 2)), rtol=1e-5)
  const = np.full((2, 8, 8), 7, np.uint8)
  for method in data.RESIZE_METHODS:
    for size in SIZES:
      np.testing.assert_allclose(data.resize_images(const, size, method), 7.0,
                                 rtol=1e-6)


@pytest.mark.parametrize("fn", _fns())
def test_class_subset_remapping(fn):
  classes = (7, 2, 5)
  ds = fn(batch_size=64, image_size=28, classes=classes)
  assert ds.extra_info["num_classes"] == 3
  assert ds.extra_info["classes"] == classes
  for split in data.SPLITS:
    _, raw_labels = _raw(ds, split)
    arrays = ds.split_arrays(split)
    # label i <-> original class classes[i]
    np.testing.assert_array_equal(np.asarray(classes)[arrays["label"]],
                                  raw_labels)
    assert set(np.unique(arrays["label"])) == {0, 1, 2}
  # Served batches: each image belongs to its split with the same label.
  arrays = ds.split_arrays("train")
  label_of = {hashlib.sha1(x.tobytes()).hexdigest(): int(l)
              for x, l in zip(arrays["image"], arrays["label"])}
  for _ in range(3):
    batch = next(ds.train)
    for x, l in zip(batch["image"], batch["label"]):
      assert label_of[hashlib.sha1(x.tobytes()).hexdigest()] == l


# --- iteration --------------------------------------------------------------


def test_iterators_deterministic_by_seed():
  def first(ds, split, n=3):
    it = ds.split(split)
    return [next(it) for _ in range(n)]

  a = data.digits_datasets(batch_size=16, seed=3)
  b = data.digits_datasets(batch_size=16, seed=3)
  c = data.digits_datasets(batch_size=16, seed=4)
  for split in data.SPLITS:
    for x, y in zip(first(a, split), first(b, split)):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(next(a.train)["image"], next(c.train)["image"])
  # seed changes batch order only; split_seed changes the split.
  for split in data.SPLITS:
    np.testing.assert_array_equal(a.split_indices(split)[1],
                                  c.split_indices(split)[1])
  d = data.digits_datasets(split_seed=1)
  assert not np.array_equal(a.split_indices("test")[1],
                            d.split_indices("test")[1])


@pytest.mark.parametrize("batch_size", [16, 500])
def test_iterators_infinite_and_cover_each_epoch(batch_size):
  ds = data.digits_datasets(batch_size=batch_size, image_size=8)
  n = ds.extra_info["split_sizes"]["inner_valid"]  # 176
  want = _hashes(ds.split_arrays("inner_valid")["image"])
  seen = []
  for _ in range(10 * n // batch_size + 1):  # ~10 epochs, crossing borders
    seen.extend(next(ds.inner_valid)["image"])
  counts = {}
  for x in seen:
    h = hashlib.sha1(x.tobytes()).hexdigest()
    counts[h] = counts.get(h, 0) + 1
  assert set(counts) == want
  # Every epoch draws each example once, so counts differ by at most 1.
  assert max(counts.values()) - min(counts.values()) <= 1


@needs_fashion
def test_cache_makes_construction_cheap():
  data.fashion_mnist_datasets(image_size=14)
  n_sources = len(data._SOURCES)  # pylint: disable=protected-access
  a = data.fashion_mnist_datasets(image_size=14, classes=(0, 1), seed=1)
  b = data.fashion_mnist_datasets(image_size=14, classes=(2, 3), seed=2)
  assert len(data._SOURCES) == n_sources  # pylint: disable=protected-access
  # Both read the same cached resized array (no per-Datasets copy).
  assert a._splits["train"].images is b._splits["train"].images  # pylint: disable=protected-access


def test_time_batches():
  out = data.time_batches(data.digits_datasets(batch_size=8), n=5)
  assert set(out) >= {"first_s", "mean_s", "median_s", "batches_per_s"}
  assert out["mean_s"] >= 0.0


# --- errors -----------------------------------------------------------------


def _assert_install_hint(message):
  assert "apt-get install dataset-fashion-mnist" in message
  assert data.FASHION_MNIST_ENV_VAR in message
  assert "data_dir" in message


def test_missing_data_dir_error(tmp_path, monkeypatch):
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.fashion_mnist_datasets(data_dir=str(tmp_path))
  _assert_install_hint(str(e.value))
  assert str(tmp_path) in str(e.value)
  assert isinstance(e.value, FileNotFoundError)
  monkeypatch.setenv(data.FASHION_MNIST_ENV_VAR, str(tmp_path / "nowhere"))
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.fashion_mnist_datasets()
  _assert_install_hint(str(e.value))
  assert "nowhere" in str(e.value)


@needs_fashion
def test_data_dir_from_env_var(tmp_path, monkeypatch):
  src = data.resolve_fashion_mnist_dir()
  for f in data.FASHION_MNIST_FILES.values():
    os.symlink(os.path.join(src, f), tmp_path / f)
  monkeypatch.setenv(data.FASHION_MNIST_ENV_VAR, str(tmp_path))
  assert data.resolve_fashion_mnist_dir() == str(tmp_path)
  ds = data.fashion_mnist_datasets(image_size=28)
  assert ds.extra_info["split_sizes"]["test"] == 10000
  # An explicit data_dir wins over the environment variable.
  with pytest.raises(data.DatasetNotFoundError):
    data.fashion_mnist_datasets(data_dir=str(tmp_path / "missing"))


@pytest.mark.parametrize("kwargs, names", [
    (dict(image_size=10), ["image_size", "8", "14", "28"]),
    (dict(image_size=(14, 8)), ["image_size"]),
    (dict(normalization="zscore"), ["normalization", "unit", "standard"]),
    (dict(resize_method="nearest"), ["resize_method", "area", "bilinear"]),
    (dict(classes=(1, 1)), ["classes", "distinct"]),
    (dict(classes=(3, 10)), ["classes", "[0, 10)"]),
    (dict(classes=(3,)), ["classes", "at least 2"]),
    (dict(batch_size=0), ["batch_size"]),
])
def test_bad_options(kwargs, names):
  with pytest.raises(ValueError) as e:
    data.digits_datasets(**kwargs)
  for name in names:
    assert name in str(e.value)


def test_tuple_image_size_accepted():
  ds = data.digits_datasets(batch_size=4, image_size=(14, 14))
  assert next(ds.train)["image"].shape == (4, 14, 14, 1)


def test_gin_binding():
  # A scope of its own, so the bindings cannot reach other tests.
  gin.parse_config("pf_test_data/data.digits_datasets.image_size = 14\n"
                   "pf_test_data/data.digits_datasets.batch_size = 3")
  with gin.config_scope("pf_test_data"):
    ds = data.digits_datasets()
  assert next(ds.train)["image"].shape == (3, 14, 14, 1)
  assert next(data.digits_datasets().train)["image"].shape == (128, 8, 8, 1)
