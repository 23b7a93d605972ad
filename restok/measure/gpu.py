"""The cuda backend measured on a GPU: what ``scripts/gpu_check.sh`` runs on a lent machine, as JSON.

``python -m restok.measure.gpu [--artifacts DIR] [--preset L] --json OUT``:
- ``artifacts`` (an export, the bundled model's in the check): the cuda backend's tokens against ONNX
  Runtime's in fp32 and bf16, and batch sizes alternating 1, 16, 3, 16, 1 through one pipeline with each
  run's graph replay compared to the same run without graphs and pass by pass (a stale graph or a wrong
  bucket shows here);
- ``preset`` (seeded random weights, held in memory: an L export's ONNX files are not needed to time the
  GPU): batch-1 latency and images per second at each batch, with CUDA graphs on and off; peak device
  memory; kernels and host launches per image (torch.profiler); host time per image against the device
  wait; bf16 against fp32 (token agreement, decoder PSNR); and how many of n images are byte-identical
  alone and inside batches (batch invariance).
Every function also runs on a CPU with ``device="cpu"`` (no graphs, no kernel counts): CI runs them so.
Timings are medians of several runs measured side by side in one process.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from restok.images import psnr
from restok.runtime.pipeline import Pipeline
from restok.sampling_params import SamplingParams

ALTERNATING = (1, 16, 3, 16, 1)
MIXED = [SamplingParams(), SamplingParams(top_k=50, top_p=1.0), SamplingParams(cfg_scale=1.0, temperature=0.8),
         SamplingParams(top_k=0, top_p=0.8)]  # top-k, top-p and both filters off: each graph variant


def _labels(n: int, num_classes: int) -> list[int]:
    return [(7 * i) % num_classes for i in range(n)]


def _mixed(n: int) -> list[SamplingParams]:
    return [MIXED[i % len(MIXED)] for i in range(n)]


# --------------------------------------------------------------------- export
def export_parity(folder: str | Path, device: str = "cuda", images: int = 16) -> dict:
    """Tokens of the cuda backend (fp32 and bf16) against ONNX Runtime's on one export, mixed settings."""
    folder = Path(folder)
    with Pipeline(folder) as ort:
        labels = _labels(images, ort.manifest.num_classes)
        want = ort.generate(labels, _mixed(images), seed=11, decode=False).tokens
    out = {"images": images}
    for precision in ("fp32", "bf16"):
        with Pipeline(folder, "cuda", device=device, compute_precision=precision) as p:
            got = p.generate(labels, _mixed(images), seed=11, decode=False).tokens
        out[f"{precision}_token_agreement"] = float((got == want).mean())
    return out


def alternating_batches(pipe: Pipeline, eager: Pipeline, sizes: tuple[int, ...] = ALTERNATING) -> dict:
    """Runs of alternating sizes through one pipeline with CUDA graphs (captured per bucket, replayed as the
    sizes alternate) against the same runs in ``eager`` (the same export without graphs): equal tokens and
    uint8 images, run by run; and the tokens of each run pass by pass (``on_step`` forces that path; its
    images are decoded at the run's own size, not the bucket's, so only its tokens are compared)."""
    runs = []
    for k, b in enumerate(sizes):
        b = min(b, pipe.max_batch)
        labels, settings = _labels(b, pipe.manifest.num_classes), _mixed(b)
        replayed = pipe.generate(labels, settings, seed=100 + k, output="uint8")
        plain = eager.generate(labels, settings, seed=100 + k, output="uint8")
        stepped = pipe.generate(labels, settings, seed=100 + k, decode=False, on_step=lambda i, be: None)
        runs.append({"batch": b, "tokens_equal": bool(np.array_equal(replayed.tokens, plain.tokens)),
                     "images_equal": bool(np.array_equal(replayed.images, plain.images)),
                     "pass_by_pass_tokens_equal": bool(np.array_equal(replayed.tokens, stepped.tokens))})
    return {"sizes": [r["batch"] for r in runs], "runs": runs,
            "all_equal": all(r["tokens_equal"] and r["images_equal"] and r["pass_by_pass_tokens_equal"] for r in runs)}


# --------------------------------------------------------------------- preset
def preset_models(preset: str, seed: int = 0):
    """(tokenizer, generator, source) of a preset with seeded weights, as ``restok export --preset`` seeds them."""
    from restok.models.presets import build_generator, build_tokenizer

    tok, gen = build_tokenizer(preset, seed=seed), build_generator(preset, seed=seed + 1)
    return tok, gen, {"kind": "preset", "preset": preset, "tokenizer_seed": seed, "generator_seed": seed + 1}


def preset_pipeline(models, max_batch: int, device: str, precision: str, cuda_graphs: bool = True) -> Pipeline:
    """A cuda-backend pipeline over models held in memory (copies: the backend moves and casts its own)."""
    from restok.export.exporter import ExportOptions, describe_export

    tok, gen, source = models
    manifest = describe_export(tok, gen, ExportOptions(max_batch=max_batch, encoder=False), source)
    return Pipeline(Path("."), "cuda", manifest=manifest, device=device, compute_precision=precision,
                    cuda_graphs=cuda_graphs, models=(copy.deepcopy(tok), copy.deepcopy(gen)))


def _timed(pipe: Pipeline, batch: int, runs: int) -> dict:
    """Median wall seconds of ``runs`` generations of ``batch`` images (after one untimed run that captures
    the graph), and the host's share: wall time minus the time spent waiting for the device."""
    labels = _labels(batch, pipe.manifest.num_classes)
    pipe.generate(labels, seed=0, output="uint8")
    be = pipe.backend
    walls, hosts = [], []
    for r in range(runs):
        wait0, t0 = be.wait_seconds, time.perf_counter()
        pipe.generate(labels, seed=r + 1, output="uint8")
        wall = time.perf_counter() - t0
        walls.append(wall)
        hosts.append(wall - (be.wait_seconds - wait0))
    wall, host = statistics.median(walls), statistics.median(hosts)
    return {"batch": batch, "runs": runs, "seconds": wall, "images_per_second": batch / wall,
            "host_seconds_per_image": host / batch, "host_share": host / wall}


def count_launches(pipe: Pipeline, batch: int) -> dict | None:
    """Kernels the GPU ran and launches the host made (kernel launches, graph launches, copies) for one
    run of ``batch`` images, per image; None without CUDA. The run's graph is captured before profiling."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if pipe.backend.device.type != "cuda":
        return None
    labels = _labels(batch, pipe.manifest.num_classes)
    pipe.generate(labels, seed=0, output="uint8")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe.generate(labels, seed=1, output="uint8")
        torch.cuda.synchronize()
    kernels = launches = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
        elif e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaMemcpy")):
            launches += 1
    return {"batch": batch, "gpu_kernels_per_image": kernels / batch, "host_launches_per_image": launches / batch}


def batch_invariance(pipe: Pipeline, images: int = 64, batches: tuple[int, ...] = (16, 64)) -> dict:
    """How many of ``images`` are byte-identical (uint8 images and tokens) generated alone and inside runs
    of each size in ``batches`` (same labels, seeds and noise streams)."""
    labels = _labels(images, pipe.manifest.num_classes)
    alone = [pipe.generate(labels[k:k + 1], seed=5, noise_start=k, output="uint8") for k in range(images)]
    out = {"images": images}
    for b in sorted({min(b, pipe.max_batch) for b in batches}):
        same = 0
        for start in range(0, images, b):
            g = pipe.generate(labels[start:start + b], seed=5, noise_start=start, output="uint8")
            for j in range(g.tokens.shape[0]):
                a = alone[start + j]
                same += bool(np.array_equal(a.tokens[0], g.tokens[j]) and np.array_equal(a.images[0], g.images[j]))
        out[f"identical_in_batches_of_{b}"] = same
    return out


def precision_gate(fast: Pipeline, reference: Pipeline, images: int = 16) -> dict:
    """The fast precision against fp32: sampled-token agreement under one seed, and the fast decoder's PSNR
    against the fp32 decoder on the fp32 tokens."""
    labels = _labels(images, reference.manifest.num_classes)
    ref = reference.generate(labels, seed=3)
    got = fast.generate(labels, seed=3, decode=False)
    decoded = fast.decode(ref.tokens)
    return {"images": images, "token_agreement": float((got.tokens == ref.tokens).mean()),
            "decoder_psnr_db": float(psnr(np.clip(decoded, 0, 1), np.clip(ref.images, 0, 1)))}


def measure_preset(preset: str, device: str, batches: list[int], runs: int, invariance_images: int,
                   profile_batches: list[int], log=print) -> dict:
    import torch

    models = preset_models(preset)
    max_batch = max(batches + [invariance_images])
    cuda = device.startswith("cuda")
    out: dict = {"preset": preset, "device": device,
                 "gpu": torch.cuda.get_device_name(0) if cuda else None, "max_batch": max_batch}
    for graphs in ((True, False) if cuda else (False,)):
        name = "graphs" if graphs else "eager"
        log(f"{preset} bf16 {name}")
        with preset_pipeline(models, max_batch, device, "bf16", graphs) as p:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out[name] = {"timings": [_timed(p, b, runs) for b in batches],
                         "launches": [c for c in (count_launches(p, b) for b in profile_batches) if c]}
            if cuda:
                out[name]["peak_device_bytes"] = torch.cuda.max_memory_allocated()
            if graphs or not cuda:
                log(f"{preset} batch invariance")
                out["batch_invariance"] = batch_invariance(p, invariance_images, (16, 64))
                log(f"{preset} bf16 vs fp32")
                with preset_pipeline(models, 16, device, "fp32", graphs) as ref:  # fp32 KV for 16, not max_batch
                    out["bf16_vs_fp32"] = precision_gate(p, ref)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m restok.measure.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", help="an export: cuda vs ONNX Runtime tokens and alternating batch sizes")
    ap.add_argument("--preset", default="L", help="preset timed with seeded weights (default L; 'none' skips)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the logic without a GPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256], help="batch sizes timed")
    ap.add_argument("--profile-batches", type=int, nargs="+", default=[1, 64], help="batch sizes profiled")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per batch (median)")
    ap.add_argument("--invariance-images", type=int, default=64, help="images of the batch-invariance count")
    ap.add_argument("--json", required=True, help="where the report goes")
    a = ap.parse_args(argv)
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    report: dict = {}
    if a.artifacts:
        log("export parity")
        report["export_parity"] = export_parity(a.artifacts, a.device)
        log("alternating batch sizes")
        with Pipeline(a.artifacts, "cuda", device=a.device) as p, \
                Pipeline(a.artifacts, "cuda", device=a.device, cuda_graphs=False) as eager:
            report["alternating_batches"] = alternating_batches(p, eager)
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")  # what is done survives a later timeout
    if a.preset.lower() != "none":
        report["preset"] = measure_preset(a.preset, a.device, a.batches, a.runs, a.invariance_images,
                                          a.profile_batches, log)
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
