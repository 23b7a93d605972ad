"""``restok bench``: latency of each backend on the same artifacts, measured in one run.

Runs are interleaved (backend A, backend B, A, B, ...) so that every backend sees the same machine load;
numbers are medians and p90s of several runs, and the headline is the ratio between backends, which is
what survives a noisy shared machine.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from restok.manifest import Manifest
from restok.runtime.pipeline import Pipeline
from restok.sampling_params import SamplingParams

REFERENCE = "torch"


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), else the peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if platform.system() != "Darwin" else r / 2**20


def _stats(x: list[float]) -> dict:
    a = np.asarray(x) * 1000.0
    return {"median_ms": round(float(np.median(a)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3)}


def run_bench(folder: str | Path, backends: list[str], batches: list[int] | None = None, runs: int = 5, warmup: int = 1,
              threads: int | None = None, sampling: SamplingParams = SamplingParams(), seed: int = 0,
              gap: float = 0.5, options: dict[str, dict] | None = None, manifest: Manifest | None = None) -> list[dict]:
    """One result per batch size; the backends are loaded once and reused for every batch size.

    ``gap`` seconds of idle time separate consecutive runs, so that the worker threads of the backend
    that just ran (OpenMP spins for a while after each op by default) are asleep when the next one starts."""
    folder = Path(folder)
    m = manifest or Manifest.read(folder)
    batches = batches or [1]
    bad = [b for b in batches if not 1 <= b <= m.max_batch]
    if bad:
        raise ValueError(f"batch sizes {bad} are outside 1..{m.max_batch} (the export's --max-batch)")
    pipes, info = {}, {}
    for name in backends:
        before = rss_mb()
        t0 = time.perf_counter()
        pipes[name] = Pipeline(folder, name, threads=threads, manifest=m, **(options or {}).get(name, {}))
        info[name] = {"load_seconds": round(time.perf_counter() - t0, 3), "rss_added_mb": round(rss_mb() - before, 1),
                      "precision": getattr(pipes[name].backend, "precision", m.precision)}
    try:
        return [_bench_batch(folder, m, pipes, info, b, runs, warmup, threads, sampling, seed, gap) for b in batches]
    finally:
        for p in pipes.values():
            p.close()


def _bench_batch(folder, m, pipes, info, batch, runs, warmup, threads, sampling, seed, gap) -> dict:
    labels = [i % m.num_classes for i in range(batch)]
    backends = list(pipes)
    samples = {n: {"steps": [], "generate": [], "decode": [], "e2e": [], "inputs": [], "fused": False} for n in backends}
    tokens = {}
    for r in range(warmup + runs):
        for name, p in pipes.items():
            time.sleep(gap)
            t0 = time.perf_counter()
            g = p.generate(labels, sampling, seed=seed)
            e2e = time.perf_counter() - t0
            tokens[name] = g.tokens
            if r >= warmup:
                s = samples[name]
                s["fused"] = not g.step_seconds  # one CUDA-graph replay: decoding is inside "generate"
                s["steps"].append(g.step_seconds)
                s["generate"].append(g.generate_seconds)
                s["decode"].append(g.decode_seconds)
                s["inputs"].append(g.input_seconds)
                s["e2e"].append(e2e)
    plan = next(iter(pipes.values())).backend.plan
    out = {"artifacts": str(folder), "precision": m.precision, "batch": batch, "max_batch": m.max_batch,
           "kv_cache": m.kv_cache, "runs": runs, "warmup": warmup,
           "host_input_bytes_per_image": plan.host_bytes(batch) / batch,
           "threads": threads or os.cpu_count(), "gap_seconds": gap,
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
           "backends": {}}
    for name, s in samples.items():
        steps = np.asarray(s["steps"])
        e2e = _stats(s["e2e"])
        out["backends"][name] = {
            **info[name],
            "fused": s["fused"],  # True: no per-pass times; "generate" includes decoding, "decode" is null
            "steps": [] if s["fused"] else [_stats(steps[:, i].tolist()) for i in range(steps.shape[1])],
            "generate": _stats(s["generate"]),
            "decode": None if s["fused"] else _stats(s["decode"]),
            "end_to_end": e2e,
            "host_inputs_ms_per_image": round(float(np.median(s["inputs"])) * 1000.0 / batch, 4),
            "images_per_second": round(batch / (e2e["median_ms"] / 1000.0), 4),
        }
    ref = REFERENCE if REFERENCE in samples else backends[0]
    out["reference"] = ref
    out["speedup_vs_reference"] = {}
    for name in samples:
        if name == ref:
            continue
        sp = {}
        comparable = not (samples[ref]["fused"] or samples[name]["fused"])
        for part in ("end_to_end", "generate", "decode"):
            if part != "end_to_end" and not comparable:
                sp[part] = None  # a fused backend has no separate generate/decode times
                continue
            a, b = out["backends"][ref][part]["median_ms"], out["backends"][name][part]["median_ms"]
            sp[part] = round(a / b, 3) if b > 0 else None
        # per-run ratios (paired runs share the machine's state), then their median
        pair = [x / y for x, y in zip(samples[ref]["e2e"], samples[name]["e2e"])]
        sp["end_to_end_paired_median"] = round(float(np.median(pair)), 3)
        sp["same_tokens"] = bool(np.array_equal(tokens[ref], tokens[name]))
        sp["token_agreement"] = round(float(np.mean(tokens[ref] == tokens[name])), 4)  # < 1 for quantized graphs
        out["speedup_vs_reference"][name] = sp
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def format_table(results: list[dict]) -> str:
    lines = []
    for res in results:
        lines.append(f"{res['artifacts']}  ({res['precision']}, batch {res['batch']}, {res['runs']} runs, "
                     f"{res['threads']} threads)")
        lines.append(f"  {'backend':<12} {'e2e ms':>10} {'p90':>10} {'generate':>10} {'decode':>10} {'img/s':>8} {'speedup':>8}")
        for name, b in res["backends"].items():
            sp = res["speedup_vs_reference"].get(name, {}).get("end_to_end")
            lines.append(f"  {name:<12} {b['end_to_end']['median_ms']:>10.1f} {b['end_to_end']['p90_ms']:>10.1f} "
                         f"{b['generate']['median_ms']:>10.1f} {(b['decode'] or {}).get('median_ms', float('nan')):>10.1f} "
                         f"{b['images_per_second']:>8.3f} {('%.2fx' % sp) if sp else 'ref':>8}")
    return "\n".join(lines)
