"""pathology-fix: Metz et al. (ICML 2019) meta-training for learned_optimization.

Importing this package applies the compatibility layer that makes
learned-optimization 0.0.1 run on current JAX (see `compat`), then registers
every gin configurable of the plugin, so `--gin_import=pathology_fix` is all a
user of LO's own tools needs.
"""

from pathology_fix import compat

compat.apply()

__version__ = "0.1.0"

# Registers the gin configurables (imports after compat.apply() on purpose).
from pathology_fix import data  # pylint: disable=g-import-not-at-top
from pathology_fix import estimators  # pylint: disable=g-import-not-at-top
from pathology_fix import local_training  # pylint: disable=g-import-not-at-top
from pathology_fix import mixing  # pylint: disable=g-import-not-at-top
from pathology_fix import paper_lopt  # pylint: disable=g-import-not-at-top
from pathology_fix import schedules  # pylint: disable=g-import-not-at-top
from pathology_fix import tasks  # pylint: disable=g-import-not-at-top
from pathology_fix import variational_lopt  # pylint: disable=g-import-not-at-top
