"""pathology-fix: Metz et al. (ICML 2019) meta-training for learned_optimization.

Importing this package applies the compatibility layer that makes
learned-optimization (PyPI 0.0.1 or GitHub main, see `lo_api`) run on current
JAX (see `compat`), then registers
every gin configurable of the plugin, so `--gin_import=pathology_fix` is all a
user of LO's own tools needs.
"""

from pathology_fix.lo_boundary import compat

compat.apply()

# After compat: detecting the API imports learned_optimization's package.
from pathology_fix.lo_boundary import lo_api  # pylint: disable=g-import-not-at-top

lo_api.install()

from pathology_fix.version import __version__  # pylint: disable=g-import-not-at-top

# Registers the gin configurables (imports after compat.apply() on purpose).
from pathology_fix.tasks_and_data import data  # pylint: disable=g-import-not-at-top
from pathology_fix.meta_gradient import estimators  # pylint: disable=g-import-not-at-top
from pathology_fix.runtime import local_training  # pylint: disable=g-import-not-at-top
from pathology_fix.meta_gradient import mixing  # pylint: disable=g-import-not-at-top
from pathology_fix.optimizers import paper_lopt  # pylint: disable=g-import-not-at-top
from pathology_fix.optimizers import progress_lopt  # pylint: disable=g-import-not-at-top
from pathology_fix.meta_gradient import schedules  # pylint: disable=g-import-not-at-top
from pathology_fix.tasks_and_data import tasks  # pylint: disable=g-import-not-at-top
from pathology_fix.optimizers import variational_lopt  # pylint: disable=g-import-not-at-top
from pathology_fix.tasks_and_data import validation_task  # pylint: disable=g-import-not-at-top
