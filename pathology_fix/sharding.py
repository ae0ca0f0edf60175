"""Splits an estimator's n samples across the local devices.

The n samples (antithetic pairs) of one outer step are independent until
`estimators.combine_samples` averages over them, so the unrolls need no
communication: every array with a sample axis is placed on a 1-D device mesh,
partitioned along that axis, and XLA's SPMD partitioner splits the jitted
chunk functions the same way. The reductions over samples in
`combine_samples` become cross-device sums; nothing else changes.

Sample-axis positions: inner states, task params, eps: axis 0 ([n, ...]);
antithetic pairs (theta_pair, paired opt states, losses): axis 1 ([2, n, ...]);
chunk data and keys: axis 1 ([steps, n, ...]).

If n is not divisible by the number of local devices the samples stay on one
device and a warning says why: a config that works on one machine keeps
working on another with a different device count.
"""

import warnings
from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

SAMPLE_AXIS = "samples"


class SampleSharding:
  """Placement of sample-indexed pytrees on a 1-D mesh (or no-ops)."""

  def __init__(self,
               num_samples: int,
               enabled: bool = True,
               devices: Optional[Sequence[Any]] = None):
    devices = list(devices) if devices is not None else jax.local_devices()
    self.num_samples = int(num_samples)
    self.mesh = None
    if enabled and len(devices) > 1:
      if self.num_samples % len(devices):
        warnings.warn(
            f"num_tasks ({self.num_samples}) is not divisible by the "
            f"{len(devices)} local devices: running every sample on "
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

  def put(self, tree, axis: int = 0):
    """Moves a pytree onto the mesh, split along `axis` (outside jit)."""
    if not self.active:
      return tree
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, self.named_sharding(np.ndim(x), axis)),
        tree)

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
        lambda x: x if isinstance(x, (bool, int, float)) else jax.device_put(
            x, replicated), tree)

  def to_default_device(self, tree):
    """Results for LO's outer loop, which accumulates them on one device."""
    if not self.active:
      return tree
    device = jax.local_devices()[0]
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, device), tree)
