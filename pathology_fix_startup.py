"""Applies pathology_fix's compatibility layer when learned_optimization is imported.

LO's own binaries import LO before any `--gin_import`, and LO GitHub main's
`summary.py` and `filesystem.py` import TensorFlow at module level, so e.g.

  python -m learned_optimization.run_outer_train_single --train_log_dir D \
      --gin_import pathology_fix --config_file gin_configs/hybrid_quadratic.gin

fails without TensorFlow before `pathology_fix` could be imported. A one-line
`pathology_fix_startup.pth` in site-packages (written by
`python -m pathology_fix_startup`, which scripts/bootstrap.sh runs) calls
`install()` at interpreter start-up: a finder that, the first time
`learned_optimization` is imported, imports `pathology_fix` first (compat
layer, gin configurables). No file of LO is touched. Cheap at start-up: only
`sys` is imported until LO is. Set PATHOLOGY_FIX_NO_STARTUP_HOOK=1 to disable.
"""

import os
import sys

PTH_NAME = "pathology_fix_startup.pth"
PTH_LINE = "import pathology_fix_startup; pathology_fix_startup.install()\n"


class _ExistingModuleLoader:
  """Hands the import system a module that is already fully imported."""

  def __init__(self, module):
    self._module = module
    self._spec = module.__spec__

  def create_module(self, spec):
    del spec
    return self._module

  def exec_module(self, module):
    module.__spec__ = self._spec  # the real one, with its search locations


class _ImportPluginFirst:
  """Meta-path finder: on `import learned_optimization`, import pathology_fix."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname != "learned_optimization":
      return None
    _uninstall()
    if "pathology_fix" in sys.modules:
      return None  # the plugin is importing LO itself, through compat
    import importlib.util  # pylint: disable=g-import-not-at-top
    import pathology_fix  # pylint: disable=g-import-not-at-top,unused-import
    module = sys.modules.get(fullname)
    if module is None:
      return None
    return importlib.util.spec_from_loader(
        fullname, _ExistingModuleLoader(module), is_package=True)


def _uninstall():
  sys.meta_path[:] = [
      f for f in sys.meta_path if not isinstance(f, _ImportPluginFirst)]


def install():
  """Adds the finder (idempotent; a no-op once LO is imported)."""
  if os.environ.get("PATHOLOGY_FIX_NO_STARTUP_HOOK"):
    return
  if "learned_optimization" in sys.modules or any(
      isinstance(f, _ImportPluginFirst) for f in sys.meta_path):
    return
  sys.meta_path.insert(0, _ImportPluginFirst())


def write_pth(site_packages=None) -> str:
  """Writes the .pth into this interpreter's site-packages; returns its path."""
  if site_packages is None:
    import sysconfig  # pylint: disable=g-import-not-at-top
    site_packages = sysconfig.get_paths()["purelib"]
  path = os.path.join(site_packages, PTH_NAME)
  with open(path, "w") as f:
    f.write(PTH_LINE)
  return path


if __name__ == "__main__":
  print(f"[pathology_fix] wrote {write_pth()}")
