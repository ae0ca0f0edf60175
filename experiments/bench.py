r"""Outer-step cost of HybridRPES against LO's truncated estimators.

  python -m experiments.bench [--quick] [--samples 8,16,...] [--out FILE]
  python -m experiments.bench --preset gpu --out bench_gpu.md   (one H100)

For every (task, truncation length k, n samples) it times one outer step
(`compute_gradient_estimate`, blocked on the gradient) of

  HybridRPES (remat)   n antithetic pairs = 2n unrolls, reverse pass recomputes
                       each chunk (rematerialize=True)
  HybridRPES (stored)  the same, keeping each chunk's residuals
                       (rematerialize=False); the default "auto" is this one
                       up to remat_chunk_threshold=10 chunks while the
                       residuals fit remat_memory_budget_mb, remat beyond
  TruncatedGrad        LO, num_tasks = 2n (same number of unrolls)
  TruncatedES          LO, num_tasks = n antithetic pairs, stacked (both signs
                       in one vectorized call, as HybridRPES does)
  TruncatedPES         LO, num_tasks = n, stacked

with MLPLOpt, steps_per_jit = 10, and an inner run long enough that no inner
problem resets during the measurement. Tasks: LO's FixedDimQuadraticFamily(10)
and the paper's 3-layer CNN (`pathology_fix.tasks.FashionMnistClassSubsetFamily`
with architecture "conv3"; image size and batch are flags).

The estimators of one (task, k, n) run in one fresh process (multiprocessing
"spawn") with their timed steps interleaved, so drifting load on a shared
machine hits all of them alike. Peak memory: on CPU, the rise of the
process's resident memory during one outer step, measured per estimator
after timing; on a GPU, peak_bytes_in_use of a fresh process per estimator
(device peaks cannot be reset). Children share a persistent XLA compilation
cache, so only the first process of each shape pays full compile time.
--profile adds a part-by-part timing of one HybridRPES chunk with XLA's cost
estimates. The parent prints the Markdown table and, with --out FILE,
writes FILE.md and FILE.json.
"""

import argparse
import ctypes
import json
import math
import multiprocessing
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ESTIMATORS = ("HybridRPES (remat)", "HybridRPES (stored)", "TruncatedGrad",
              "TruncatedES", "TruncatedPES")
BASELINE = "TruncatedGrad"
HYBRID = ("HybridRPES (remat)", "HybridRPES (stored)")
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
    "pathology_fix", "bench_xla")

# name -> settings. task_lengths / task_samples override lengths / samples.
PRESETS = {
    # CPU, < 5 minutes on 2 idle cores (the budget skips what does not fit).
    # The CNN runs n=2: one outer step of conv3 at n=8 takes ~9 s here.
    "quick": dict(tasks=("quadratic", "cnn"), lengths=(10, 100),
                  task_lengths={"cnn": (10,)}, samples=(8,),
                  task_samples={"cnn": (2,)}, cnn_image_size=8,
                  cnn_batch_size=8, warmup=2,
                  repeats={"quadratic": 10, "cnn": 3}, mem_steps=1,
                  config_timeout=240, budget_s=280),
    # Everything at CPU-friendly sizes (tens of minutes on 2 cores).
    "full": dict(tasks=("quadratic", "cnn"), lengths=(10, 100, 1000),
                 task_lengths={}, samples=(8,), task_samples={"cnn": (2,)},
                 cnn_image_size=8, cnn_batch_size=8, warmup=3,
                 repeats={"quadratic": 15, "cnn": 5}, mem_steps=2,
                 config_timeout=1800, budget_s=None),
    # One H100, under 4 minutes: the paper's CNN at 28x28, batch 128; the
    # budget cuts what does not fit (k=1000 last) and says so in the table.
    "gpu": dict(tasks=("cnn",), lengths=(10, 100, 1000), task_lengths={},
                samples=(8,), task_samples={}, cnn_image_size=28,
                cnn_batch_size=128, warmup=2,
                repeats={"quadratic": 5, "cnn": 3}, mem_steps=1,
                config_timeout=150, budget_s=215),
    # Seconds on CPU: checks that the GPU script runs end to end.
    "tiny": dict(tasks=("quadratic",), lengths=(10,), task_lengths={},
                 samples=(2,), task_samples={}, cnn_image_size=8,
                 cnn_batch_size=4, warmup=2, repeats={"quadratic": 2, "cnn": 2},
                 mem_steps=1, config_timeout=300, budget_s=None),
}

MEMORY_NOTE_CPU = (
    "Peak memory (CPU): the largest rise of the process's resident memory "
    "during one outer step (after the timed ones and one settling step): "
    "/proc/self VmHWM minus VmRSS just before the step, with the peak reset "
    "through /proc/self/clear_refs and glibc malloc set to mmap blocks "
    ">= 4 KiB and trim frees, so freed buffers leave the resident set. It "
    "counts the step's live and temporary buffers (saved states, residuals, "
    "XLA temporaries), not the inner states held between steps nor compiled "
    "code; about 1 MiB is noise.")
MEMORY_NOTE_GPU = (
    "Peak memory (GPU): device memory_stats() peak_bytes_in_use of the "
    "configuration's own process minus bytes_in_use after its inner "
    "problems were initialized (before the first outer step).")


# Child process: one configuration.


def _set_glibc_malloc_for_measurement():
  """Large blocks via mmap and trimmed frees: the RSS follows live buffers."""
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  libc.mallopt(m_mmap_threshold, 4096)
  libc.mallopt(m_trim_threshold, 4096)
  libc.malloc_trim(0)
  return True


def _proc_status_kib(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


class CompileCounter:
  """Counts XLA compilations (JAX's backend-compile monitoring event)."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.names: List[str] = []
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration
    if event == self.EVENT:
      self.names.append(str(kwargs.get("fun_name", "?")))

  @property
  def count(self) -> int:
    return len(self.names)


def _cnn_family(image_size: int, batch_size: int):
  """The paper's conv3 on Fashion-MNIST classes; a synthetic stand-in if absent."""
  try:
    from pathology_fix import tasks as ptasks  # pylint: disable=g-import-not-at-top
    family = ptasks.FashionMnistClassSubsetFamily(
        architecture="conv3", image_size=image_size, batch_size=batch_size)
    return family, f"conv3 FashionMNIST {image_size}px b{batch_size}"
  except Exception as e:  # pylint: disable=broad-except
    print(f"[bench] paper CNN unavailable ({e!r}); synthetic conv3 instead",
          file=sys.stderr)
  return _synthetic_cnn_family(image_size, batch_size), (
      f"conv3 synthetic {image_size}px b{batch_size}")


def _synthetic_cnn_family(image_size: int, batch_size: int):
  """conv3 (32 ch, strides 2,2,1, avg pool) on random images; LO APIs only."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from learned_optimization.tasks import base as tasks_base  # pylint: disable=g-import-not-at-top
  from learned_optimization.tasks.datasets import base as datasets_base  # pylint: disable=g-import-not-at-top

  def batches():
    rng = np.random.default_rng(0)
    while True:
      yield {"image": rng.standard_normal(
                 (batch_size, image_size, image_size, 1)).astype(np.float32),
             "label": rng.integers(0, 10, batch_size).astype(np.int32)}

  def forward(batch):
    net = batch["image"]
    for stride in (2, 2, 1):
      net = jax.nn.relu(hk.Conv2D(32, 3, stride=stride)(net))
    logits = hk.Linear(10)(jnp.mean(net, axis=(1, 2)))
    labels = jax.nn.one_hot(batch["label"], 10)
    return jnp.mean(tasks_base.softmax_cross_entropy(logits=logits,
                                                     labels=labels))

  net = hk.transform(forward)

  class SyntheticConv3(tasks_base.Task):
    datasets = datasets_base.Datasets(
        train=batches(), inner_valid=batches(), outer_valid=batches(),
        test=batches())

    def init(self, key):
      return net.init(key, next(batches()))

    def loss(self, params, key, data):
      return net.apply(params, key, data)

  return tasks_base.single_task_to_family(SyntheticConv3(), name="conv3_syn")


def _make_estimator(name: str, family, lopt, n: int, k: int, total: int,
                    spj: int):
  import pathology_fix  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from learned_optimization.outer_trainers import truncated_es  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncated_grad  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncated_pes  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncation_schedule  # pylint: disable=g-import-not-at-top
  from pathology_fix import estimators  # pylint: disable=g-import-not-at-top
  sched = truncation_schedule.ConstantTruncationSchedule(total)
  if name in HYBRID:
    return estimators.HybridRPES(
        family, lopt, sched, num_tasks=n, unroll_length=k, steps_per_jit=spj,
        rematerialize=name == "HybridRPES (remat)")
  if name == "TruncatedGrad":
    return truncated_grad.TruncatedGrad(
        family, lopt, sched, num_tasks=2 * n, unroll_length=k,
        steps_per_jit=spj)
  if name == "TruncatedES":
    return truncated_es.TruncatedES(
        family, lopt, sched, num_tasks=n, unroll_length=k, steps_per_jit=spj,
        std=0.01, stack_antithetic_samples=True)
  if name == "TruncatedPES":
    return truncated_pes.TruncatedPES(
        family, lopt, sched, num_tasks=n, trunc_length=k, steps_per_jit=spj,
        std=0.01, stack_antithetic_samples=True)
  raise ValueError(f"unknown estimator {name!r}")


def _init_jax(cfg):
  import jax  # pylint: disable=g-import-not-at-top
  if cfg.get("cache_dir"):
    jax.config.update("jax_compilation_cache_dir", cfg["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  import pathology_fix  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  return jax


def _family(cfg):
  from learned_optimization.tasks import quadratics  # pylint: disable=g-import-not-at-top
  if cfg["task"].startswith("quadratic"):
    dim = int(cfg["task"].partition(":")[2] or 10)
    return (quadratics.FixedDimQuadraticFamily(dim),
            f"LO FixedDimQuadraticFamily({dim})")
  return _cnn_family(cfg["cnn_image_size"], cfg["cnn_batch_size"])


class _Runner:
  """One estimator and its inner problems; `step` runs one outer step."""

  def __init__(self, name, cfg, family, lopt, weights):
    import jax  # pylint: disable=g-import-not-at-top
    steps = cfg["warmup"] + cfg["repeats"] + cfg["mem_steps"] + 1
    self.name = name
    self.weights = weights
    self.est = _make_estimator(name, family, lopt, cfg["n"], cfg["k"],
                               total=cfg["k"] * (steps + 2) + cfg["spj"],
                               spj=cfg["spj"])
    self.state = self.est.init_worker_state(weights, jax.random.PRNGKey(1))
    jax.block_until_ready(self.state)
    self.calls = 0

  def step(self) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    t = time.perf_counter()
    out, _ = self.est.compute_gradient_estimate(
        self.weights, jax.random.PRNGKey(self.calls), self.state)
    jax.block_until_ready((out.grad, out.unroll_state))
    self.state = out.unroll_state
    self.calls += 1
    return time.perf_counter() - t


def _setup(cfg):
  jax = _init_jax(cfg)
  from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import gradient_learner  # pylint: disable=g-import-not-at-top
  family, task_label = _family(cfg)
  lopt = mlp_lopt.MLPLOpt()
  weights = gradient_learner.WorkerWeights(
      theta=lopt.init(jax.random.PRNGKey(0)), theta_model_state=None,
      outer_state=gradient_learner.OuterState(0))
  return jax, family, task_label, lopt, weights


def _cpu_peak_rss(runner: _Runner, mem_steps: int) -> Optional[int]:
  """Largest resident-memory rise over `mem_steps` outer steps (bytes)."""
  import gc  # pylint: disable=g-import-not-at-top
  ok = _set_glibc_malloc_for_measurement()
  runner.step()  # settles: frees what earlier steps left under old settings
  gc.collect()
  if ok:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  peaks = []
  for _ in range(mem_steps):
    baseline = _proc_status_kib("VmRSS")
    if baseline is None or not _reset_peak_rss():
      return None
    runner.step()
    peaks.append(1024 * (_proc_status_kib("VmHWM") - baseline))
  return max(peaks)


def run_group(cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Times every estimator of one (task, k, n) in this process.

  Timed steps are interleaved (one step of each estimator per round, the
  order rotating), so a change in machine load hits all of them alike.
  On CPU the peak memory of each is measured here too, afterwards.
  """
  t_start = time.perf_counter()
  jax, family, task_label, lopt, weights = _setup(cfg)
  counter = CompileCounter()
  device = jax.devices()[0]
  runners = [_Runner(name, cfg, family, lopt, weights)
             for name in cfg["estimators"]]
  warm = {r.name: [r.step() for _ in range(cfg["warmup"])] for r in runners}
  times = {r.name: [] for r in runners}
  compiles = {r.name: 0 for r in runners}
  for i in range(cfg["repeats"]):
    for j in range(len(runners)):
      r = runners[(i + j) % len(runners)]
      before = counter.count
      times[r.name].append(r.step())
      compiles[r.name] += counter.count - before

  results = []
  for r in runners:
    median = statistics.median(times[r.name])
    res = {key: v for key, v in cfg.items() if key != "estimators"}
    res.update(
        estimator=r.name, task_label=task_label,
        device=str(device.device_kind), platform=device.platform,
        unrolls=2 * cfg["n"], warmup_s=warm[r.name], times_s=times[r.name],
        median_s=median, inner_steps_per_s=2 * cfg["n"] * cfg["k"] / median,
        compiles_during_timing=compiles[r.name])
    if r.name in HYBRID:
      res.update(_hybrid_breakdown(r.est, weights, r.state, cfg["k"],
                                   cfg["repeats"]))
    results.append(res)
  # Memory last: the malloc settings it needs would slow the timed steps.
  if device.platform == "cpu" and cfg["mem_steps"]:
    for r, res in zip(runners, results):
      res["peak_mem_bytes"] = _cpu_peak_rss(r, cfg["mem_steps"])
      res["mem_method"] = "cpu_rss"
  for res in results:
    res["group_wall_s"] = time.perf_counter() - t_start
  return results


def run_memory(cfg: Dict[str, Any]) -> Dict[str, Any]:
  """Device peak memory of one estimator, alone in this process (GPU)."""
  jax, family, _, lopt, weights = _setup(cfg)
  device = jax.devices()[0]
  base = (device.memory_stats() or {}).get("bytes_in_use")
  runner = _Runner(cfg["estimator"], cfg, family, lopt, weights)
  for _ in range(cfg["warmup"] + cfg["mem_steps"]):
    runner.step()
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is None or base is None:
    return dict(peak_mem_bytes=None, mem_method="unavailable")
  return dict(peak_mem_bytes=peak - base, mem_method="device_peak")


def _hybrid_breakdown(est, weights, state, k, repeats):
  """Forward-only unroll vs the full unroll with reverse pass, same inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  theta = weights.theta
  unroller = est.unroller
  state, steps_left = unroller.prepare(theta, state, weights.outer_state,
                                       jax.random.PRNGKey(7))
  eps = est._sample_eps(jax.random.PRNGKey(8), theta, est.sigma,  # pylint: disable=protected-access
                        num_samples=est.num_tasks)
  out = {}
  for label, grads in (("forward_s", False), ("unroll_with_reverse_s", True)):
    times = []
    for i in range(max(2, repeats // 2) + 1):
      t = time.perf_counter()
      res = unroller.unroll(theta, eps, state, jax.random.PRNGKey(i), k,
                            with_rp_grads=grads, steps_left=steps_left)
      jax.block_until_ready((res.losses, res.rp_grads))
      times.append(time.perf_counter() - t)
    out[label] = statistics.median(times[1:])  # first may compile the ES path
  return out


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

  n, spj = cfg["n"], cfg["spj"]
  if cfg["task"].startswith("quadratic"):
    dim = int(cfg["task"].partition(":")[2] or 10)
    family, task_label = quadratics.FixedDimQuadraticFamily(dim), f"quad{dim}"
  else:
    family, task_label = _cnn_family(cfg["cnn_image_size"],
                                     cfg["cnn_batch_size"])
  lopt = mlp_lopt.MLPLOpt()
  est = _make_estimator("HybridRPES (remat)", family, lopt, n, spj,
                        total=100 * spj, spj=spj)
  unroller = est.unroller
  theta = lopt.init(jax.random.PRNGKey(0))
  weights = gradient_learner.WorkerWeights(
      theta=theta, theta_model_state=None,
      outer_state=gradient_learner.OuterState(0))
  state = est.init_worker_state(weights, jax.random.PRNGKey(1))
  eps = est._sample_eps(jax.random.PRNGKey(2), theta, est.sigma,  # pylint: disable=protected-access
                        num_samples=n)
  # pylint: disable=protected-access
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
       unroller.engine.forward_chunk, fwd_args),  # pylint: disable=protected-access
      ("forward chunk keeping residuals", unroller.engine.forward_chunk_vjp,  # pylint: disable=protected-access
       fwd_args),
      ("apply stored pullback", unroller.engine.apply_pullback,  # pylint: disable=protected-access
       (pullback, cot_states, cot_totals, rp_grads)),
      ("remat backward chunk (recompute + pullback)",
       unroller.engine.backward_chunk,  # pylint: disable=protected-access
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
  residual_mib = unroller.engine.residual_bytes(*fwd_args) / 2**20  # pylint: disable=protected-access
  return dict(cfg, task_label=task_label, rows=rows,
              inner_params_per_unroll=int(params_per_unroll),
              residual_mib_per_chunk=residual_mib,
              device=str(jax.devices()[0].device_kind))


def _child(cfg, queue):
  try:
    fn = {"profile": run_profile, "memory": run_memory,
          "group": run_group}[cfg["kind"]]
    queue.put(("ok", fn(cfg)))
  except BaseException as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    queue.put(("error", f"{e!r}\n{traceback.format_exc()}"))


def run_in_child(cfg: Dict[str, Any], timeout_s: float) -> Any:
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_child, args=(cfg, queue))
  proc.start()
  try:
    status, payload = queue.get(timeout=timeout_s)
  except Exception:  # pylint: disable=broad-except
    status, payload = "error", f"no result within {timeout_s:.0f} s"
  proc.join(timeout=30)
  if proc.is_alive():
    proc.kill()
    proc.join()
  if status == "ok":
    return payload
  return dict(error=payload.splitlines()[0] if payload else "?",
              error_detail=payload)


# Parent: configurations, tables.


def _fmt_bytes(b) -> str:
  if b is None:
    return "n/a"
  return f"{b / 2**20:.1f}"


def _ratio(a, b) -> Optional[float]:
  if a is None or b is None or not b or (isinstance(b, float) and
                                         math.isnan(b)):
    return None
  return a / b


def _fmt_ratio(r) -> str:
  return "n/a" if r is None else f"{r:.2f}x"


def _group_key(r):
  return (r["task"], r["k"], r["n"])


def add_ratios(results: List[Dict[str, Any]]) -> None:
  by_group = {}
  for r in results:
    by_group.setdefault(_group_key(r), {})[r["estimator"]] = r
  for group in by_group.values():
    base = group.get(BASELINE)
    es = group.get("TruncatedES")
    for r in group.values():
      if "error" in r:
        continue
      ok = base is not None and "error" not in base
      r["time_vs_grad"] = _ratio(r["median_s"], base["median_s"]) if ok else None
      r["steps_per_s_vs_grad"] = _ratio(r["inner_steps_per_s"],
                                        base["inner_steps_per_s"]) if ok else None
      r["mem_vs_grad"] = _ratio(r.get("peak_mem_bytes"),
                                base.get("peak_mem_bytes")) if ok else None
      if r["estimator"] in HYBRID and es is not None and "error" not in es:
        r["time_vs_es"] = _ratio(r["median_s"], es["median_s"])


def markdown(results: List[Dict[str, Any]], args_summary: str,
             remat_threshold: int = 10) -> str:
  lines = [f"# Outer-step cost ({args_summary})", ""]
  if results:
    r0 = next((r for r in results if "error" not in r), results[0])
    lines.append(f"Device: {r0.get('device', '?')} ({r0.get('platform', '?')})"
                 f", host {platform.node()}, {os.cpu_count()} CPUs.")
    lines.append("")
  header = ("| task | k | n | unrolls | estimator | outer step s (median) | "
            "inner steps/s | peak mem MiB | time / Grad | steps/s / Grad | "
            "mem / Grad | compiles in timed steps |")
  lines += [header, "|" + "---|" * (header.count("|") - 1)]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['task']} | {r['k']} | {r['n']} | {2 * r['n']} | "
                   f"{r['estimator']} | error: {r['error'][:60]} | | | | | | |")
      continue
    lines.append(
        f"| {r['task']} | {r['k']} | {r['n']} | {r['unrolls']} | "
        f"{r['estimator']} | {r['median_s']:.4f} | "
        f"{r['inner_steps_per_s']:.0f} | {_fmt_bytes(r.get('peak_mem_bytes'))}"
        f" | {_fmt_ratio(r.get('time_vs_grad'))} | "
        f"{_fmt_ratio(r.get('steps_per_s_vs_grad'))} | "
        f"{_fmt_ratio(r.get('mem_vs_grad'))} | "
        f"{r['compiles_during_timing']} |")
  lines.append("")

  hybrid_rows = [r for r in results
                 if r["estimator"] in HYBRID and "error" not in r]
  if hybrid_rows:
    lines += ["## HybridRPES against TruncatedES and its own forward pass", "",
              "| task | k | n | variant | time / TruncatedES | forward-only "
              "unroll s | unroll + reverse s | reverse share |",
              "|---|---|---|---|---|---|---|---|"]
    for r in hybrid_rows:
      fwd, full = r.get("forward_s"), r.get("unroll_with_reverse_s")
      share = (1 - fwd / full) if fwd and full else None
      lines.append(
          f"| {r['task']} | {r['k']} | {r['n']} | {r['estimator']} | "
          f"{_fmt_ratio(r.get('time_vs_es'))} | "
          f"{fwd:.4f} | {full:.4f} | "
          f"{'n/a' if share is None else f'{100 * share:.0f}%'} |")
    lines.append("")

  # Memory growth of the rematerialized reverse pass with k.
  growth = []
  for r in results:
    if r["estimator"] != "HybridRPES (remat)" or "error" in r:
      continue
    for s in results:
      if (s["estimator"] == r["estimator"] and "error" not in s and
          s["task"] == r["task"] and s["n"] == r["n"] and s["k"] < r["k"] and
          s["k"] == min(x["k"] for x in results if x["task"] == r["task"])):
        g = _ratio(r.get("peak_mem_bytes"), s.get("peak_mem_bytes"))
        growth.append(f"- {r['task']} n={r['n']}: HybridRPES (remat) peak "
                      f"memory k={r['k']} / k={s['k']}: {_fmt_ratio(g)} "
                      f"({_fmt_bytes(r.get('peak_mem_bytes'))} / "
                      f"{_fmt_bytes(s.get('peak_mem_bytes'))} MiB)")
  if growth:
    lines += ["## Memory growth with k (rematerialized)", ""] + growth + [""]

  ns = sorted({r["n"] for r in results})
  scaling = len({(r["task"], r["k"], r["n"]) for r in results}) > len(
      {(r["task"], r["k"]) for r in results})
  if scaling:
    lines += ["## Throughput (inner steps/s) against n", "",
              "| task | k | estimator | " + " | ".join(f"n={n}" for n in ns) +
              " |", "|---|---|---|" + "---|" * len(ns)]
    rows = {}
    for r in results:
      if "error" not in r:
        rows.setdefault((r["task"], r["k"], r["estimator"]),
                        {})[r["n"]] = r["inner_steps_per_s"]
    for (task, k, name), per_n in rows.items():
      cells = [f"{per_n[n]:.0f}" if n in per_n else "" for n in ns]
      lines.append(f"| {task} | {k} | {name} | " + " | ".join(cells) + " |")
    lines.append("")

  task_labels = sorted({f"{r['task']}: {r['task_label']}" for r in results
                        if "task_label" in r})
  mem_note = (MEMORY_NOTE_GPU if any(
      r.get("mem_method") == "device_peak" for r in results) else
              MEMORY_NOTE_CPU)
  lines += [
      "Notes:",
      "- Outer step: one `compute_gradient_estimate`, blocked on the gradient "
      "and next state; median of the timed repeats after the warm-up steps "
      "(LO's TruncatedGrad compiles again on its 2nd step). The estimators "
      "of one (task, k, n) run in one process and their timed steps are "
      "interleaved (one step each per round, rotating order), so load "
      "changes on a shared machine hit them alike. Inner steps/s = unrolls "
      "x k / median time; every estimator runs 2n unrolls of k steps.",
      "- HybridRPES (remat) recomputes each chunk of steps_per_jit=10 steps "
      "in the reverse pass; (stored) keeps each chunk's jax.vjp residuals. "
      f"The default rematerialize=\"auto\" uses stored residuals up to "
      f"{remat_threshold} chunks (k <= {10 * remat_threshold}) while they fit "
      "in remat_memory_budget_mb, remat otherwise.",
      "- TruncatedES / TruncatedPES run both signs in one vectorized call "
      "(stack_antithetic_samples=True); forward only.",
      "- 'forward-only unroll' is HybridRPES's own unroll without the reverse "
      "pass (what VariationalES costs); 'reverse share' = 1 - forward / "
      "(unroll + reverse).",
      "- Tasks: " + "; ".join(task_labels) + ". Learned optimizer: MLPLOpt.",
      "- " + mem_note,
      "- 'compiles in timed steps' counts XLA compilations during the timed "
      "repeats (0 = no recompilation after warm-up).",
  ]
  return "\n".join(lines) + "\n"


def profile_markdown(profiles: List[Dict[str, Any]]) -> str:
  lines = ["## Profile: one chunk of HybridRPES, part by part", "",
           "| task | n | part | median s | x forward | XLA GFLOP | XLA GB "
           "accessed | XLA temp MiB |", "|---|---|---|---|---|---|---|---|"]
  for p in profiles:
    if "error" in p:
      lines.append(f"| {p['task']} | {p['n']} | error: {p['error'][:60]} "
                   "| | | | | |")
      continue
    fwd = p["rows"][0]["median_s"]
    for r in p["rows"]:
      temp = "n/a" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
      lines.append(
          f"| {p['task']} | {p['n']} | {r['part']} | {r['median_s']:.4f} | "
          f"{r['median_s'] / fwd:.2f} | {r['gflops']:.3g} | "
          f"{r['gb_accessed']:.3g} | {temp} |")
  lines += ["", "One chunk = steps_per_jit inner steps of all 2n unrolls. "
            "GFLOP / GB accessed / temp MiB: XLA's static cost and memory "
            "analysis of the compiled function (a loop body counts once, "
            "so scan-heavy parts are underestimated). Inner parameters per "
            "unroll: " + ", ".join(
                f"{p['task']}: {p['inner_params_per_unroll']}"
                for p in profiles if "error" not in p) + ". Stored residuals "
            "of one chunk (the pullback's leaves): " + ", ".join(
                f"{p['task']} n={p['n']}: {p['residual_mib_per_chunk']:.1f} MiB"
                for p in profiles if "error" not in p) + ".", ""]
  return "\n".join(lines)


def _parse_ints(text: str) -> List[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def build_groups(args) -> List[Dict[str, Any]]:
  """One group per (task, k, n): its estimators are timed in one process."""
  preset = PRESETS[args.preset]
  tasks = args.tasks.split(",") if args.tasks else list(preset["tasks"])
  estimators_ = args.estimators.split(",") if args.estimators else list(
      ESTIMATORS)
  for name in estimators_:
    if name not in ESTIMATORS:
      raise SystemExit(f"unknown estimator {name!r}; choose from {ESTIMATORS}")
  groups = []
  for task in tasks:
    if args.lengths:
      lengths = _parse_ints(args.lengths)
    else:
      lengths = preset["task_lengths"].get(task, preset["lengths"])
    if args.samples:
      samples = _parse_ints(args.samples)
    else:
      samples = preset["task_samples"].get(task, preset["samples"])
    for k in lengths:
      if k % args.steps_per_jit:
        raise SystemExit(f"k={k} must be a multiple of steps_per_jit")
      for n in samples:
        groups.append(dict(
            kind="group", task=task, k=k, n=n, estimators=estimators_,
            spj=args.steps_per_jit,
            warmup=args.warmup or preset["warmup"],
            repeats=args.repeats or preset["repeats"][task.partition(":")[0]],
            mem_steps=preset["mem_steps"],
            cnn_image_size=args.cnn_image_size or preset["cnn_image_size"],
            cnn_batch_size=args.cnn_batch_size or preset["cnn_batch_size"]))
  return groups


def _error_rows(group, error):
  return [dict({k: v for k, v in group.items() if k != "estimators"},
               estimator=name, error=error) for name in group["estimators"]]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="CPU preset, < 5 min on 2 cores (= --preset quick)")
  p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                 help="quick (CPU), full (CPU, slow), gpu (one H100, < 4 "
                 "min), tiny (smoke test)")
  p.add_argument("--samples", default=None,
                 help="comma-separated n (antithetic pairs), e.g. 8,16,32")
  p.add_argument("--lengths", default=None, help="comma-separated k")
  p.add_argument("--tasks", default=None, help="quadratic,cnn")
  p.add_argument("--estimators", default=None,
                 help="comma-separated subset of: " + ", ".join(ESTIMATORS))
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--warmup", type=int, default=None)
  p.add_argument("--steps-per-jit", type=int, default=10)
  p.add_argument("--cnn-image-size", type=int, default=None)
  p.add_argument("--cnn-batch-size", type=int, default=None)
  p.add_argument("--time-budget", type=float, default=None,
                 help="seconds; later configurations are skipped once spent")
  p.add_argument("--config-timeout", type=float, default=None,
                 help="seconds per configuration (default: the preset's)")
  p.add_argument("--profile", action="store_true",
                 help="also time HybridRPES's chunk functions one by one")
  p.add_argument("--cache-dir", default=None,
                 help="persistent XLA compilation cache shared by the children "
                 f"and by later runs (default {DEFAULT_CACHE_DIR}); 'temp' "
                 "for a fresh one deleted at exit, 'none' to disable")
  p.add_argument("--out", default=None,
                 help="write FILE.md and FILE.json (extension stripped)")
  args = p.parse_args(argv)
  if args.preset is None:
    args.preset = "quick" if args.quick else "full"

  groups = build_groups(args)
  budget = args.time_budget if args.time_budget is not None else PRESETS[
      args.preset]["budget_s"]
  if args.config_timeout is None:
    args.config_timeout = PRESETS[args.preset]["config_timeout"]
  tmp_cache = None
  if args.cache_dir == "temp":
    tmp_cache = cache_dir = tempfile.mkdtemp(prefix="bench_xla_cache_")
  elif args.cache_dir == "none":
    cache_dir = None
  else:
    cache_dir = args.cache_dir or DEFAULT_CACHE_DIR

  t0 = time.perf_counter()

  def over_budget():
    return budget is not None and time.perf_counter() - t0 > budget - 10

  def timeout():
    # Within a budget no child may outlive it.
    if budget is None:
      return args.config_timeout
    return max(10., min(args.config_timeout,
                        budget - (time.perf_counter() - t0)))

  results, profiles = [], []
  try:
    for i, group in enumerate(groups):
      if over_budget():
        print(f"[bench] time budget {budget:.0f} s spent: skipping "
              f"{len(groups) - i} groups", file=sys.stderr)
        for g in groups[i:]:
          results += _error_rows(g, "skipped (time budget)")
        break
      group = dict(group, cache_dir=cache_dir)
      rows = run_in_child(group, timeout())
      if isinstance(rows, dict):  # the child failed
        rows = _error_rows(group, rows["error"])
      # Device memory cannot be reset: one fresh process per estimator.
      for row in rows:
        if "error" in row or row.get("platform") == "cpu":
          continue
        if over_budget():
          row.update(peak_mem_bytes=None, mem_method="skipped (time budget)")
          continue
        mem = run_in_child(
            dict(group, kind="memory", estimator=row["estimator"]), timeout())
        row.update(mem if "error" not in mem else dict(
            peak_mem_bytes=None, mem_method="error: " + mem["error"]))
      results += rows
      summary_ = ", ".join(
          f"{r['estimator']} " + (r["error"] if "error" in r else
                                  f"{r['median_s']:.4f} s")
          for r in rows)
      print(f"[bench] {i + 1}/{len(groups)} {group['task']} k={group['k']} "
            f"n={group['n']}: {summary_} (t={time.perf_counter() - t0:.0f} s)",
            file=sys.stderr)

    if args.profile:
      for key in dict.fromkeys((g["task"], g["n"]) for g in groups):
        group = next(g for g in groups if (g["task"], g["n"]) == key)
        if over_budget():
          break
        prof = run_in_child(dict(group, kind="profile", cache_dir=cache_dir,
                                 repeats=max(3, group["repeats"])), timeout())
        if "error" in prof:
          prof = dict(task=group["task"], n=group["n"], error=prof["error"])
        profiles.append(prof)
        print(f"[bench] profiled {key}", file=sys.stderr)
  finally:
    if tmp_cache:
      shutil.rmtree(tmp_cache, ignore_errors=True)

  add_ratios(results)
  summary = (f"preset {args.preset}, steps_per_jit {args.steps_per_jit}, "
             f"total {time.perf_counter() - t0:.0f} s")
  table = markdown(results, summary)
  if profiles:
    table += "\n" + profile_markdown(profiles)
  print(table)
  if args.out:
    stem = pathlib.Path(args.out)
    if stem.suffix in (".md", ".json"):
      stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(table)
    for r in results + profiles:
      r.pop("cache_dir", None)
    stem.with_suffix(".json").write_text(json.dumps(
        dict(preset=args.preset, argv=sys.argv[1:], results=results,
             profiles=profiles),
        indent=1, default=str))
    print(f"[bench] wrote {stem.with_suffix('.md')} and "
          f"{stem.with_suffix('.json')}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
