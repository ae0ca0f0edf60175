"""Learned optimizers shipped with the package, ready to use.

  import pathology_fix.pretrained as pretrained
  opt = pretrained.optax("mlp_lopt_demo_fmnist8", num_steps=1000)
  ...
  updates, opt_state = opt.update(grads, opt_state, params, loss=loss)

Each optimizer is a folder `<name>/` here: `params_<N>` (its theta, LO's
`ParameterCheckpoint` as written by `pathology_fix.train`; read with
`runtime.checkpoints.load_params`), `lopt.gin` (the constructor arguments
of its architecture) and `record.json` (its license, and how it was made:
command, seed, meta-training minutes and steps, git commit, held-out results).
Rebuild one with `python -m experiments.pretrain <name>`. The thetas are
under the package's license (LICENSE, Apache-2.0), named in each record.
"""

import importlib.resources
import json
import os
from typing import Any, Dict, List, Tuple

from gin import config as gin_config
from gin import config_parser

from learned_optimization.learned_optimizers import adafac_mlp_lopt
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.learned_optimizers import mlp_lopt
from learned_optimization.learned_optimizers import nn_adam
from pathology_fix.optimizers import paper_lopt
from pathology_fix.optimizers import progress_lopt
from pathology_fix.pretrained.adapter import lopt_to_optax
from pathology_fix.runtime import checkpoints

ARCHITECTURE_FILE = "lopt.gin"
RECORD_FILE = "record.json"
# The shipped thetas' license: the package's own (LICENSE).
LICENSE = "Apache-2.0"
# The architectures a lopt.gin may name (gin name -> class).
LEARNED_OPTIMIZERS = {
    "MLPLOpt": mlp_lopt.MLPLOpt,
    "AdafacMLPLOpt": adafac_mlp_lopt.AdafacMLPLOpt,
    "PaperMLPLOpt": paper_lopt.PaperMLPLOpt,
    "NNAdam": nn_adam.NNAdam,
    "ProgressAdam": progress_lopt.ProgressAdam,
}

__all__ = ["names", "load", "optax", "record", "path", "lopt_to_optax",
           "read_architecture", "LEARNED_OPTIMIZERS", "LICENSE"]


def _root() -> str:
  # A regular (unzipped) install: the package folder is on disk.
  return os.fspath(importlib.resources.files(__name__))


def names() -> List[str]:
  """The shipped optimizers' names (folders holding a record.json), sorted."""
  root = _root()
  return sorted(n for n in os.listdir(root)
                if os.path.isfile(os.path.join(root, n, RECORD_FILE)))


def path(name: str) -> str:
  """The folder of the shipped optimizer `name`."""
  available = names()
  if name not in available:
    raise ValueError(f"pretrained.name {name!r} is not a shipped optimizer; "
                     f"shipped: {available}")
  return os.path.join(_root(), name)


def record(name: str) -> Dict[str, Any]:
  """The JSON record of how `name` was meta-trained and how it did."""
  with open(os.path.join(path(name), RECORD_FILE)) as f:
    return json.load(f)


def read_architecture(gin_path: str) -> lopt_base.LearnedOptimizer:
  """Builds the learned optimizer a lopt.gin describes, without touching gin.

  The file holds unscoped literal bindings of ONE class in
  `LEARNED_OPTIMIZERS` (e.g. `MLPLOpt.hidden_size = 32`). They are passed as
  explicit arguments, so the user's own gin bindings cannot change them.
  """
  with open(gin_path) as f:
    parser = config_parser.ConfigParser(f, gin_config.ParserDelegate())
    statements = list(parser)
  kwargs, classes = {}, set()
  for st in statements:
    if isinstance(st, config_parser.ImportStatement):
      continue
    if not isinstance(st, config_parser.BindingStatement) or st.scope:
      raise ValueError(f"{gin_path}: only unscoped bindings are allowed, got "
                       f"{st!r}")
    classes.add(st.selector)
    kwargs[st.arg_name] = st.value
  if len(classes) != 1 or next(iter(classes)) not in LEARNED_OPTIMIZERS:
    raise ValueError(f"{gin_path}: must bind exactly one of "
                     f"{sorted(LEARNED_OPTIMIZERS)}, got {sorted(classes)}")
  return LEARNED_OPTIMIZERS[classes.pop()](**kwargs)


def load(name: str) -> Tuple[lopt_base.LearnedOptimizer, Any]:
  """(learned_opt, theta) of the shipped optimizer `name`.

  `learned_opt.opt_fn(theta)` is an LO Optimizer; `lopt_to_optax` (or
  `pretrained.optax`) makes it an optax transformation.
  """
  folder = path(name)
  learned_opt = read_architecture(os.path.join(folder, ARCHITECTURE_FILE))
  steps = checkpoints.checkpoint_steps(folder, checkpoints.PARAMS_PREFIX)
  if len(steps) != 1:
    raise ValueError(f"{folder}: expected exactly one params_<N> file, found "
                     f"steps {sorted(steps)}")
  return learned_opt, checkpoints.load_params(folder, steps[0], learned_opt)


def optax(name: str, num_steps: int):  # pylint: disable=redefined-outer-name
  """The shipped optimizer `name` as an `optax.GradientTransformationExtraArgs`.

  Use it in an optax loop, passing the training loss as an extra argument:

    opt = pretrained.optax(name, num_steps)
    opt_state = opt.init(params)
    for _ in range(num_steps):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = opt.update(grads, opt_state, params, loss=loss)
      params = optax_lib.apply_updates(params, updates)
  """
  learned_opt, theta = load(name)
  return lopt_to_optax(learned_opt, theta, num_steps)
