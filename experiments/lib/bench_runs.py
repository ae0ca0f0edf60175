"""Benchmark children: one (task, k, n) group per fresh process (bench.py).

Families, estimators, the runner that times one library outer step
(`pathology_fix.runtime.outer_loop.outer_step`, blocked on the new theta and inner
states), CPU/GPU peak memory. The spawn-process plumbing is `bench_child`.
"""

import ctypes
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

from experiments.lib import bench_headline
from experiments.lib import bench_phases

ESTIMATORS = ("HybridRPES (remat)", "HybridRPES (stored)", "TruncatedGrad",
              "TruncatedES", "TruncatedPES")
# Also accepted by --estimators: the library default ("auto"), the same with
# the reverse pass keeping every intermediate of a chunk (the engine before
# per-step checkpoints, `inner_problems.STEP_CHECKPOINTS[None]`), and
# VariationalES, forward only on HybridRPES's own unrolls.
AUTO = "HybridRPES (auto)"
AUTO_WHOLE_CHUNK = "HybridRPES (auto) whole-chunk"
REMAT_WHOLE_CHUNK = "HybridRPES (remat) whole-chunk"
EXTRA_ESTIMATORS = (AUTO, AUTO_WHOLE_CHUNK, REMAT_WHOLE_CHUNK, "VariationalES")
WHOLE_CHUNK = (AUTO_WHOLE_CHUNK, REMAT_WHOLE_CHUNK)
BASELINE = "TruncatedGrad"
HYBRID = ("HybridRPES (remat)", "HybridRPES (stored)") + (AUTO,) + WHOLE_CHUNK
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
    "pathology_fix", "bench_xla")


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


def cnn_family(image_size: int, batch_size: int):
  """The paper's conv3 on Fashion-MNIST classes; a synthetic stand-in if absent."""
  try:
    from pathology_fix.tasks_and_data import tasks as ptasks  # pylint: disable=g-import-not-at-top
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


def make_estimator(name: str, family, lopt, n: int, k: int, total: int,
                    spj: int, task: str = ""):
  import pathology_fix  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from learned_optimization.outer_trainers import truncated_es  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncated_grad  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncated_pes  # pylint: disable=g-import-not-at-top
  from learned_optimization.outer_trainers import truncation_schedule  # pylint: disable=g-import-not-at-top
  from pathology_fix.meta_gradient import estimators  # pylint: disable=g-import-not-at-top
  sched = truncation_schedule.ConstantTruncationSchedule(total)
  ours = bench_headline.ESTIMATOR_KWARGS if task == "headline" else {}
  if name in HYBRID:
    remat = {"HybridRPES (remat)": True, "HybridRPES (stored)": False,
             REMAT_WHOLE_CHUNK: True}
    est = estimators.HybridRPES(
        family, lopt, sched, num_tasks=n, unroll_length=k, steps_per_jit=spj,
        rematerialize=remat.get(name, "auto"), **ours)
    if name in WHOLE_CHUNK:
      est.unroller.problems.step_checkpoint = None
    return est
  if name == "VariationalES":
    return estimators.VariationalES(
        family, lopt, sched, num_tasks=n, unroll_length=k, steps_per_jit=spj,
        **ours)
  if task == "headline" and name != "TruncatedES":
    raise ValueError(f"{name} is not benchmarked on the headline set-up")
  if name == "TruncatedGrad":
    return truncated_grad.TruncatedGrad(
        family, lopt, sched, num_tasks=2 * n, unroll_length=k,
        steps_per_jit=spj)
  if name == "TruncatedES":
    # On the headline set-up LO's closest objective: the loss of one
    # outer_valid batch per step (ours averages meta_loss_evals = 2).
    return truncated_es.TruncatedES(
        family, lopt, sched, num_tasks=n, unroll_length=k, steps_per_jit=spj,
        std=0.01, stack_antithetic_samples=True,
        train_and_meta=task == "headline")
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
  if cfg["task"] == "headline":
    return bench_headline.family(), bench_headline.LABEL
  if cfg["task"].startswith("quadratic"):
    dim = int(cfg["task"].partition(":")[2] or 10)
    return (quadratics.FixedDimQuadraticFamily(dim),
            f"LO FixedDimQuadraticFamily({dim})")
  return cnn_family(cfg["cnn_image_size"], cfg["cnn_batch_size"])


class _Clocked:
  """An estimator whose `compute_gradient_estimate` is timed, blocked on its
  gradient and next state (what the tables compare); delegates the rest."""

  def __init__(self, estimator):
    self.estimator = estimator
    self.task_family = estimator.task_family
    self.seconds = None

  def init_worker_state(self, worker_weights, key):
    return self.estimator.init_worker_state(worker_weights, key)

  def compute_gradient_estimate(self, *args, **kwargs):
    import jax  # pylint: disable=g-import-not-at-top
    t, c = time.perf_counter(), time.process_time()
    out, metrics = self.estimator.compute_gradient_estimate(*args, **kwargs)
    jax.block_until_ready((out.grad, out.unroll_state))
    self.seconds = time.perf_counter() - t
    self.cpu_seconds = time.process_time() - c
    return out, metrics


class _Runner:
  """One estimator, its inner problems and its own theta; `step` runs one
  outer step of the library loop (paper's outer optimizer) and returns the
  estimator's share of it. `outer_step_seconds` lists whole steps."""

  def __init__(self, name, cfg, family, lopt):
    import jax  # pylint: disable=g-import-not-at-top
    from pathology_fix.runtime import outer_loop  # pylint: disable=g-import-not-at-top
    steps = cfg["warmup"] + cfg["repeats"] + cfg["mem_steps"] + 1
    self.name = name
    self.est = make_estimator(name, family, lopt, cfg["n"], cfg["k"],
                              total=cfg["k"] * (steps + 2) + cfg["spj"],
                              spj=cfg["spj"], task=cfg["task"])
    self.clocked = _Clocked(self.est)
    self.cpu_seconds = []
    self.learner = outer_loop.learner(lopt)
    self.learner_state = self.learner.init(jax.random.PRNGKey(0))
    self.states = [self.est.init_worker_state(self.weights,
                                              jax.random.PRNGKey(1))]
    jax.block_until_ready(self.states)
    self.calls = 0
    self.outer_step_seconds = []

  @property
  def weights(self):
    return self.learner.get_state_for_worker(self.learner_state)

  @property
  def state(self):
    return self.states[0]

  def step(self) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    from pathology_fix.runtime import outer_loop  # pylint: disable=g-import-not-at-top
    t = time.perf_counter()
    out = outer_loop.outer_step(
        self.learner, [self.clocked], self.states, self.learner_state,
        outer_loop.step_keys(jax.random.PRNGKey(0), self.calls))
    jax.block_until_ready((out.learner_state, out.unroll_states))
    self.outer_step_seconds.append(time.perf_counter() - t)
    self.learner_state, self.states = out.learner_state, out.unroll_states
    self.calls += 1
    self.cpu_seconds.append(self.clocked.cpu_seconds)
    return self.clocked.seconds


def _setup(cfg):
  jax = _init_jax(cfg)
  from learned_optimization.learned_optimizers import mlp_lopt  # pylint: disable=g-import-not-at-top
  family, task_label = _family(cfg)
  if cfg["task"] == "headline":
    return jax, family, task_label, bench_headline.learned_optimizer()
  return jax, family, task_label, mlp_lopt.MLPLOpt()


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
  jax, family, task_label, lopt = _setup(cfg)
  counter = CompileCounter()
  device = jax.devices()[0]
  runners = [_Runner(name, cfg, family, lopt)
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
        compiles_during_timing=compiles[r.name],
        # This process's CPU time (all threads) of the same timed steps: a
        # step descheduled by other jobs does not accrue it.
        median_cpu_s=statistics.median(
            r.cpu_seconds[cfg["warmup"]:cfg["warmup"] + cfg["repeats"]]),
        # The whole library outer step (estimate + outer update + LO's
        # bookkeeping), over the timed repeats.
        outer_step_median_s=statistics.median(
            r.outer_step_seconds[cfg["warmup"]:cfg["warmup"] + cfg["repeats"]]))
    if r.name in HYBRID and cfg.get("breakdown", True):
      res.update(_hybrid_breakdown(r.est, r.weights, r.state, cfg["k"],
                                   cfg["repeats"]))
    if r.name in (AUTO, AUTO_WHOLE_CHUNK) and cfg.get("breakdown", True):
      res.update(bench_phases.phase_seconds(r.est, r.weights, r.state,
                                            cfg["k"], max(2, cfg["repeats"] // 2)))
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
  jax, family, _, lopt = _setup(cfg)
  device = jax.devices()[0]
  base = (device.memory_stats() or {}).get("bytes_in_use")
  runner = _Runner(cfg["estimator"], cfg, family, lopt)
  for _ in range(cfg["warmup"] + cfg["mem_steps"]):
    runner.step()
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is None or base is None:
    return dict(peak_mem_bytes=None, mem_method="unavailable")
  return dict(peak_mem_bytes=peak - base, mem_method="device_peak")


def _hybrid_breakdown(est, weights, state, k, repeats):
  """Forward-only unroll vs the full unroll with reverse pass, same inputs.

  Times the unroller's public `prepare` and `unroll` (the two halves of
  `truncate`), with and without the reverse pass.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from pathology_fix_core import variational  # pylint: disable=g-import-not-at-top
  theta = weights.theta
  unroller = est.unroller
  state, steps_left = unroller.prepare(theta, state, weights.outer_state,
                                       jax.random.PRNGKey(7))
  eps = variational.sample_perturbations(jax.random.PRNGKey(8), theta,
                                         est.sigma, num_samples=est.num_samples)
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
