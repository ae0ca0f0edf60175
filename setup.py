"""pathology-fix: Metz et al. (ICML 2019) meta-training for learned_optimization.

learned-optimization==0.0.1 declares requirements that do not install on
current Python (dm-launchpad-nightly, flax==0.3.3, ...), so it is installed
with `--no-deps` by `scripts/bootstrap.sh` (what the README's commands run).
`pip install -e .` alone gives every other dependency; then run
`pip install --no-deps learned-optimization==0.0.1`.
"""

import setuptools

LEARNED_OPTIMIZATION = "learned-optimization==0.0.1"

setuptools.setup(
    name="pathology-fix",
    version="0.1.0",
    description=("Variational RP+ES hybrid gradient estimators, truncation "
                 "curriculum and validation meta-objectives for "
                 "learned_optimization"),
    packages=setuptools.find_packages(include=["pathology_fix", "pathology_fix.*", "pathology_fix_core"]),
    # Start-up hook for LO's own binaries; `python -m pathology_fix_startup`
    # writes its .pth (see that module).
    py_modules=["pathology_fix_startup"],
    # The shipped learned optimizers: theta (params_<N>), lopt.gin, record.json.
    package_data={"pathology_fix.pretrained": ["*/params_*", "*/*.gin",
                                               "*/*.json",
                                               "*/snapshots/params_*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax",
        "dm-haiku",
        "flax",
        "optax",
        "gin-config",
        "chex",
        "tqdm",
        "absl-py",
        "numpy",
        # Imported by learned-optimization without being declared.
        "dill",
        "portpicker",
        # TensorBoard event files without TensorFlow, and the viewer.
        "tensorboardX",
        "tensorboard",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest"]},
)
