"""Samples split across two (forced) CPU devices give the one-device gradient."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the device count is fixed when jax starts.
SCRIPT = r"""
import json, sys, warnings
import numpy as np
import jax
import pathology_fix  # noqa: F401
from learned_optimization.learned_optimizers import base as lopt_base
from learned_optimization.outer_trainers import gradient_learner
from learned_optimization.outer_trainers import truncation_schedule
from learned_optimization.tasks import quadratics
from learned_optimization.tasks.datasets import base as datasets_base
from pathology_fix.meta_gradient import estimators

assert jax.local_device_count() == 2, jax.devices()


class SeededFamily(quadratics.FixedDimQuadraticFamilyData):
  # Both runs must read the same batches (the ES half sees the data noise).

  def __init__(self, dim):
    super().__init__(dim)

    def batches():
      rng = np.random.default_rng(0)
      while True:
        yield np.float32(rng.standard_normal())

    self.datasets = datasets_base.Datasets(
        train=batches(), inner_valid=batches(), outer_valid=batches(),
        test=batches())


def estimator(shard, num_tasks=6, rematerialize="auto"):
  # 50-step inner runs: truncations of 20, 20, clipped 10, then a reset.
  return estimators.HybridRPES(
      SeededFamily(4), lopt_base.LearnableSGDM(),
      truncation_schedule.ConstantTruncationSchedule(50), num_tasks=num_tasks,
      unroll_length=20, steps_per_jit=10, shard_samples=shard,
      rematerialize=rematerialize)


def run(shard, rematerialize):
  est = estimator(shard, rematerialize=rematerialize)
  theta = lopt_base.LearnableSGDM().init(jax.random.PRNGKey(0))
  weights = gradient_learner.WorkerWeights(
      theta=theta, theta_model_state=None,
      outer_state=gradient_learner.OuterState(0))
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  grads, losses = [], []
  for i in range(4):
    out, metrics = est.compute_gradient_estimate(
        weights, jax.random.PRNGKey(10 + i), state)
    state = out.unroll_state
    grads.append({k: float(v) for k, v in out.grad.items()})
    losses.append(float(out.mean_loss))
  state_devices = sorted({len(leaf.sharding.device_set)
                          for leaf in jax.tree_util.tree_leaves(state)})
  grad_devices = sorted({len(leaf.sharding.device_set)
                         for leaf in jax.tree_util.tree_leaves(out.grad)})
  return dict(active=est.sharding.active, grads=grads, losses=losses,
              state_devices=state_devices, grad_devices=grad_devices,
              inner_step=np.asarray(state.inner_step).tolist())


result = {
    "sharded": run(True, "auto"),
    "sharded_remat": run(True, True),
    "single": run(False, "auto"),
}
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  odd = estimator(True, num_tasks=5)
result["odd_active"] = odd.sharding.active
result["odd_warnings"] = [str(w.message) for w in caught]
print("RESULT" + json.dumps(result))
"""


@pytest.fixture(scope="module")
def two_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=2").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_sharded_gradient_equals_single_device_gradient(two_devices):
  sharded, single = two_devices["sharded"], two_devices["single"]
  assert sharded["active"] and not single["active"]
  assert sharded["state_devices"] == [2]  # the inner states are split
  assert sharded["grad_devices"] == [1]  # what LO's outer loop receives
  # Four steps covered a clipped truncation and a reset.
  assert sharded["inner_step"] == single["inner_step"] == [20] * 6
  for run in (sharded, two_devices["sharded_remat"]):
    np.testing.assert_allclose(run["losses"], single["losses"], rtol=1e-5)
    for got, want in zip(run["grads"], single["grads"]):
      for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4,
                                   atol=1e-6)


def test_samples_not_divisible_by_devices_stay_on_one_device(two_devices):
  assert not two_devices["odd_active"]
  assert any("not divisible" in w for w in two_devices["odd_warnings"])
