"""How `lo_boundary.apply()` makes learned_optimization run on current JAX.

What it patches is listed in one place, the `pathology_fix.lo_boundary`
docstring. This module holds the mechanism: removed names are restored as
attributes, and packages LO imports but does not need for single-machine
work get stand-ins that exist only while LO modules execute. Nothing on disk
is modified.

Stand-ins are visible only while an LO module executes: a global fake
`tensorflow` in sys.modules breaks flax.io and etils, which probe for it.
Using a stand-in (e.g. `tfds.load`) raises `MissingDependencyError`, which says
what to install. When the real package is installed it is used instead.
LO main is told from 0.0.1 by its features (see `lo_api`); each fix checks
for the name it replaces, so one layer serves both.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
import types

import jax
import jax.core
import jax.lib
import jax.tree_util
import numpy as np

_INSTALL_HINTS = {
    "tensorflow":
        "pip install tensorflow-cpu tensorflow-datasets (needed only for LO's "
        "tfds datasets and TF summary writer)",
    "tensorflow_datasets":
        "pip install tensorflow-cpu tensorflow-datasets (LO's image and text "
        "tasks load data with tfds; offline data is in pathology_fix.tasks_and_data.data)",
}
# Called by LO at import time; harmless to skip without TensorFlow.
_NO_OP_ATTRIBUTES = {"enable_v2_behavior"}


class MissingDependencyError(ImportError):
  """Raised when LO reaches a code path that needs an uninstalled package."""


class _Placeholder:
  """Any attribute of a stand-in package: usable in annotations, fails if used."""

  def __init__(self, package, path):
    self._package = package
    self._path = path

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Placeholder(self._package, f"{self._path}.{name}")

  def __call__(self, *args, **kwargs):
    raise MissingDependencyError(
        f"`{self._path}` needs the package `{self._package}`, which is not "
        f"installed. To use it: {_INSTALL_HINTS[self._package]}.")

  def __repr__(self):
    return f"<missing {self._path}>"


class _StandInModule(types.ModuleType):
  """A module whose every attribute is a placeholder."""

  def __init__(self, name, package):
    super().__init__(name)
    self.__dict__["_package"] = package
    self.__dict__["__path__"] = []  # lets `import tensorflow.compat.v2` resolve

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    if name in _NO_OP_ATTRIBUTES:
      return lambda *args, **kwargs: None
    return _Placeholder(self._package, f"{self.__name__}.{name}")


def _is_installed(package):
  try:
    return importlib.util.find_spec(package) is not None
  except (ImportError, ValueError):
    return False


def _make_stand_ins():
  """Modules to expose while LO executes, for packages that are absent."""
  modules = {}
  if not _is_installed("tensorflow"):
    tf = _StandInModule("tensorflow", "tensorflow")
    tf_compat = _StandInModule("tensorflow.compat", "tensorflow")
    tf_v2 = _StandInModule("tensorflow.compat.v2", "tensorflow")
    tf.__dict__["compat"] = tf_compat
    tf_compat.__dict__["v2"] = tf_v2
    modules.update({
        "tensorflow": tf,
        "tensorflow.compat": tf_compat,
        "tensorflow.compat.v2": tf_v2,
    })
  if not _is_installed("tensorflow") or not _is_installed("tensorboard"):
    from pathology_fix.lo_boundary import tensorboard_writer  # pylint: disable=g-import-not-at-top
    modules["flax.metrics.tensorboard"] = tensorboard_writer
  if not _is_installed("tensorflow_datasets"):
    modules["tensorflow_datasets"] = _StandInModule("tensorflow_datasets",
                                                    "tensorflow_datasets")
  if not _is_installed("courier"):
    from pathology_fix.lo_boundary import inprocess_courier  # pylint: disable=g-import-not-at-top
    modules["courier"] = inprocess_courier
  return modules


class _StandInScope:
  """Puts stand-ins in sys.modules while (possibly nested) LO modules execute."""

  def __init__(self, stand_ins):
    self._stand_ins = stand_ins
    self._depth = 0
    self._saved = {}
    self._lock = threading.RLock()

  def __enter__(self):
    self._lock.acquire()
    if self._depth == 0:
      for name, module in self._stand_ins.items():
        self._saved[name] = sys.modules.get(name)
        sys.modules[name] = module
    self._depth += 1

  def __exit__(self, *exc):
    self._depth -= 1
    if self._depth == 0:
      for name, previous in self._saved.items():
        if previous is None:
          sys.modules.pop(name, None)
        else:
          sys.modules[name] = previous
      self._saved = {}
    self._lock.release()


def _use_tensorboardx_writer(summary_module):
  """LO main's summary writers need TensorFlow; 0.0.1's is flax's (stood in)."""
  if "TensorboardWriter" in summary_module.__dict__ and (
      not _is_installed("tensorflow") or not _is_installed("tensorboard")):
    from pathology_fix.lo_boundary import tensorboard_writer  # pylint: disable=g-import-not-at-top
    summary_module.TensorboardWriter = tensorboard_writer.SummaryWriter
    summary_module.JaxboardWriter = tensorboard_writer.SummaryWriter


def _keep_log_compiles_setting(setup_module):
  """LO main's setup_experiment turns jax_log_compiles on: keep the user's value.

  (JAX_LOG_COMPILES=1 in the environment still turns it on.)
  """
  original = setup_module.setup_experiment
  if getattr(original, "_keeps_log_compiles", False):
    return

  def setup_experiment(*args, **kwargs):
    before = jax.config.jax_log_compiles
    try:
      return original(*args, **kwargs)
    finally:
      jax.config.update("jax_log_compiles", before)

  setup_experiment.__doc__ = original.__doc__
  setup_experiment._keeps_log_compiles = True  # pylint: disable=protected-access
  setup_module.setup_experiment = setup_experiment


# Run right after the LO module of that name executes.
_AFTER_IMPORT = {
    "learned_optimization.summary": _use_tensorboardx_writer,
    "learned_optimization.setup_experiment": _keep_log_compiles_setting,
}


class _ScopedLoader(importlib.abc.Loader):
  """Wraps LO's loader so that its modules execute inside the stand-in scope."""

  def __init__(self, loader, scope):
    self._loader = loader
    self._scope = scope

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    with self._scope:
      self._loader.exec_module(module)
    fix = _AFTER_IMPORT.get(module.__name__)
    if fix is not None:
      fix(module)

  def __getattr__(self, name):  # get_source, get_filename, ... for tools
    return getattr(self._loader, name)


class _AliasLoader(importlib.abc.Loader):
  """Loads an already imported module under another name."""

  def __init__(self, module):
    self._module = module

  def create_module(self, spec):
    return self._module

  def exec_module(self, module):
    pass


# Stand-ins also importable outside LO's module execution: LO main imports
# courier inside functions (distributed.py, population.py). Nothing probes
# for courier the way flax and etils probe for tensorflow.
_RUNTIME_STAND_INS = ("courier",)


class _LearnedOptimizationFinder(importlib.abc.MetaPathFinder):
  """Finds `learned_optimization.*` normally, then scopes its execution."""

  def __init__(self, scope, stand_ins):
    self._scope = scope
    self._runtime_stand_ins = {
        name: stand_ins[name] for name in _RUNTIME_STAND_INS
        if name in stand_ins}

  def find_spec(self, fullname, path, target=None):
    if fullname in self._runtime_stand_ins:
      return importlib.util.spec_from_loader(
          fullname, _AliasLoader(self._runtime_stand_ins[fullname]))
    if fullname != "learned_optimization" and not fullname.startswith(
        "learned_optimization."):
      return None
    spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
    if spec is not None and spec.loader is not None:
      spec.loader = _ScopedLoader(spec.loader, self._scope)
    return spec


def _restore_removed_names():
  tree_util = jax.tree_util
  restored = {
      "tree_map": tree_util.tree_map,
      "tree_multimap": tree_util.tree_map,
      "tree_leaves": tree_util.tree_leaves,
      "tree_flatten": tree_util.tree_flatten,
      "tree_unflatten": tree_util.tree_unflatten,
      "tree_structure": tree_util.tree_structure,
      "ShapedArray": jax.core.ShapedArray,
  }
  for name, value in restored.items():
    if name not in jax.__dict__:
      setattr(jax, name, value)
  if "xla_client" not in jax.lib.__dict__:
    xla_client = types.ModuleType("jax.lib.xla_client")
    xla_client.Device = jax.Device
    jax.lib.xla_client = xla_client
  if "product" not in np.__dict__:
    np.product = np.prod


def _use_file_checkpoints():
  import flax  # pylint: disable=g-import-not-at-top
  try:
    flax.config.update("flax_use_orbax_checkpointing", False)
  except (AttributeError, KeyError):  # older flax: files are the default
    pass


_QUIET_MESSAGES = (
    # LO logs an ERROR when oryx is absent; its in-graph summaries are off on
    # current JAX either way (our estimators return their metrics explicitly).
    "Oryx not found",
    # flax without TensorFlow: local files work, gs:// paths are not used.
    "Tensorflow library not found",
)


def _quiet_known_messages(record) -> bool:
  return not any(m in record.getMessage() for m in _QUIET_MESSAGES)


def _quiet_gin_include_probe(record) -> bool:
  # gin first looks each `include 'x.gin'` up as a Python package resource and
  # logs an ERROR when it is not one, then finds it on the search path; a
  # file that is really missing still fails the parse with its own error.
  return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
              and record.getMessage().startswith("Path not found"))


_applied = False


def apply():
  """Applies the compatibility layer; idempotent."""
  global _applied
  if _applied:
    return
  if any(name == "learned_optimization" or name.startswith(
      "learned_optimization.") for name in sys.modules):
    raise ImportError(
        "learned_optimization was imported before pathology_fix; import "
        "pathology_fix first (or pass --gin_import=pathology_fix) so that its "
        "compatibility layer can be applied.")
  logging.getLogger("absl").addFilter(_quiet_known_messages)
  logging.getLogger().addFilter(_quiet_gin_include_probe)
  _restore_removed_names()
  _use_file_checkpoints()
  # Imported before the scope exists so they see the real environment.
  import flax.serialization  # pylint: disable=g-import-not-at-top,unused-import
  import flax.training.checkpoints  # pylint: disable=g-import-not-at-top,unused-import
  stand_ins = _make_stand_ins()
  scope = _StandInScope(stand_ins)
  sys.meta_path.insert(0, _LearnedOptimizationFinder(scope, stand_ins))
  _applied = True
