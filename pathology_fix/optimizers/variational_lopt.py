"""A learned-optimizer wrapper that makes LO's own estimators optimize L~.

`VariationalLearnedOptimizer(lopt, sigma)` draws eps ~ N(0, sigma^2 I) once
per inner problem, when its optimizer state is initialized, keeps it in that
state, and applies theta + eps at every inner step. LO's TruncatedGrad,
TruncatedES or TruncatedPES run on the wrapped optimizer then estimate the
gradient of the smoothed objective L~(theta) = E_eps[L(theta + eps)]: eps does
not depend on theta, so d/dtheta of L(theta + eps) is the RP sample.

Two smoothed objectives: the wrapper and our estimators
(`estimators.HybridRPES`, `VariationalRP`, `VariationalES`) differ in how long
one eps lives.

  | | eps drawn | inner run of T steps in truncations of k |
  |---|---|---|
  | this wrapper | once per inner run, at init | theta + eps for all T steps |
  | our estimators | fresh every truncation | theta + eps_j for truncation j |

Wrapper: L~_run(theta) = E_eps[ L(theta + eps; whole inner run) ], the smoothing
of the whole-run objective; consecutive truncations of one run are correlated
through the shared eps. Estimators: the inner state a truncation starts from
was produced under earlier draws, and each truncation smooths only its own
k steps, E_eps_j[ L_j(theta + eps_j | state_j) ] (the paper's truncated
setting; antithetic pairs need eps_j independent of the state). The two agree
when every truncation is a whole inner run (T = k), which is how the
equivalence test with LO's TruncatedGrad is set up; otherwise they are
different objectives. Tests: `test_estimators.py::
test_variational_lopt_keeps_one_eps_for_the_whole_inner_run` and
`test_next_state_continues_from_positive_branch_and_resets_at_the_end`.
"""

from typing import Any, Optional

import flax
import gin
import jax

from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.optimizers import base as opt_base
from pathology_fix_core import variational


@flax.struct.dataclass
class VariationalOptState:
  inner_opt_state: Any
  eps: Any  # shaped like theta; fixed for the whole inner run


def _add(theta, eps):
  return jax.tree_util.tree_map(lambda t, e: t + e, theta, eps)


@gin.configurable
class VariationalLearnedOptimizer(lopt_base.LearnedOptimizer):
  """Applies theta + eps, eps drawn per inner problem at init.

  eps is kept for the whole inner run, across truncations (unlike our
  estimators, which draw a fresh eps per truncation: see the module doc).

  Args:
    learned_opt: the wrapped learned optimizer.
    sigma: std of the Gaussian smoothing.

  LO's estimators call `opt_fn(theta)` with is_training False inside training
  too, so every optimizer this returns perturbs. To apply the mean theta (e.g.
  at evaluation) use `self.learned_opt.opt_fn(theta)`.
  """

  def __init__(self, learned_opt: lopt_base.LearnedOptimizer, sigma: float = 0.1):
    self.learned_opt = learned_opt
    self.sigma = variational.validate_sigma(sigma)

  def init(self, key) -> lopt_base.MetaParams:
    return self.learned_opt.init(key)

  def opt_fn(self, theta, is_training: bool = False) -> opt_base.Optimizer:
    learned_opt, sigma = self.learned_opt, self.sigma
    unperturbed = learned_opt.opt_fn(theta, is_training=is_training)

    class _PerturbedOpt(opt_base.Optimizer):
      """The wrapped optimizer at theta + eps, eps held in the state."""

      def init(self,
               params,
               model_state=None,
               num_steps: Optional[int] = None,
               key=None) -> VariationalOptState:
        if key is None:
          raise ValueError(
              "VariationalLearnedOptimizer needs a PRNG key at init to draw its "
              "perturbation; pass key= to opt.init")
        key_eps, key_inner = jax.random.split(key)
        eps = variational.sample_perturbation(key_eps, theta, sigma)
        perturbed = learned_opt.opt_fn(_add(theta, eps), is_training=is_training)
        return VariationalOptState(
            inner_opt_state=perturbed.init(
                params, model_state, num_steps=num_steps, key=key_inner),
            eps=eps)

      def update(self, opt_state, grad, model_state=None, key=None, **kwargs):
        perturbed = learned_opt.opt_fn(
            _add(theta, opt_state.eps), is_training=is_training)
        return opt_state.replace(
            inner_opt_state=perturbed.update(
                opt_state.inner_opt_state, grad, model_state=model_state,
                key=key, **kwargs))

      def get_params(self, opt_state):
        return unperturbed.get_params(opt_state.inner_opt_state)

      def get_state(self, opt_state):
        return unperturbed.get_state(opt_state.inner_opt_state)

      def set_params(self, opt_state, params):
        return opt_state.replace(inner_opt_state=unperturbed.set_params(
            opt_state.inner_opt_state, params))

    return _PerturbedOpt()
