r"""Adam with a learned learning-rate schedule over training progress.

A learned optimizer that knows how far through training it is, so it can learn
warmup and decay; at its initial theta it is exactly Adam at a constant rate.

Progress. At the inner step that applies update number t (t = 0, 1, ...) of a
run of T steps, p_t = clip(t / T, 0, 1). T is the `num_steps` that LO's
`Optimizer.init(params, model_state, num_steps, key)` receives (both LO
versions' truncated steps, our estimators' inner problems, the evaluation
loop and `pretrained.lopt_to_optax` pass the inner run's length there); it is
kept in the optimizer state. The constructor's `num_steps` is the fallback
for callers that pass none. (The paper's MLP optimizer, docs/method.md §9 and
`paper_lopt.py`, sees only the absolute step, through tanh(t / eta - 1).)
An estimator's `random_initial_iteration_offset` moves only the estimator's
own step count, so a sample's first, staggered run starts here at t = 0 and
ends before p reaches 1; the runs after it see the whole schedule.

theta (float32, all zeros at init):
  "log_lr" [K]:     s, the schedule's values at the knots x_0 = 0 < ... <
                    x_{K-1} = 1 (`knots`)
  "beta1", "beta2" []:  a_1, a_2, shifts of log(1 - beta)
  "weight_decay" []:    d

Schedule (piecewise linear in log space between the knots):
  phi(p) [K]: the hat functions of the knots (`knot_weights`), so
              phi(p) . s is the linear interpolation of s at p
  lr(p) = lr_0 exp(clip(c_lr phi(p) . s, -LOG_LR_CLIP, LOG_LR_CLIP))

Hyperparameters:
  1 - beta_i = clip((1 - beta_i0) exp(c_h a_i), MIN_ONE_MINUS_BETA,
                    MAX_ONE_MINUS_BETA)
  lambda = c_wd d   (decoupled weight decay, scaled by lr(p) as in AdamW)

Update of every parameter w with gradient g (n = t + 1):
  m <- beta_1 m + (1 - beta_1) g,     v <- beta_2 v + (1 - beta_2) g^2
  m_hat = m / (1 - beta_1^n),         v_hat = v / (1 - beta_2^n)
  w <- w - lr(p_t) (m_hat / (sqrt(v_hat + eps_root) + eps) + lambda w)

At theta = 0: lr(p) = lr_0, beta_i = beta_i0, lambda = 0, which is optax's
(and LO's) Adam(lr_0, beta_10, beta_20, eps, eps_root) step for step.
theta has K + 3 entries (12 with the 9 default knots). The scales c_lr, c_h,
c_wd set how far one unit of theta moves the optimizer: with c_lr = 10, an
outer perturbation of 0.01 changes the learning rate by about 10%, like
NNAdam's 0.1 log(lr) parameterization.
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

# Denser near the ends, where warmup and the final decay happen.
DEFAULT_KNOTS = (0.0, 0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0)
LOG_LR_CLIP = 20.0  # learning rate within lr_0 e^{+-20}: never inf or 0
MIN_ONE_MINUS_BETA = 1e-5  # beta <= 0.99999: bias correction stays > 0
MAX_ONE_MINUS_BETA = 0.999  # beta >= 0.001: log1p(-(1 - beta)) stays finite


def training_progress(iteration: jax.Array, num_steps: jax.Array) -> jax.Array:
  """p = clip(t / T, 0, 1): [] int, [] -> [] float32."""
  t = jnp.asarray(iteration, jnp.float32)
  return jnp.clip(t / jnp.asarray(num_steps, jnp.float32), 0.0, 1.0)


def knot_weights(p: jax.Array, knots: Sequence[float]) -> jax.Array:
  """Hat functions of the knots at p: [] -> [K] float32.

  phi_k(p) = clip(min((p - x_{k-1}) / (x_k - x_{k-1}),
                      (x_{k+1} - p) / (x_{k+1} - x_k)), 0, 1),
  a missing neighbour's term left out (x_0 only falls, x_{K-1} only rises).
  On [x_0, x_{K-1}] the weights are nonnegative and sum to 1, and
  phi(p) . s interpolates s linearly between the knots; p outside is clamped
  to the nearest end.
  """
  x = jnp.asarray(knots, jnp.float32)
  p = jnp.clip(jnp.asarray(p, jnp.float32), x[0], x[-1])
  inf = jnp.full((1,), jnp.inf, jnp.float32)
  rising = jnp.concatenate([inf, (p - x[:-1]) / (x[1:] - x[:-1])])
  falling = jnp.concatenate([(x[1:] - p) / (x[1:] - x[:-1]), inf])
  return jnp.clip(jnp.minimum(rising, falling), 0.0, 1.0)


def schedule_learning_rate(log_lr_knots: jax.Array, p: jax.Array,
                           knots: Sequence[float], initial_learning_rate: float,
                           lr_scale: float) -> jax.Array:
  """lr(p) = lr_0 exp(clip(c_lr phi(p) . s, +-LOG_LR_CLIP)), p of any shape."""
  p = jnp.asarray(p, jnp.float32)
  phi = jax.vmap(lambda q: knot_weights(q, knots))(p.reshape(-1))
  log_mult = jnp.clip(lr_scale * (phi @ log_lr_knots), -LOG_LR_CLIP,
                      LOG_LR_CLIP)
  return (initial_learning_rate * jnp.exp(log_mult)).reshape(p.shape)


def one_minus_beta(a: jax.Array, initial_beta: float,
                   scale: float) -> jax.Array:
  """1 - beta = clip((1 - beta_0) exp(c_h a), MIN, MAX): [] -> []."""
  return jnp.clip((1.0 - initial_beta) * jnp.exp(scale * a),
                  MIN_ONE_MINUS_BETA, MAX_ONE_MINUS_BETA)


def bias_correction(q: jax.Array, n: jax.Array) -> jax.Array:
  """1 - beta^n for beta = 1 - q, as -expm1(n log1p(-q)) (exact for small q)."""
  return -jnp.expm1(jnp.asarray(n, jnp.float32) * jnp.log1p(-q))


def adam_direction(m: jax.Array, v: jax.Array, q1: jax.Array, q2: jax.Array,
                   n: jax.Array, eps: float, eps_root: float) -> jax.Array:
  """m_hat / (sqrt(v_hat + eps_root) + eps), shape of m (q_i = 1 - beta_i)."""
  m_hat = m / bias_correction(q1, n)
  v_hat = v / bias_correction(q2, n)
  return m_hat / (jnp.sqrt(v_hat + eps_root) + eps)


@flax.struct.dataclass
class ProgressAdamState:
  params: Any
  state: Any
  iteration: jax.Array  # int32 [], updates applied so far (t)
  num_steps: jax.Array  # float32 [], length T of the inner run
  m: Any  # like params, float32
  v: Any  # like params, float32


def _positive(owner: str, name: str, value: Any, allow_zero=False) -> float:
  ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and
        np.isfinite(value) and (value >= 0 if allow_zero else value > 0))
  if not ok:
    kind = "non-negative" if allow_zero else "positive"
    raise errors.InvalidArgument(
        f"{owner}.{name} must be a {kind} finite number, got "
        f"{value!r}", f"{owner}.{name}")
  return float(value)


def validate_knots(knots: Any) -> Tuple[float, ...]:
  """At least 2 strictly increasing knots, the first 0 and the last 1."""
  try:
    values = tuple(float(k) for k in knots)
  except (TypeError, ValueError):
    values = None
  if (values is None or len(values) < 2 or values[0] != 0.0 or
      values[-1] != 1.0 or any(b <= a for a, b in zip(values, values[1:]))):
    raise errors.InvalidArgument(
        "ProgressAdam.knots must be >= 2 strictly increasing "
        f"numbers from 0.0 to 1.0, got {knots!r}", "ProgressAdam.knots")
  return values


def _beta(name: str, value: Any) -> float:
  if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and
          1.0 - MAX_ONE_MINUS_BETA <= value <= 1.0 - MIN_ONE_MINUS_BETA):
    raise errors.InvalidArgument(
        f"ProgressAdam.{name} must be in "
        f"[{1.0 - MAX_ONE_MINUS_BETA:g}, "
        f"{1.0 - MIN_ONE_MINUS_BETA:g}], got {value!r}", f"ProgressAdam.{name}")
  return float(value)


def _num_steps(owner: str, value: Any) -> Optional[int]:
  if value is None:
    return None
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or
      value < 1):
    raise errors.InvalidArgument(
        f"{owner} must be None or an integer >= 1, got "
        f"{value!r}", owner)
  return int(value)


@gin.configurable
class ProgressAdam(lopt_base.LearnedOptimizer):
  """Adam with a learned schedule over progress t / T (module doc: the math).

  Args:
    initial_learning_rate: lr_0, the constant rate at theta = 0.
    knots: progress values x_k of the schedule's knots (0.0 first, 1.0 last).
    lr_scale: c_lr, log learning rate per unit of theta["log_lr"].
    initial_beta1, initial_beta2: beta_10, beta_20 (theta = 0).
    beta_scale: c_h, log(1 - beta) per unit of theta["beta1"/"beta2"].
    weight_decay_scale: c_wd, decoupled weight decay per unit of
      theta["weight_decay"] (0 turns weight decay off).
    epsilon, epsilon_root: Adam's eps (outside the sqrt) and eps_root
      (inside), as in optax.adam and LO's Adam.
    num_steps: T when `Optimizer.init` gets num_steps=None; None: then
      init raises.

  theta: {"log_lr": [K], "beta1": [], "beta2": [], "weight_decay": []}.
  """

  def __init__(self,
               initial_learning_rate: float = 1e-2,
               knots: Sequence[float] = DEFAULT_KNOTS,
               lr_scale: float = 10.0,
               initial_beta1: float = 0.9,
               initial_beta2: float = 0.999,
               beta_scale: float = 10.0,
               weight_decay_scale: float = 1.0,
               epsilon: float = 1e-8,
               epsilon_root: float = 1e-8,
               num_steps: Optional[int] = None):
    super().__init__()
    owner = "ProgressAdam"
    self.initial_learning_rate = _positive(owner, "initial_learning_rate",
                                           initial_learning_rate)
    self.knots = validate_knots(knots)
    self.lr_scale = _positive(owner, "lr_scale", lr_scale)
    self.initial_beta1 = _beta("initial_beta1", initial_beta1)
    self.initial_beta2 = _beta("initial_beta2", initial_beta2)
    self.beta_scale = _positive(owner, "beta_scale", beta_scale)
    self.weight_decay_scale = _positive(owner, "weight_decay_scale",
                                        weight_decay_scale, allow_zero=True)
    self.epsilon = _positive(owner, "epsilon", epsilon)
    self.epsilon_root = _positive(owner, "epsilon_root", epsilon_root,
                                  allow_zero=True)
    self.num_steps = _num_steps(f"{owner}.num_steps", num_steps)

  def init(self, key: PRNGKey) -> lopt_base.MetaParams:
    del key  # deterministic: theta = 0 is Adam at lr_0
    zero = jnp.zeros((), jnp.float32)
    return {"log_lr": jnp.zeros((len(self.knots),), jnp.float32),
            "beta1": zero, "beta2": zero, "weight_decay": zero}

  def learning_rate(self, theta, progress) -> jax.Array:
    """lr(p) of theta at progress values p (any shape): for plots, records."""
    return schedule_learning_rate(theta["log_lr"], progress, self.knots,
                                  self.initial_learning_rate, self.lr_scale)

  def hyperparameters(self, theta) -> dict:
    """beta1, beta2 and the weight decay lambda that theta sets (scalars)."""
    return {
        "beta1": 1.0 - one_minus_beta(theta["beta1"], self.initial_beta1,
                                      self.beta_scale),
        "beta2": 1.0 - one_minus_beta(theta["beta2"], self.initial_beta2,
                                      self.beta_scale),
        "weight_decay": self.weight_decay_scale * theta["weight_decay"],
    }

  def opt_fn(self, theta: lopt_base.MetaParams,
             is_training: bool = False) -> opt_base.Optimizer:
    del is_training
    lopt = self

    class _Opt(opt_base.Optimizer):
      """ProgressAdam with theta captured."""

      def init(self,
               params: Any,
               model_state: Any = None,
               num_steps: Optional[Any] = None,
               key: Optional[PRNGKey] = None) -> ProgressAdamState:
        del key
        return lopt.init_state(params, model_state, num_steps)

      def update(self,
                 opt_state: ProgressAdamState,
                 grad: Any,
                 loss: Optional[jax.Array] = None,
                 model_state: Any = None,
                 is_valid: bool = False,
                 key: Optional[PRNGKey] = None) -> ProgressAdamState:
        del loss, is_valid, key
        return lopt.update_state(theta, opt_state, grad, model_state)

      def set_params(self, opt_state, params):
        return opt_state.replace(params=params)

      @property
      def name(self) -> str:
        return "ProgressAdam"

    return _Opt()

  def init_state(self, params: Any, model_state: Any = None,
                 num_steps: Optional[Any] = None) -> ProgressAdamState:
    """Zero moments; T from `num_steps` (may be traced), else constructor's."""
    if num_steps is None:
      num_steps = self.num_steps
    if num_steps is None:
      raise errors.InvalidArgument(
          "ProgressAdam needs the inner run's length: pass num_steps= to "
          "opt.init, or bind ProgressAdam.num_steps", "ProgressAdam.num_steps")
    if isinstance(num_steps, numbers.Number):
      _num_steps("ProgressAdam: opt.init's num_steps", num_steps)
    zeros = jax.tree_util.tree_map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return ProgressAdamState(
        params=params, state=model_state,
        iteration=jnp.asarray(0, jnp.int32),
        num_steps=jnp.asarray(num_steps, jnp.float32), m=zeros, v=zeros)

  def update_state(self, theta, opt_state: ProgressAdamState, grad: Any,
                   model_state: Any = None) -> ProgressAdamState:
    """One inner step (module doc): moments, scheduled AdamW step, t + 1."""
    p = training_progress(opt_state.iteration, opt_state.num_steps)
    lr = self.learning_rate(theta, p)
    q1 = one_minus_beta(theta["beta1"], self.initial_beta1, self.beta_scale)
    q2 = one_minus_beta(theta["beta2"], self.initial_beta2, self.beta_scale)
    decay = self.weight_decay_scale * theta["weight_decay"]
    n = opt_state.iteration + 1
    g32 = jax.tree_util.tree_map(lambda g: jnp.asarray(g, jnp.float32), grad)
    m = jax.tree_util.tree_map(lambda m, g: (1 - q1) * m + q1 * g,
                               opt_state.m, g32)
    v = jax.tree_util.tree_map(lambda v, g: (1 - q2) * v + q2 * g * g,
                               opt_state.v, g32)

    def new_param(w, m, v):
      step = adam_direction(m, v, q1, q2, n, self.epsilon, self.epsilon_root)
      return (w - lr * (step + decay * w)).astype(jnp.asarray(w).dtype)

    params = jax.tree_util.tree_map(new_param, opt_state.params, m, v)
    return opt_state.replace(params=params, state=model_state,
                             iteration=n.astype(jnp.int32), m=m, v=v)
