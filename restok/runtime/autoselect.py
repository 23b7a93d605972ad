"""``--backend auto``: the fastest configuration that passes the quality gate on this machine.

Candidates: ONNX Runtime (the reference for the artifacts), OpenVINO fp32 and OpenVINO bf16 where the
``openvino`` package is installed (bf16 where the CPU has bf16 units), and the cuda backend in bf16 where
PyTorch sees a GPU and the export records the weights it came from. Each is gated against ONNX Runtime
on the same artifacts (sampled-token agreement >= 95%, decoder PSNR >= 40 dB over ``GATE_IMAGES`` images)
and timed (median of 3 runs); the fastest that passes wins. The measurement is remembered per user, keyed
by the artifacts' content, the CPU and the packages' versions, so it runs once per machine and export.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from restok.fileutil import atomic_write_bytes, cache_root
from restok.manifest import Manifest

GATE_IMAGES = 8
MIN_TOKEN_AGREEMENT = 0.95
MIN_PSNR_DB = 40.0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def candidates(manifest: Manifest) -> list[tuple[str, str, dict]]:
    """(label, backend, options) available here for these artifacts."""
    out = [("onnxruntime", "onnxruntime", {})]
    if manifest.precision == "int8-dynamic":
        return out  # ONNX Runtime's contrib op: nothing else reads these graphs
    if _gpu_visible() and manifest.source.get("kind") in ("preset", "bundled", "checkpoint"):
        out.append(("cuda bf16", "cuda", {"device": "cuda", "compute_precision": "bf16"}))
    try:
        from restok.runtime.openvino_backend import cpu_has_bf16

        import openvino  # noqa: F401
    except ImportError:
        return out
    out.append(("openvino fp32", "openvino", {"compute_precision": "fp32"}))
    if cpu_has_bf16():
        out.append(("openvino bf16", "openvino", {"compute_precision": "bf16"}))
    return out


def _gpu_visible() -> bool:
    """PyTorch is installed and sees a CUDA device (torch is imported only when it is installed)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _key(folder: Path, manifest: Manifest, labels: list[str]) -> str:
    versions = {}
    for mod in ("onnxruntime", "openvino", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    gpu = __import__("torch").cuda.get_device_name(0) if any(c.startswith("cuda") for c in labels) else None
    doc = {"files": {k: v["sha256"] for k, v in sorted(manifest.files.items())}, "cpu": _cpu(), "gpu": gpu,
           "cores": os.cpu_count(), "versions": versions, "candidates": labels, "gate": [GATE_IMAGES,
           MIN_TOKEN_AGREEMENT, MIN_PSNR_DB]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def measure(folder: Path, manifest: Manifest, threads: int | None = None) -> list[dict]:
    """Gate and time every candidate; ONNX Runtime is the reference."""
    from restok.images import psnr
    from restok.runtime.pipeline import Pipeline

    m = manifest
    labels = [i % m.num_classes for i in range(GATE_IMAGES)]
    batch = min(4, m.max_batch)
    ref = Pipeline(folder, "onnxruntime", threads=threads, manifest=m)
    want = ref.generate(labels, seed=0)
    results = []
    try:
        for label, backend, opts in candidates(m):
            print(f"restok: --backend auto: measuring {label}", file=sys.stderr)
            pipe = ref if backend == "onnxruntime" else Pipeline(folder, backend, threads=threads, manifest=m, **opts)
            try:
                tokens = float(np.mean(pipe.generate(labels, seed=0, decode=False).tokens == want.tokens))
                p = psnr(want.images, pipe.decode(want.tokens), clip=True)
                pipe.generate(labels[:batch], seed=1)  # warm
                times = []
                for r in range(3):
                    t0 = time.perf_counter()
                    pipe.generate(labels[:batch], seed=r)
                    times.append(time.perf_counter() - t0)
            finally:
                if pipe is not ref:
                    pipe.close()
            p = min(float(p), 200.0)  # identical images: inf, kept as 200
            results.append({"label": label, "backend": backend, "options": opts, "token_agreement": tokens,
                            "decoder_psnr_db": p, "seconds_per_image": float(np.median(times)) / batch,
                            "passed": tokens >= MIN_TOKEN_AGREEMENT and p >= MIN_PSNR_DB})
    finally:
        ref.close()
    return results


def choose_backend(folder: str | Path, manifest: Manifest, threads: int | None = None) -> dict:
    """The fastest passing candidate: {'backend', 'options', 'label', 'reason', 'measured'}; remembered."""
    folder = Path(folder)
    cands = candidates(manifest)
    root = cache_root() / "auto"
    path = root / f"{_key(folder, manifest, [c[0] for c in cands])}.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = None
    if len(cands) == 1:
        results = [{"label": "onnxruntime", "backend": "onnxruntime", "options": {}, "passed": True,
                    "seconds_per_image": None, "token_agreement": 1.0, "decoder_psnr_db": 200.0}]
    elif results is None:
        results = measure(folder, manifest, threads)
        try:
            atomic_write_bytes(path, json.dumps(results, indent=2).encode())
        except OSError:
            pass  # no writable cache: measure again next time
    passing = [r for r in results if r["passed"]]
    best = min(passing, key=lambda r: r["seconds_per_image"] or 0.0)
    ref = next(r for r in results if r["backend"] == "onnxruntime")
    if len(results) == 1:
        reason = "the only backend for these artifacts here"
    else:
        speed = (ref["seconds_per_image"] or 0) / max(best["seconds_per_image"] or 1e-9, 1e-9)
        reason = (f"{speed:.2f}x onnxruntime; gate: {best['token_agreement']:.1%} tokens, "
                  f"{best['decoder_psnr_db']:.1f} dB; measured once, remembered in {path}")
    return {"backend": best["backend"], "options": best["options"], "label": best["label"], "reason": reason,
            "measured": results}
