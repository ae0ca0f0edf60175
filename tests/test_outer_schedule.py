"""Outer learning-rate schedules on the paper's outer optimizer."""

import math

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pathology_fix  # noqa: F401  (compat before LO)
from learned_optimization.learned_optimizers import base as lopt_base  # pylint: disable=g-bad-import-order
from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-bad-import-order
from pathology_fix.optimizers import outer_optimizer
from pathology_fix.runtime import outer_loop
from pathology_fix.optimizers import outer_schedule


def _lr_reference(t, lr, schedule, total, warmup, final):
  """The module docstring's lr(t), written out per case."""
  if t < warmup:
    return lr * (t + 1) / warmup
  if schedule == "constant":
    return lr
  p = min((t - warmup) / (total - warmup), 1.0)
  if schedule == "cosine":
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))
  return lr * (1 - (1 - final) * p)


CASES = [("constant", None, 0, 0.0), ("constant", None, 5, 0.0),
         ("cosine", 40, 0, 0.0), ("cosine", 40, 8, 0.1),
         ("linear", 30, 0, 0.25), ("linear", 30, 10, 0.0)]


@pytest.mark.parametrize("schedule,total,warmup,final", CASES)
def test_schedule_follows_the_formula(schedule, total, warmup, final):
  sched = outer_schedule.OuterSchedule(2e-3, schedule, total, warmup, final)
  ts = np.arange(0, 60)
  got = np.asarray(jax.jit(jax.vmap(sched))(ts))
  want = [_lr_reference(t, 2e-3, schedule, total, warmup, final) for t in ts]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)


def test_schedule_landmarks():
  cos = outer_schedule.OuterSchedule(1e-3, "cosine", 100, 0, 0.2)
  assert float(cos(0)) == pytest.approx(1e-3)
  assert float(cos(50)) == pytest.approx(1e-3 * 0.6)  # halfway: mid value
  assert float(cos(100)) == pytest.approx(2e-4)
  assert float(cos(1000)) == pytest.approx(2e-4)  # stays at the final rate
  lin = outer_schedule.OuterSchedule(1e-3, "linear", 20, 10, 0.0)
  assert float(lin(0)) == pytest.approx(1e-4)  # warm-up starts above zero
  assert float(lin(9)) == pytest.approx(1e-3)
  assert float(lin(15)) == pytest.approx(5e-4)
  assert float(lin(20)) == 0.0


def _adam_steps(grads, lrs, b1=0.5, b2=0.999, eps=1e-8, eps_root=1e-8,
                clip=0.1):
  """Textbook Adam (optax's eps_root) on clipped grads, step size lrs[t]."""
  m = np.zeros_like(grads[0], np.float64)
  v = np.zeros_like(m)
  x = np.zeros_like(m)
  out = []
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    g = np.clip(g, -clip, clip)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t) + eps_root)
                                       + eps)
    out.append(x.copy())
  return out


@pytest.mark.parametrize("schedule,total,warmup,final", CASES[1:])
def test_updates_are_clipped_adam_with_the_scheduled_step(schedule, total,
                                                          warmup, final):
  rng = np.random.default_rng(0)
  grads = [rng.normal(scale=0.2, size=(5,)) for _ in range(45)]  # some > 0.1
  lrs = [_lr_reference(t, 1e-2, schedule, total, warmup, final)
         for t in range(len(grads))]
  want = _adam_steps(grads, lrs)
  opt = outer_schedule.scheduled_outer_optimizer(
      1e-2, schedule=schedule, total_steps=total, warmup_steps=warmup,
      final_fraction=final)
  state = opt.init({"w": jnp.zeros(5)})
  for t, g in enumerate(grads):
    state = opt.update(state, {"w": jnp.asarray(g, jnp.float32)},
                       loss=jnp.asarray(0.0))
    np.testing.assert_allclose(opt.get_params(state)["w"], want[t],
                               rtol=2e-4, atol=1e-7)
    assert opt.learning_rate(t) == pytest.approx(lrs[t], rel=1e-5, abs=1e-8)


def test_constant_schedule_is_exactly_the_paper_optimizer():
  rng = np.random.default_rng(1)
  theta = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  paper = outer_optimizer.paper_outer_optimizer(3e-3)
  ours = outer_schedule.scheduled_outer_optimizer(3e-3)
  assert isinstance(ours.opt, type(paper.opt))
  s_paper, s_ours = paper.init(theta), ours.init(theta)
  assert (jax.tree_util.tree_structure(s_paper) ==
          jax.tree_util.tree_structure(s_ours))
  for _ in range(8):
    g = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(scale=0.3, size=x.shape), x.dtype),
        theta)
    s_paper = paper.update(s_paper, g, loss=jnp.asarray(0.0))
    s_ours = ours.update(s_ours, g, loss=jnp.asarray(0.0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, s_paper, s_ours)


def _update(learner, state, grad, i):
  agg = gradient_learner.AggregatedGradient(
      theta_grads=grad, theta_model_state=None, mean_loss=jnp.asarray(1.0))
  return learner.update(state, [agg], key=jax.random.PRNGKey(i))[0]


def test_as_the_gradient_learner_optimizer_and_resumed_from_bytes():
  # The schedule's counter lives in the learner state: a restored state
  # continues it exactly.
  opt = outer_schedule.scheduled_outer_optimizer(
      0.05, schedule="cosine", total_steps=6, warmup_steps=2,
      final_fraction=0.1)
  learner = outer_loop.learner(lopt_base.LearnableSGD(initial_lr=1.0), opt)
  state = learner.init(jax.random.PRNGKey(0))
  grad = jax.tree_util.tree_map(jnp.ones_like,
                                outer_loop.theta(learner, state))
  thetas = [outer_loop.theta(learner, state)["log_lr"]]
  states = [state]
  for i in range(8):
    state = _update(learner, state, grad, i)
    states.append(state)
    thetas.append(outer_loop.theta(learner, state)["log_lr"])
  assert int(state.theta_opt_state.iteration) == 8
  # A constant gradient makes every Adam step exactly lr(t) (up to eps).
  steps = np.diff(np.asarray(thetas, np.float64))
  want = [-_lr_reference(t, 0.05, "cosine", 6, 2, 0.1) for t in range(8)]
  np.testing.assert_allclose(steps, want, rtol=1e-4)
  restored = flax.serialization.from_bytes(
      learner.init(jax.random.PRNGKey(1)),
      flax.serialization.to_bytes(states[3]))
  for i in range(3, 8):
    restored = _update(learner, restored, grad, i)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": "exp"}, r"schedule='exp'; allowed: \('constant', 'cosine', "
                          r"'linear'\)"),
    ({"schedule": "cosine"}, r"total_steps=None; allowed: an integer >"),
    ({"schedule": "linear", "total_steps": 10, "warmup_steps": 10},
     r"total_steps=10; allowed: an integer > warmup_steps \(10\)"),
    ({"warmup_steps": -1}, r"warmup_steps=-1; allowed: an integer >= 0"),
    ({"warmup_steps": 2.5}, r"warmup_steps=2.5; allowed"),
    ({"schedule": "cosine", "total_steps": 10, "final_fraction": 1.5},
     r"final_fraction=1.5; allowed: a float in \[0, 1\]"),
    ({"learning_rate": 0.0}, r"learning_rate=0.0; allowed: a finite float > 0"),
    ({"learning_rate": float("nan")}, r"learning_rate=nan; allowed"),
    ({"meta_loss_split": "test"}, r"meta_loss_split='test'; allowed: "
                                  r"\['outer_valid', 'train'\]"),
])
def test_bad_values_name_the_parameter_and_allowed_values(kwargs, match):
  with pytest.raises(ValueError,
                     match=r"scheduled_outer_optimizer\." + match):
    outer_schedule.scheduled_outer_optimizer(**kwargs)


def test_peak_rate_from_gin_paper_binding_or_split_default():
  gin.clear_config()
  try:
    opt = outer_schedule.scheduled_outer_optimizer(meta_loss_split="train")
    assert opt.schedule.learning_rate == 3e-3
    opt = outer_schedule.scheduled_outer_optimizer()
    assert opt.schedule.learning_rate == 3e-4  # "outer_valid"
    gin.parse_config("paper_outer_optimizer.learning_rate = 1e-3")
    assert outer_schedule.scheduled_outer_optimizer(
        schedule="cosine", total_steps=5).schedule.learning_rate == 1e-3
    assert outer_schedule.scheduled_outer_optimizer(
        2e-3).schedule.learning_rate == 2e-3  # explicit beats the binding
    gin.parse_config("Adam.learning_rate = 0.1")
    with pytest.raises(ValueError, match="Adam.learning_rate"):
      outer_schedule.scheduled_outer_optimizer()
  finally:
    gin.clear_config()


def test_gin_binds_it_as_the_learner_theta_optimizer():
  gin.clear_config()
  try:
    gin.parse_config("""
        import pathology_fix.optimizers.outer_schedule
        scheduled_outer_optimizer.learning_rate = 1e-3
        scheduled_outer_optimizer.schedule = "linear"
        scheduled_outer_optimizer.total_steps = 100
        scheduled_outer_optimizer.warmup_steps = 10
        scheduled_outer_optimizer.final_fraction = 0.1
        GradientLearner.theta_opt = @scheduled_outer_optimizer()
    """)
    ref = gin.query_parameter("GradientLearner.theta_opt")
    opt = ref.scoped_configurable_fn()
    assert isinstance(opt, outer_schedule.ScheduledOuterOptimizer)
    assert opt.learning_rate(100) == pytest.approx(1e-4)
    assert opt.learning_rate(9) == pytest.approx(1e-3)
  finally:
    gin.clear_config()
