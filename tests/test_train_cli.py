"""`python -m pathology_fix.train`: outputs, resume after a kill."""

import os
import signal
import time

import jax
import numpy as np
import pytest

import pathology_fix  # pylint: disable=unused-import  # compat before LO
from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-bad-import-order
from pathology_fix.runtime import checkpoints

import cli_utils

# Metrics every step: one compilation instead of two (with/without summary).
FAST = ("run_train.summary_every_n = 1", "resumable_local_train.seed = 0")


def test_short_run_writes_checkpoints_summaries_and_config(tmp_path):
  log_dir = tmp_path / "run"
  proc = cli_utils.run_train(
      log_dir, *FAST, "run_train.num_steps = 3",
      "resumable_local_train.checkpoint_every_n_steps = 2",
      "resumable_local_train.keep = 2")
  assert proc.returncode == 0, cli_utils.describe(proc)

  names = set(os.listdir(log_dir))
  # Saved at 0 (initial), 2 (periodic), 3 (final); keep = 2 drops
  # checkpoint_0 but never params_0, the starting theta.
  assert {n for n in names if n.startswith(("checkpoint_", "params_"))} == {
      "checkpoint_2", "checkpoint_3", "params_0", "params_2", "params_3"}
  assert "config.gin" in names and "metrics.jsonl" in names
  assert cli_utils.event_files(log_dir), names
  assert not [n for n in names if n.endswith(".tmp")]
  assert "TruncatedPES" in (log_dir / "config.gin").read_text()

  ckpt = cli_utils.load_state(log_dir / "checkpoint_3", cli_utils.checkpoint_template())
  assert int(ckpt.gradient_learner_state.theta_opt_state.iteration) == 3
  params = cli_utils.load_state(log_dir / "params_3", cli_utils.params_template())
  assert int(params.step) == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, params.params,
                         ckpt.gradient_learner_state.theta_opt_state.params)
  with cli_utils.gin_config():
    lopt = mlp_lopt.MLPLOpt()
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         checkpoints.load_params(str(log_dir), 3, lopt),
                         params.params)
  with pytest.raises(FileNotFoundError, match=r"params_1: .*\[0, 2, 3\]"):
    checkpoints.load_params(str(log_dir), 1, lopt)

  records = cli_utils.read_metrics(log_dir)
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    assert np.isfinite(r["mean_loss"])
    # Estimator metrics ("mean||<family>/...") keep their names.
    assert "FixedDimQuadraticFamily/grad_norm" in r, sorted(r)

  # TensorBoard has the same scalars, at the same steps, as metrics.jsonl.
  scalars = cli_utils.read_scalars(log_dir)
  for tag in ("mean_loss", "FixedDimQuadraticFamily/grad_norm",
              "theta_grad_norm"):
    assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
    np.testing.assert_allclose([v for _, v in scalars[tag]],
                               [r[tag] for r in records], rtol=1e-6)
  theta_tags = [t for t in scalars if t.startswith("theta_mean_abs/")]
  assert theta_tags and all(t in records[0] for t in theta_tags)

  assert f"checkpoints: {log_dir}/checkpoint_3" in proc.stdout
  assert f"metrics:     {log_dir}/metrics.jsonl" in proc.stdout


def _wait_for_checkpoint(proc, log_dir, min_step, timeout_s=cli_utils.TIMEOUT_S):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    steps = checkpoints.checkpoint_steps(str(log_dir))
    if steps and steps[-1] >= min_step:
      return
    assert proc.poll() is None, f"training exited early: {proc.returncode}"
    time.sleep(0.2)
  pytest.fail(f"no checkpoint at step >= {min_step} within {timeout_s} s")


def _adam_state(ckpt):
  opt_state = ckpt.gradient_learner_state.theta_opt_state
  adam = opt_state.optax_opt_state[0]  # optax.adam = chain(scale_by_adam, lr)
  return opt_state.params, adam


def test_resume_after_sigkill_continues_from_last_checkpoint(tmp_path):
  log_dir = tmp_path / "run"
  every_step = (*FAST, "resumable_local_train.checkpoint_every_n_steps = 1")
  with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
    proc = cli_utils.start_train(
        log_dir, *every_step, "run_train.num_steps = 100000", stdout=out,
        stderr=err)
    try:
      _wait_for_checkpoint(proc, log_dir, min_step=2)
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()

  # What a kill can leave behind: the newest complete checkpoint N, and a
  # half-written checkpoint_<N+1>.tmp. A checkpoint_<N+1> that is unreadable
  # (torn by the disk, say) must not stop resume either.
  n = checkpoints.checkpoint_steps(str(log_dir))[-1]
  template = cli_utils.checkpoint_template()
  before = cli_utils.load_state(log_dir / f"checkpoint_{n}", template)
  assert int(before.gradient_learner_state.theta_opt_state.iteration) == n
  (log_dir / f"checkpoint_{n + 1}.tmp").write_bytes(b"\x85\xa3garbage")
  (log_dir / f"checkpoint_{n + 1}").write_bytes(
      (log_dir / f"checkpoint_{n}").read_bytes()[:40])

  proc = cli_utils.run_train(log_dir, *every_step,
                             f"run_train.num_steps = {n + 2}")
  assert proc.returncode == 0, cli_utils.describe(proc)
  assert f"Resuming from {log_dir}/checkpoint_{n}: outer step {n} " in proc.stdout
  assert "this run did 2 steps" in proc.stdout
  assert not [p for p in os.listdir(log_dir) if p.endswith(".tmp")]

  # Step count continues; metrics logged by the killed run after its last
  # checkpoint are dropped, so steps stay unique and increasing.
  assert [r["step"] for r in cli_utils.read_metrics(log_dir)] == list(
      range(1, n + 3))
  scalars = cli_utils.read_scalars(log_dir)
  assert [s for s, _ in scalars["mean_loss"]] == list(range(1, n + 3))

  after = cli_utils.load_state(log_dir / f"checkpoint_{n + 1}", template)
  assert int(after.gradient_learner_state.theta_opt_state.iteration) == n + 1
  assert float(after.elapsed_time) > float(before.elapsed_time)
  final = cli_utils.load_state(log_dir / f"checkpoint_{n + 2}", template)
  assert int(final.gradient_learner_state.theta_opt_state.iteration) == n + 2

  # The first resumed update started exactly from checkpoint N's theta and
  # Adam moments: undo one Adam step (lr and betas from the config).
  lr, b1, b2, eps, eps_root = 3e-3, 0.9, 0.999, 1e-8, 1e-8
  theta0, adam0 = _adam_state(before)
  theta1, adam1 = _adam_state(after)
  assert int(adam0.count) == n and int(adam1.count) == n + 1

  def check_moments(m0, v0, m1, v1):
    g = (m1 - b1 * m0) / (1 - b1)  # the gradient of the resumed step
    np.testing.assert_allclose(
        v1, b2 * v0 + (1 - b2) * g**2, rtol=1e-3, atol=1e-6 * np.max(v1))

  def check_theta(t0, t1, m1, v1):
    t = n + 1
    m_hat, v_hat = m1 / (1 - b1**t), v1 / (1 - b2**t)
    expected = t0 - lr * m_hat / (np.sqrt(v_hat + eps_root) + eps)
    np.testing.assert_allclose(t1, expected, rtol=1e-4, atol=lr * 1e-3)

  jax.tree_util.tree_map(check_moments, adam0.mu, adam0.nu, adam1.mu, adam1.nu)
  jax.tree_util.tree_map(check_theta, theta0, theta1, adam1.mu, adam1.nu)


# Bad input (flags, gin, checkpoints): tests/test_bad_config.py.
