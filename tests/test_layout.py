"""The layout the README promises: who may import what, and how big a unit may grow."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "pathology_fix_core"
PACKAGE = ROOT / "pathology_fix"
EXPERIMENTS = ROOT / "experiments"
# What the math may import: the standard library's small helpers, jax and numpy.
CORE_ALLOWED = {"jax", "numpy", "math", "typing", "functools", "dataclasses",
                "pathology_fix_core", "__future__"}
MAX_FUNCTION_LINES = 120
MAX_CLASS_LINES = 250
MAX_EXPERIMENT_LINES = 400


def _imported_roots(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module.split(".")[0]


def _python_files(folder: pathlib.Path):
  return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _python_files(CORE), ids=lambda p: p.name)
def test_core_imports_only_jax_and_numpy(path):
  bad = set(_imported_roots(path)) - CORE_ALLOWED
  assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_core_installs_nothing():
  code = (
      "import sys, jax\n"
      "import pathology_fix_core.combine, pathology_fix_core.curriculum\n"
      "import pathology_fix_core.objectives, pathology_fix_core.variational\n"
      "loaded = sorted(m for m in sys.modules\n"
      "                if m.split('.')[0] in ('learned_optimization', 'pathology_fix', 'gin'))\n"
      "print(loaded, hasattr(jax, 'tree_multimap'))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out == "[] False"


def _oversized(paths, limit_function, limit_class):
  found = []
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      limit = {ast.FunctionDef: limit_function,
               ast.AsyncFunctionDef: limit_function,
               ast.ClassDef: limit_class}.get(type(node))
      if limit is not None:
        length = node.end_lineno - node.lineno + 1
        if length > limit:
          found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                       f"({length} lines > {limit})")
  return found


def test_no_function_or_class_is_too_long():
  paths = _python_files(PACKAGE) + _python_files(CORE)
  assert not _oversized(paths, MAX_FUNCTION_LINES, MAX_CLASS_LINES)


def _experiment_scripts():
  return sorted(EXPERIMENTS.glob("*.py"))


def test_experiment_scripts_are_short_and_import_no_other_script():
  scripts = {p.stem for p in _experiment_scripts() if p.stem != "__init__"}
  problems = []
  for path in _experiment_scripts():
    lines = len(path.read_text().splitlines())
    if lines > MAX_EXPERIMENT_LINES:
      problems.append(f"{path.name}: {lines} lines")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      for name in names:
        parts = name.split(".")
        if parts[0] == "experiments" and len(parts) > 1 and parts[1] in scripts:
          problems.append(f"{path.name} imports experiments.{parts[1]}")
  assert not problems, problems


ENTRY_POINTS = {"__init__.py", "train.py", "demo.py"}


@pytest.mark.parametrize(
    "path", [p for p in sorted(PACKAGE.glob("*.py")) if p.name not in ENTRY_POINTS],
    ids=lambda p: p.name)
def test_adapters_do_not_import_the_runtime(path):
  tree = ast.parse(path.read_text())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      imported.add(node.module)
      imported.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      imported.update(a.name for a in node.names)
  assert not any(name.startswith("pathology_fix.runtime") for name in imported)
