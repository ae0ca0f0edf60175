"""The layout docs/architecture.md describes: folders are layers, imports run one way.

Every import statement counts, at module level or inside a function.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "pathology_fix_core"
PACKAGE = ROOT / "pathology_fix"
EXPERIMENTS = ROOT / "experiments"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"

# Bottom to top. A module may import its own package and lower layers only;
# packages that share a layer do not import each other.
LAYERS = (
    ("pathology_fix_core",),
    ("pathology_fix.lo_boundary",),
    ("pathology_fix.meta_gradient",),
    ("pathology_fix.tasks_and_data", "pathology_fix.optimizers"),
    ("pathology_fix.runtime",),
    ("pathology_fix.pretrained", "pathology_fix.cli"),
)
# The package face and its helpers, which sit outside the layers: what
# `import pathology_fix` loads, and the old `-m` names of the CLI tools.
FACE = "pathology_fix"
FACE_MODULES = ("pathology_fix.version", "pathology_fix.old_module_paths")
FACE_LAYERS = 4  # the face registers gin configurables up to this layer
SHIMS = {"pathology_fix.train": "pathology_fix.cli.train",
         "pathology_fix.demo": "pathology_fix.cli.demo"}
# What the math may import: the standard library's small helpers, jax and numpy.
CORE_ALLOWED = {"jax", "numpy", "math", "typing", "functools", "dataclasses",
                "pathology_fix_core", "__future__"}
MAX_FUNCTION_LINES = 120
MAX_CLASS_LINES = 250
MAX_EXPERIMENT_LINES = 400


def _python_files(folder: pathlib.Path):
  return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  if parts[0] == "tests":  # pytest puts tests/ on the path: `import cli_utils`
    parts = ["tests"] + parts[1:]
  return ".".join(parts)


def _project_modules():
  files = (_python_files(PACKAGE) + _python_files(CORE) +
           _python_files(EXPERIMENTS) + _python_files(ROOT / "tests") +
           [ROOT / "pathology_fix_startup.py"])
  return {_module_name(p): p for p in files}


MODULES = _project_modules()


def _resolve(name: str):
  """The project module `name` is, or its nearest project parent; else None."""
  if name in MODULES:
    return name
  if f"tests.{name}" in MODULES:
    return f"tests.{name}"
  parent = name.rpartition(".")[0]
  return _resolve(parent) if parent else None


def imports_of(module: str):
  """The project modules `module` imports (any import statement in it)."""
  found = set()
  for node in ast.walk(ast.parse(MODULES[module].read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      target = _resolve(name)
      if target is not None and target != module:
        found.add(target)
  return found


def _layer(module: str):
  """(layer index, package) of a module in the layers, or None."""
  for index, packages in enumerate(LAYERS):
    for package in packages:
      if module == package or module.startswith(package + "."):
        return index, package
  return None


def _layered_modules():
  return sorted(m for m in MODULES if _layer(m) is not None)


def test_every_module_of_the_package_has_a_layer():
  package_modules = [m for m in MODULES if m.split(".")[0] in (
      "pathology_fix", "pathology_fix_core")]
  homeless = [m for m in package_modules if _layer(m) is None and
              m not in (FACE, *FACE_MODULES, *SHIMS)]
  assert not homeless, f"modules outside every layer: {homeless}"


@pytest.mark.parametrize("module", _layered_modules())
def test_imports_run_down_the_layers(module):
  own_index, own_package = _layer(module)
  bad = []
  for target in imports_of(module):
    where = _layer(target)
    if where is None:
      if target.split(".")[0] in ("pathology_fix", "pathology_fix_core"):
        bad.append(f"{target} (the package face, a shim or an old path)")
      continue
    index, package = where
    if index > own_index or (index == own_index and package != own_package):
      bad.append(f"{target} (layer {index}, {package})")
  assert not bad, f"{module} (layer {own_index}) imports {bad}"


@pytest.mark.parametrize("path", _python_files(CORE), ids=lambda p: p.name)
def test_core_imports_only_jax_and_numpy(path):
  roots = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      roots.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      roots.add(node.module.split(".")[0])
  bad = roots - CORE_ALLOWED
  assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_face_imports_the_layers_up_to_the_registered_ones():
  for target in imports_of(FACE):
    where = _layer(target)
    assert target in FACE_MODULES or (
        where is not None and where[0] < FACE_LAYERS), target


def test_the_shims_import_only_their_cli_tool():
  for shim, tool in SHIMS.items():
    assert imports_of(shim) == {tool}, shim


def test_importing_the_core_installs_nothing():
  code = (
      "import sys, jax\n"
      "import pathology_fix_core.combine, pathology_fix_core.curriculum\n"
      "import pathology_fix_core.objectives, pathology_fix_core.variational\n"
      "import pathology_fix_core.averaging, pathology_fix_core.errors\n"
      "loaded = sorted(m for m in sys.modules\n"
      "                if m.split('.')[0] in ('learned_optimization', 'pathology_fix', 'gin'))\n"
      "print(loaded, hasattr(jax, 'tree_multimap'))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out == "[] False"


def test_importing_the_package_loads_no_runtime_and_applies_compat():
  code = (
      "import sys, jax, pathology_fix\n"
      "above = sorted(m for m in sys.modules if m.startswith(\n"
      "    ('pathology_fix.runtime', 'pathology_fix.cli',\n"
      "     'pathology_fix.pretrained')))\n"
      "print(above, hasattr(jax, 'tree_multimap'))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out.splitlines()[-1] == "[] True"


def test_old_module_paths_give_the_moved_modules():
  code = (
      "import importlib, gin, pathology_fix\n"
      "from pathology_fix import old_module_paths\n"
      "same = all(importlib.import_module(old) is importlib.import_module(new)\n"
      "           for old, new in old_module_paths.MOVED.items())\n"
      "gin.parse_config('import pathology_fix.tasks\\n'\n"
      "                 'import pathology_fix.progress_lopt\\n'\n"
      "                 'ProgressAdam.initial_learning_rate = 0.1')\n"
      "from pathology_fix import estimators, train\n"
      "print(same, estimators.HybridRPES.__module__, train.execute.__module__)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out.splitlines()[-1] == (
      "True pathology_fix.meta_gradient.estimators pathology_fix.cli.train")


def _cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in graph[node]:
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_no_import_cycles_anywhere():
  graph = {module: imports_of(module) for module in MODULES}
  assert not _cycles(graph)


def test_the_cycle_check_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]


def test_the_architecture_doc_names_every_layer_and_module():
  doc = ARCHITECTURE_DOC.read_text()
  missing = [package.split(".")[-1] + "/" for packages in LAYERS
             for package in packages
             if package.split(".")[-1] + "/" not in doc]
  missing += [path.name for path in _python_files(PACKAGE) + _python_files(CORE)
              if path.name != "__init__.py" and path.name not in doc]
  assert not missing, f"docs/architecture.md does not mention {missing}"


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
