"""pathology-fix: Metz et al. (ICML 2019) meta-training for learned_optimization.

learned-optimization==0.0.1 declares requirements that do not install on
current Python (dm-launchpad-nightly, flax==0.3.3, ...), so it is installed
with `--no-deps` after this package (README, "Installing without ./run.sh"):

  pip install -c constraints.txt .     # the tested versions; or without -c
  pip install --no-deps learned-optimization==0.0.1
  python -m pathology_fix_startup

Lower bounds below are the versions in constraints.txt (the only ones tested);
upper bounds only where a newer major release is expected to break.
"""

import os
import re

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))
LEARNED_OPTIMIZATION = "learned-optimization==0.0.1"
# Ours and every sub-package to come.
PACKAGES = ["pathology_fix", "pathology_fix.*",
            "pathology_fix_core", "pathology_fix_core.*"]


def read_version():
  # As text: importing pathology_fix would patch jax, flax and LO.
  with open(os.path.join(HERE, "pathology_fix", "version.py")) as f:
    match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
  if match is None:
    raise RuntimeError("pathology_fix/version.py: no __version__ line")
  return match.group(1)


def data_files_of(packages):
  """Every file in a package's folders that are not packages themselves.

  E.g. pathology_fix/pretrained/<name>/{params_N,lopt.gin,record.json,
  snapshots/params_N}: a new optimizer, file kind or folder ships without
  an edit here, wherever the package that holds it moves.
  """
  package_data = {}
  for package in packages:
    root = os.path.join(HERE, *package.split("."))
    files = []
    for entry in sorted(os.listdir(root)):
      folder = os.path.join(root, entry)
      if not os.path.isdir(folder) or entry.startswith((".", "__")):
        continue
      if os.path.isfile(os.path.join(folder, "__init__.py")):
        continue  # a sub-package: find_packages lists it
      for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames
                       if not d.startswith((".", "__pycache__"))]
        files += [os.path.relpath(os.path.join(dirpath, n), root)
                  for n in filenames
                  if not n.startswith(".") and not n.endswith((".pyc", ".pyo"))]
    if files:
      package_data[package] = sorted(files)
  return package_data


packages = setuptools.find_packages(where=HERE, include=PACKAGES)

setuptools.setup(
    name="pathology-fix",
    version=read_version(),
    description=("Variational RP+ES hybrid gradient estimators, truncation "
                 "curriculum and validation meta-objectives for "
                 "learned_optimization"),
    license="Apache-2.0",
    packages=packages,
    # Start-up hook for LO's own binaries; `python -m pathology_fix_startup`
    # writes its .pth (see that module).
    py_modules=["pathology_fix_startup"],
    # The shipped learned optimizers: theta (params_<N>), lopt.gin, record.json.
    package_data=data_files_of(packages),
    # jax, jaxlib, flax and numpy at the versions below need 3.11.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "dm-haiku>=0.0.17",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "gin-config>=0.5.0",
        "chex>=0.1.92",
        "tqdm>=4.70.1",
        "absl-py>=2.5.1",
        # numpy 3 does not exist yet; 2.0 removed `numpy.product`, which LO
        # uses (compat.py restores it): a new major is expected to remove more.
        "numpy>=2.4.6,<3",
        # Imported by learned-optimization without being declared.
        "dill>=0.4.1",
        "portpicker>=1.6.0",
        # TensorBoard event files without TensorFlow, and the viewer.
        "tensorboardX>=2.6.5",
        "tensorboard>=2.21.0",
        "matplotlib>=3.11.2",
        "scikit-learn>=1.9.1",
    ],
    extras_require={"test": ["pytest>=9.2.0"]},
)
