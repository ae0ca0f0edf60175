"""The n inner problems of one estimator: init, reset, one step, meta-loss.

This is the role LO GitHub main calls `TruncatedStep`: everything about the
inner training runs, and nothing about gradients of them. For each sample i
it holds one inner problem (task, inner optimizer state, step count,
truncation state), and it runs chunks of `steps_per_jit` inner steps for the
2n antithetic unrolls (theta + eps_i and theta - eps_i from the same state,
on the same data and keys). The reverse pass through those chunks lives in
`vjp_engine.py`; `unroll.AntitheticUnroller.truncate` puts both together.

Meta-loss of one inner step:
  split "train": the training loss of the step's own batch, before the
    update (LO's convention);
  split "outer_valid": the loss after the update on `meta_loss_evals`
    outer_valid batches, each clipped at max_loss then averaged
    (`objectives.batch_averaged_meta_loss`; "mean" clips their mean).
Every step's meta-loss is then clipped at max_loss and summed over the
active steps of the chunk (`objectives.clipped_loss_sum_and_count`).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from learned_optimization.outer_trainers import gradient_learner
from pathology_fix_core import errors
from pathology_fix.meta_gradient import batches
from pathology_fix_core import objectives

META_LOSS_SPLITS = ("train", "outer_valid")

# What the reverse pass keeps of one inner step of a chunk (`jax.checkpoint`
# policies; the forward pass alone is unaffected):
#   None       every intermediate of every step (plain `jax.vjp` of the scan);
#   "nothing"  only each step's carried inner states: the reverse pass
#              recomputes one step, then pulls back through it;
#   "dots"     the matrix products' outputs too; elementwise work recomputed.
STEP_CHECKPOINTS = {
    None: None,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}
DEFAULT_STEP_CHECKPOINT = "nothing"


@flax.struct.dataclass
class VariationalUnrollState(gradient_learner.GradientEstimatorState):
  """Inner problems of one estimator; every leaf has a leading [n] axis."""
  inner_opt_state: Any
  task_param: Any
  inner_step: jnp.ndarray  # int32 [n], steps done in the current inner run
  truncation_state: Any  # LO TruncationSchedule state; `.length` is [n]


def tree_where(condition, on_true, on_false):
  """Per-sample select: condition [n] broadcast against leaves [n, ...]."""

  def select(a, b):
    c = jnp.reshape(condition, condition.shape + (1,) * (a.ndim - condition.ndim))
    return jnp.where(c, a, b)

  return jax.tree_util.tree_map(select, on_true, on_false)


def strong_types(tree):
  """Drops weak types, so the first and later states hit the same jit cache."""
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype),
                                tree)


def validate_meta_loss_options(meta_loss_split: str, meta_loss_evals: int):
  if meta_loss_split not in META_LOSS_SPLITS:
    raise errors.InvalidArgument(
        f"meta_loss_split ({meta_loss_split!r}) must be one of "
        f"{META_LOSS_SPLITS}", "meta_loss_split")
  if int(meta_loss_evals) < 1:
    raise errors.InvalidArgument(
        f"meta_loss_evals ({meta_loss_evals}) must be >= 1", "meta_loss_evals")
  if meta_loss_split == "train" and int(meta_loss_evals) != 1:
    # LO's convention: the train meta-loss is the loss of the inner step's
    # own batch, before the update; there are no extra batches to average.
    raise errors.InvalidArgument(
        f"meta_loss_evals ({meta_loss_evals}) must be 1 with "
        "meta_loss_split='train' (the meta-loss is the training loss of the "
        "inner step's own batch); use meta_loss_split='outer_valid' to "
        "average several batches", "meta_loss_evals", "meta_loss_split")


class InnerProblems:
  """n inner problems of `task_family`, trained by `learned_opt`.

  task_family, learned_opt and trunc_sched follow LO's interfaces; `sharding`
  is a `sharding.SampleSharding` for the sample axis. `step_checkpoint` (a
  key of `STEP_CHECKPOINTS`) is what a reverse pass through `chunk` keeps per
  inner step; it changes memory traffic, not the gradient.
  """

  step_checkpoint = DEFAULT_STEP_CHECKPOINT

  def __init__(self, task_family, learned_opt, trunc_sched, num_samples: int,
               steps_per_jit: int, meta_loss_split: str, meta_loss_evals: int,
               max_loss: float, meta_loss_clip_mode: str, sample_sharding):
    validate_meta_loss_options(meta_loss_split, meta_loss_evals)
    self.task_family = task_family
    self.learned_opt = learned_opt
    self.trunc_sched = trunc_sched
    self.num_samples = int(num_samples)
    self.steps_per_jit = int(steps_per_jit)
    self.meta_loss_split = meta_loss_split
    self.meta_loss_evals = int(meta_loss_evals)
    self.max_loss = objectives.validate_max_loss(max_loss)
    self.meta_loss_clip_mode = objectives.validate_clip_mode(
        meta_loss_clip_mode)
    self.sharding = sample_sharding
    self._init_states = jax.jit(self._init_sharded)
    self._prepare = jax.jit(self._reset_and_count)
    self._continue = jax.jit(self._continue_from_positive)

  # Init and reset.

  def _init_one(self, theta, outer_state, key,
                offset) -> VariationalUnrollState:
    """A fresh inner problem that starts `offset` steps into its run.

    A staggered run (offset > 0) is a whole run of length - offset steps:
    the learned optimizer is told that many steps, so one that reads its
    progress (step / num_steps) sees its schedule from start to end.
    """
    key_task, key_params, key_length, key_opt = jax.random.split(key, 4)
    task_param = self.task_family.sample(key_task)
    params, model_state = self.task_family.task_fn(task_param).init_with_state(
        key_params)
    truncation_state = jax.tree_util.tree_map(
        jnp.asarray, self.trunc_sched.init(key_length, outer_state))
    offset = jnp.minimum(offset, truncation_state.length - 1)
    opt_state = self.learned_opt.opt_fn(theta, is_training=True).init(
        params, model_state, num_steps=truncation_state.length - offset,
        key=key_opt)
    return VariationalUnrollState(
        inner_opt_state=opt_state,
        task_param=task_param,
        inner_step=jnp.asarray(offset, dtype=jnp.int32),
        truncation_state=truncation_state)

  def _init_sharded(self, theta, outer_state, keys, offsets=None):
    if offsets is None:
      offsets = jnp.zeros((keys.shape[0],), jnp.int32)
    states = jax.vmap(self._init_one, in_axes=(None, None, 0, 0))(
        theta, outer_state, keys, offsets)
    return self.sharding.constrain(strong_types(states), axis=0)

  def init_state(self, theta, outer_state, key,
                 random_initial_iteration_offset: int = 0):
    """Fresh inner problems; optionally staggered so they end at different times."""
    theta, outer_state, key = self.sharding.replicate((theta, outer_state, key))
    key_init, key_offset = jax.random.split(key)
    offsets = jnp.zeros((self.num_samples,), jnp.int32)
    if random_initial_iteration_offset:
      offsets = jax.random.randint(key_offset, (self.num_samples,), 0,
                                   random_initial_iteration_offset, jnp.int32)
    state = self._init_states(theta, outer_state,
                              jax.random.split(key_init, self.num_samples),
                              offsets)
    return self.sharding.put(state, axis=0)

  def _reset_finished(self, theta, state, outer_state, key):
    fresh = self._init_sharded(theta, outer_state,
                               jax.random.split(key, self.num_samples))
    return tree_where(self.finished(state), fresh, state)

  def _reset_and_count(self, theta, state, outer_state, key):
    # cond, not a Python branch: compiled with everything else at warm-up,
    # and no inner problem is initialized on steps where none finished.
    state = jax.lax.cond(
        jnp.any(self.finished(state)),
        lambda s: self._reset_finished(theta, s, outer_state, key),
        lambda s: s, state)
    state = self.sharding.constrain(state, axis=0)
    return state, state.truncation_state.length - state.inner_step

  @staticmethod
  def finished(state: VariationalUnrollState) -> jnp.ndarray:
    return state.inner_step >= state.truncation_state.length

  def prepare(self, theta, state, outer_state, key):
    """Resets finished inner problems; returns (state, steps left [n] numpy)."""
    theta, outer_state, key = self.sharding.replicate((theta, outer_state, key))
    state, steps_left = self._prepare(theta, state, outer_state, key)
    return state, self.sharding.to_host(steps_left)

  def steps_left(self, state: VariationalUnrollState) -> np.ndarray:
    return self.sharding.to_host(state.truncation_state.length -
                                 state.inner_step)

  # One inner step of one unroll, and a chunk of them for all 2n unrolls.

  def _step_meta_loss(self, task, loss, next_params, next_model_state, key,
                      meta_data):
    if meta_data is None:
      return task.normalizer(loss)  # LO's convention: loss before the update
    meta_keys = jax.random.split(key, self.meta_loss_evals)
    meta_losses = jax.vmap(lambda k, d: task.loss_with_state(
        next_params, next_model_state, k, d)[0])(meta_keys, meta_data)
    if self.meta_loss_clip_mode == "per_batch":
      meta_losses = task.normalizer(meta_losses)
    meta_loss = objectives.batch_averaged_meta_loss(
        meta_losses, self.max_loss, self.meta_loss_clip_mode)
    if self.meta_loss_clip_mode == "mean":
      meta_loss = task.normalizer(meta_loss)
    return meta_loss

  def inner_step(self, theta, opt_state, task_param, key, data, active):
    """One inner step of one unroll: (next opt state, its meta-loss)."""
    task = self.task_family.task_fn(task_param)
    opt = self.learned_opt.opt_fn(theta, is_training=True)
    params, model_state = opt.get_params_state(opt_state)
    key_train, key_update, key_meta = jax.random.split(key, 3)
    if self.meta_loss_split == "outer_valid":
      train_data, meta_data = data
    else:
      train_data, meta_data = data, None
    (loss, next_model_state), grad = jax.value_and_grad(
        task.loss_with_state, has_aux=True)(params, model_state, key_train,
                                             train_data)
    next_opt_state = opt.update(
        opt_state, grad, loss=loss, model_state=next_model_state,
        key=key_update)
    next_params = None if meta_data is None else opt.get_params(next_opt_state)
    meta_loss = self._step_meta_loss(task, loss, next_params, next_model_state,
                                     key_meta, meta_data)
    # A finished inner run stays frozen until the next truncation resets it.
    next_opt_state = tree_where(active, next_opt_state, opt_state)
    return next_opt_state, meta_loss

  def chunk(self, theta_pair, opt_states, task_params, datas, keys, active):
    """steps_per_jit steps of all 2n unrolls.

    Args:
      theta_pair: leaves [2, n, ...]; opt_states: leaves [2, n, ...];
      task_params: leaves [n, ...]; datas: leaves [steps, n, ...];
      keys: [steps, n, 2]; active: bool [steps, n].

    Returns:
      (opt_states after the chunk, clipped meta-loss summed over active steps
      [2, n]).
    """
    per_sample = jax.vmap(self.inner_step)
    per_sign = jax.vmap(per_sample, in_axes=(0, 0, None, None, None, None))

    def step(states, xs):
      key, data, act = xs
      states, losses = per_sign(theta_pair, states, task_params, key, data, act)
      return states, losses

    policy = STEP_CHECKPOINTS[self.step_checkpoint]
    if self.step_checkpoint is not None:
      # A step's residuals stay in cache while its pullback runs, instead of
      # a whole chunk's being written out and read back (memory-bound).
      step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    opt_states, losses = jax.lax.scan(step, opt_states, (keys, datas, active))
    mask = jnp.broadcast_to(active[:, None, :], losses.shape)
    total, _ = objectives.clipped_loss_sum_and_count(losses, mask, self.max_loss)
    return opt_states, total

  # Data and keys for one chunk.

  def chunk_inputs(self, key, chunk_index, steps):
    """Keys [steps, n, 2] and active mask of chunk `chunk_index` (traced)."""
    step_index = chunk_index * self.steps_per_jit + jnp.arange(
        self.steps_per_jit)
    active = step_index[:, None] < steps[None, :]
    return self.chunk_keys(key, chunk_index), active

  def _batches(self, split: str, out=None):
    """Leaves [steps_per_jit, m, ...]: this process's samples' batches.

    LO's reading order (`training.get_batches`: step-major, sample-minor);
    with a mesh over processes only `sharding.local_samples` are built, the
    others' batches skipped (`batches.get_batches`). `out`: arrays to fill.
    """
    return batches.get_batches(self.task_family.datasets, split,
                               self.steps_per_jit, self.num_samples,
                               self.sharding.local_samples, out=out)

  def chunk_data(self):
    """The next chunk's batches, leaves [steps_per_jit, m, ...] (numpy).

    m = n, or in a multi-process run only this process's samples
    (`sharding.local_samples`; place them with `put_process_local`).
    Validation batches: leaves [steps_per_jit, m, meta_loss_evals, ...],
    evaluation e read after evaluation e - 1 (all steps and samples each).
    """
    if self.task_family.datasets is None:
      return None if self.meta_loss_split == "train" else (None, None)
    train = self._batches("train")
    if self.meta_loss_split == "train":
      return train
    leaves, treedef = jax.tree_util.tree_flatten(self._batches("outer_valid"))
    meta = [np.empty(x.shape[:2] + (self.meta_loss_evals,) + x.shape[2:],
                     x.dtype) for x in leaves]
    for m, x in zip(meta, leaves):
      m[:, :, 0] = x
    for e in range(1, self.meta_loss_evals):
      # Read into place: no stack of the evaluations afterwards.
      self._batches("outer_valid",
                    out=treedef.unflatten([m[:, :, e] for m in meta]))
    return train, treedef.unflatten(meta)

  def chunk_keys(self, key, chunk_index):
    keys = jax.random.split(
        jax.random.fold_in(key, chunk_index),
        self.steps_per_jit * self.num_samples)
    return keys.reshape((self.steps_per_jit, self.num_samples) + keys.shape[1:])

  # After the truncation.

  def _continue_from_positive(self, state, final_opt_states, num_steps):
    next_state = state.replace(
        inner_opt_state=jax.tree_util.tree_map(lambda x: x[0],
                                               final_opt_states),
        inner_step=state.inner_step + num_steps.astype(jnp.int32))
    return self.sharding.constrain(next_state, axis=0)

  def next_state(self, state: VariationalUnrollState, final_opt_states,
                 num_steps: np.ndarray) -> VariationalUnrollState:
    """Next state: the theta + eps unroll, with the step count advanced.

    final_opt_states: leaves [2, n, ...] (row 0: theta + eps); num_steps [n].
    """
    return self._continue(state, final_opt_states,
                          self.sharding.replicate(
                              jnp.asarray(num_steps, jnp.int32)))
