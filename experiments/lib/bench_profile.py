"""bench.py --profile: HybridRPES's chunk functions one by one, XLA costs.

It calls the chunked-VJP engine's and the inner problems' public functions
(`unroller.engine.*`, `unroller.problems.*`) one at a time, only under
--profile.
"""

import statistics
import time
from typing import Any, Dict, Optional

from experiments.lib import bench_runs


def _cost(compiled) -> Dict[str, Optional[float]]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  mem = compiled.memory_analysis()
  return dict(
      gflops=cost.get("flops", float("nan")) / 1e9,
      gb_accessed=cost.get("bytes accessed", float("nan")) / 1e9,
      temp_mib=(mem.temp_size_in_bytes / 2**20) if mem is not None else None)


def run_profile(cfg: Dict[str, Any]) -> Dict[str, Any]:
  """Times HybridRPES's chunk functions one by one, with XLA's cost estimates.

  One chunk (steps_per_jit steps of all 2n unrolls) of: the forward pass, the
  forward pass keeping residuals, applying the stored pullback, and the
  rematerialized backward (recompute + pullback); plus, for scale, the
  inner task's own value_and_grad over the same steps without the learned
  optimizer, and TruncatedES's unit of work (the same forward).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if cfg.get("cache_dir"):
    jax.config.update("jax_compilation_cache_dir", cfg["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  import pathology_fix  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  from learned_optimization.tasks import quadratics  # pylint: disable=g-import-not-at-top
  from pathology_fix_core import variational  # pylint: disable=g-import-not-at-top

  n, spj = cfg["n"], cfg["spj"]
  if cfg["task"].startswith("quadratic"):
    dim = int(cfg["task"].partition(":")[2] or 10)
    family, task_label = quadratics.FixedDimQuadraticFamily(dim), f"quad{dim}"
  else:
    family, task_label = bench_runs.cnn_family(cfg["cnn_image_size"],
                                     cfg["cnn_batch_size"])
  lopt = mlp_lopt.MLPLOpt()
  est = bench_runs.make_estimator("HybridRPES (remat)", family, lopt, n, spj,
                        total=100 * spj, spj=spj)
  unroller = est.unroller
  theta = lopt.init(jax.random.PRNGKey(0))
  weights = gradient_learner.WorkerWeights(
      theta=theta, theta_model_state=None,
      outer_state=gradient_learner.OuterState(0))
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  eps = variational.sample_perturbations(jax.random.PRNGKey(2), theta,
                                         est.sigma, num_samples=n)

  theta_pair, opt_states, totals = unroller.engine.pair_up(theta, eps,
                                                   state.inner_opt_state)
  datas = unroller.problems.chunk_data()
  key = jax.random.PRNGKey(3)
  steps = jnp.full((n,), spj, jnp.int32)
  fwd_args = (theta_pair, opt_states, state.task_param, datas, key, 0, steps,
              totals)
  _, cot_totals, cot_states, rp_grads = unroller.engine.finish_forward(
      theta_pair, opt_states, totals, steps)
  pullback = unroller.engine.forward_chunk_vjp(*fwd_args)[2]

  def task_grads_only(theta_pair, opt_states, task_params, datas, key):
    """The inner task's value_and_grad for every unroll and step, no update."""
    keys, _ = unroller.problems.chunk_inputs(key, 0, steps)
    task_fn = family.task_fn

    def one(opt_state, task_param, k, data):
      p, s = lopt.opt_fn(theta, is_training=True).get_params_state(opt_state)
      (l, _), g = jax.value_and_grad(
          task_fn(task_param).loss_with_state, has_aux=True)(p, s, k, data)
      return l + sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(g))

    per_sample = jax.vmap(one)
    per_sign = jax.vmap(per_sample, in_axes=(0, None, None, None))

    def body(c, xs):
      k, data = xs
      return c + jnp.sum(per_sign(opt_states, task_params, k, data)), None

    return jax.lax.scan(body, 0., (keys, datas))[0]
  # pylint: enable=protected-access

  parts = [
      ("forward chunk (= TruncatedES / VariationalES work)",
       unroller.engine.forward_chunk, fwd_args),
      ("forward chunk keeping residuals", unroller.engine.forward_chunk_vjp,
       fwd_args),
      ("apply stored pullback", unroller.engine.apply_pullback,
       (pullback, cot_states, cot_totals, rp_grads)),
      ("remat backward chunk (recompute + pullback)",
       unroller.engine.backward_chunk,
       fwd_args[:7] + (cot_states, cot_totals, rp_grads)),
      ("inner task value_and_grad only (no learned optimizer)",
       jax.jit(task_grads_only),
       (theta_pair, opt_states, state.task_param, datas, key)),
  ]
  rows = []
  for name, fn, args in parts:
    compiled = fn.lower(*args).compile()
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(cfg["repeats"]):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t)
    rows.append(dict(part=name, median_s=statistics.median(times),
                     **_cost(compiled)))
  params_per_unroll = sum(
      x.size for x in jax.tree_util.tree_leaves(
          lopt.opt_fn(theta).get_params(state.inner_opt_state))) // n
  residual_mib = unroller.engine.residual_bytes(*fwd_args) / 2**20
  return dict(cfg, task_label=task_label, rows=rows,
              inner_params_per_unroll=int(params_per_unroll),
              residual_mib_per_chunk=residual_mib,
              device=str(jax.devices()[0].device_kind))
