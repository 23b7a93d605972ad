"""The ``restok`` command line: export, generate, check, bench.

Every command that runs a model reads an artifacts folder (``restok export``). Without ``--artifacts``,
the model named by --checkpoint / --tokenizer + --generator / --preset (default: the bundled model) is
exported once into a cache folder keyed by its weights and the export options, and reused.
Exit codes: 0 success, 1 a check failed, 2 bad input (the message says what to fix).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from restok.engines.builder import EngineError
from restok.schedule import CFG_SCHEDULES

EXIT_FAIL, EXIT_USAGE = 1, 2


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------- arguments


def _add_model_args(p: argparse.ArgumentParser, export_opts: bool = True) -> None:
    g = p.add_argument_group("model (default: the bundled model)")
    g.add_argument("--checkpoint", metavar="DIR", help="a folder with tokenizer/ and generator/ restok checkpoints")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer checkpoint: file, folder or hub id (with --generator)")
    g.add_argument("--generator", metavar="PATH", help="generator checkpoint: file, folder or hub id (with --tokenizer)")
    g.add_argument("--preset", help="an architecture (tiny, B, L): its shapes for bare state dicts, or alone: "
                                    "seeded random weights")
    g.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    if export_opts:
        e = p.add_argument_group("export")
        e.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="graph precision (default fp32)")
        e.add_argument("--batch", type=int, default=None, help="images per run the graphs are built for (default 1)")
        e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
        e.add_argument("--no-cfg", action="store_true", help="export without classifier-free guidance (half the rows)")
        e.add_argument("--no-encoder", action="store_true", help="skip the tokenizer encoder graph")
        e.add_argument("--kv-cache", choices=("concat", "inplace"), default="concat",
                       help="concat: past/present KV per pass (any TensorRT 10.x; default); inplace: one fixed-size "
                            "cache updated with ONNX TensorScatter (opset 24; TensorRT >= 10.15 updates it in place), "
                            "plus past/present step graphs sharing its weights that older TensorRT builds instead")
        e.add_argument("--no-concat-fallback", action="store_true",
                       help="with --kv-cache inplace: skip the past/present fallback graphs (TensorRT >= 10.15 only)")


def _add_artifacts_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", metavar="DIR", help="an export folder (restok export); default: the model options below, "
                                                       "exported into the cache on first use")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the paper's gFID 2.34 settings)")
    g.add_argument("--classes", type=int, nargs="+", help="class ids, one image each (default: 0..7 or fewer)")
    g.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same images on every backend")
    g.add_argument("--cfg-scale", type=float, default=3.75, help="classifier-free guidance scale; <= 1 disables (default 3.75)")
    g.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="step", help="guidance schedule over the steps (default step)")
    g.add_argument("--cfg-start", type=float, default=0.25, help="progress where the 'step' schedule turns guidance on (default 0.25)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables (default)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 disables (default 0.95)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restok",
        description="ResTok + HAR: export per-step graphs, generate images, check parity, benchmark backends.",
        epilog="Run 'restok COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    ex = sub.add_parser("export", help="export the generator (one graph per HAR step) and the tokenizer to ONNX",
                        description="Export one ONNX graph per HAR step (sampling inside), the tokenizer decoder and "
                                    "encoder, a shared weights file per model and manifest.json. A preset alone "
                                    "means that architecture with seeded random weights; no model option means "
                                    "the bundled model.")
    _add_model_args(ex)
    ex.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced atomically when complete)")
    ex.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    ex.set_defaults(func=cmd_export)

    gen = sub.add_parser("generate", help="generate class-conditional images (PNGs, a grid, tokens, a JSON summary)",
                         description="Generate images from an export on a backend. Writes one PNG per image, "
                                     "grid.png, tokens.npy and summary.json (timings per step and for decoding).")
    _add_artifacts_arg(gen)
    _add_model_args(gen)
    gen.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"),
                     help="onnxruntime (default, CPU), tensorrt (GPU; restok build first) or torch (the reference)")
    gen.add_argument("--device", default="cpu", help="torch backend device (default cpu)")
    gen.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    gen.add_argument("--low-memory", action="store_true", help="onnxruntime: share one copy of the weights across "
                     "passes instead of pre-packing them per pass (much less RAM, slower)")
    _add_sampling_args(gen)
    gen.add_argument("--out", required=True, metavar="DIR", help="output folder")
    gen.add_argument("--json", action="store_true", help="print the JSON summary on stdout")
    gen.set_defaults(func=cmd_generate)

    chk = sub.add_parser("check", help="PyTorch vs ONNX Runtime (or TensorRT) parity, step by step; Polygraphy files",
                         description="Compare the exported graphs on ONNX Runtime (or TensorRT engines) with the "
                                     "float32 PyTorch modules they came from: teacher-forced logits per step, "
                                     "sampled tokens over whole generations "
                                     "under the same noise, decoder error and PSNR. Writes Polygraphy input and "
                                     "reference-output files for replay (polygraphy run ... --load-inputs "
                                     "--load-outputs). Exits 1 when a check fails.")
    _add_artifacts_arg(chk)
    _add_model_args(chk)
    chk.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                     help="the backend checked against the PyTorch reference (default onnxruntime)")
    chk.add_argument("--device", default="cpu", help="torch device of the reference (default cpu; cuda on GPU machines)")
    chk.add_argument("--images", type=int, default=16, help="images for the token-agreement check (default 16)")
    chk.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    chk.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    chk.add_argument("--low-memory", action="store_true", help="onnxruntime: one shared copy of the weights (less RAM, slower)")
    chk.add_argument("--max-logit-error", type=float, default=None, help="fail above this max abs logits error "
                     "(default 1e-3 for fp32, report only for fp16)")
    chk.add_argument("--min-token-agreement", type=float, default=None, help="fail below this fraction (default 1.0 for fp32)")
    chk.add_argument("--min-psnr", type=float, default=None, help="fail below this decoder PSNR in dB (default 60 for fp32)")
    chk.add_argument("--polygraphy-dir", metavar="DIR", help="where to write Polygraphy files (default: ARTIFACTS/polygraphy)")
    chk.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT ('-' for stdout)")
    chk.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="latency per step, per decode and end to end, across backends, in one run",
                       description="Time the pipeline on each backend, interleaving runs so that every backend sees "
                                   "the same machine load; report medians, p90s, images/s, memory and the speed "
                                   "ratio between backends.")
    b.add_argument("--artifacts", metavar="DIR", action="append", help="export folder(s); repeat for several batch sizes")
    _add_model_args(b)
    b.add_argument("--backends", default="onnxruntime,torch",
                   help="comma-separated from onnxruntime, tensorrt, torch (default onnxruntime,torch)")
    b.add_argument("--device", default="cpu", help="torch backend device (default cpu; cuda to compare on a GPU)")
    b.add_argument("--runs", type=int, default=5, help="timed runs per backend (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    b.add_argument("--low-memory", action="store_true", help="onnxruntime: one shared copy of the weights (less RAM, slower)")
    b.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' for stdout)")
    b.set_defaults(func=cmd_bench)
    bd = sub.add_parser("build", help="TensorRT engines for an export (GPU machine with TensorRT)",
                        description="Build one TensorRT engine per graph of an export, cached under "
                                    "ARTIFACTS/engines/<TensorRT version>/<GPU>/ and keyed by the ONNX hashes, "
                                    "precision, batch, TensorRT version and GPU; a mismatch is refused with what to "
                                    "rebuild. Precision comes from the graphs (strongly typed networks).")
    bd.add_argument("--artifacts", required=True, metavar="DIR", help="an export (restok export or calibrate)")
    bd.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8", "fp8", "int8-weight-only"),
                    help="assert the artifacts' precision (export --precision fp16; calibrate for int8/fp8)")
    bd.add_argument("--batch", type=int, nargs="+", help="assert the artifacts' batch")
    bd.add_argument("--workspace", type=float, default=8.0, metavar="GB", help="builder workspace limit (default 8)")
    bd.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    bd.add_argument("--timing-cache", metavar="PATH", default="", help="timing cache (default: next to the engines, one per TensorRT version and GPU)")
    bd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    bd.set_defaults(func=cmd_build)

    cal = sub.add_parser("calibrate", help="INT8 / FP8 / weight-only INT8 Q/DQ artifacts with a quality gate",
                         description="Calibrate on FP32 generation traces, write Q/DQ versions of every step graph "
                                     "and of the tokenizer decoder as a new artifacts folder, and gate it on ONNX "
                                     "Runtime against the FP32 artifacts (token agreement, decoded PSNR). A failed "
                                     "gate writes nothing and exits 1.")
    cal.add_argument("--artifacts", required=True, metavar="DIR", help="FP32 artifacts (restok export)")
    cal.add_argument("--precision", required=True, choices=("int8", "fp8", "int8-weight-only", "int8-dynamic"),
                     help="int8 (W8A8), fp8 (E4M3 W8A8), int8-weight-only (these three: Q/DQ for TensorRT), or "
                          "int8-dynamic (ONNX Runtime CPU only: int8 GEMMs with per-call activation ranges, "
                          "no calibration data; the fast CPU path)")
    cal.add_argument("--samples", type=int, default=32, help="calibration generations (default 32)")
    cal.add_argument("--method", choices=("max", "percentile"), default="max",
                     help="activation ranges: max |x| over the samples (default), or the largest per-sample "
                          "percentile of |x| (--percentile), which clips rare outliers")
    cal.add_argument("--percentile", type=float, default=99.99, help="with --method percentile (default 99.99)")
    cal.add_argument("--classes", type=int, nargs="+", help="calibration class ids (default: all, cycled)")
    cal.add_argument("--quantize-head", action="store_true", help="also quantize the LM head (kept in FP32 by default)")
    cal.add_argument("--no-decoder", action="store_true", help="keep the tokenizer decoder in FP32")
    cal.add_argument("--exclude-node", action="append", default=[], metavar="NAME", help="keep this node in FP32 (repeatable)")
    cal.add_argument("--exclude-op", action="append", default=[], choices=("MatMul", "Gemm", "Conv"),
                     help="keep every node of this op type in FP32 (repeatable)")
    cal.add_argument("--gate-images", type=int, default=64, help="images for the quality gate (default 64)")
    cal.add_argument("--min-token-agreement", type=float, default=0.9, help="gate: sampled tokens equal to FP32 (default 0.9)")
    cal.add_argument("--min-psnr", type=float, default=30.0, help="gate: decoded-image PSNR vs FP32 in dB (default 30)")
    cal.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    cal.add_argument("--low-memory", action="store_true", help="onnxruntime without per-pass weight pre-packing "
                     "(needed for fp32 L on machines with less than ~40 GB of RAM; slower)")
    cal.add_argument("--out", required=True, metavar="DIR", help="the new artifacts folder")
    cal.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT ('-' for stdout)")
    cal.set_defaults(func=cmd_calibrate)

    tr = sub.add_parser("train", help="train a tokenizer or a generator (single process or under torchrun)",
                        description="Train with a JSON config plus key=value overrides. Run under torchrun for "
                                    "several processes (DDP; FSDP on GPUs with fsdp=true). --resume continues "
                                    "from the last checkpoint in the config's out folder, exactly.")
    tr.add_argument("what", choices=("tokenizer", "generator"), help="which model")
    tr.add_argument("--config", metavar="JSON", help="a config file (fields: see restok/training/train_*.py)")
    tr.add_argument("--resume", action="store_true", help="continue from out/checkpoints/latest")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=2000 lr=3e-4")
    tr.set_defaults(func=cmd_train)

    xc = sub.add_parser("extract-codes", help="tokenize a dataset once, in resumable shards, for generator training")
    xc.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer checkpoint")
    xc.add_argument("--preset", default="L", help="architecture for a bare state dict (default L)")
    xc.add_argument("--data", required=True, help="digits | folder:PATH | wds:PATTERN")
    xc.add_argument("--out", required=True, metavar="DIR", help="output folder (resumes if it holds a partial run)")
    xc.add_argument("--crops", choices=("ten", "center"), default="ten", help="ten crops (default) or the centre crop")
    xc.add_argument("--no-flip", action="store_true", help="leave out the flipped crops (e.g. for digits)")
    xc.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    xc.add_argument("--shard-size", type=int, default=10000, help="images per shard (default 10000)")
    xc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    xc.set_defaults(func=cmd_extract_codes)

    ev = sub.add_parser("evaluate", help="tokenizer reconstruction metrics, or digit class accuracy of generations")
    ev.add_argument("what", choices=("tokenizer", "digits"), help="tokenizer: PSNR, codebook usage/entropy; "
                    "digits: how often generated digits are classified as requested")
    ev.add_argument("--data", default="digits:test", help="evaluation images (default digits:test)")
    _add_artifacts_arg(ev)
    _add_model_args(ev, export_opts=False)
    ev.add_argument("--per-class", type=int, default=10, help="generated images per class (default 10)")
    _add_sampling_args(ev)
    ev.add_argument("--json", metavar="OUT", help="write the result as JSON to OUT ('-' for stdout)")
    ev.set_defaults(func=cmd_evaluate)
    return parser


# ------------------------------------------------------------------------------- model resolution


def _bundled_model() -> Path | None:
    d = Path(__file__).parent / "assets" / "tiny"
    return d if (d / "tokenizer").exists() and (d / "generator").exists() else None


def _resolve_models(args):
    """-> (tokenizer, generator, source dict) from the model options."""
    from restok.checkpoints import load_generator, load_tokenizer
    from restok.models.presets import build_generator, build_tokenizer, get_preset

    if bool(args.tokenizer) != bool(args.generator):
        raise CLIError("--tokenizer and --generator go together")
    if args.checkpoint and args.tokenizer:
        raise CLIError("use either --checkpoint DIR or --tokenizer/--generator, not both")
    preset = args.preset
    if preset:
        get_preset(preset)
    folder = Path(args.checkpoint) if args.checkpoint else None
    if folder is None and not args.tokenizer and not preset:
        folder = _bundled_model()
        if folder is None:
            preset = "tiny"
            print("restok: no bundled trained model in this install; using the tiny preset with seeded random weights",
                  file=sys.stderr)
    if folder is not None:
        t_path, g_path = folder / "tokenizer", folder / "generator"
    elif args.tokenizer:
        t_path, g_path = args.tokenizer, args.generator
    else:
        s = args.weights_seed
        source = {"kind": "preset", "preset": preset, "tokenizer_seed": s, "generator_seed": s + 1}
        return build_tokenizer(preset, seed=s), build_generator(preset, seed=s + 1), source
    tok = load_tokenizer(t_path, preset or "L")
    gen = load_generator(g_path, preset or "L")
    src = {"kind": "checkpoint", "tokenizer": str(Path(t_path).resolve()) if Path(t_path).exists() else str(t_path),
           "generator": str(Path(g_path).resolve()) if Path(g_path).exists() else str(g_path)}
    return tok, gen, src


def _export_options(args):
    from restok.export import DEFAULT_OPSET, ExportOptions

    kv = getattr(args, "kv_cache", "concat") or "concat"
    return ExportOptions(precision=getattr(args, "precision", "fp32"), batch=getattr(args, "batch", 1) or 1,
                         guided=not getattr(args, "no_cfg", False),
                         opset=getattr(args, "opset", None) or (24 if kv == "inplace" else DEFAULT_OPSET),
                         encoder=not getattr(args, "no_encoder", False), kv_cache=kv,
                         concat_fallback=not getattr(args, "no_concat_fallback", False))


def _cache_root() -> Path:
    return Path(os.environ.get("RESTOK_CACHE", Path.home() / ".cache" / "restok"))


def _artifacts(args) -> Path:
    """--artifacts, or the model options exported into the cache (once)."""
    if getattr(args, "artifacts", None):
        a = args.artifacts
        folder = Path(a[0] if isinstance(a, list) else a)
        given = [f"--{o.replace('_', '-')}" for o in ("checkpoint", "tokenizer", "generator", "preset", "precision", "opset")
                 if getattr(args, o, None) not in (None, "fp32")]
        if given:
            raise CLIError(f"--artifacts already fixes the model and export options; drop {', '.join(given)}")
        if getattr(args, "batch", None) is not None:
            from restok.manifest import Manifest

            have = Manifest.read(folder).batch
            if have != args.batch:
                raise CLIError(f"{folder} was exported for batch {have}, not {args.batch}; "
                               f"re-export with --batch {args.batch} or drop --batch")
        return folder
    from dataclasses import asdict

    import restok
    from restok.export import export_artifacts, state_dict_sha256
    from restok.manifest import ArtifactError, Manifest

    tok, gen, source = _resolve_models(args)
    opts = _export_options(args)
    key = json.dumps({"v": restok.__version__, "tok": state_dict_sha256(tok), "gen": state_dict_sha256(gen),
                      "opts": asdict(opts)}, sort_keys=True)
    folder = _cache_root() / "artifacts" / hashlib.sha256(key.encode()).hexdigest()[:20]
    try:
        Manifest.read(folder)
        return folder
    except ArtifactError:
        pass
    print(f"restok: exporting the model into {folder} (once)", file=sys.stderr)
    export_artifacts(tok, gen, folder, opts, source=source)
    return folder


# ------------------------------------------------------------------------------------ commands


def cmd_export(args) -> dict:
    from restok.export import export_artifacts

    opts = _export_options(args)
    opts.validate()
    tok, gen, source = _resolve_models(args)
    t0 = time.perf_counter()
    m = export_artifacts(tok, gen, args.out, opts, source=source)
    summary = {
        "out": str(Path(args.out).resolve()), "precision": m.precision, "batch": m.batch, "guided": m.guided,
        "kv_cache": m.kv_cache,
        "opset": m.opset, "graphs": sorted(m.graphs), "seconds": round(time.perf_counter() - t0, 2),
        "bytes": sum(f["bytes"] for f in m.files.values()),
    }
    if not args.json:
        print(f"exported {len(m.graphs)} graphs ({summary['bytes'] / 2**20:.1f} MiB, {m.precision}, batch {m.batch}) "
              f"to {summary['out']} in {summary['seconds']}s")
    return summary


def _sampling(args):
    from restok.runtime import SamplingParams

    s = SamplingParams(args.cfg_scale, args.cfg_schedule, args.cfg_start, args.temperature, args.top_k, args.top_p)
    s.validate()
    return s


def _batches(classes: list[int], batch: int):
    """Chunks of exactly ``batch`` labels; the last is padded by repeating its last label (the padded
    images are dropped). Noise is per image index, so padding changes nothing."""
    for start in range(0, len(classes), batch):
        chunk = classes[start : start + batch]
        yield start, len(chunk), chunk + [chunk[-1]] * (batch - len(chunk))


def cmd_generate(args) -> dict:
    from tqdm import tqdm

    from restok.images import make_grid, save_png, to_uint8
    from restok.runtime import Pipeline

    sampling = _sampling(args)
    folder = _artifacts(args)
    pipe = Pipeline(folder, backend=args.backend, threads=args.threads, low_memory=args.low_memory, device=args.device)
    m = pipe.manifest
    classes = args.classes if args.classes is not None else list(range(min(m.num_classes, 8)))
    bad = [c for c in classes if not 0 <= c < m.num_classes]
    if bad:
        raise CLIError(f"class ids {bad} are outside [0, {m.num_classes}) for this model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, tokens = [], []
    step_times = np.zeros(m.num_steps)
    t_dec = 0.0
    with tqdm(total=len(classes), desc=f"generating ({args.backend})", unit="img", file=sys.stderr, disable=None) as bar:
        for start, n, labels in _batches(classes, m.batch):
            g = pipe.generate(labels, sampling, seed=args.seed, noise_start=start)
            step_times += g.step_seconds
            t_dec += g.decode_seconds
            images.append(to_uint8(g.images[:n]))
            tokens.append(g.tokens[:n])
            bar.update(n)
    pipe.close()
    images = np.concatenate(images)
    files = [str(save_png(img, out / f"{i:04d}_class{c}.png")) for i, (c, img) in enumerate(zip(classes, images))]
    grid = save_png(make_grid(images), out / "grid.png")
    np.save(out / "tokens.npy", np.concatenate(tokens))
    summary = {
        "artifacts": str(folder), "backend": args.backend, "precision": m.precision, "batch": m.batch,
        "num_steps": m.num_steps, "classes": classes, "seed": args.seed,
        "sampling": {"cfg_scale": sampling.cfg_scale, "cfg_schedule": sampling.cfg_schedule, "cfg_start": sampling.cfg_start,
                     "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p},
        "seconds": {"steps": [round(t, 5) for t in step_times], "generate": round(float(step_times.sum()), 4),
                    "decode": round(t_dec, 4)},
        "images_per_second": round(len(classes) / max(float(step_times.sum()) + t_dec, 1e-9), 3),
        "images": files, "grid": str(grid), "tokens": str(out / "tokens.npy"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.json:
        print(f"wrote {len(files)} images and {grid} ({summary['seconds']['generate']}s generate, "
              f"{summary['seconds']['decode']}s decode, {args.backend})")
    return summary


def cmd_check(args) -> dict:
    from restok.parity import ParityThresholds, run_check

    from restok.manifest import Manifest

    folder = _artifacts(args)
    th = ParityThresholds.for_backend(args.backend, Manifest.read(folder).precision)
    th = th.override(args.max_logit_error, args.min_token_agreement, args.min_psnr)
    report = run_check(folder, images=args.images, seed=args.seed, threads=args.threads, thresholds=th,
                       polygraphy_dir=Path(args.polygraphy_dir) if args.polygraphy_dir else None,
                       low_memory=args.low_memory, backend=args.backend, device=args.device)
    _write_json(report, args.json)
    print(report["summary"], file=sys.stderr)
    return {"_exit": 0 if report["passed"] else EXIT_FAIL, **({"report": report} if args.json == "-" else {})}


def cmd_bench(args) -> dict:
    from restok.bench import format_table, run_bench

    if args.runs < 1 or args.warmup < 0:
        raise CLIError("--runs must be >= 1 and --warmup >= 0")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    folders = [Path(a) for a in args.artifacts] if args.artifacts else [_artifacts(args)]
    from restok.runtime.backend import backend_names

    unknown = [b for b in backends if b not in backend_names()]
    if unknown:
        raise CLIError(f"unknown backends {unknown}; choose from {', '.join(backend_names())}")
    results = [run_bench(f, backends, runs=args.runs, warmup=args.warmup, threads=args.threads,
                         low_memory=args.low_memory, device=args.device) for f in folders]
    doc = {"results": results}
    _write_json(doc, args.json)
    print(format_table(results), file=sys.stderr if args.json == "-" else sys.stdout)
    return {}


def cmd_build(args) -> dict:
    from restok.engines.builder import BuildOptions, EngineError, build_engines
    from restok.manifest import QUANTIZED, Manifest

    m = Manifest.read(args.artifacts)
    if args.precision and args.precision != m.precision:
        how = "restok calibrate --precision" if args.precision in QUANTIZED else "restok export --precision"
        if args.precision == "bf16":
            raise CLIError("bf16 graphs are not exported yet; use fp16 (or fp32)")
        raise CLIError(f"{args.artifacts} holds {m.precision} graphs, not {args.precision}; make them with {how} {args.precision}")
    if args.batch and any(b != m.batch for b in args.batch):
        raise CLIError(f"{args.artifacts} was exported for batch {m.batch}; export one folder per batch size "
                       f"(restok export --batch N) and build each")
    opts = BuildOptions(workspace_gb=args.workspace, opt_level=args.opt_level, timing_cache=args.timing_cache)
    try:
        opts.validate()
        d = build_engines(args.artifacts, opts)
    except EngineError as e:
        raise CLIError(str(e)) from e
    if not args.json:
        print(f"engines in {d}")
    return {"engines": str(d)}


def cmd_calibrate(args) -> dict:
    from restok.calibration import CalibrationOptions, calibrate

    opts = CalibrationOptions(
        precision=args.precision, samples=args.samples, method=args.method, percentile=args.percentile,
        classes=tuple(args.classes or ()),
        quantize_head=args.quantize_head, quantize_decoder=not args.no_decoder,
        exclude_nodes=tuple(args.exclude_node), exclude_ops=tuple(args.exclude_op), gate_images=args.gate_images,
        min_token_agreement=args.min_token_agreement, min_psnr=args.min_psnr,
    )
    report = calibrate(args.artifacts, args.out, opts, threads=args.threads,
                       report_path=args.json if args.json and args.json != "-" else None, low_memory=args.low_memory)
    if args.json == "-":
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    q = report["quality"]
    verdict = "PASS" if report["passed"] else "FAIL (nothing written)"
    print(f"{verdict} {args.precision}: token agreement {q['token_agreement']:.4f} over {q['images']} images "
          f"(gate {args.min_token_agreement}), decoder PSNR {q['decoder_psnr_db']:.1f} dB (gate {args.min_psnr}), "
          f"max logits error {max(s['logits_max_abs_error'] for s in q['steps']):.3g}", file=sys.stderr)
    return {"_exit": 0 if report["passed"] else EXIT_FAIL}


def cmd_train(args) -> dict:
    from restok.training.common import load_config

    if args.what == "tokenizer":
        from restok.training.train_tokenizer import TokenizerTrainConfig as Cfg
        from restok.training.train_tokenizer import train_tokenizer as run
    else:
        from restok.training.train_generator import GeneratorTrainConfig as Cfg
        from restok.training.train_generator import train_generator as run
    cfg = load_config(Cfg, args.config, args.overrides)
    out = run(cfg, resume=args.resume)
    print(f"trained {args.what}: {out}/checkpoints/latest", file=sys.stderr)
    return {}


def cmd_extract_codes(args) -> dict:
    from restok.checkpoints import load_tokenizer
    from restok.training.codes import extract_codes
    from restok.training.data import open_dataset

    tok = load_tokenizer(args.tokenizer, args.preset)
    data = open_dataset(args.data, tok.cfg.image_size, train=False)
    out = extract_codes(tok, data, args.out, crops=args.crops, flip=not args.no_flip, batch_size=args.batch,
                        shard_size=args.shard_size, device=args.device)
    print(f"codes of {len(data)} images in {out}", file=sys.stderr)
    return {}


def cmd_evaluate(args) -> dict:
    if args.what == "tokenizer":
        from restok.checkpoints import load_tokenizer
        from restok.training.data import open_dataset
        from restok.training.evaluate import tokenizer_metrics

        if not args.tokenizer:
            raise CLIError("evaluate tokenizer needs --tokenizer PATH")
        tok = load_tokenizer(args.tokenizer, args.preset or "L")
        res = tokenizer_metrics(tok, open_dataset(args.data, tok.cfg.image_size, train=False))
    else:
        from restok.runtime import Pipeline
        from restok.training.evaluate import generated_class_accuracy

        pipe = Pipeline(_artifacts(args))
        sampling = _sampling(args)

        def images(labels):
            out = []
            for start, n, chunk in _batches(labels, pipe.batch):
                out.append(pipe.generate(chunk, sampling, seed=args.seed, noise_start=start).images[:n])
            return np.concatenate(out)

        res = generated_class_accuracy(images, pipe.manifest.num_classes, args.per_class)
    _write_json(res, args.json)
    if args.json != "-":
        print(json.dumps(res, indent=2))
    return {}


def _write_json(doc: dict, where: str | None) -> None:
    if not where:
        return
    text = json.dumps(doc, indent=2) + "\n"
    if where == "-":
        sys.stdout.write(text)
    else:
        from restok.fileutil import atomic_write_bytes

        atomic_write_bytes(where, text.encode())


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except CLIError as e:
        print(f"restok {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, ImportError, FileNotFoundError, EngineError, MemoryError) as e:  # bad input or environment
        print(f"restok {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"restok {args.command}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict) and getattr(args, "json", None) is True:
        print(json.dumps(result, indent=2))
    return int(result.get("_exit", 0)) if isinstance(result, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
