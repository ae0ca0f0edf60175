"""Applies pathology_fix's compatibility layer before any test imports LO."""

import pathology_fix  # noqa: F401
