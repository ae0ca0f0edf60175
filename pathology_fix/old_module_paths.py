"""The module paths of release 0.1.0, kept importable after the move to layer folders.

`import pathology_fix.tasks` (a line in many gin configs) or
`from pathology_fix import estimators` gives the module at its new path;
it is the same module object, so gin registers nothing twice. The two
command-line tools keep their old `python -m` paths as files of their own
(`pathology_fix/train.py`, `pathology_fix/demo.py`), since `-m` needs code.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# Old path -> new path.
MOVED = {
    "pathology_fix.batches": "pathology_fix.meta_gradient.batches",
    "pathology_fix.data": "pathology_fix.tasks_and_data.data",
    "pathology_fix.distributed": "pathology_fix.runtime.distributed",
    "pathology_fix.estimators": "pathology_fix.meta_gradient.estimators",
    "pathology_fix.inner_problems": "pathology_fix.meta_gradient.inner_problems",
    "pathology_fix.lo_api": "pathology_fix.lo_boundary.lo_api",
    "pathology_fix.mixing": "pathology_fix.meta_gradient.mixing",
    "pathology_fix.paper_lopt": "pathology_fix.optimizers.paper_lopt",
    "pathology_fix.progress_lopt": "pathology_fix.optimizers.progress_lopt",
    "pathology_fix.schedules": "pathology_fix.meta_gradient.schedules",
    "pathology_fix.sharding": "pathology_fix.meta_gradient.sharding",
    "pathology_fix.tasks": "pathology_fix.tasks_and_data.tasks",
    "pathology_fix.unroll": "pathology_fix.meta_gradient.unroll",
    "pathology_fix.validation_task": "pathology_fix.tasks_and_data.validation_task",
    "pathology_fix.variational_lopt": "pathology_fix.optimizers.variational_lopt",
    "pathology_fix.vjp_engine": "pathology_fix.meta_gradient.vjp_engine",
    "pathology_fix.runtime.compat": "pathology_fix.lo_boundary.compat",
    "pathology_fix.runtime.inprocess_courier":
        "pathology_fix.lo_boundary.inprocess_courier",
    "pathology_fix.runtime.outer_schedule":
        "pathology_fix.optimizers.outer_schedule",
    "pathology_fix.runtime.tensorboard_writer":
        "pathology_fix.lo_boundary.tensorboard_writer",
}


class _MovedModuleLoader(importlib.abc.Loader):
  """Hands the import system the module at its new path."""

  def __init__(self, new_name: str):
    self._new_name = new_name
    self._spec = None

  def create_module(self, spec):
    del spec
    module = importlib.import_module(self._new_name)
    self._spec = module.__spec__
    return module

  def exec_module(self, module):
    module.__spec__ = self._spec  # the import system set the old path's


class _MovedModuleFinder(importlib.abc.MetaPathFinder):

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    new_name = MOVED.get(fullname)
    if new_name is None:
      return None
    return importlib.util.spec_from_loader(fullname,
                                           _MovedModuleLoader(new_name))


def install():
  """Puts the finder first on sys.meta_path (idempotent).

  First: a finder that maps the whole `pathology_fix` folder (an editable
  install of another checkout) would otherwise find stale files there.
  """
  if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
