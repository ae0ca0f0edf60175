"""Meta-test: optimizers train fresh inner problems from scratch.

The training run's `mean_loss` is read at wherever the truncated unrolls of
that step happen to be in their inner runs, so it mostly tracks inner
progress. Whether meta-training helped is answered here instead: whole inner
runs with fixed data and keys, for several optimizers side by side (e.g.
params_0 and the latest params of a run, and hand-designed baselines such as
Adam at a grid of learning rates). Per task, every entry starts from the same
initialization and sees the same batch sequence.

Compilations: one per task and learned optimizer (all thetas share it), one
per task and hand-designed optimizer, one per task and `Sweep` (a family of
optimizers over a hyper-parameter axis, e.g. learning rates or stacked
thetas, run vmapped in one call).

Split losses are the mean over `num_eval_batches` sampled batches, or with
`whole_splits=True` the exact mean over every example of the split (or of a
fixed subset, `max_eval_examples`).

`meta_test` returns the means over tasks (a dict), with the per-task rows
(`.per_task`) and the loss curves (`.curves`) attached.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from learned_optimization.optimizers import base as opt_base
import numpy as np
import optax

EVAL_SPLITS = ("train", "outer_valid", "test")
EVAL_CHUNK_SIZE = 512  # examples per forward pass of a whole-split loss


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Optimizers `make(v)` for each v along the leading axis of `values`.

  make: value -> LO `Optimizer` or optax GradientTransformation (e.g.
    `lambda lr: optax.adam(lr)`, or a learned optimizer's `opt_fn`).
  values: pytree whose leaves have a leading axis [H] (learning rates, or
    thetas stacked with `jax.tree_util.tree_map(jnp.stack, ...)`).
  labels: H strings; entry i is reported as "<key> <labels[i]>" (see
    `sweep_names`) where key is the Sweep's name in `meta_test`'s entries.

  All H runs share one compilation and one vmapped call per task.
  """
  make: Callable[[Any], Any]
  values: Any
  labels: Sequence[str]


def learning_rate_sweep(make: Callable[[Any], Any],
                        learning_rates: Sequence[float]) -> Sweep:
  """Sweep over learning rates, labelled "lr=<lr:.3g>"."""
  lrs = [float(lr) for lr in learning_rates]
  return Sweep(make, jnp.asarray(lrs, jnp.float32),
               tuple(f"lr={lr:.3g}" for lr in lrs))


def sweep_names(key: str, sweep: Sweep) -> List[str]:
  """The names under which `meta_test` reports the entries of `sweep`."""
  return [f"{key} {label}" for label in sweep.labels]


def _batches(task, split: str, count: int):
  """`count` batches of `task`'s split stacked on a leading axis (or ())."""
  if task.datasets is None:
    return ()
  it = task.datasets.split(split)
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                *[next(it) for _ in range(count)])


def _whole_split(task, split: str, max_examples: Optional[int], seed: int):
  """Every example of the split (or a fixed random subset of max_examples)."""
  arrays = task.datasets.split_arrays(split)
  n = jax.tree_util.tree_leaves(arrays)[0].shape[0]
  if max_examples is not None and n > max_examples:
    keep = np.sort(np.random.default_rng(seed).choice(n, max_examples, False))
    arrays = jax.tree_util.tree_map(lambda a: a[keep], arrays)
  return arrays


def _padded(examples, size: int):
  """(examples zero-padded to `size` rows, weights [size]: 1/N real, 0 pad)."""
  n = jax.tree_util.tree_leaves(examples)[0].shape[0]
  pad = lambda a: np.concatenate(  # noqa: E731
      [a, np.zeros((size - n,) + a.shape[1:], a.dtype)])
  weights = np.where(np.arange(size) < n, 1.0 / n, 0.0).astype(np.float32)
  return jax.tree_util.tree_map(pad, examples), weights


def exact_mean_loss(example_loss: Callable[[Any], jnp.ndarray], examples,
                    weights, chunk_size: int) -> jnp.ndarray:
  """sum_i weights_i example_loss(example_i), in chunks of chunk_size.

  example_loss(one example, leaves without the batch axis) -> scalar;
  examples: leaves [M, ...] with M a multiple of chunk_size; weights: [M]
  (1/N on the N real examples, 0 on padding, so the sum is their exact mean
  and padded splits of different sizes can share one compilation).
  """
  m = weights.shape[0]
  chunked = jax.tree_util.tree_map(
      lambda a: a.reshape((m // chunk_size, chunk_size) + a.shape[1:]),
      (examples, weights))

  def chunk_sum(xw):
    x, w = xw
    losses = jax.vmap(example_loss)(x)
    return jnp.sum(jnp.where(w > 0, losses, 0.) * w)  # padding may be NaN

  return jnp.sum(jax.lax.map(chunk_sum, chunked))


def _inner_run(task, make_opt: Callable[[Any], opt_base.Optimizer],
               num_steps: int, eval_every: Optional[int],
               chunk_size: Optional[int]):
  """(hyper, key, train_batches, eval_data) -> (losses [T], evals).

  evals: {split: final loss}, or with eval_every {split: [T // eval_every + 1]}
  losses at steps 0, eval_every, 2 eval_every, ... (same draws as the final).
  eval_data: {split: stacked batches}, or with chunk_size {split:
  (examples, weights)} whose exact weighted mean loss is taken.
  """

  def run(hyper, key, train_batches, eval_data):
    opt = make_opt(hyper)
    init_key, key = jax.random.split(key)
    params, model_state = task.init_with_state(init_key)
    opt_state = opt.init(params, model_state, num_steps=num_steps)

    def step(opt_state, xs):
      key, batch = xs
      params, model_state = opt.get_params_state(opt_state)
      (loss, model_state), grad = jax.value_and_grad(
          task.loss_with_state, has_aux=True)(params, model_state, key, batch)
      return opt.update(opt_state, grad, loss=loss,
                        model_state=model_state), loss

    keys = jax.random.split(key, num_steps + 1)

    def final_loss(params, model_state, batches):
      if not jax.tree_util.tree_leaves(batches):  # the task draws its own data
        return task.normalizer(
            task.loss_with_state(params, model_state, keys[-1], ())[0])
      if chunk_size is not None:  # (examples, weights): one at a time
        return task.normalizer(exact_mean_loss(
            lambda x: task.loss_with_state(
                params, model_state, keys[-1],
                jax.tree_util.tree_map(lambda a: a[None], x))[0],
            *batches, chunk_size))
      count = jax.tree_util.tree_leaves(batches)[0].shape[0]
      per_batch = jax.vmap(lambda k, b: task.loss_with_state(
          params, model_state, k, b)[0])(jax.random.split(keys[-1], count),
                                         batches)
      return jnp.mean(task.normalizer(per_batch))

    def evaluate(opt_state):
      params, model_state = opt.get_params_state(opt_state)
      return {s: final_loss(params, model_state, b)
              for s, b in eval_data.items()}

    if eval_every is None:
      opt_state, losses = jax.lax.scan(step, opt_state,
                                       (keys[:-1], train_batches))
      return losses, evaluate(opt_state)

    def segment(opt_state, xs):
      opt_state, losses = jax.lax.scan(step, opt_state, xs)
      return opt_state, (losses, evaluate(opt_state))

    num_segments = num_steps // eval_every
    by_segment = jax.tree_util.tree_map(
        lambda a: a.reshape((num_segments, eval_every) + a.shape[1:]),
        (keys[:-1], train_batches))
    first = evaluate(opt_state)
    _, (losses, evals) = jax.lax.scan(segment, opt_state, by_segment)
    evals = jax.tree_util.tree_map(
        lambda a, b: jnp.concatenate([a[None], b]), first, evals)
    return losses.reshape(-1), evals

  return run


class MetaTestResult(dict):
  """{name: {metric: mean over tasks}}, plus `.per_task` and `.curves`.

  per_task: one row per (task, name): {"task", "name", metric: value}.
  curves: {name: {"step_loss": float [tasks, num_steps] normalized training
    loss of every inner step (on its batch), and with eval_every
    "<split>_loss": float [tasks, num_steps // eval_every + 1], the split's
    loss (as in "final_<split>_loss") at steps 0, eval_every, ...}}.
  A Sweep's entries appear under `sweep_names(key, sweep)`.
  """

  def __init__(self, means, per_task, curves):
    super().__init__(means)
    self.per_task: List[Dict[str, Any]] = per_task
    self.curves: Dict[str, Dict[str, np.ndarray]] = curves


def as_optimizer(entry: Any) -> Optional[opt_base.Optimizer]:
  """An LO Optimizer for a hand-designed `meta_test` entry; None for a theta."""
  if isinstance(entry, opt_base.Optimizer):
    return entry
  if isinstance(entry, optax.GradientTransformation):
    return opt_base.OptaxOptimizer(entry)
  return None


@dataclasses.dataclass
class _Group:
  """Entries sharing one compiled run: make_opt(hyper) -> Optimizer."""
  make_opt: Callable[[Any], opt_base.Optimizer]
  vmapped: bool
  calls: List[Any] = dataclasses.field(default_factory=list)  # (names, hyper)


def _groups(lopt, entries: Mapping[str, Any]) -> List[_Group]:
  groups = {}
  for name, entry in entries.items():
    if isinstance(entry, Sweep):
      make = lambda h, s=entry: as_optimizer(s.make(h))
      groups[("sweep", name)] = _Group(
          make, True, [(sweep_names(name, entry), entry.values)])
    elif as_optimizer(entry) is not None:
      groups[("fixed", name)] = _Group(
          lambda _, o=as_optimizer(entry): o, False, [([name], ())])
    else:
      groups.setdefault(("lopt",), _Group(lopt.opt_fn, False)).calls.append(
          ([name], entry))
  return list(groups.values())


def _entry_names(entries: Mapping[str, Any]) -> List[str]:
  """Reported names, in entry order (a Sweep expands to its H names)."""
  return [n for k, e in entries.items()
          for n in (sweep_names(k, e) if isinstance(e, Sweep) else [k])]


def _check_args(tasks, lopt, thetas, num_steps, eval_every, whole_splits,
                eval_chunk_size):
  if num_steps < 1:
    raise ValueError(f"meta_test.num_steps ({num_steps}) must be >= 1")
  if not tasks:
    raise ValueError("meta_test.tasks must not be empty")
  if eval_every is not None and (eval_every < 1 or num_steps % eval_every):
    raise ValueError(f"meta_test.eval_every ({eval_every}) must be >= 1 and "
                     f"divide num_steps ({num_steps})")
  if eval_chunk_size < 1:
    raise ValueError(f"meta_test.eval_chunk_size ({eval_chunk_size}) must "
                     "be >= 1")
  thetas_ = [n for n, e in thetas.items()
             if not isinstance(e, Sweep) and as_optimizer(e) is None]
  if lopt is None and thetas_:
    raise ValueError("meta_test.lopt is None but thetas has learned-optimizer "
                     f"entries: {thetas_}")
  for name, entry in thetas.items():
    if isinstance(entry, Sweep):
      sizes = {a.shape[0] if np.ndim(a) else None
               for a in jax.tree_util.tree_leaves(entry.values)}
      if sizes != {len(entry.labels)}:
        raise ValueError(
            f"meta_test.thetas[{name!r}] (Sweep): values' leading axes "
            f"{sorted(map(str, sizes))} must all equal len(labels) "
            f"({len(entry.labels)})")
  names = _entry_names(thetas)
  if len(set(names)) != len(names):
    raise ValueError("meta_test.thetas: reported names must be distinct "
                     f"(Sweeps expand to '<key> <label>'): {names}")
  if whole_splits:
    bad = [t.name for t in tasks
           if not hasattr(getattr(t, "datasets", None), "split_arrays")]
    if bad:
      raise ValueError("meta_test.whole_splits=True needs tasks whose datasets"
                       f" offer split_arrays (e.g. data.OfflineImageDatasets);"
                       f" these do not: {bad}")


def _eval_data(task, index, splits, num_eval_batches, whole_splits,
               max_eval_examples):
  """{split: stacked batches or whole-split examples} of one task."""
  if task.datasets is None:
    return {"train": ()}
  if splits is None:
    splits = EVAL_SPLITS
  if not whole_splits:
    return {s: _batches(task, s, num_eval_batches) for s in splits}
  caps = dict(max_eval_examples or {})
  return {s: _whole_split(task, s, caps.get(s), seed=index) for s in splits}


def _whole_eval_data(tasks, splits, max_eval_examples, chunk_size,
                     same_model):
  """Per task {split: (examples, weights)}, each split padded to a multiple of
  chunk_size (with same_model: to the largest such size over the tasks, so
  that one compilation serves them all)."""
  raw = [_eval_data(task, i, splits, 0, True, max_eval_examples)
         for i, task in enumerate(tasks)]
  rows = lambda x: jax.tree_util.tree_leaves(x)[0].shape[0]  # noqa: E731
  sizes = [{s: -(-rows(x) // chunk_size) * chunk_size for s, x in r.items()}
           for r in raw]
  if same_model:
    top = {s: max(size[s] for size in sizes) for s in sizes[0]}
    sizes = [top] * len(raw)
  return [{s: _padded(x, size[s]) for s, x in r.items()}
          for r, size in zip(raw, sizes)]


def meta_test(tasks: Sequence[Any], lopt, thetas: Dict[str, Any],
              num_steps: int, key, num_eval_batches: int = 5,
              eval_every: Optional[int] = None, *,
              splits: Optional[Sequence[str]] = None,
              whole_splits: bool = False,
              max_eval_examples: Optional[Mapping[str, int]] = None,
              eval_chunk_size: int = EVAL_CHUNK_SIZE,
              same_model: bool = False) -> MetaTestResult:
  """Trains every task from scratch with each entry; same data and keys for all.

  Per task, every entry starts from the same initialization (from `key`)
  and sees the same sequence of training batches (drawn once from the
  task's "train" split).

  Args:
    tasks: LO Tasks (any mix; each is compiled once per optimizer).
    lopt: the LearnedOptimizer whose `opt_fn(theta)` trains them (may be None
      when every entry is hand-designed or a Sweep).
    thetas: {name: entry} to compare; an entry is a theta of `lopt`, an LO
      `Optimizer` (e.g. `optimizers.base.Adam(1e-3)`), an optax
      GradientTransformation, or a `Sweep` (reported as its H entries,
      `sweep_names(name, sweep)`, run vmapped in one compilation).
    num_steps: inner steps per run.
    key: randomness of initializations and inner steps, split per task.
    num_eval_batches: batches of each split averaged for the split losses
      (ignored with whole_splits).
    eval_every: also evaluate the splits every this many steps (must divide
      num_steps) into `.curves`; None: only after the run.
    splits: dataset splits to evaluate; default `EVAL_SPLITS` (only "train"
      for tasks without datasets, whose loss draws its own data).
    whole_splits: the split loss is the exact mean over every example of
      the split (`datasets.split_arrays`) instead of over sampled batches;
      it evaluates the task's loss on one example at a time, so assumes the
      loss is a mean of per-example terms (no batch statistics).
    max_eval_examples: with whole_splits, {split: cap}: a split larger than
      the cap is evaluated on a fixed random subset of that many examples
      (the same for every entry; seeded by the task's position).
    eval_chunk_size: with whole_splits, examples per forward pass.
    same_model: the caller's promise that every task is the same model (the
      same init and loss functions, e.g. one architecture on different class
      subsets) and differs only in its datasets: tasks[0]'s functions are
      compiled once per optimizer and reused for every task whose data has
      the same shapes.

  Returns:
    MetaTestResult: {name: {"train_loss_mean": mean inner training loss over
    the run, "final_<split>_loss": normalized loss after the run}} averaged
    over tasks; `.per_task` and `.curves` as documented there.
  """
  _check_args(tasks, lopt, thetas, num_steps, eval_every, whole_splits,
              eval_chunk_size)
  groups = _groups(lopt, thetas)
  order = _entry_names(thetas)
  rows = []
  curves = {name: {} for name in order}
  chunk = eval_chunk_size if whole_splits else None
  compiled = {}  # (id(model task), group) -> jitted run
  whole = (_whole_eval_data(tasks, splits, max_eval_examples,
                            eval_chunk_size, same_model)
           if whole_splits else None)
  for index, (task, task_key) in enumerate(
      zip(tasks, jax.random.split(key, len(tasks)))):
    train = _batches(task, "train", num_steps)
    evals = (whole[index] if whole_splits else
             _eval_data(task, index, splits, num_eval_batches, False, None))
    task_rows = {}
    for g, group in enumerate(groups):
      model = tasks[0] if same_model else task
      if (id(model), g) not in compiled:
        run = _inner_run(model, group.make_opt, num_steps, eval_every, chunk)
        compiled[(id(model), g)] = jax.jit(
            jax.vmap(run, in_axes=(0, None, None, None)) if group.vmapped
            else run)
      run = compiled[(id(model), g)]
      for names, hyper in group.calls:
        out = run(hyper, task_key, train, evals)
        for i, name in enumerate(names):
          losses, split_losses = (jax.tree_util.tree_map(lambda a: a[i], out)
                                  if group.vmapped else out)
          task_rows[name] = _record(task, name, losses, split_losses,
                                    eval_every, curves[name])
    rows += [task_rows[name] for name in order]
  means = {}
  for name in order:
    mine = [r for r in rows if r["name"] == name]
    means[name] = {k: float(np.mean([r[k] for r in mine]))
                   for k in mine[0] if k not in ("task", "name")}
  curves = {name: {k: np.stack(v) for k, v in c.items()}
            for name, c in curves.items()}
  return MetaTestResult(means, rows, curves)


def _record(task, name, losses, split_losses, eval_every, curves):
  """The row of one (task, entry); appends its curves to `curves`."""
  losses = task.normalizer(losses)
  row = {"task": task.name, "name": name,
         "train_loss_mean": float(jnp.mean(losses))}
  curves.setdefault("step_loss", []).append(np.asarray(losses))
  for s, v in split_losses.items():
    v = np.asarray(v)
    row[f"final_{s}_loss"] = float(v if eval_every is None else v[-1])
    if eval_every is not None:
      curves.setdefault(f"{s}_loss", []).append(v)
  return row
