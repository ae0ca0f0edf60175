"""Applies pathology_fix's compatibility layer before any test imports LO.

Also imports the runtime's training loop, which registers the gin name
`resumable_local_train` that the shipped configs bind (`import pathology_fix`
alone loads no runtime), so tests can parse every config in this process.

Also marks `lo_main`: the fast subset CI runs a second time against
learned_optimization GitHub main (`.ci/run`; `PATHOLOGY_FIX_LO=main ./run.sh
test`). Listed here, by node id prefix, so test files need no edits.
"""

import jax
import pathology_fix  # noqa: F401
from pathology_fix.runtime import local_training  # noqa: F401
import pytest

LO_MAIN_SUBSET = (
    "tests/test_lo_api.py",
    "tests/test_lo_main_shipped_tests.py",
    "tests/test_gin_configs.py",
    "tests/test_train_cli.py::test_short_run_writes_checkpoints_summaries_and_config",
    "tests/test_train_cli.py::test_resume_after_sigkill_continues_from_last_checkpoint",
    "tests/test_bad_config.py::test_in_a_subprocess",
    "tests/test_tensorboard_events.py",
    "tests/test_end_to_end.py::test_mixture_of_hybrid_and_lo_pes_runs",
    "tests/test_estimators.py::test_estimators_are_unbiased_for_the_smoothed_gradient",
    "tests/test_progress_lopt.py::test_every_estimator_gives_a_finite_gradient",
)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.nodeid.startswith(LO_MAIN_SUBSET):
      item.add_marker(pytest.mark.lo_main)


@pytest.fixture(autouse=True)
def _restore_jax_x64():
  """A test (or an experiment's main) that turns on x64 must not leak it."""
  before = jax.config.jax_enable_x64
  yield
  if jax.config.jax_enable_x64 != before:
    jax.config.update("jax_enable_x64", before)
