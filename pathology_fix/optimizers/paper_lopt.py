r"""The paper's per-parameter MLP learned optimizer (Sec. 5; docs/method.md §9).

For every parameter w of every tensor, with gradient g, at inner step t:

  accumulators, for each decay b in `decays` (default 0.5, 0.9, 0.99, 0.999,
  0.9999):  m_b <- b m_b + (1 - b) g,   v_b <- b v_b + (1 - b) g^2
  22 tensor features:  m_b, v_b, 1/sqrt(v_b + moment_eps),
                       m_b / sqrt(v_b + moment_eps)  (4 x 5), g, w
  each divided by its RMS over the tensor: x / sqrt(mean_tensor(x^2) + 1e-5)
  9 time features:     tanh(t / eta - 1), eta log-spaced 3 .. 300,000
  MLP: 31 inputs -> `hidden_size` ReLU -> 2 outputs (o_dir, o_mag)
  update:  w <- w - step_mult * o_dir * exp(exp_mult * o_mag)

The update is the paper's dw = 1e-3 o_dir exp(1e-3 o_mag), applied as a
descent step (w - dw) like LO's MLPLOpt, so a theta that outputs o_dir ~ g
descends. v_b is the mean-square accumulator (the paper's "rms").

Speed: the first layer never sees the normalized 31-vector. Per tensor,
  relu(concat(x / r, tau) W1 + b1)
      = relu(x (W1_x / r[:, None]) + (tau W1_tau + b1)),
so the per-tensor RMS r scales the 22 rows of W1 (a [22, H] op, not [n, 22])
and the time features become one bias vector shared by all tensors; the only
per-parameter work is the accumulators, the 22 raw features, one [n, 22] x
[22, H] matmul, the ReLU and the [n, H] x [H, 2] output. `paper_features`
builds the explicit 31-vector for tests and inspection; the folded update is
1.8x faster than applying the MLP to it (experiments/bench_step.py and
experiments/results/bench_step/NOTES.md: the learned step runs at 0.87x Adam's
steps per CPU-second on conv3, 8px, batch 64).
"""

import numbers
from typing import Any, Optional, Sequence, Tuple

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np

from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.optimizers import base as opt_base

from pathology_fix_core import errors

PRNGKey = jax.Array

PAPER_DECAYS = (0.5, 0.9, 0.99, 0.999, 0.9999)
PAPER_TIMESCALES = tuple(float(x) for x in np.geomspace(3.0, 300_000.0, 9))
NORMALIZER_EPS = 1e-5
NUM_TENSOR_FEATURES_PER_DECAY = 4  # m, v, 1/sqrt(v + eps), m/sqrt(v + eps)


def num_tensor_features(num_decays: int) -> int:
  """Features normalized per tensor: 4 per decay, gradient and weight."""
  return NUM_TENSOR_FEATURES_PER_DECAY * num_decays + 2


def update_moments(m: jax.Array, v: jax.Array, g: jax.Array,
                   decays: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """One step of the accumulators; m, v: [..., D], g: [...], decays: [D].

  m <- b m + (1 - b) g,  v <- b v + (1 - b) g^2, per decay b.
  """
  g = g[..., None]
  return decays * m + (1 - decays) * g, decays * v + (1 - decays) * g * g


def time_features(step: jax.Array, timescales: Sequence[float]) -> jax.Array:
  """tanh(t / eta - 1) for each eta: [] -> [len(timescales)] float32."""
  etas = jnp.asarray(timescales, jnp.float32)
  return jnp.tanh(jnp.asarray(step, jnp.float32) / etas - 1.0)


def rms_normalize(x: jax.Array, eps: float = NORMALIZER_EPS) -> jax.Array:
  """x [n, F] -> x / sqrt(mean over n of x^2 + eps), per column."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=0, keepdims=True) + eps)


def tensor_features(w: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array,
                    moment_eps: float) -> jax.Array:
  """The un-normalized per-parameter features of one tensor.

  Args:
    w, g: weights and gradient, any shape S (n = prod(S) elements).
    m, v: accumulators after this step's update, shape S + [D].
    moment_eps: eps in 1/sqrt(v + eps).

  Returns:
    [n, 4 D + 2]: m (D), v (D), 1/sqrt(v + eps) (D), m/sqrt(v + eps) (D), g, w.
  """
  n = int(np.prod(w.shape))
  m = m.reshape(n, -1)
  v = v.reshape(n, -1)
  inv_sqrt = jax.lax.rsqrt(v + moment_eps)
  return jnp.concatenate(
      [m, v, inv_sqrt, m * inv_sqrt, g.reshape(n, 1), w.reshape(n, 1)],
      axis=1).astype(jnp.float32)


def paper_features(w, g, m, v, step, timescales=PAPER_TIMESCALES,
                   moment_eps: float = 1e-8) -> jax.Array:
  """The paper's full input vector per parameter: [n, 4 D + 2 + T].

  Tensor features divided by their RMS over the tensor (eps 1e-5), then the
  time features, identical for every parameter. m, v already updated.
  """
  x = rms_normalize(tensor_features(w, g, m, v, moment_eps))
  tau = jnp.broadcast_to(time_features(step, timescales),
                         (x.shape[0], len(timescales)))
  return jnp.concatenate([x, tau], axis=1)


def init_mlp(key: PRNGKey, num_inputs: int, hidden_size: int) -> dict:
  """One hidden layer: w ~ N(0, 1/fan_in), biases 0 (float32)."""
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (num_inputs, hidden_size), jnp.float32) /
            np.sqrt(num_inputs),
      "b1": jnp.zeros((hidden_size,), jnp.float32),
      "w2": jax.random.normal(k2, (hidden_size, 2), jnp.float32) /
            np.sqrt(hidden_size),
      "b2": jnp.zeros((2,), jnp.float32),
  }


def apply_mlp(theta: dict, features: jax.Array) -> jax.Array:
  """[n, F] -> [n, 2] (o_dir, o_mag): relu(x w1 + b1) w2 + b2."""
  hidden = jax.nn.relu(features @ theta["w1"] + theta["b1"])
  return hidden @ theta["w2"] + theta["b2"]


def step_from_outputs(outputs: jax.Array, step_mult: float,
                      exp_mult: float) -> jax.Array:
  """[n, 2] -> [n]: step_mult * o_dir * exp(exp_mult * o_mag)."""
  return step_mult * outputs[:, 0] * jnp.exp(exp_mult * outputs[:, 1])


def tensor_step(theta: dict, w, g, m, v, time_bias: jax.Array,
                step_mult: float, exp_mult: float,
                moment_eps: float) -> jax.Array:
  """The step (to subtract from w) of one tensor, normalization folded in W1.

  Equal to step_from_outputs(apply_mlp(theta, paper_features(...))) with
  time_bias = time_features(t) @ w1[F:] + b1; shape of w.
  """
  x = tensor_features(w, g, m, v, moment_eps)
  num_x = x.shape[1]
  inv_rms = jax.lax.rsqrt(jnp.mean(x * x, axis=0) + NORMALIZER_EPS)  # [F]
  w1 = theta["w1"][:num_x] * inv_rms[:, None]
  hidden = jax.nn.relu(x @ w1 + time_bias)
  outputs = hidden @ theta["w2"] + theta["b2"]
  return step_from_outputs(outputs, step_mult, exp_mult).reshape(w.shape)


@flax.struct.dataclass
class PaperMLPLOptState:
  params: Any
  momentum: Any  # like params, each leaf [..., D]
  second_moment: Any  # like params, each leaf [..., D]
  iteration: jax.Array
  state: Any


def _check_positive(name: str, value: Any):
  if not isinstance(value, numbers.Real) or isinstance(value, bool) or not (
      np.isfinite(value) and value > 0):
    raise errors.InvalidArgument(
        f"PaperMLPLOpt.{name} must be a positive finite number, "
        f"got {value!r}", f"PaperMLPLOpt.{name}")


@gin.configurable
class PaperMLPLOpt(lopt_base.LearnedOptimizer):
  """Metz et al. (2019)'s per-parameter MLP (module docstring has the math).

  Args:
    step_mult: scale of the direction output (paper 1e-3).
    exp_mult: scale of the magnitude output inside exp (paper 1e-3).
    hidden_size: ReLU units of the single hidden layer (paper 32).
    decays: accumulator decays (paper 0.5, 0.9, 0.99, 0.999, 0.9999).
    timescales: eta of the tanh(t / eta - 1) features (paper: 9, log-spaced
      3 .. 300,000).
    moment_eps: eps in 1/sqrt(v + eps).

  theta: {"w1": [4 D + 2 + T, H], "b1": [H], "w2": [H, 2], "b2": [2]},
  float32 (the paper: [31, 32], [32], [32, 2], [2]).
  """

  def __init__(self,
               step_mult: float = 1e-3,
               exp_mult: float = 1e-3,
               hidden_size: int = 32,
               decays: Sequence[float] = PAPER_DECAYS,
               timescales: Sequence[float] = PAPER_TIMESCALES,
               moment_eps: float = 1e-8):
    super().__init__()
    _check_positive("step_mult", step_mult)
    _check_positive("exp_mult", exp_mult)
    _check_positive("moment_eps", moment_eps)
    if (not isinstance(hidden_size, (int, np.integer)) or
        isinstance(hidden_size, bool) or hidden_size < 1):
      raise errors.InvalidArgument(
          "PaperMLPLOpt.hidden_size must be a positive int, got "
          f"{hidden_size!r}", "PaperMLPLOpt.hidden_size")
    decays = tuple(float(d) for d in decays)
    if not decays or not all(0.0 <= d < 1.0 for d in decays):
      raise errors.InvalidArgument(
          "PaperMLPLOpt.decays must be a non-empty sequence of "
          f"values in [0, 1), got {decays!r}", "PaperMLPLOpt.decays")
    timescales = tuple(float(s) for s in timescales)
    if not all(s > 0 for s in timescales):
      raise errors.InvalidArgument(
          "PaperMLPLOpt.timescales must be positive, got "
          f"{timescales!r}", "PaperMLPLOpt.timescales")
    self.step_mult = float(step_mult)
    self.exp_mult = float(exp_mult)
    self.hidden_size = int(hidden_size)
    self.decays = decays
    self.timescales = timescales
    self.moment_eps = float(moment_eps)

  @property
  def num_inputs(self) -> int:
    return num_tensor_features(len(self.decays)) + len(self.timescales)

  def init(self, key: PRNGKey) -> lopt_base.MetaParams:
    return init_mlp(key, self.num_inputs, self.hidden_size)

  def opt_fn(self, theta: lopt_base.MetaParams,
             is_training: bool = False) -> opt_base.Optimizer:
    del is_training
    lopt = self

    class _Opt(opt_base.Optimizer):
      """PaperMLPLOpt with theta captured."""

      def init(self,
               params: Any,
               model_state: Any = None,
               num_steps: Optional[int] = None,
               key: Optional[PRNGKey] = None) -> PaperMLPLOptState:
        del num_steps, key
        zeros = jax.tree_util.tree_map(
            lambda p: jnp.zeros(p.shape + (len(lopt.decays),), jnp.float32),
            params)
        return PaperMLPLOptState(
            params=params, momentum=zeros, second_moment=zeros,
            iteration=jnp.asarray(0, jnp.int32), state=model_state)

      def update(self,
                 opt_state: PaperMLPLOptState,
                 grad: Any,
                 loss: Optional[jax.Array] = None,
                 model_state: Any = None,
                 is_valid: bool = False,
                 key: Optional[PRNGKey] = None) -> PaperMLPLOptState:
        del loss, is_valid, key
        return lopt.update_state(theta, opt_state, grad, model_state)

    return _Opt()

  def update_state(self, theta, opt_state: PaperMLPLOptState, grad: Any,
                   model_state: Any = None) -> PaperMLPLOptState:
    """One inner step: accumulators, per-tensor MLP step, iteration + 1."""
    decays = jnp.asarray(self.decays, jnp.float32)
    num_x = num_tensor_features(len(self.decays))
    # Time features enter every tensor's first layer as one shared bias.
    time_bias = (time_features(opt_state.iteration, self.timescales)
                 @ theta["w1"][num_x:] + theta["b1"])
    moments = jax.tree_util.tree_map(
        lambda m, v, g: update_moments(m, v, g, decays),
        opt_state.momentum, opt_state.second_moment, grad)
    treedef = jax.tree_util.tree_structure(grad)
    pairs = treedef.flatten_up_to(moments)
    momentum = treedef.unflatten([p[0] for p in pairs])
    second_moment = treedef.unflatten([p[1] for p in pairs])

    def new_param(w, g, m, v):
      step = tensor_step(theta, w, g, m, v, time_bias, self.step_mult,
                         self.exp_mult, self.moment_eps)
      return (w - step).astype(w.dtype)

    params = jax.tree_util.tree_map(new_param, opt_state.params, grad,
                                    momentum, second_moment)
    return PaperMLPLOptState(
        params=params, momentum=momentum, second_moment=second_moment,
        iteration=opt_state.iteration + 1, state=model_state)
