"""``restok check``: the float32 PyTorch reference vs ONNX Runtime on the same artifacts, step by step.

For fp32 artifacts this is implementation parity (ladder rung 2, gated); for fp16 artifacts it measures
what the lower precision costs (rung 3, reported; thresholds optional).

1. Teacher-forced per pass: the PyTorch modules run one generation of two images; every pass's recorded
   inputs are fed to the generator graph on both backends, and logits, sampled tokens and KV caches are
   compared.
2. Free-running generations under the same seed: the fraction of identical sampled tokens.
3. The tokenizer decoder on the same tokens: max error and PSNR; the encoder: identical ids.
The recorded inputs and PyTorch outputs are written as Polygraphy files so that any later backend can
replay them (``polygraphy run generator/generator.onnx --onnxrt --load-inputs generator_pass3_inputs.json
--load-outputs generator_pass3_outputs.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from restok.images import psnr
from restok.manifest import Manifest
from restok.runtime.backend import create_backend
from restok.runtime.pipeline import Pipeline
from restok.sampling_params import SamplingParams


PSNR_IDENTICAL = 200.0  # what identical images report (their PSNR is infinite, which JSON cannot hold)


@dataclass(frozen=True)
class ParityThresholds:
    """None means report only."""

    max_logit_error: float | None = 1e-3
    min_token_agreement: float | None = 1.0
    min_psnr: float | None = 60.0

    @classmethod
    def for_backend(cls, backend: str, precision: str) -> "ParityThresholds":
        """Gated by default: ONNX Runtime fp32 (implementation parity); the cuda backend in fp32 (parity, with
        1% of tokens allowed to move where GPU reductions round otherwise); OpenVINO and the cuda backend in
        bf16/fp16 at the quality gate of the fast configurations (95% of sampled tokens, decoder PSNR 40 dB).
        Everything else is reported (other precisions; TensorRT) unless thresholds are given. ``precision``
        is what the backend computes in."""
        if backend == "openvino" or (backend == "cuda" and precision != "fp32"):
            return cls(None, 0.95, 40.0)
        if backend == "cuda":
            return cls(1e-3, 0.99, 60.0)
        return cls() if backend == "onnxruntime" and precision == "fp32" else cls(None, None, None)

    def override(self, max_logit_error=None, min_token_agreement=None, min_psnr=None) -> "ParityThresholds":
        kw = {k: v for k, v in dict(max_logit_error=max_logit_error, min_token_agreement=min_token_agreement,
                                     min_psnr=min_psnr).items() if v is not None}
        return replace(self, **kw)


def _labels(m: Manifest, start: int, n: int) -> list[int]:
    return [(start + i) % m.num_classes for i in range(n)]


def _has_polygraphy() -> bool:
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return False
    return True


def _save_polygraphy(folder: Path, name: str, feeds: dict, outputs: dict) -> dict:
    """Polygraphy's own JSON formats: a list of feed dicts, and RunResults with a 'torch' runner."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # no "[I] Saving ..." line per file
    folder.mkdir(parents=True, exist_ok=True)
    inp, out = folder / f"{name}_inputs.json", folder / f"{name}_outputs.json"
    save_json([feeds], str(inp))
    rr = RunResults()
    rr.append(("torch", [IterationResult(outputs=outputs, runner_name="torch")]))
    rr.save(str(out))
    return {"inputs": str(inp), "outputs": str(out)}


def run_check(folder: str | Path, images: int = 16, seed: int = 0, threads: int | None = None,
              thresholds: ParityThresholds | dict | None = None, polygraphy_dir: Path | None = None,
              sampling: SamplingParams = SamplingParams(), backend: str = "onnxruntime",
              reference_device: str = "cpu", manifest: Manifest | None = None, reference: tuple | None = None,
              **backend_options) -> dict:
    """The float32 PyTorch reference (on ``reference_device``; from ``reference`` = (tokenizer, generator)
    checkpoint paths when given, else from what the export recorded) against ``backend``. ``thresholds``:
    all of them, or a dict of the ones to change from the backend's defaults (``ParityThresholds.for_backend``
    of what it computes in)."""
    folder = Path(folder)
    m = manifest or Manifest.read(folder)
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    cand = create_backend(backend, folder, m, threads, **backend_options)
    m = cand.manifest  # TensorRT < 10.15 runs an in-place export's past/present graph: compare that
    th = thresholds if isinstance(thresholds, ParityThresholds) else \
        ParityThresholds.for_backend(backend, getattr(cand, "precision", m.precision)).override(**(thresholds or {}))
    try:
        ref = create_backend("torch", folder, m, threads, device=reference_device, reference=reference)
    except BaseException:
        cand.close()
        raise
    pref, pcand = Pipeline(folder, ref, manifest=m), Pipeline(folder, cand, manifest=m)
    pg_dir = polygraphy_dir  # None: no Polygraphy files (restok check writes them to ARTIFACTS/polygraphy)
    write_pg = pg_dir is not None and _has_polygraphy()
    batch = min(2, m.max_batch)
    report: dict = {"artifacts": str(folder), "backend": backend,
                    "precision": getattr(cand, "precision", m.precision), "max_batch": m.max_batch,
                    "guided": m.guided, "kv_cache": m.kv_cache, "thresholds": th.__dict__, "steps": []}
    try:
        # 1. teacher-forced, pass by pass: the reference's inputs of every pass, fed to both backends
        feeds: list[dict] = []
        pref.generate(_labels(m, 0, batch), sampling, seed=seed, decode=False,
                      on_step=lambda i, be: feeds.append(be.pass_feeds(i)))
        replay = {}
        g = m.graphs["generator"]
        for st, f in zip(pref.schedule.steps, feeds):
            f = {t.name: f[t.name].astype(t.dtype, copy=False) for t in g.inputs}
            want, got = ref.run_graph("generator", f), cand.run_graph("generator", f)
            lw, lg = want["logits"], got["logits"].astype(np.float32)
            kv = [t.name for t in g.outputs if t.role in ("kv_present", "kv_cache_out")]
            report["steps"].append({
                "step": st.index, "new_positions": st.num_new, "cached": st.cached,
                "logits_max_abs_error": float(np.abs(lw - lg).max()),
                "logits_std": float(lw.std()),
                "tokens_identical": float(np.mean(want["next_tokens"] == got["next_tokens"])),
                "kv_max_abs_error": max(float(np.abs(want[k] - got[k].astype(np.float32)).max()) for k in kv),
            })
            name = f"generator_pass{st.index}"
            replay[name] = _save_polygraphy(pg_dir, name, f, want) if write_pg else None

        # 2. free-running generations under the same seed
        lab = _labels(m, 0, images)
        a = pref.generate(lab, sampling, seed=seed, decode=False).tokens
        b = pcand.generate(lab, sampling, seed=seed, decode=False).tokens
        agree, identical = int((a == b).sum()), int((a == b).all(axis=1).sum())
        first_tokens = a[: m.max_batch]
        report["generation"] = {"images": images, "token_agreement": agree / a.size, "identical_images": identical}

        # 3. tokenizer graphs on the same inputs
        ia = np.array(ref.decode(first_tokens))
        ib = np.array(cand.decode(first_tokens))
        report["decoder"] = {"max_abs_error": float(np.abs(ia - ib).max()), "psnr_db": min(psnr(ia, ib), PSNR_IDENTICAL),
                             "image_std": float(ia.std())}
        replay["decoder"] = (_save_polygraphy(pg_dir, "decoder", {"tokens": first_tokens}, {"images": ia})
                             if write_pg else None)
        if "encoder" in m.graphs and cand.has_encoder:
            x = np.clip(ia, 0.0, 1.0).astype(np.float32)
            ea, eb = np.asarray(ref.encode(x)), np.asarray(cand.encode(x))
            report["encoder"] = {"ids_identical": float(np.mean(ea == eb))}
        elif "encoder" in m.graphs:
            report["encoder"] = {"skipped": f"the {backend} backend has no encoder (restok build --encoder builds it)"}
    finally:
        pref.close()
        pcand.close()
    report["polygraphy"] = {
        "dir": str(pg_dir) if write_pg else None,
        "replay": {name: f"polygraphy run {folder / m.graphs[name.split('_pass')[0]].file} --onnxrt --load-inputs "
                         f"{f['inputs']} --load-outputs {f['outputs']}" for name, f in replay.items() if f},
        "note": None if write_pg else ("no replay files asked for" if pg_dir is None else
                                       "polygraphy is not installed: no replay files written"),
    }

    # verdict
    checks = []
    max_err = max(s["logits_max_abs_error"] for s in report["steps"])
    if th.max_logit_error is not None:
        checks.append(("teacher-forced logits max abs error", max_err, "<=", th.max_logit_error, max_err <= th.max_logit_error))
    agreement = report["generation"]["token_agreement"]
    if th.min_token_agreement is not None:
        checks.append(("token agreement", agreement, ">=", th.min_token_agreement, agreement >= th.min_token_agreement))
    p = report["decoder"]["psnr_db"]
    if th.min_psnr is not None:
        checks.append(("decoder PSNR dB", p, ">=", th.min_psnr, p >= th.min_psnr))
    report["checks"] = [{"name": c[0], "value": c[1], "op": c[2], "threshold": c[3], "passed": bool(c[4])} for c in checks]
    report["passed"] = all(c[4] for c in checks)
    report["summary"] = (
        f"{'PASS' if report['passed'] else 'FAIL'} ({backend}, {report['precision']}, max batch {m.max_batch}): logits max abs "
        f"error {max_err:.3g} (logits std {min(s['logits_std'] for s in report['steps']):.3g}), token agreement "
        f"{agreement:.4f} over {images} images ({identical} identical), decoder PSNR {p:.1f} dB"
    )
    return report
