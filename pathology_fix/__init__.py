"""pathology-fix: Metz et al. (ICML 2019) meta-training for learned_optimization.

`import pathology_fix` (or `--gin_import=pathology_fix` for LO's own
binaries) does three things, below, and nothing else:

1. `lo_boundary.apply()`: the compatibility layer that lets
   learned_optimization (PyPI 0.0.1 or GitHub main) run on current JAX; the
   `pathology_fix.lo_boundary` docstring lists everything it patches. It must
   run before anything imports learned_optimization.
2. Registers the gin configurables of the library layers: estimators,
   truncation schedules and mixtures (`meta_gradient`), learned and outer
   optimizers (`optimizers`), tasks and offline datasets (`tasks_and_data`).
   The runtime's configurables (`resumable_local_train`, `MetaValidation`,
   `ThetaEMA`) register when `pathology_fix.runtime` is imported, as
   `python -m pathology_fix.train` does; importing this package loads no
   training loop.
3. Keeps the module paths of release 0.1.0 importable (`old_module_paths`).

The layers, bottom to top: `pathology_fix_core` (math) <- `lo_boundary` <-
`meta_gradient` <- `tasks_and_data`, `optimizers` <- `runtime` <-
`pretrained`, `cli` (docs/architecture.md).
"""

from pathology_fix import lo_boundary

lo_boundary.apply()

# Registers the gin configurables (after apply(): they import LO).
from pathology_fix.meta_gradient import estimators  # pylint: disable=g-import-not-at-top
from pathology_fix.meta_gradient import mixing  # pylint: disable=g-import-not-at-top
from pathology_fix.meta_gradient import schedules  # pylint: disable=g-import-not-at-top
from pathology_fix.optimizers import outer_optimizer  # pylint: disable=g-import-not-at-top
from pathology_fix.optimizers import outer_schedule  # pylint: disable=g-import-not-at-top
from pathology_fix.optimizers import paper_lopt  # pylint: disable=g-import-not-at-top
from pathology_fix.optimizers import progress_lopt  # pylint: disable=g-import-not-at-top
from pathology_fix.optimizers import variational_lopt  # pylint: disable=g-import-not-at-top
from pathology_fix.tasks_and_data import data  # pylint: disable=g-import-not-at-top
from pathology_fix.tasks_and_data import tasks  # pylint: disable=g-import-not-at-top
from pathology_fix.tasks_and_data import validation_task  # pylint: disable=g-import-not-at-top
from pathology_fix.version import __version__  # pylint: disable=g-import-not-at-top
from pathology_fix import old_module_paths  # pylint: disable=g-import-not-at-top

old_module_paths.install()
