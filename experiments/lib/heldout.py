"""Held-out evaluation tasks for E5 / E6, and the per-step speed benchmark.

Evaluation itself is `pathology_fix.runtime.evaluation.meta_test` (whole
splits, a fixed init and batch order per task shared by every optimizer,
learning-rate grids vmapped as a `Sweep`).
"""

import time
from typing import Any, Dict, List, Sequence, Tuple

import jax
import numpy as np
from tqdm import tqdm

from experiments.lib.meta_training import ARCH, IMAGE_SIZE
from pathology_fix.tasks_and_data import data
from pathology_fix.tasks_and_data import tasks

Spec = Tuple[str, Sequence[int], int]  # (dataset, classes, seed)


def task_name(dataset: str, classes: Sequence[int]) -> str:
  """E.g. "FMNIST567", "digits038"."""
  prefix = "FMNIST" if dataset == "fashion_mnist" else "digits"
  return prefix + "".join(map(str, classes))


def make_tasks(specs: Sequence[Spec], batch_size: int,
               image_size: int = IMAGE_SIZE,
               arch: str = ARCH) -> Tuple[List[str], List[Any]]:
  """(names, LO Tasks): `arch` on each spec's class subset (split seed
  `seed`, which also fixes its training batch order)."""
  names, out = [], []
  for dataset, classes, seed in specs:
    ds = data.DATASET_FNS[dataset](batch_size=batch_size,
                                   image_size=image_size, classes=classes,
                                   seed=seed)
    out.append(tasks.make_task(arch, ds))
    names.append(task_name(dataset, classes))
  return names, out


def measure_steps_per_second(task, optimizers: Dict[str, Any], steps: int,
                             repeats: int, key=None) -> Dict[str, float]:
  """Median inner steps/s per optimizer; repeats interleave the optimizers.

  optimizers: name -> LO Optimizer instance. One Python-level call of a
  jitted (gradient + update) function per step, on batches already on the
  device (at most 100, cycled).
  """
  key = jax.random.PRNGKey(0) if key is None else key
  params0 = task.init(key)
  it = task.datasets.split("train")
  batches = [jax.device_put(next(it)) for _ in range(min(steps, 100))]
  fns, states = {}, {}
  for name, opt in optimizers.items():

    def one(state, batch, opt=opt):
      loss, grad = jax.value_and_grad(task.loss)(opt.get_params(state), key,
                                                 batch)
      return opt.update(state, grad, loss=loss)

    fns[name] = jax.jit(one)
    states[name] = opt.init(params0, num_steps=steps)
    # Compile; twice, as some states (NNAdam's) change dtype after one step.
    jax.block_until_ready(fns[name](fns[name](states[name], batches[0]),
                                    batches[0]))
  rates = {name: [] for name in optimizers}
  for _ in tqdm(range(repeats), desc="timing", leave=False):
    for name, fn in fns.items():
      state = states[name]
      t0 = time.perf_counter()
      for i in range(steps):
        state = fn(state, batches[i % len(batches)])
      jax.block_until_ready(state)
      rates[name].append(steps / (time.perf_counter() - t0))
  return {name: float(np.median(r)) for name, r in rates.items()}
