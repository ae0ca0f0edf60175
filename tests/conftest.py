"""Applies pathology_fix's compatibility layer before any test imports LO.

Also marks `lo_main`: the fast subset CI runs a second time against
learned_optimization GitHub main (`.ci/run`; `PATHOLOGY_FIX_LO=main ./run.sh
test`). Listed here, by node id prefix, so test files need no edits.
"""

import pathology_fix  # noqa: F401
import pytest

LO_MAIN_SUBSET = (
    "tests/test_lo_api.py",
    "tests/test_lo_main_shipped_tests.py",
    "tests/test_gin_configs.py",
    "tests/test_train_cli.py::test_short_run_writes_checkpoints_summaries_and_config",
    "tests/test_train_cli.py::test_resume_after_sigkill_continues_from_last_checkpoint",
    "tests/test_train_cli.py::test_bad_input_is_one_error_line",
    "tests/test_tensorboard_events.py",
    "tests/test_end_to_end.py::test_mixture_of_hybrid_and_lo_pes_runs",
    "tests/test_estimators.py::test_estimators_are_unbiased_for_the_smoothed_gradient",
)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.nodeid.startswith(LO_MAIN_SUBSET):
      item.add_marker(pytest.mark.lo_main)
