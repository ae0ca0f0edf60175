"""Offline image datasets as learned_optimization `Datasets`, numpy only.

LO 0.0.1 loads every image dataset through tensorflow_datasets, which needs
TensorFlow and a download. The two datasets here are read from local files,
decoded once per process and held in memory:

* Fashion-MNIST, from the idx .gz files of the Debian package
  `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/). Another
  directory can be given by the `data_dir` argument (gin:
  `data.fashion_mnist_datasets.data_dir`) or the environment variable
  PATHOLOGY_FIX_FASHION_MNIST_DIR, in that order of precedence.
* scikit-learn's bundled `load_digits` (1,797 8x8 digits, pixels 0..16).

Splits (per class, by a seeded permutation of that class's examples, so the
split of an example depends only on `split_seed`, never on the class subset):

| dataset       | train          | inner_valid | outer_valid | test           |
|---------------|----------------|-------------|-------------|----------------|
| fashion_mnist | rest (80%)     | 10%         | 10%         | official t10k  |
| digits        | rest (~70%)    | 10%         | 10%         | 10% (carved)   |

"10%" of a class with n examples is floor(0.1 * n); train gets the rest. All
Fashion-MNIST classes have 6,000 train / 1,000 test examples, so the split sizes
are exactly 4,800 / 600 / 600 / 1,000 per class. Digits classes have 174-183
examples; over all 10 classes the sizes are 1,269 / 176 / 176 / 176.

Batches are dicts {"image": float32 [B, H, W, 1], "label": int32 [B]} (the
format of LO's image datasets). Every split's iterator is infinite (LO's
evaluation code calls `next` on the test split repeatedly): it walks seeded
per-epoch permutations of the split, so every example is seen once per epoch,
and offers `skip()`, which advances it without gathering a batch.
For an exact pass over a split use `OfflineImageDatasets.split_arrays`.

In gin, name these constructors `data.fashion_mnist_datasets` /
`data.digits_datasets`: the bare `fashion_mnist_datasets` also matches LO's
tfds loader once LO's image tasks are imported (gin reports it ambiguous).
"""

import dataclasses
import gzip
import os
import threading
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import gin
import jax
import jax.numpy as jnp
from learned_optimization.tasks.datasets import base as datasets_base
import numpy as np

from pathology_fix_core import errors

SPLITS = ("train", "inner_valid", "outer_valid", "test")
IMAGE_SIZES = (8, 14, 28)
NORMALIZATIONS = ("unit", "standard")
RESIZE_METHODS = ("area", "bilinear")

FASHION_MNIST_ENV_VAR = "PATHOLOGY_FIX_FASHION_MNIST_DIR"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress",
                             "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                             "Ankle boot")

# Fractions of each class given to inner_valid / outer_valid (/ test when the
# dataset has no official test set); train gets the rest.
VALID_FRACTION = 0.1


class DatasetNotFoundError(FileNotFoundError):
  """A dataset file is missing; the message says how to install it.

  Like `errors.InvalidArgument`, it names the parameter that points at the
  files (`message`, `parameters`), so the CLI can show the user's setting.
  """

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message
    self.parameters = ("data_dir",)


# ---------------------------------------------------------------------------
# Raw sources, decoded once per process.


@dataclasses.dataclass(frozen=True)
class _Source:
  """One decoded dataset, held in memory.

  Attributes:
    key: cache key of the source (name and resolved path).
    parts: part name ("train", "test" or "all") -> (images [N, H, W] uint8,
      labels [N] int64). Images are uint8 so 28x28 Fashion-MNIST takes 55 MB.
    pixel_max: value of a white pixel (255 or 16), mapped to 1.0.
    num_classes: number of classes of the full dataset.
  """
  key: Tuple[str, str]
  parts: Mapping[str, Tuple[np.ndarray, np.ndarray]]
  pixel_max: float
  num_classes: int


_SOURCES: Dict[Tuple[str, str], _Source] = {}
# (source key, part, image size, method) -> images [N, S, S] (uint8 at the
# native size, float32 in [0, 1] otherwise).
_RESIZED: Dict[Tuple[Any, ...], np.ndarray] = {}
# (source key, size, method, split_seed, classes) -> (mean, std) of train.
_STATS: Dict[Tuple[Any, ...], Tuple[float, float]] = {}
_LOCK = threading.RLock()


def read_idx_gz(path: str) -> np.ndarray:
  """Decodes one gzipped idx file (the MNIST format) into a uint8 array.

  Format: 2 zero bytes, a type byte (0x08 = uint8), a byte with the number of
  dimensions d, d big-endian int32 sizes, then the data in C order.
  """
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"{path} is not a uint8 idx file (header {raw[:4]!r})")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, offset=4))
  offset = 4 + 4 * ndim
  if len(raw) - offset != int(np.prod(dims)):
    raise ValueError(f"{path}: header says shape {dims} but holds "
                     f"{len(raw) - offset} bytes")
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def resolve_fashion_mnist_dir(data_dir: Optional[str] = None) -> str:
  """Directory of the Fashion-MNIST files: argument, then env var, then apt."""
  if data_dir:
    return data_dir
  return os.environ.get(FASHION_MNIST_ENV_VAR) or DEFAULT_FASHION_MNIST_DIR


def _missing_fashion_mnist(path: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(
      f"Fashion-MNIST file not found: {path}. Install it with "
      f"`apt-get install {FASHION_MNIST_APT_PACKAGE}` (Debian/Ubuntu; files go "
      f"to {DEFAULT_FASHION_MNIST_DIR}), or point the environment variable "
      f"{FASHION_MNIST_ENV_VAR} or the `data_dir` argument (gin: "
      "`data.fashion_mnist_datasets.data_dir`) at a directory holding "
      f"{', '.join(sorted(FASHION_MNIST_FILES.values()))}.")


def load_fashion_mnist(data_dir: Optional[str] = None) -> _Source:
  """Decodes (once per directory per process) the four Fashion-MNIST files."""
  directory = os.path.realpath(resolve_fashion_mnist_dir(data_dir))
  key = ("fashion_mnist", directory)
  with _LOCK:
    if key in _SOURCES:
      return _SOURCES[key]
    paths = {k: os.path.join(directory, f)
             for k, f in FASHION_MNIST_FILES.items()}
    for path in paths.values():
      if not os.path.isfile(path):
        raise _missing_fashion_mnist(path)
    arrays = {k: read_idx_gz(p) for k, p in paths.items()}
    parts = {}
    for part in ("train", "test"):
      images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
      if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST {part}: images {images.shape} and "
                         f"labels {labels.shape} do not match")
      parts[part] = (images, labels.astype(np.int64))
    source = _Source(key, parts, 255.0, 10)
    _SOURCES[key] = source
    return source


def load_digits_source() -> _Source:
  """scikit-learn's 8x8 digits (pixels 0..16), decoded once per process."""
  key = ("digits", "sklearn")
  with _LOCK:
    if key not in _SOURCES:
      from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
      digits = sk_datasets.load_digits()
      images = np.asarray(digits.images).astype(np.uint8)  # integral 0..16
      labels = np.asarray(digits.target).astype(np.int64)
      _SOURCES[key] = _Source(key, {"all": (images, labels)}, 16.0, 10)
    return _SOURCES[key]


# ---------------------------------------------------------------------------
# Resizing (separable linear maps, so one matmul per axis for a whole array).


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights: overlap of input pixels with each output pixel.

  Output pixel i covers [i * n_in / n_out, (i + 1) * n_in / n_out) in input
  coordinates; its value is the area-weighted mean of the pixels it overlaps
  (exact box averaging for any ratio, like TF's "area" resize).
  """
  edges = np.arange(n_out + 1) * (n_in / n_out)
  lo, hi = edges[:-1, None], edges[1:, None]
  pix = np.arange(n_in)[None, :]
  overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0, None)
  return overlap / overlap.sum(axis=1, keepdims=True)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights with half-pixel centers."""
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), lo), 1 - frac)
  np.add.at(w, (np.arange(n_out), hi), frac)
  return w


def resize_images(images: np.ndarray, size: int,
                  method: str = "area") -> np.ndarray:
  """Resizes square images [N, H, W] -> float32 [N, size, size] (same scale)."""
  _check_choice("resize_method", method, RESIZE_METHODS)
  make = _area_matrix if method == "area" else _bilinear_matrix
  rows = make(images.shape[1], size).astype(np.float32)
  cols = make(images.shape[2], size).astype(np.float32)
  out = np.empty((images.shape[0], size, size), np.float32)
  chunk = 8192  # bounds the float32 temporary of the input
  for s in range(0, images.shape[0], chunk):
    x = images[s:s + chunk].astype(np.float32)
    y = x @ cols.T  # [n, H, size]: columns first, then rows (batched matmul)
    out[s:s + chunk] = np.swapaxes(np.swapaxes(y, 1, 2) @ rows.T, 1, 2)
  return out


def _images_at(source: _Source, part: str, size: int,
               method: str) -> Tuple[np.ndarray, float]:
  """Images of one part at `size`, cached; returns (images, scale to [0,1])."""
  images = source.parts[part][0]
  if images.shape[1:] == (size, size):
    return images, 1.0 / source.pixel_max
  key = (source.key, part, size, method)
  with _LOCK:
    if key not in _RESIZED:
      resized = resize_images(images, size, method)
      resized *= np.float32(1.0 / source.pixel_max)
      _RESIZED[key] = resized
    return _RESIZED[key], 1.0


# ---------------------------------------------------------------------------
# Splits.


def _class_split(labels: np.ndarray, classes: Sequence[int],
                 names: Sequence[str], seed: int) -> Dict[str, np.ndarray]:
  """Per-class seeded split of example indices into `names`.

  The first name gets the rest, each later one floor(VALID_FRACTION * n) of
  every class with n examples. One permutation of the whole array (by `seed`)
  fixes every example's split regardless of which classes are asked for.

  Returns:
    name -> int64 [n_name] indices into `labels`, sorted.
  """
  order = np.random.default_rng(seed).permutation(labels.shape[0])
  out = {name: [] for name in names}
  for c in classes:
    members = order[labels[order] == c]
    n_small = int(np.floor(VALID_FRACTION * members.shape[0]))
    n_first = members.shape[0] - n_small * (len(names) - 1)
    out[names[0]].append(members[:n_first])
    for i, name in enumerate(names[1:]):
      start = n_first + i * n_small
      out[name].append(members[start:start + n_small])
  return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


def _check_choice(name: str, value: Any, allowed: Sequence[Any]):
  if value not in allowed:
    raise errors.InvalidArgument(
        f"{name} must be one of {tuple(allowed)}, got {value!r}", name)


def _check_image_size(image_size: Union[int, Sequence[int]],
                      prefix: str = "") -> int:
  """Accepts 14 or (14, 14) (LO passes sizes as tuples); returns the int."""
  size = image_size
  if isinstance(size, (tuple, list)):
    if len(size) != 2 or size[0] != size[1]:
      raise errors.InvalidArgument(
          f"{prefix}image_size must be one of "
          f"{IMAGE_SIZES} (or a square (n, n) tuple), got "
          f"{image_size!r}", f"{prefix}image_size")
    size = size[0]
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
    raise errors.InvalidArgument(
        f"{prefix}image_size must be one of {IMAGE_SIZES}, got "
        f"{image_size!r}", f"{prefix}image_size")
  _check_choice(f"{prefix}image_size", int(size), IMAGE_SIZES)
  return int(size)


def _check_classes(classes: Optional[Sequence[int]], num_classes: int,
                   prefix: str = "") -> Tuple[int, ...]:
  """None -> all classes; else distinct ints in [0, num_classes), >= 2."""
  if classes is None:
    return tuple(range(num_classes))
  try:
    out = tuple(int(c) for c in np.asarray(classes).reshape(-1))
  except (TypeError, ValueError) as e:
    raise errors.InvalidArgument(
        f"{prefix}classes must be a sequence of class ids in "
        f"[0, {num_classes}), got {classes!r}", f"{prefix}classes") from e
  if (len(out) < 2 or len(set(out)) != len(out) or
      any(c < 0 or c >= num_classes for c in out)):
    raise errors.InvalidArgument(
        f"{prefix}classes must hold at least 2 distinct class ids "
        f"in [0, {num_classes}) (or be None for all), got "
        f"{classes!r}", f"{prefix}classes")
  return out


def _check_batch_size(batch_size: int, prefix: str = "") -> int:
  if (isinstance(batch_size, bool) or
      not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise errors.InvalidArgument(
        f"{prefix}batch_size must be an int >= 1, got {batch_size!r}",
        f"{prefix}batch_size")
  return int(batch_size)


# ---------------------------------------------------------------------------
# Iterators and the Datasets container.


@dataclasses.dataclass(frozen=True)
class _SplitData:
  """One split: rows `indices` of `images` (a cached array, never copied).

  Attributes:
    images: [N_source, S, S] uint8 or float32, shared with the cache.
    indices: int64 [n] rows of `images` in this split.
    labels: int32 [n] labels already remapped to 0..k-1.
    scale, shift: batch = images[rows] * scale + shift gives the normalized
      float32 images.
  """
  images: np.ndarray
  indices: np.ndarray
  labels: np.ndarray
  scale: float
  shift: float

  def gather(self, positions: np.ndarray) -> Dict[str, np.ndarray]:
    """Batch of the examples at `positions` (into the split), [B, S, S, 1]."""
    x = self.images[self.indices[positions]].astype(np.float32)
    if self.scale != 1.0:
      x *= np.float32(self.scale)
    if self.shift != 0.0:
      x += np.float32(self.shift)
    return {"image": x[..., None], "label": self.labels[positions]}


class _EpochIterator:
  """Infinite batches over seeded per-epoch permutations of one split.

  Batches may straddle epochs (and a batch larger than the split spans
  several), so every example is drawn once per epoch and none is dropped.
  Thread safe. `skip()` advances the stream as `next()` does without
  gathering the images (see `batches.py`).
  """

  def __init__(self, data: _SplitData, batch_size: int, seed: Sequence[int]):
    self._data = data
    self._batch_size = batch_size
    self._rng = np.random.default_rng(list(seed))
    self._order = np.zeros([0], np.int64)
    self._pos = 0
    self._lock = threading.Lock()

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    return self._data.gather(self._advance())

  def skip(self):
    self._advance()

  def _advance(self) -> np.ndarray:
    """Positions (into the split) of the next batch; moves the stream on."""
    with self._lock:
      n = self._data.indices.shape[0]
      if self._pos + self._batch_size <= self._order.shape[0]:
        positions = self._order[self._pos:self._pos + self._batch_size]
        self._pos += self._batch_size
        return positions
      chunks = [self._order[self._pos:]]
      need = self._batch_size - chunks[0].shape[0]
      while need > 0:
        self._order = self._rng.permutation(n)
        take = min(need, n)
        chunks.append(self._order[:take])
        self._pos = take
        need -= take
      return np.concatenate(chunks)


class OfflineImageDatasets(datasets_base.Datasets):
  """LO `Datasets` over in-memory arrays, with exact access to each split.

  Besides LO's four iterators (`train`, `inner_valid`, `outer_valid`, `test`),
  `extra_info` and `abstract_batch`, it offers `split_arrays(split)` and
  `split_indices(split)`. `extra_info` holds "num_classes", "classes" (the
  original class ids, in label order), "image_size", "normalization",
  "split_sizes", "dataset", "batch_size", "seed" and "split_seed".
  """

  def __init__(self, splits: Mapping[str, _SplitData], source_parts: Mapping[
      str, str], batch_size: int, seed: int, extra_info: Mapping[str, Any]):
    self._splits = dict(splits)
    self._source_parts = dict(source_parts)
    iters = {
        name: _EpochIterator(self._splits[name], batch_size,
                             (seed, SPLITS.index(name)))
        for name in SPLITS
    }
    size = extra_info["image_size"]
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 1),
                                      jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    super().__init__(
        train=iters["train"],
        inner_valid=iters["inner_valid"],
        outer_valid=iters["outer_valid"],
        test=iters["test"],
        extra_info=dict(extra_info),
        abstract_batch=abstract_batch)

  def split_indices(self, split: str) -> Tuple[str, np.ndarray]:
    """(source part, int64 [n] example indices into it) of one split."""
    _check_choice("split", split, SPLITS)
    return self._source_parts[split], self._splits[split].indices

  def split_arrays(self, split: str) -> Dict[str, np.ndarray]:
    """The whole split in index order: image float32 [n, S, S, 1], label [n]."""
    _check_choice("split", split, SPLITS)
    data = self._splits[split]
    return data.gather(np.arange(data.indices.shape[0]))


def _pixel_stats(images: np.ndarray, scale: float) -> Tuple[float, float]:
  """(mean, std) of all pixels of `images` * scale, in float64."""
  total, total_sq = 0.0, 0.0
  for s in range(0, images.shape[0], 4096):  # bounded float64 temporaries
    x = images[s:s + 4096].astype(np.float64) * scale
    total += x.sum()
    total_sq += np.square(x).sum()
  mean = total / images.size
  var = max(total_sq / images.size - mean**2, 0.0)
  return mean, var**0.5 or 1.0


def _build(source: _Source, split_parts: Mapping[str, Tuple[str, np.ndarray]],
           dataset: str, batch_size: int, image_size: int,
           classes: Tuple[int, ...], normalization: str, resize_method: str,
           seed: int, split_seed: int) -> OfflineImageDatasets:
  """Assembles an OfflineImageDatasets from per-split (part, indices)."""
  lut = np.full([source.num_classes], -1, np.int32)
  lut[list(classes)] = np.arange(len(classes), dtype=np.int32)
  images_of = {part: _images_at(source, part, image_size, resize_method)
               for part, _ in split_parts.values()}

  shift, std = 0.0, 1.0
  if normalization == "standard":
    # Scalar mean / std over all pixels of the train split (after resize).
    stats_key = (source.key, image_size, resize_method, split_seed, classes)
    with _LOCK:
      if stats_key not in _STATS:
        part, idx = split_parts["train"]
        images, scale = images_of[part]
        _STATS[stats_key] = _pixel_stats(images[idx], scale)
      mean, std = _STATS[stats_key]
    shift = -mean / std

  splits = {}
  for name, (part, idx) in split_parts.items():
    images, scale = images_of[part]
    labels = lut[source.parts[part][1][idx]]
    splits[name] = _SplitData(images, idx, labels, scale / std, shift)

  extra_info = {
      "num_classes": len(classes),
      "classes": classes,
      "image_size": image_size,
      "normalization": normalization,
      "split_sizes": {k: int(v[1].shape[0]) for k, v in split_parts.items()},
      "dataset": dataset,
      "batch_size": batch_size,
      "seed": seed,
      "split_seed": split_seed,
  }
  return OfflineImageDatasets(splits, {k: v[0] for k, v in split_parts.items()},
                              batch_size, seed, extra_info)


def _check_options(owner, batch_size, image_size, normalization,
                   resize_method):
  """The options every dataset constructor takes; returns (batch, size).

  Messages name them `<owner>.<option>`.
  """
  prefix = f"{owner}."
  batch_size = _check_batch_size(batch_size, prefix)
  size = _check_image_size(image_size, prefix)
  _check_choice(f"{prefix}normalization", normalization, NORMALIZATIONS)
  _check_choice(f"{prefix}resize_method", resize_method, RESIZE_METHODS)
  return batch_size, size


@gin.configurable
def fashion_mnist_datasets(batch_size: int = 128,
                           image_size: Union[int, Tuple[int, int]] = 14,
                           classes: Optional[Sequence[int]] = None,
                           normalization: str = "unit",
                           seed: int = 0,
                           split_seed: int = 0,
                           resize_method: str = "area",
                           data_dir: Optional[str] = None
                          ) -> OfflineImageDatasets:
  """Fashion-MNIST from the local idx files (see the module docstring).

  Args:
    batch_size: B of every batch.
    image_size: 8, 14 or 28 (or a square tuple); 28 is the native size.
    classes: class ids to keep, relabelled 0..k-1 in the order given; None
      keeps all 10.
    normalization: "unit" (pixels in [0, 1]) or "standard" (zero mean, unit
      variance over all pixels of this train split).
    seed: seeds the order in which batches are drawn.
    split_seed: seeds which examples go to train / inner_valid / outer_valid.
    resize_method: "area" (box averaging) or "bilinear".
    data_dir: directory of the idx .gz files; overrides the environment
      variable PATHOLOGY_FIX_FASHION_MNIST_DIR and the apt default.

  Returns:
    OfflineImageDatasets yielding {"image": f32 [B, S, S, 1], "label": i32 [B]}.
  """
  batch_size, size = _check_options("fashion_mnist_datasets", batch_size,
                                    image_size, normalization, resize_method)
  source = load_fashion_mnist(data_dir)
  classes = _check_classes(classes, source.num_classes,
                           "fashion_mnist_datasets.")

  train_labels = source.parts["train"][1]
  parts = _class_split(train_labels, classes,
                       ("train", "inner_valid", "outer_valid"), split_seed)
  test_labels = source.parts["test"][1]
  split_parts = {k: ("train", v) for k, v in parts.items()}
  split_parts["test"] = ("test", np.flatnonzero(np.isin(test_labels, classes)))
  return _build(source, split_parts, "fashion_mnist", batch_size, size,
                classes, normalization, resize_method, seed, split_seed)


@gin.configurable
def digits_datasets(batch_size: int = 128,
                    image_size: Union[int, Tuple[int, int]] = 8,
                    classes: Optional[Sequence[int]] = None,
                    normalization: str = "unit",
                    seed: int = 0,
                    split_seed: int = 0,
                    resize_method: str = "area") -> OfflineImageDatasets:
  """scikit-learn's 8x8 digits, split per class about 70/10/10/10.

  There is no official test set, so a disjoint test part is carved out like
  the two validation parts (floor(10%) of each class; train gets the rest).
  Sizes 14 and 28 upsample the 8x8 images. Arguments as in
  `fashion_mnist_datasets`.

  Returns:
    OfflineImageDatasets yielding {"image": f32 [B, S, S, 1], "label": i32 [B]}.
  """
  batch_size, size = _check_options("digits_datasets", batch_size, image_size,
                                    normalization, resize_method)
  source = load_digits_source()
  classes = _check_classes(classes, source.num_classes, "digits_datasets.")
  parts = _class_split(source.parts["all"][1], classes, SPLITS, split_seed)
  split_parts = {k: ("all", v) for k, v in parts.items()}
  return _build(source, split_parts, "digits", batch_size, size, classes,
                normalization, resize_method, seed, split_seed)


DATASET_FNS = {
    "fashion_mnist": fashion_mnist_datasets,
    "digits": digits_datasets,
}


def time_batches(datasets: datasets_base.Datasets, n: int = 100,
                 split: str = "train") -> Dict[str, float]:
  """Times `n` calls of next() on one split (after one untimed warm-up call).

  Returns:
    {"first_s": seconds of the warm-up call, "mean_s" and "median_s": seconds
    per batch over the n timed calls, "batches_per_s": 1 / mean_s, "n": n}.
  """
  it = datasets.split(split)
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0
  times = np.empty([n])
  for i in range(n):
    t0 = time.perf_counter()
    next(it)
    times[i] = time.perf_counter() - t0
  mean = float(times.mean())
  return {"first_s": first, "mean_s": mean,
          "median_s": float(np.median(times)),
          "batches_per_s": 1.0 / mean if mean > 0 else float("inf"),
          "n": float(n)}
