"""ValidationMetaLossFamily: LO's own estimators see our validation objective."""

import collections

import numpy as np
import pytest

import jax
import estimator_fixtures as fx
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import truncated_pes
from learned_optimization.outer_trainers import truncation_schedule
from pathology_fix.meta_gradient import estimators
from pathology_fix.lo_boundary import lo_api
from pathology_fix.tasks_and_data import validation_task
from test_validation_objective import LR, TARGETS, _tagged_family

# Every group of 3 consecutive outer_valid batches holds each target once,
# whatever order LO reads them in; 30 is far past MAX_LOSS.
VALID_TARGETS = (-1.0, 30.0, 2.0)
MAX_LOSS = 10.0
STEPS = 5  # with 2 tasks: 10 reads per eval, so HybridRPES's groups are full cycles too


def _closed_form_meta_losses(steps=STEPS, evals=3, clip_each=True):
  """Per step: SGD on (w - 1)^2 from w = 0, then the validation meta-loss."""
  w, out = 0.0, []
  for _ in range(steps):
    w = w - LR * 2 * (w - TARGETS["train"])
    batch = [(w - c)**2 for c in VALID_TARGETS[:evals]]
    if clip_each:
      out.append(np.mean(np.minimum(batch, MAX_LOSS)))
    else:
      out.append(np.mean(batch))
  return np.array(out)


def _lo_pes(family, num_tasks=2):
  return lo_api.build_lo_estimator(
      truncated_pes.TruncatedPES, family, lopt_base.LearnableSGD(
          initial_lr=LR),
      trunc_sched=truncation_schedule.ConstantTruncationSchedule(100),
      num_tasks=num_tasks, trunc_length=STEPS, steps_per_jit=STEPS,
      std=1e-6, train_and_meta=True)


def _first_estimate(est):
  theta = lopt_base.LearnableSGD(initial_lr=LR).init(jax.random.PRNGKey(0))
  weights = fx.worker_weights(theta)
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  out, _ = est.compute_gradient_estimate(weights, jax.random.PRNGKey(2), state)
  return out


def test_lo_truncated_pes_sees_the_clipped_averaged_validation_loss():
  reads = collections.Counter()
  family = validation_task.ValidationMetaLossFamily(
      _tagged_family(reads, outer_valid_targets=VALID_TARGETS),
      meta_loss_evals=3, max_loss=MAX_LOSS)
  out = _first_estimate(_lo_pes(family))
  expected = _closed_form_meta_losses()
  per_step = np.asarray(out.unroll_info.loss)  # [steps, tasks]
  print("LO PES per-step meta-losses", per_step[:, 0], "expected", expected)
  np.testing.assert_allclose(per_step, np.broadcast_to(
      expected[:, None], per_step.shape), rtol=1e-4)
  np.testing.assert_allclose(float(out.mean_loss), expected.mean(), rtol=1e-4)
  # The clip and the average both matter here.
  for other in (_closed_form_meta_losses(clip_each=False),
                _closed_form_meta_losses(evals=1)):
    assert abs(other.mean() - expected.mean()) > 0.1
  # 3 outer_valid batches per step and task (2 tasks).
  assert reads["outer_valid"] >= 3 * 2 * STEPS


def test_ours_and_lo_pes_optimize_the_same_objective():
  """HybridRPES with meta_loss_evals=3 unwrapped == on the wrapper with 1."""
  expected = _closed_form_meta_losses().mean()
  for wrapped in (False, True):
    family = _tagged_family(collections.Counter(),
                            outer_valid_targets=VALID_TARGETS)
    if wrapped:
      family = validation_task.ValidationMetaLossFamily(
          family, meta_loss_evals=3, max_loss=MAX_LOSS)
    est = estimators.HybridRPES(
        family, lopt_base.LearnableSGD(initial_lr=LR),
        truncation_schedule.ConstantTruncationSchedule(100), num_tasks=5,
        unroll_length=STEPS, steps_per_jit=STEPS, sigma=1e-6,
        meta_loss_split="outer_valid", meta_loss_evals=1 if wrapped else 3,
        max_loss=MAX_LOSS)
    out = _first_estimate(est)
    np.testing.assert_allclose(float(out.mean_loss), expected, rtol=1e-4,
                               err_msg=f"wrapped={wrapped}")


@pytest.mark.parametrize("kwargs, message", [
    (dict(meta_loss_evals=0), "ValidationMetaLossFamily.meta_loss_evals"),
    (dict(max_loss=-1.0), "ValidationMetaLossFamily.max_loss"),
])
def test_bad_arguments_name_the_parameter(kwargs, message):
  family = _tagged_family(collections.Counter())
  with pytest.raises(ValueError, match=message):
    validation_task.ValidationMetaLossFamily(family, **kwargs)


def test_a_family_without_datasets_is_refused():
  with pytest.raises(ValueError, match="ValidationMetaLossFamily.task_family"):
    validation_task.ValidationMetaLossFamily(fx.fixed_quadratic_family())
