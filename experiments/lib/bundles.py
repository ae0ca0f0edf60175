"""Held-out evaluation on task bundles: fixed inits, batch orders, exact splits.

Several same-architecture tasks stacked on a leading axis; every optimizer
(a vmapped hyper-parameter axis: learning rates or stacked thetas) sees the
same init and batch sequence per task, and split losses are exact means over
the whole split. E5 and E6 evaluate with it; `pathology_fix.runtime.evaluation`'s
`meta_test` is the package's evaluator for any LO task (sampled batches).
"""

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.lib.meta_training import ARCH, IMAGE_SIZE
from pathology_fix import data
from pathology_fix import tasks

SPLITS = ("train", "inner_valid", "test")  # evaluation splits, in this order


@dataclasses.dataclass
class TaskBundle:
  """Several same-architecture tasks stacked on a leading [tasks] axis.

  Splits of different sizes are zero-padded; `eval_w` weights each example
  1 / (real size) so the weighted sum is the exact mean over the split.
  """
  names: List[str]
  task: Any  # the LO Task (architecture) shared by all
  init: Any  # params, leaves [T, ...]
  train_x: np.ndarray  # [T, N, S, S, 1]
  train_y: np.ndarray  # [T, N]
  batch_idx: np.ndarray  # int32 [T, steps, B] rows of train_x per step
  eval_x: Tuple[np.ndarray, ...]  # per split in `eval_splits`: [T, M, ...]
  eval_y: Tuple[np.ndarray, ...]
  eval_w: Tuple[np.ndarray, ...]
  eval_splits: Tuple[str, ...]


def _pad(arrays: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
  n = max(a.shape[0] for a in arrays)
  out = np.zeros((len(arrays), n) + arrays[0].shape[1:], arrays[0].dtype)
  mask = np.zeros((len(arrays), n), np.float32)
  for i, a in enumerate(arrays):
    out[i, :a.shape[0]] = a
    mask[i, :a.shape[0]] = 1.0 / a.shape[0]
  return out, mask


def _batch_indices(n: int, steps: int, batch: int, rng) -> np.ndarray:
  # Epoch-wise permutations, as the datasets' own iterators draw them.
  epochs = -(-steps * batch // n) + 1
  order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
  return order[:steps * batch].reshape(steps, batch).astype(np.int32)


def build_bundle(specs: Sequence[Tuple[str, Sequence[int], int]], *,
                 steps: int, batch_size: int,
                 eval_splits: Sequence[str] = SPLITS,
                 train_eval_examples: Optional[int] = None,
                 image_size: int = IMAGE_SIZE, arch: str = ARCH
                 ) -> TaskBundle:
  """specs: (dataset "fashion_mnist" | "digits", classes, seed) per task.

  The "train" evaluation split is a fixed random subset of at most
  `train_eval_examples` training examples (cost); the others are whole.
  """
  names, inits, tx, ty, idx = [], [], [], [], []
  ev = {s: ([], []) for s in eval_splits}
  task = None
  for dataset, classes, seed in specs:
    ds = data.DATASET_FNS[dataset](batch_size=batch_size,
                                   image_size=image_size, classes=classes,
                                   seed=seed)
    task = task or tasks.make_task(arch, ds)
    names.append(f"{'FMNIST' if dataset == 'fashion_mnist' else 'digits'}"
                 f"{''.join(map(str, classes))}")
    rng = np.random.default_rng(seed)
    inits.append(task.init(jax.random.PRNGKey(seed)))
    train = ds.split_arrays("train")
    tx.append(train["image"])
    ty.append(train["label"])
    idx.append(_batch_indices(train["label"].shape[0], steps, batch_size, rng))
    for s in eval_splits:
      arr = ds.split_arrays(s)
      x, y = arr["image"], arr["label"]
      if s == "train" and train_eval_examples and x.shape[0] > train_eval_examples:
        keep = np.sort(rng.choice(x.shape[0], train_eval_examples, False))
        x, y = x[keep], y[keep]
      ev[s][0].append(x)
      ev[s][1].append(y)
  train_x, _ = _pad(tx)
  train_y, _ = _pad(ty)
  eval_x, eval_y, eval_w = [], [], []
  for s in eval_splits:
    x, w = _pad(ev[s][0])
    y, _ = _pad(ev[s][1])
    eval_x.append(x)
    eval_y.append(y)
    eval_w.append(w)
  init = jax.tree_util.tree_map(lambda *a: np.stack(a), *inits)
  return TaskBundle(names, task, init, train_x, train_y, np.stack(idx),
                    tuple(eval_x), tuple(eval_y), tuple(eval_w),
                    tuple(eval_splits))


def _per_example_ce(task, params, x, y):
  # No dropout in these MLPs, but haiku asks for a key all the same.
  logits = task._mod.apply(params, jax.random.PRNGKey(0), x)  # pylint: disable=protected-access
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


# Optimizers as (init(params), step(state, grad, loss), params(state)).

def learned_optimizer(lopt, theta, num_steps: int):
  opt = lopt.opt_fn(theta)
  return ((lambda p: opt.init(p, num_steps=num_steps)),
          (lambda s, g, l: opt.update(s, g, loss=l)), opt.get_params)


def train_curves(bundle: TaskBundle, make_opt: Callable[[Any], Tuple],
                 hypers, steps: int, eval_every: int) -> np.ndarray:
  """Trains every task with every hyper-parameter; exact split losses.

  make_opt(hyper) -> (init, step, params). hypers: pytree with a leading
  [H] axis (learning rates, or stacked thetas).

  Returns:
    float [tasks, H, steps // eval_every + 1, len(eval_splits)]: loss on each
    evaluation split at steps 0, eval_every, 2 eval_every, ... (NaN if the run
    diverged).
  """
  task = bundle.task
  key = jax.random.PRNGKey(0)  # the MLPs here have no randomness (no dropout)
  num_evals = steps // eval_every

  def evaluate(params, ex, ey, ew):
    return jnp.stack([jnp.sum(_per_example_ce(task, params, x, y) * w)
                      for x, y, w in zip(ex, ey, ew)])

  def run(hyper, params0, tx, ty, idx, ex, ey, ew):
    init, step, get = make_opt(hyper)

    def inner(state, rows):
      loss, grad = jax.value_and_grad(task.loss)(
          get(state), key, {"image": tx[rows], "label": ty[rows]})
      return step(state, grad, loss), None

    def segment(state, rows):
      state, _ = jax.lax.scan(inner, state, rows)
      return state, evaluate(get(state), ex, ey, ew)

    rows = idx[:num_evals * eval_every].reshape(num_evals, eval_every, -1)
    _, losses = jax.lax.scan(segment, init(params0), rows)
    return jnp.concatenate([evaluate(params0, ex, ey, ew)[None], losses])

  per_hyper = jax.vmap(run, in_axes=(0,) + (None,) * 7)
  fn = jax.jit(per_hyper)
  out = []
  for t in range(len(bundle.names)):  # one task at a time bounds memory
    pick = lambda a: a[t]  # pylint: disable=cell-var-from-loop
    out.append(np.asarray(fn(
        hypers, jax.tree_util.tree_map(pick, bundle.init), bundle.train_x[t],
        bundle.train_y[t], bundle.batch_idx[t],
        tuple(map(pick, bundle.eval_x)), tuple(map(pick, bundle.eval_y)),
        tuple(map(pick, bundle.eval_w)))))
  return np.stack(out)


# ---------------------------------------------------------------------------
# Per-step speed: jitted single steps, the way a training loop runs.


def measure_steps_per_second(bundle: TaskBundle, optimizers: Dict[str, Any],
                             steps: int, repeats: int) -> Dict[str, float]:
  """Median inner steps/s per optimizer; repeats interleave the optimizers.

  optimizers: name -> LO Optimizer instance. One Python-level call of a
  jitted (batch gather + gradient + update) function per step.
  """
  task = bundle.task
  key = jax.random.PRNGKey(0)
  params0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), bundle.init)
  tx, ty = jnp.asarray(bundle.train_x[0]), jnp.asarray(bundle.train_y[0])
  idx = jnp.asarray(bundle.batch_idx[0])
  fns, states = {}, {}
  for name, opt in optimizers.items():

    def one(state, rows, opt=opt):
      params = opt.get_params(state)
      loss, grad = jax.value_and_grad(task.loss)(
          params, key, {"image": tx[rows], "label": ty[rows]})
      return opt.update(state, grad, loss=loss)

    fns[name] = jax.jit(one)
    states[name] = opt.init(params0, num_steps=steps)
    jax.block_until_ready(fns[name](states[name], idx[0]))  # compile
  rates = {name: [] for name in optimizers}
  for _ in tqdm(range(repeats), desc="timing", leave=False):
    for name, fn in fns.items():
      state = states[name]
      t0 = time.perf_counter()
      for i in range(steps):
        state = fn(state, idx[i % idx.shape[0]])
      jax.block_until_ready(state)
      rates[name].append(steps / (time.perf_counter() - t0))
  return {name: float(np.median(r)) for name, r in rates.items()}
