"""Splits an estimator's n samples across the devices of every process.

The n samples (antithetic pairs) of one outer step are independent until
`estimators.combine_samples` averages over them, so the unrolls need no
communication: every array with a sample axis is placed on a 1-D device mesh,
partitioned along that axis, and XLA's SPMD partitioner splits the jitted
chunk functions the same way. The reductions over samples in
`combine_samples` become cross-device sums; nothing else changes.

Sample-axis positions: inner states, task params, eps: axis 0 ([n, ...]);
antithetic pairs (theta_pair, paired opt states, losses): axis 1 ([2, n, ...]);
chunk data and keys: axis 1 ([steps, n, ...]).

If n is not divisible by the number of devices the samples stay on one
device and a warning says why: a config that works on one machine keeps
working on another with a different device count.

Several processes (`jax.distributed`, see `distributed.py`): the mesh holds
all processes' devices, in `jax.devices()` order, so process p owns a
contiguous block of samples. Everything drawn inside jitted code (tasks,
inner initializations, perturbations, inner keys) is computed by SPMD for
the owned samples only. Host batches come from each process's own copy of
the (seeded) data stream, read in the one-process order: the process builds
only its own samples' batches (`local_samples`) and skips the others'
(`batches.get_batches`), and `put_process_local` assembles the global array
from every process's block. The merge's means and variances over samples are
all-reduces across processes inside `combine_samples`' jitted step, and what
leaves the estimator (`to_default_device`) is the same value on every
process, so LO's outer optimizer keeps theta identical everywhere. In a
multi-process run n must be divisible by the global device count (the
estimator checks it when it is built: no process can run the others'
samples).
"""

import warnings
from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec
import numpy as np

SAMPLE_AXIS = "samples"


class SampleSharding:
  """Placement of sample-indexed pytrees on a 1-D mesh (or no-ops)."""

  def __init__(self,
               num_samples: int,
               enabled: bool = True,
               devices: Optional[Sequence[Any]] = None):
    if devices is None:
      devices = jax.devices() if enabled else jax.local_devices()
    devices = list(devices)
    self.num_samples = int(num_samples)
    self.mesh = None
    if enabled and len(devices) > 1:
      if self.num_samples % len(devices):
        # The estimator refuses this when the devices span processes.
        warnings.warn(
            f"the {self.num_samples} samples per outer step are not divisible "
            f"by the {len(devices)} local devices: running every sample on "
            f"{devices[0]}. Use a multiple of {len(devices)} to shard.",
            stacklevel=2)
      else:
        self.mesh = Mesh(np.asarray(devices), (SAMPLE_AXIS,))

  @property
  def active(self) -> bool:
    return self.mesh is not None

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.size

  def named_sharding(self, ndim: int, axis: int) -> NamedSharding:
    """Splits `axis` of an ndim-array; arrays without that axis replicate."""
    if ndim <= axis:
      return NamedSharding(self.mesh, PartitionSpec())
    spec = [None] * ndim
    spec[axis] = SAMPLE_AXIS
    return NamedSharding(self.mesh, PartitionSpec(*spec))

  @property
  def spans_processes(self) -> bool:
    return self.mesh is not None and not self.named_sharding(
        0, 0).is_fully_addressable

  def _to_mesh(self, x, sharding: NamedSharding):
    """device_put, or for a mesh over processes: this process's slices of x.

    x (numpy, or an array on this process's devices) must hold the same
    value on every process; only the slices of the local devices are read.
    """
    if not self.spans_processes or (isinstance(x, jax.Array) and
                                    not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])

  def put(self, tree, axis: int = 0):
    """Moves a pytree onto the mesh, split along `axis` (outside jit)."""
    if not self.active:
      return tree
    return jax.tree_util.tree_map(
        lambda x: self._to_mesh(x, self.named_sharding(np.ndim(x), axis)),
        tree)

  @property
  def local_samples(self) -> np.ndarray:
    """Sorted indices [m] of the samples on this process's devices.

    All n unless the mesh spans processes.
    """
    if not self.spans_processes:
      return np.arange(self.num_samples)
    index_map = self.named_sharding(1, 0).addressable_devices_indices_map(
        (self.num_samples,))
    return np.unique(np.concatenate(
        [np.arange(self.num_samples)[i] for i in index_map.values()]))

  def put_process_local(self, tree, axis: int = 0):
    """`put` of a pytree whose leaves hold only `local_samples` along `axis`.

    Leaves are numpy [..., m, ...] with the samples in `local_samples`
    order; every process passes its own. The result equals `put` of the
    full [..., n, ...] tree.
    """
    if not self.spans_processes:
      return self.put(tree, axis)

    def place(x):
      shape = list(np.shape(x))
      shape[axis] = self.num_samples
      return jax.make_array_from_process_local_data(
          self.named_sharding(len(shape), axis), np.asarray(x), tuple(shape))

    return jax.tree_util.tree_map(place, tree)

  def constrain(self, tree, axis: int = 0):
    """The same placement as `put`, as a constraint inside jitted code."""
    if not self.active:
      return tree
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(
            x, self.named_sharding(np.ndim(x), axis)), tree)

  def replicate(self, tree):
    """A copy on every device: operands shared by all samples (theta, keys).

    Arrays committed to one device (e.g. an outer optimizer's output) cannot
    enter a computation on the mesh without this.
    """
    if not self.active:
      return tree
    replicated = NamedSharding(self.mesh, PartitionSpec())
    # Python scalars are never committed; leave them (and their types) alone.
    return jax.tree_util.tree_map(
        lambda x: x if isinstance(x, (bool, int, float)) else self._to_mesh(
            x, replicated), tree)

  def to_default_device(self, tree):
    """Results for LO's outer loop, which accumulates them on one device.

    Over several processes every process gets the whole value: replicated
    arrays (the merged gradient, the metrics) from a local copy, sample-split
    ones (per-sample losses, task params) gathered from all processes.
    """
    if not self.active:
      return tree
    device = jax.local_devices()[0]

    def local(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
          x = x.addressable_data(0)
        else:
          x = multihost_utils.process_allgather(x, tiled=True)
      return jax.device_put(x, device)

    return jax.tree_util.tree_map(local, tree)

  def to_host(self, x) -> np.ndarray:
    """A numpy copy of a whole (possibly sample-split) array, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
