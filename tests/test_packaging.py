"""What a user gets from `pip install .`: version, license, tested versions, a wheel.

The slow test does what a user outside this repository does (README,
"Installing without ./run.sh"): a wheel, a fresh virtualenv with the tested
constraints and learned-optimization 0.0.1 --no-deps, the start-up hook, then
the pretrained optimizers through optax and `python -m pathology_fix.train`,
run from a folder outside the checkout.
"""

import json
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import setuptools

import pathology_fix
from pathology_fix import pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
LEARNED_OPTIMIZATION = "learned-optimization==0.0.1"
# Generous: ~800 MB of wheels on a shared 2-core machine.
INSTALL_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 600
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def _setup_kwargs():
  """The arguments setup.py passes to setuptools.setup (nothing is built)."""
  captured = {}
  real = setuptools.setup
  setuptools.setup = lambda **kwargs: captured.update(kwargs)
  try:
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
  finally:
    setuptools.setup = real
  return captured


def _canonical(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _constraints():
  pins = {}
  for line in CONSTRAINTS.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, _, version = line.partition("==")
      assert version, f"constraints.txt: {line!r} is not an exact pin"
      pins[_canonical(name)] = version
  return pins


def _requirement(spec):
  """'numpy>=2.4.6,<3' -> ('numpy', {'>=': '2.4.6', '<': '3'})."""
  name = _NAME.match(spec).group(1)
  bounds = dict(re.findall(r"(>=|<=|==|<|>)\s*([^,\s]+)", spec[len(name):]))
  return _canonical(name), bounds


def test_version_is_one_number_in_setup_package_and_changelog():
  kwargs = _setup_kwargs()
  assert kwargs["version"] == pathology_fix.__version__
  first = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M)
  assert first is not None, "CHANGELOG.md has no '## <version>' entry"
  assert first.group(1) == pathology_fix.__version__


def test_license_file_setup_and_every_shipped_record_name_apache_2():
  text = (REPO / "LICENSE").read_text()
  assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"], text[:80]
  assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
  assert _setup_kwargs()["license"] == pretrained.LICENSE == "Apache-2.0"
  assert pretrained.names()
  for name in pretrained.names():
    assert pretrained.record(name).get("license") == pretrained.LICENSE, name


def test_every_requirement_is_pinned_and_bounded_below_by_the_pin():
  pins = _constraints()
  kwargs = _setup_kwargs()
  requirements = kwargs["install_requires"] + [
      r for extra in kwargs["extras_require"].values() for r in extra]
  for spec in requirements:
    name, bounds = _requirement(spec)
    assert name in pins, f"{spec}: not in constraints.txt"
    # The lower bound is the tested version: what the constraints install.
    assert bounds.get(">=") == pins[name], (spec, pins[name])
  assert "pathology-fix" not in pins and "learned-optimization" not in pins


def _package_folders():
  found = set()
  for top in ("pathology_fix", "pathology_fix_core"):
    for init in (REPO / top).rglob("__init__.py"):
      if "__pycache__" not in init.parts:
        found.add(".".join(init.parent.relative_to(REPO).parts))
  return found


def test_setup_ships_every_package_and_the_pretrained_files():
  kwargs = _setup_kwargs()
  assert set(kwargs["packages"]) == _package_folders()
  shipped = set(kwargs["package_data"]["pathology_fix.pretrained"])
  root = pathlib.Path(pretrained.__file__).parent
  for name in pretrained.names():
    on_disk = {str(p.relative_to(root)) for p in (root / name).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk and on_disk <= shipped, sorted(on_disk - shipped)


# --- the slow test: a non-editable install in a fresh virtualenv -------------


def _run(cmd, timeout, **kwargs):
  return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                        timeout=timeout, **kwargs)


def _describe(proc):
  return (f"$ {' '.join(proc.args)}\nexit {proc.returncode}\n"
          f"--- stdout ---\n{proc.stdout[-4000:]}\n"
          f"--- stderr ---\n{proc.stderr[-4000:]}")


def _pip(python, *args, tmp_path, timeout=INSTALL_TIMEOUT_S):
  """Runs pip; skips the test if the failure is that no index is reachable."""
  proc = _run([python, "-m", "pip", *args], timeout, env=_outside_env())
  if proc.returncode != 0:
    probe = _run([python, "-m", "pip", "download", "--no-deps",
                  "--dest", tmp_path / "probe", "--no-cache-dir",
                  f"tqdm=={_constraints()['tqdm']}"], RUN_TIMEOUT_S,
                 env=_outside_env())
    if probe.returncode != 0:
      last = (probe.stderr.strip().splitlines() or ["?"])[-1]
      pytest.skip(f"pip cannot reach a package index: {last}")
  assert proc.returncode == 0, _describe(proc)
  return proc


def _outside_env():
  # Nothing that would put the checkout (or another environment) on sys.path.
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                      "VIRTUAL_ENV", "PYTHONUSERBASE")}
  env["PYTHONNOUSERSITE"] = "1"
  return env


def _copy_of_checkout(dest):
  """The checkout's files (tracked, or new and not ignored) under `dest`.

  Building there keeps setuptools' build/ and *.egg-info out of the
  checkout; a stale build/lib would also leak removed files into a wheel.
  """
  listing = _run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                  "--exclude-standard"], RUN_TIMEOUT_S)
  if listing.returncode != 0:  # not a git checkout: copy all but build output
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "runs"))
    return dest
  for rel in filter(None, listing.stdout.split("\0")):
    if (REPO / rel).is_file():  # listed but deleted files are skipped
      (dest / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / rel, dest / rel)
  return dest


USE_INSTALLED = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, optax
    import pathology_fix
    import pathology_fix.pretrained as pretrained

    def loss_fn(p):
      return jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum((p["b"] - 1.0) ** 2)

    losses = {}
    for name in pretrained.names():
      params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.zeros(2)}
      opt = pretrained.optax(name, num_steps=10)
      state = opt.init(params)
      for _ in range(10):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, loss=loss)
        params = optax.apply_updates(params, updates)
      losses[name] = [float(loss_fn({"w": jnp.array([1.0, -2.0, 3.0]),
                                     "b": jnp.zeros(2)})),
                      float(loss_fn(params))]
    print(json.dumps({
        "file": pathology_fix.__file__, "version": pathology_fix.__version__,
        "sys_path": sys.path, "names": pretrained.names(),
        "licenses": [pretrained.record(n)["license"]
                     for n in pretrained.names()],
        "losses": losses}))
    """)
STARTUP_HOOK = ("import sys, learned_optimization; "
                "print('pathology_fix' in sys.modules)")


@pytest.mark.slow
def test_wheel_in_a_fresh_virtualenv_from_outside_the_checkout(tmp_path):
  dist, venv = tmp_path / "dist", tmp_path / "venv"
  outside = tmp_path / "outside"
  outside.mkdir()

  # 1. The wheel, built as pip builds it for a user (isolated build).
  source = _copy_of_checkout(tmp_path / "source")
  _pip(sys.executable, "wheel", "--no-deps", "--wheel-dir", dist, source,
       tmp_path=tmp_path)
  wheels = list(dist.glob("pathology_fix-*.whl"))
  assert len(wheels) == 1, list(dist.iterdir())
  assert wheels[0].name.startswith(f"pathology_fix-{pathology_fix.__version__}-")
  names = zipfile.ZipFile(wheels[0]).namelist()
  for name in pretrained.names():
    assert f"pathology_fix/pretrained/{name}/record.json" in names, name
  assert any(n.endswith(".dist-info/licenses/LICENSE")
             or n.endswith(".dist-info/LICENSE") for n in names), names
  assert not [n for n in names if n.startswith(("tests/", "experiments/"))]

  # 2. A fresh virtualenv: the wheel (not editable) at the tested versions.
  proc = _run([sys.executable, "-m", "venv", venv], RUN_TIMEOUT_S,
              env=_outside_env())
  assert proc.returncode == 0, _describe(proc)
  python = venv / "bin" / "python"
  _pip(python, "install", "-q", "-c", CONSTRAINTS, wheels[0],
       tmp_path=tmp_path)
  _pip(python, "install", "-q", "--no-deps", LEARNED_OPTIMIZATION,
       tmp_path=tmp_path)
  proc = _run([python, "-m", "pathology_fix_startup"], RUN_TIMEOUT_S,
              cwd=outside, env=_outside_env())
  assert proc.returncode == 0, _describe(proc)
  site = pathlib.Path(proc.stdout.split("wrote ", 1)[1].strip()).parent
  assert site.is_relative_to(venv), proc.stdout

  # 3. From outside the checkout: the hook, the pretrained optimizers, train.
  proc = _run([python, "-c", STARTUP_HOOK], RUN_TIMEOUT_S, cwd=outside,
              env=_outside_env())
  assert proc.returncode == 0 and proc.stdout.strip() == "True", _describe(proc)

  proc = _run([python, "-c", USE_INSTALLED], RUN_TIMEOUT_S, cwd=outside,
              env=_outside_env())
  assert proc.returncode == 0, _describe(proc)
  used = json.loads(proc.stdout.strip().splitlines()[-1])
  assert pathlib.Path(used["file"]).is_relative_to(site), used["file"]
  assert not any(str(REPO) == p or p.startswith(str(REPO) + os.sep)
                 for p in used["sys_path"]), used["sys_path"]
  assert used["version"] == pathology_fix.__version__
  assert used["names"] == pretrained.names() and used["names"]
  assert set(used["licenses"]) == {"Apache-2.0"}
  for name, (first, last) in used["losses"].items():
    # 10 optax steps of a shipped optimizer make progress on a quadratic.
    assert last < 0.95 * first, (name, first, last)

  run_dir = tmp_path / "run"
  proc = _run([python, "-m", "pathology_fix.train",
               "--config_file", REPO / "gin_configs" / "hybrid_quadratic.gin",
               "--gin_bindings", "run_train.num_steps = 2",
               "--train_log_dir", run_dir], RUN_TIMEOUT_S, cwd=outside,
              env=_outside_env())
  assert proc.returncode == 0, _describe(proc)
  written = set(os.listdir(run_dir))
  assert {"params_0", "params_2", "checkpoint_2", "config.gin"} <= written, (
      written)
  assert "HybridRPES" in (run_dir / "config.gin").read_text()
