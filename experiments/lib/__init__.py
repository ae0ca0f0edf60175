"""Code the experiment scripts share; nothing here imports a script."""

import pathology_fix  # noqa: F401  (compat layer before any LO import)
