"""The paper's image-classification tasks and task families, on offline data.

Metz et al. (2019) meta-train on 10-way 32x32 ImageNet class subsets (700
meta-training / 300 held-out classes) with a 3-layer CNN, and evaluate on
MLPs and a 6-layer CNN on MNIST. Offline, this module uses Fashion-MNIST and
scikit-learn's digits (`data.py` here) instead:

| role                | data                                  | networks |
|---------------------|---------------------------------------|----------|
| meta-training       | Fashion-MNIST classes {0..4} ("train")   | conv3 |
| held-out classes    | Fashion-MNIST classes {5..9} ("heldout") | conv3 |
| out of distribution | digits, or either Fashion-MNIST pool  | mlp2x32, mlp3x128, conv6 |

The pools are disjoint, so no held-out class is ever seen in meta-training.
With 5 classes per pool a task is k-way (default k = 3: C(5, 3) = 10 distinct
subsets per pool; chance loss ln 3) rather than the paper's 10-way.

Architectures (all ReLU, mean softmax cross-entropy, identity normalizer):
  conv3:    3x3 convs, 32 channels, strides 2, 2, 1, global average pool,
            linear head (the paper's meta-training CNN).
  conv6:    the same with 6 convs, strides 2, 1, 2, 1, 1, 1 (28x28 images).
  mlp2x32:  flatten, 2 hidden layers of 32 (14x14 images).
  mlp3x128: flatten, 3 hidden layers of 128 (14x14 images).
conv3 defaults to 28x28 (nearest to the paper's 32x32); on 2 CPU cores one
Adam step at batch 128 takes ~16 ms at 28x28 and ~5 ms at 14x14, so cheap
runs may set image_size=14.
The networks reuse LO's fixed-task classes (`conv._ConvTask`,
`image_mlp._MLPImageTask`), only with our strides and an identity normalizer
(LO's clip the loss at 1.5 ln(num_classes); the plugin clips in its outer
objective instead).

Task families. In LO a family owns ONE `datasets` whose iterators feed every
task of the family (`training.get_batch` calls `next(datasets.split(s))` once
per task). So a family here is one fixed class subset, drawn from its pool
when the family is built; `sample(key)` returns that subset (int32 [k], the
same for every key, so it vmaps) and a sampled task differs only in its
initialization, which LO draws from its own key. New class subsets come from
new families: `sample_fashion_mnist_family(key, ...)` is a
`sample_task_family_fn` for `outer_train.build_gradient_estimators`, which
calls it once per gradient estimator.

Meta-training estimators read only the "train" and "outer_valid" splits;
"test" is for evaluation code only.
"""

import itertools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import gin
import haiku as hk
import jax
import jax.numpy as jnp
from learned_optimization.tasks import base
from learned_optimization.tasks.datasets import base as datasets_base
from learned_optimization.tasks.fixed import conv
from learned_optimization.tasks.fixed import image_mlp
import numpy as np

from pathology_fix_core import errors
from pathology_fix.meta_gradient import batches
from pathology_fix.tasks_and_data import data

PRNGKey = jax.Array

META_TRAIN_CLASSES = (0, 1, 2, 3, 4)
HELDOUT_CLASSES = (5, 6, 7, 8, 9)
CLASS_POOLS = {
    "train": META_TRAIN_CLASSES,
    "heldout": HELDOUT_CLASSES,
    "all": tuple(range(10)),
}

# name -> (kind, hidden sizes / channels, strides, default image size).
ARCHITECTURES = {
    "conv3": ("conv", (32, 32, 32), (2, 2, 1), 28),
    "conv6": ("conv", (32,) * 6, (2, 1, 2, 1, 1, 1), 28),
    "mlp2x32": ("mlp", (32, 32), None, 14),
    "mlp3x128": ("mlp", (128, 128, 128), None, 14),
}
META_TRAIN_ARCHITECTURES = ("conv3",)
HELDOUT_ARCHITECTURES = ("conv6", "mlp2x32", "mlp3x128")


def _conv_pool_loss_fn(channels: Sequence[int], strides: Sequence[int],
                       kernel_size: int,
                       activation: Callable[[jax.Array], jax.Array],
                       num_classes: int):
  """Haiku fn: batch {"image": [B, H, W, C], "label": [B]} -> mean CE []."""

  def fn(batch):
    net = batch["image"]
    for c, s in zip(channels, strides):
      net = activation(hk.Conv2D(c, kernel_size, stride=s)(net))  # SAME pad
    net = jnp.mean(net, axis=(1, 2))  # global average pool -> [B, C]
    logits = hk.Linear(num_classes)(net)
    labels = jax.nn.one_hot(batch["label"], num_classes)
    return jnp.mean(base.softmax_cross_entropy(logits=logits, labels=labels))

  return fn


@gin.configurable
class ConvPoolTask(conv._ConvTask):  # pylint: disable=protected-access
  """Conv stack -> global average pool -> linear; mean softmax CE.

  Params: a haiku dict (conv kernels [k, k, C_in, C_out], biases, head
  [C_last, num_classes]); the model state is an empty dict. Both vmap.
  """

  def __init__(self,
               datasets: data.OfflineImageDatasets,
               channels: Sequence[int] = (32, 32, 32),
               strides: Sequence[int] = (2, 2, 1),
               kernel_size: int = 3,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
               name: Optional[str] = None):
    if len(channels) != len(strides) or not channels:
      raise errors.InvalidArgument(
          "channels and strides must be non-empty and of equal "
          f"length, got {tuple(channels)} and {tuple(strides)}",
          "ConvPoolTask.channels", "ConvPoolTask.strides")
    num_classes = datasets.extra_info["num_classes"]
    super().__init__(
        _conv_pool_loss_fn(tuple(channels), tuple(strides), kernel_size,
                           activation, num_classes), datasets)
    self._name = name

  def normalizer(self, loss):
    return loss

  @property
  def name(self):
    return self._name or super().name


@gin.configurable
class MLPTask(image_mlp._MLPImageTask):  # pylint: disable=protected-access
  """Flatten -> MLP (activation between layers) -> logits; mean softmax CE."""

  def __init__(self,
               datasets: data.OfflineImageDatasets,
               hidden_sizes: Sequence[int] = (32, 32),
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
               name: Optional[str] = None):
    super().__init__(datasets, list(hidden_sizes), act_fn=activation)
    self._name = name

  def normalizer(self, loss):
    return loss

  @property
  def name(self):
    return self._name or super().name


def _check_architecture(architecture: str, prefix: str = ""):
  if architecture not in ARCHITECTURES:
    raise errors.InvalidArgument(
        f"{prefix}architecture must be one of "
        f"{tuple(ARCHITECTURES)}, got {architecture!r}",
        f"{prefix}architecture")


def default_image_size(architecture: str) -> int:
  """Image size the paper uses for this architecture (conv3: 28 ~ its 32)."""
  _check_architecture(architecture)
  return ARCHITECTURES[architecture][3]


def make_task(architecture: str, datasets: data.OfflineImageDatasets,
              name: Optional[str] = None) -> base.Task:
  """One of the paper's networks (see ARCHITECTURES) on `datasets`."""
  _check_architecture(architecture)
  kind, sizes, strides, _ = ARCHITECTURES[architecture]
  if kind == "conv":
    return ConvPoolTask(datasets, channels=sizes, strides=strides, name=name)
  return MLPTask(datasets, hidden_sizes=sizes, name=name)


def _dataset_fn(dataset: str, prefix: str = ""):
  if dataset not in data.DATASET_FNS:
    raise errors.InvalidArgument(
        f"{prefix}dataset must be one of "
        f"{tuple(data.DATASET_FNS)}, got {dataset!r}", f"{prefix}dataset")
  return data.DATASET_FNS[dataset]


def _short_name(dataset: str, size: int, architecture: str,
                classes: Sequence[int]) -> str:
  prefix = {"fashion_mnist": "FashionMnist", "digits": "Digits"}[dataset]
  return f"{prefix}{size}_{architecture}_c{''.join(str(c) for c in classes)}"


@gin.configurable
def paper_task(architecture: str = "conv3",
               dataset: str = "fashion_mnist",
               classes: Optional[Sequence[int]] = None,
               image_size: Optional[int] = None,
               batch_size: int = 128,
               normalization: str = "unit",
               seed: int = 0) -> base.Task:
  """A single task: `architecture` on `dataset` (all 10 classes by default).

  image_size None picks the architecture's size (conv3/conv6: 28, MLPs: 14).
  """
  _check_architecture(architecture, "paper_task.")
  size = image_size or default_image_size(architecture)
  datasets = _dataset_fn(dataset, "paper_task.")(
      batch_size=batch_size, image_size=size, classes=classes,
      normalization=normalization, seed=seed)
  return make_task(
      architecture, datasets,
      _short_name(dataset, size, architecture,
                  datasets.extra_info["classes"]))


# The pool a family draws its classes from when none is given.
DEFAULT_POOLS = {"fashion_mnist": "train", "digits": "all"}


@gin.configurable(denylist=["owner"])
class ClassSubsetFamily(base.TaskFamily):
  """Tasks on one fixed class subset of `dataset`; tasks differ only in initialization.

  The subset is `classes` (class ids), or, when None, `num_classes_per_task`
  classes drawn by `seed` from `classes_pool`: "train" ({0..4}, meta-training),
  "heldout" ({5..9}), "all", or explicit ids; the default pool is
  "train" for Fashion-MNIST and "all" for digits. `seed` also picks the
  batch order. Error messages name the family `owner` (default: the class's
  name; the gin names `FashionMnistClassSubsetFamily` and
  `DigitsClassSubsetFamily` pass their own).

  `sample(key)` -> int32 [k]: the original class ids (label i is classes[i]),
  identical for every key. `task_fn(cfg)` -> the family's single Task (data
  lives in the family, so cfg cannot select other classes; it is carried so
  that LO's unroll state records which classes a task uses).
  """

  def __init__(self,
               classes: Optional[Sequence[int]] = None,
               dataset: str = "fashion_mnist",
               architecture: str = "conv3",
               image_size: Optional[int] = None,
               batch_size: int = 128,
               normalization: str = "unit",
               seed: int = 0,
               name: Optional[str] = None,
               classes_pool: Union[str, Sequence[int], None] = None,
               num_classes_per_task: int = 3,
               owner: Optional[str] = None):
    super().__init__()
    prefix = f"{owner or type(self).__name__}."
    dataset_fn = _dataset_fn(dataset, prefix)
    if classes is None:
      classes = draw_classes(
          DEFAULT_POOLS[dataset] if classes_pool is None else classes_pool,
          num_classes_per_task, seed, prefix)
    _check_architecture(architecture, prefix)  # before loading any data
    size = image_size or default_image_size(architecture)
    self.datasets = dataset_fn(
        batch_size=batch_size, image_size=size, classes=classes,
        normalization=normalization, seed=seed)
    self.classes = tuple(self.datasets.extra_info["classes"])
    self.architecture = architecture
    self._name = name or _short_name(dataset, size, architecture,
                                     self.classes)
    self.task = make_task(architecture, self.datasets, self._name)

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def sample(self, key: PRNGKey) -> jax.Array:
    del key  # the class subset is fixed per family; init uses LO's key
    return jnp.asarray(self.classes, jnp.int32)

  def task_fn(self, cfg: Any) -> base.Task:
    del cfg
    return self.task

  def eval_task_fn(self, cfg: Any) -> base.Task:
    # LO's base class raises here instead of returning.
    return self.task_fn(cfg)


def _resolve_pool(classes_pool: Union[str, Sequence[int]],
                  prefix: str = "") -> Tuple[int, ...]:
  if isinstance(classes_pool, str):
    if classes_pool not in CLASS_POOLS:
      raise errors.InvalidArgument(
          f"{prefix}classes_pool must be one of "
          f"{tuple(CLASS_POOLS)} or a sequence of class ids, got "
          f"{classes_pool!r}", f"{prefix}classes_pool")
    return CLASS_POOLS[classes_pool]
  return tuple(int(c) for c in classes_pool)


def _check_num_classes(num_classes_per_task: int, pool: Tuple[int, ...],
                       prefix: str = ""):
  if not 2 <= num_classes_per_task <= len(pool):
    raise errors.InvalidArgument(
        f"{prefix}num_classes_per_task must be in "
        f"[2, {len(pool)}] for pool {pool}, got "
        f"{num_classes_per_task!r}", f"{prefix}num_classes_per_task")


def draw_classes(classes_pool: Union[str, Sequence[int]],
                 num_classes_per_task: int, seed: int,
                 prefix: str = "") -> Tuple[int, ...]:
  """k distinct classes from the pool, in a seeded random (label) order.

  `prefix` qualifies the parameter names in messages (e.g. "Family.").
  """
  pool = _resolve_pool(classes_pool, prefix)
  _check_num_classes(num_classes_per_task, pool, prefix)
  rng = np.random.default_rng(seed)
  return tuple(int(c) for c in rng.choice(pool, num_classes_per_task,
                                          replace=False))


# Gin names of 0.1 (configs bind them): the one family on each dataset.
@gin.configurable
def FashionMnistClassSubsetFamily(  # pylint: disable=invalid-name
    classes_pool: Union[str, Sequence[int]] = "train",
    num_classes_per_task: int = 3,
    architecture: str = "conv3",
    image_size: Optional[int] = None,
    batch_size: int = 128,
    normalization: str = "unit",
    seed: int = 0,
    name: Optional[str] = None) -> ClassSubsetFamily:
  """`ClassSubsetFamily` on k Fashion-MNIST classes drawn (by seed) from a pool."""
  return ClassSubsetFamily(
      dataset="fashion_mnist", classes_pool=classes_pool,
      num_classes_per_task=num_classes_per_task, architecture=architecture,
      image_size=image_size, batch_size=batch_size,
      normalization=normalization, seed=seed, name=name,
      owner="FashionMnistClassSubsetFamily")


@gin.configurable
def DigitsClassSubsetFamily(  # pylint: disable=invalid-name
    classes_pool: Union[str, Sequence[int]] = "all",
    num_classes_per_task: int = 3,
    architecture: str = "conv3",
    image_size: Optional[int] = None,
    batch_size: int = 128,
    normalization: str = "unit",
    seed: int = 0,
    name: Optional[str] = None) -> ClassSubsetFamily:
  """`ClassSubsetFamily` on k digit classes drawn (by seed) from {0..9}."""
  return ClassSubsetFamily(
      dataset="digits", classes_pool=classes_pool,
      num_classes_per_task=num_classes_per_task, architecture=architecture,
      image_size=image_size, batch_size=batch_size,
      normalization=normalization, seed=seed, name=name,
      owner="DigitsClassSubsetFamily")


class RoundRobin:
  """Cycles over several iterators, one `next` each.

  LO's batched unrolls call `next` once per sample, in sample order, so with
  n a multiple of the number of iterators m, sample i always reads iterator
  i % m: every inner run keeps one meaning of its labels.
  """

  def __init__(self, iterators):
    self._iterators = list(iterators)
    self._next = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterators[self._next])
    self._next = (self._next + 1) % len(self._iterators)
    return batch

  def skip(self):
    """Advances as `next` does, skipping the child's batch (`batches.skip`)."""
    batches.skip(self._iterators[self._next])
    self._next = (self._next + 1) % len(self._iterators)


def every_subset_family(class_pool: Union[str, Sequence[int]] = "train",
                        num_classes_per_task: int = 3,
                        dataset: str = "fashion_mnist",
                        architecture: str = "conv3",
                        image_size: Optional[int] = None,
                        batch_size: int = 128,
                        normalization: str = "unit",
                        seed: int = 0) -> ClassSubsetFamily:
  """One family whose sample i trains on the (i mod m)-th k-class subset.

  Every subset of size `num_classes_per_task` of the pool, m of them (10 for
  3 of 5 classes), each with its own batch order (seed + i). They share the
  architecture and batch shapes, so one compiled unroll serves them all. The
  estimator's number of samples must be a multiple of m (checked by our
  estimators through `num_subsets`), else a sample's labels would change
  meaning between batches.
  """
  prefix = "every_subset_family."
  pool = _resolve_pool(class_pool, prefix)
  _check_num_classes(num_classes_per_task, pool, prefix)
  subsets = list(itertools.combinations(pool, num_classes_per_task))
  families = [ClassSubsetFamily(c, dataset=dataset, architecture=architecture,
                                image_size=image_size, batch_size=batch_size,
                                normalization=normalization, seed=seed + i)
              for i, c in enumerate(subsets)]
  first = families[0]
  first.datasets = datasets_base.Datasets(
      **{s: RoundRobin(f.datasets.split(s) for f in families)
         for s in data.SPLITS},
      extra_info=dict(first.datasets.extra_info, subsets=subsets),
      abstract_batch=first.datasets.abstract_batch)
  first.task.datasets = first.datasets
  first.num_subsets = len(subsets)
  first._name = f"every{num_classes_per_task}of{len(pool)}_" + first._name  # pylint: disable=protected-access
  return first


@gin.configurable
def sample_every_subset_family(
    key: PRNGKey,
    class_pool: Union[str, Sequence[int]] = "train",
    num_classes_per_task: int = 3,
    dataset: str = "fashion_mnist",
    architecture: str = "conv3",
    image_size: Optional[int] = None,
    batch_size: int = 128,
    normalization: str = "unit") -> ClassSubsetFamily:
  """A `sample_task_family_fn`: `every_subset_family` (seeded by key)."""
  return every_subset_family(class_pool, num_classes_per_task, dataset,
                             architecture, image_size, batch_size,
                             normalization, _seed_from_key(key))


def _seed_from_key(key: PRNGKey) -> int:
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


@gin.configurable
def sample_fashion_mnist_family(
    key: PRNGKey,
    class_pool: Union[str, Sequence[int]] = "train",
    num_classes_per_task: int = 3,
    architecture: str = "conv3",
    image_size: Optional[int] = None,
    batch_size: int = 128,
    normalization: str = "unit") -> ClassSubsetFamily:
  """A `sample_task_family_fn`: a family on a new class subset per key."""
  return FashionMnistClassSubsetFamily(
      classes_pool=class_pool, num_classes_per_task=num_classes_per_task,
      architecture=architecture, image_size=image_size,
      batch_size=batch_size, normalization=normalization,
      seed=_seed_from_key(key))


@gin.configurable
def sample_digits_family(key: PRNGKey,
                         class_pool: Union[str, Sequence[int]] = "all",
                         num_classes_per_task: int = 3,
                         architecture: str = "conv3",
                         image_size: Optional[int] = None,
                         batch_size: int = 128,
                         normalization: str = "unit"
                        ) -> ClassSubsetFamily:
  """A `sample_task_family_fn` over digit class subsets (held out)."""
  return DigitsClassSubsetFamily(
      classes_pool=class_pool, num_classes_per_task=num_classes_per_task,
      architecture=architecture, image_size=image_size,
      batch_size=batch_size, normalization=normalization,
      seed=_seed_from_key(key))
