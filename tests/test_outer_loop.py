"""pathology_fix.runtime.outer_loop: the paper's outer optimizer and the library loop."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli_utils
import pathology_fix  # pylint: disable=unused-import  # compat before LO
from learned_optimization.learned_optimizers import base as lopt_base  # pylint: disable=g-bad-import-order
from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-bad-import-order
from pathology_fix.optimizers import outer_optimizer
from pathology_fix.runtime import outer_loop

TARGET = 0.7  # the fake meta-loss is (log_lr - TARGET)^2


def _adam_reference(grads, lr, b1=0.5, b2=0.999, eps=1e-8, eps_root=1e-8,
                    clip=0.1):
  """Textbook Adam (Kingma & Ba, with optax's eps_root) on clipped grads."""
  m = v = 0.0
  steps = []
  for t, g in enumerate(grads, start=1):
    g = float(np.clip(g, -clip, clip))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    steps.append(-lr * m_hat / (np.sqrt(v_hat + eps_root) + eps))
  return steps


class _QuadraticEstimator:
  """Exact gradient of (log_lr - TARGET)^2; counts its calls and keys."""

  class _Family:
    name = "fake_family"

  task_family = _Family()

  def __init__(self):
    self.keys = []

  def init_worker_state(self, worker_weights, key):
    del worker_weights
    return {"calls": jnp.asarray(0), "key": key}

  def compute_gradient_estimate(self, worker_weights, key, state,
                                with_summary=False):
    del with_summary
    self.keys.append(np.asarray(key))
    log_lr = worker_weights.theta["log_lr"]
    loss = (log_lr - TARGET)**2
    out = gradient_learner.GradientEstimatorOut(
        mean_loss=loss, grad={"log_lr": 2 * (log_lr - TARGET)},
        unroll_state={"calls": state["calls"] + 1, "key": state["key"]},
        unroll_info=None)
    return out, {"mean||meta_loss": loss}


def _learner(lr):
  return outer_loop.learner(lopt_base.LearnableSGD(initial_lr=1.0),
                            outer_optimizer.paper_outer_optimizer(lr))


def test_paper_optimizer_is_clipped_adam_with_beta1_half():
  # Gradients beyond the clip (5, -3) and inside it (0.05): each update must
  # equal textbook Adam(beta1 0.5) on the clipped values.
  lr = 0.01
  grads = [5.0, -3.0, 0.05, 0.05]
  opt = outer_optimizer.paper_outer_optimizer(lr)
  state = opt.init({"w": jnp.asarray(0.0)})
  previous = 0.0
  for g, expected in zip(grads, _adam_reference(grads, lr)):
    state = opt.update(state, {"w": jnp.asarray(g)}, loss=jnp.asarray(0.))
    w = float(opt.get_params(state)["w"])
    assert w - previous == pytest.approx(expected, rel=1e-4)
    previous = w


@pytest.mark.parametrize("split,lr", [("train", 3e-3), ("outer_valid", 3e-4)])
def test_paper_learning_rate_per_objective(split, lr):
  opt = outer_optimizer.paper_outer_optimizer(meta_loss_split=split)
  state = opt.init({"w": jnp.asarray(0.0)})
  state = opt.update(state, {"w": jnp.asarray(1.0)}, loss=jnp.asarray(0.))
  # First Adam step: lr * g / (|g| + eps) = lr for g = 1.
  assert float(opt.get_params(state)["w"]) == pytest.approx(-lr, rel=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"meta_loss_split": "test"}, "meta_loss_split"),
    ({"learning_rate": 0.0}, "learning_rate"),
])
def test_bad_outer_optimizer_arguments_name_the_parameter(kwargs, match):
  with pytest.raises(ValueError, match=match):
    outer_optimizer.paper_outer_optimizer(**kwargs)


def test_run_applies_the_outer_optimizer_to_the_estimate_each_step():
  lr, num_steps = 0.05, 6
  learner = _learner(lr)
  est = _QuadraticEstimator()
  state = learner.init(jax.random.PRNGKey(0))
  log_lr = float(outer_loop.theta(learner, state)["log_lr"])
  m = v = 0.0
  seen = []
  for t, out in enumerate(
      outer_loop.run(learner, [est], state, num_steps, jax.random.PRNGKey(1),
                     unroll_key=jax.random.PRNGKey(2)), start=1):
    # Reference Adam step on the exact gradient at the previous theta.
    g = float(np.clip(2 * (log_lr - TARGET), -0.1, 0.1))
    m, v = 0.5 * m + 0.5 * g, 0.999 * v + 0.001 * g * g
    log_lr -= lr * (m / (1 - 0.5**t)) / (
        np.sqrt(v / (1 - 0.999**t) + 1e-8) + 1e-8)
    assert out.step == t
    assert float(outer_loop.theta(learner, out.learner_state)["log_lr"]) == (
        pytest.approx(log_lr, rel=1e-5))
    assert int(out.unroll_states[0]["calls"]) == t  # states are carried
    seen.append(out.mean_loss)
  assert len(seen) == num_steps
  assert seen[-1] < seen[0]  # moving toward TARGET


def test_resumed_run_draws_the_keys_of_the_uninterrupted_one():
  learner = _learner(0.05)
  start = learner.init(jax.random.PRNGKey(0))
  base = jax.random.PRNGKey(3)
  whole = _QuadraticEstimator()
  states = list(outer_loop.run(learner, [whole], start, 5, base,
                               unroll_key=jax.random.PRNGKey(4)))
  resumed = _QuadraticEstimator()
  for out in outer_loop.run(learner, [resumed], states[1].learner_state, 5,
                            base, unroll_states=states[1].unroll_states):
    last = out
  assert len(resumed.keys) == 3  # steps 2, 3, 4
  for a, b in zip(whole.keys[2:], resumed.keys):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
      outer_loop.theta(learner, last.learner_state)["log_lr"],
      outer_loop.theta(learner, states[-1].learner_state)["log_lr"])


def test_run_needs_states_or_a_key_and_resampling_needs_lopt():
  learner = _learner(0.05)
  state = learner.init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="unroll_key"):
    next(outer_loop.run(learner, [_QuadraticEstimator()], state, 2,
                        jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match="lopt"):
    next(outer_loop.run(learner, [_QuadraticEstimator()], state, 2,
                        jax.random.PRNGKey(0), unroll_key=jax.random.PRNGKey(1),
                        stochastic_resample_frequency=10))


@pytest.mark.parametrize("config,lr", [
    ("hybrid_quadratic", 3e-3), ("demo", 3e-3), ("paper_hybrid", 3e-4),
    ("paper_hybrid_train_objective", 3e-3)])
def test_configs_use_the_paper_optimizer(config, lr):
  gin.clear_config()
  gin.add_config_file_search_path(str(cli_utils.REPO / "gin_configs"))
  try:
    gin.parse_config_file(str(cli_utils.REPO / "gin_configs" / f"{config}.gin"))
    assert gin.query_parameter("paper_outer_optimizer.learning_rate") == lr
    theta_opt = gin.query_parameter("GradientLearner.theta_opt")
    assert theta_opt.selector == "paper_outer_optimizer"
  finally:
    gin.clear_config()


def test_a_leftover_adam_binding_is_an_error_not_a_no_op():
  gin.clear_config()
  try:
    gin.parse_config("Adam.learning_rate = 0.1")
    with pytest.raises(ValueError, match="Adam.learning_rate"):
      outer_optimizer.paper_outer_optimizer(3e-3)
  finally:
    gin.clear_config()


class _DivergingAfter(_QuadraticEstimator):
  """Finite for the first `good` calls, then every sample non-finite.

  Like our estimators with no finite sample: NaN mean loss, exact-zero
  gradient; `nan_grad` returns NaN gradients instead (LO's estimators).
  """

  def __init__(self, good, nan_grad=False):
    super().__init__()
    self.good, self.nan_grad = good, nan_grad

  def compute_gradient_estimate(self, worker_weights, key, state,
                                with_summary=False):
    out, metrics = super().compute_gradient_estimate(worker_weights, key,
                                                     state, with_summary)
    if len(self.keys) <= self.good:
      return out, metrics
    fill = jnp.nan if self.nan_grad else 0.0
    out = out.replace(mean_loss=jnp.asarray(jnp.nan),
                      grad={"log_lr": jnp.full_like(out.grad["log_lr"], fill)})
    return out, {"mean||meta_loss": jnp.asarray(jnp.nan)}


def _without_iteration(opt_state):
  return outer_loop._with_field(opt_state, "iteration", 0)  # pylint: disable=protected-access


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("nan_grad", [False, True])
def test_step_without_a_finite_sample_is_skipped(nan_grad):
  # Two good steps give Adam momentum; the third has no finite sample. An
  # applied zero gradient would still move theta through the momentum.
  learner = _learner(0.05)
  state = learner.init(jax.random.PRNGKey(0))
  outs = list(outer_loop.run(learner, [_DivergingAfter(2, nan_grad)], state,
                             4, jax.random.PRNGKey(1),
                             unroll_key=jax.random.PRNGKey(2)))
  assert [o.step for o in outs] == [1, 2, 3, 4]  # skipped steps still count
  assert [o.skipped for o in outs] == [False, False, True, True]
  assert [o.metrics[outer_loop.SKIPPED_METRIC] for o in outs] == [0, 0, 1, 1]
  good = outs[1].learner_state.theta_opt_state
  for out in outs[2:]:
    skipped = out.learner_state.theta_opt_state
    assert int(skipped.iteration) == out.step
    assert _leaves_equal(_without_iteration(skipped), _without_iteration(good))
  # The check above can fail: Adam's momentum moves theta on a zero gradient.
  moved, _ = learner.update(outs[1].learner_state, [
      gradient_learner.AggregatedGradient(
          theta_grads={"log_lr": jnp.asarray(0.0)},
          theta_model_state=None, mean_loss=jnp.asarray(0.0))
  ] if hasattr(gradient_learner, "AggregatedGradient") else [
      outs[0].worker_out.to_put.replace(
          theta_grads={"log_lr": jnp.asarray(0.0)})], key=jax.random.PRNGKey(5))
  assert not _leaves_equal(outer_loop.theta(learner, moved),
                           outer_loop.theta(learner, outs[1].learner_state))


def test_a_finite_estimator_among_non_finite_ones_is_applied():
  learner = _learner(0.05)
  state = learner.init(jax.random.PRNGKey(0))
  out = next(outer_loop.run(learner, [_DivergingAfter(0), _QuadraticEstimator()],
                            state, 1, jax.random.PRNGKey(1),
                            unroll_key=jax.random.PRNGKey(2)))
  assert not out.skipped
  assert not _leaves_equal(outer_loop.theta(learner, out.learner_state),
                           outer_loop.theta(learner, state))
