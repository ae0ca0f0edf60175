"""bench.py's tables: ratios to TruncatedGrad, Markdown for runs and profiles."""

import math
import os
import platform
from typing import Any, Dict, List, Optional

from experiments.lib.bench_runs import BASELINE, HYBRID


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
      var_es = group.get("VariationalES")
      if (r["estimator"] in HYBRID and var_es is not None and
          "error" not in var_es):
        r["time_vs_variational_es"] = _ratio(r["median_s"], var_es["median_s"])


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
              "| task | k | n | variant | time / TruncatedES | time / "
              "VariationalES | forward-only unroll s | unroll + reverse s | "
              "reverse share | phases s: data / forward / reverse / merge (CPU: "
              "process CPU time) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in hybrid_rows:
      fwd, full = r.get("forward_s"), r.get("unroll_with_reverse_s")
      share = (1 - fwd / full) if fwd and full else None
      # CPU time where measured: robust to other jobs on the machine.
      clock = "_cpu" if "phase_data_cpu_s" in r else ""
      phases = " / ".join(
          f"{r[f'phase_{p}{clock}_s']:.4f}" for p in ("data", "forward",
                                                      "reverse", "merge")
      ) if "phase_data_s" in r else "n/a"
      phases += " CPU" if clock else ""
      if "phase_remat" in r:
        phases += " (remat)" if r["phase_remat"] else " (stored)"
      lines.append(
          f"| {r['task']} | {r['k']} | {r['n']} | {r['estimator']} | "
          f"{_fmt_ratio(r.get('time_vs_es'))} | "
          f"{_fmt_ratio(r.get('time_vs_variational_es'))} | "
          f"{'n/a' if fwd is None else f'{fwd:.4f}'} | "
          f"{'n/a' if full is None else f'{full:.4f}'} | "
          f"{'n/a' if share is None else f'{100 * share:.0f}%'} | {phases} |")
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
      "- Outer step: the estimator's `compute_gradient_estimate` inside one "
      "library outer step (`outer_loop.outer_step`, which then applies the "
      "paper's outer update; the whole step's median is "
      "outer_step_median_s in the JSON), blocked on the gradient and next "
      "state; median of the timed repeats after the warm-up steps "
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
      "- Tasks: " + "; ".join(task_labels) + ". Learned optimizer: MLPLOpt "
      "(the headline set-up: NNAdam; its TruncatedES uses LO's "
      "train_and_meta, one outer_valid batch per step against our 2).",
      "- Whole-chunk residuals: the reverse pass keeping every intermediate "
      "of a chunk (`InnerProblems.step_checkpoint = None`, the engine before "
      "per-step checkpoints), in the same process. Phases: one truncation "
      "replayed piece by piece, blocking after each (host data and its "
      "transfer, forward chunks, reverse chunks, the merge).",
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


def _median_of(results, task, k, n, estimator):
  for r in results:
    if (r["task"], r["k"], r["n"], r["estimator"]) == (task, k, n, estimator) \
        and "error" not in r:
      return r
  return None


def summary_keys(results: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The machine-readable figures of the performance table.

  hybrid_over_forward_es[task][k]: HybridRPES's outer-step time (the
    library default, rematerialize="auto") over LO's forward-only
    TruncatedES, measured side by side (the group with the fewest samples);
    hybrid_over_variational_es the same over VariationalES (HybridRPES's own
    unrolls, forward only); *_whole_chunk: the engine without per-step
    checkpoints, in the same process; *_cpu_time: the same ratios of the
    process's CPU time (robust to other jobs on a shared machine).
  cost_per_sample_s[n] on the headline set-up and its n=40 / n=10 ratio.
  memory_k1000_over_k10[task]: peak memory of the rematerialized pass
    (rematerialize=True) at k=1000 over k=10; *_whole_chunk likewise.
  """
  from experiments.lib.bench_runs import AUTO, AUTO_WHOLE_CHUNK, REMAT_WHOLE_CHUNK  # pylint: disable=g-import-not-at-top
  ratios = [f"hybrid_over_{b}_es{s}{t}" for b in ("forward", "variational")
            for s in ("", "_whole_chunk") for t in ("", "_cpu_time")]
  out = {key: {} for key in ratios + [
      "memory_k1000_over_k10", "memory_k1000_over_k10_whole_chunk",
      "cost_per_sample_s", "cost_per_sample_s_whole_chunk"]}
  groups = sorted({(r["task"], r["k"], r["n"]) for r in results},
                  key=lambda g: (g[0], g[1], -g[2]))
  for task, k, n in groups:  # the smallest n of each (task, k) wins
    for hybrid, suffix in ((AUTO, ""), (AUTO_WHOLE_CHUNK, "_whole_chunk")):
      h = _median_of(results, task, k, n, hybrid)
      for base, key in (("TruncatedES", "hybrid_over_forward_es"),
                        ("VariationalES", "hybrid_over_variational_es")):
        b = _median_of(results, task, k, n, base)
        if h and b:
          out[key + suffix].setdefault(task, {})[str(k)] = (
              h["median_s"] / b["median_s"])
          if h.get("median_cpu_s") and b.get("median_cpu_s"):
            out[key + suffix + "_cpu_time"].setdefault(task, {})[str(k)] = (
                h["median_cpu_s"] / b["median_cpu_s"])
  for hybrid, suffix in ((AUTO, ""), (AUTO_WHOLE_CHUNK, "_whole_chunk")):
    for task, k, n in groups:
      h = _median_of(results, task, k, n, hybrid)
      if task == "headline" and h:
        out["cost_per_sample_s" + suffix][str(n)] = h["median_s"] / n
        out.setdefault("cost_per_sample_cpu_s" + suffix, {})[str(n)] = (
            h.get("median_cpu_s", float("nan")) / n)
    for per_key, ratio_key in (("cost_per_sample_s", ""),
                               ("cost_per_sample_cpu_s", "_cpu_time")):
      per = out.get(per_key + suffix, {})
      if "40" in per and "10" in per:
        out["cost_per_sample_n40_over_n10" + suffix + ratio_key] = (
            per["40"] / per["10"])
  for remat, suffix in (("HybridRPES (remat)", ""),
                        (REMAT_WHOLE_CHUNK, "_whole_chunk")):
    for task in sorted({g[0] for g in groups}):
      ns = sorted({g[2] for g in groups if g[0] == task})
      for n in ns:
        lo, hi = (_median_of(results, task, k, n, remat) for k in (10, 1000))
        if lo and hi and lo.get("peak_mem_bytes") and hi.get("peak_mem_bytes"):
          out["memory_k1000_over_k10" + suffix][task] = (
              hi["peak_mem_bytes"] / lo["peak_mem_bytes"])
  return out


def summary_markdown(keys: Dict[str, Any]) -> str:
  """The summary figures as a Markdown list (see `summary_keys`)."""
  lines = ["## Summary figures (JSON keys)", ""]
  for key, value in keys.items():
    if isinstance(value, dict):
      value = ", ".join(
          f"{k}: " + (", ".join(f"k={kk} {vv:.2f}x" for kk, vv in v.items())
                      if isinstance(v, dict) else f"{v:.4g}")
          for k, v in value.items()) or "n/a"
    else:
      value = f"{value:.3f}"
    lines.append(f"- {key}: {value}")
  return "\n".join(lines) + "\n"
