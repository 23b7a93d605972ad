"""``restok check``: the PyTorch reference vs a backend (ONNX Runtime, OpenVINO, cuda, TensorRT), pass by pass;
Polygraphy files."""

from __future__ import annotations

import sys
from pathlib import Path

from restok.cli.common import (EXIT_FAILED, EXIT_OK, CLIError, add_artifacts_arg, add_export_args, add_json_arg,
                               add_model_args, add_runtime_args, artifacts, check_runtime_args, finite_float,
                               given_flags, non_empty_path, positive_int, read_manifest, seed_int, write_json)


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="the PyTorch reference vs a backend, pass by pass (parity and quality gates)",
                       description="Compare a backend (the exported graphs on ONNX Runtime, OpenVINO or TensorRT engines, "
                                   "or the cuda backend's modules) with the float32 PyTorch modules they came "
                                   "from: teacher-forced logits per pass, sampled tokens over "
                                   "whole generations under the same seed, decoder error and PSNR. Writes Polygraphy "
                                   "input and reference-output files for replay (polygraphy run ... --load-inputs "
                                   "--load-outputs). Exits 1 when a check fails. With --artifacts, --tokenizer/"
                                   "--generator (or --checkpoint) name the checkpoints of the reference when the "
                                   "recorded ones moved: they must match the weights the export recorded.")
    add_artifacts_arg(p)
    add_model_args(p)
    add_export_args(p)
    add_runtime_args(p, backends=("onnxruntime", "openvino", "cuda", "tensorrt"))
    p.add_argument("--images", type=positive_int, default=16, help="images for the token-agreement check (default 16)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")
    p.add_argument("--max-logit-error", type=finite_float, default=None,
                   help="fail above this max abs logits error (default 1e-3 for fp32 on ONNX Runtime and on the cuda backend; "
                        "report only otherwise)")
    p.add_argument("--min-token-agreement", type=finite_float, default=None,
                   help="fail below this fraction of identical tokens (default: 1.0 for fp32 on ONNX Runtime, 0.99 for the "
                        "cuda backend in fp32, 0.95 for it in bf16/fp16 and for OpenVINO; report only otherwise)")
    p.add_argument("--min-psnr", type=finite_float, default=None,
                   help="fail below this decoder PSNR in dB (default: 60 for fp32 on ONNX Runtime and the cuda backend, "
                        "40 for the cuda backend in bf16/fp16 and for OpenVINO)")
    p.add_argument("--polygraphy-dir", metavar="DIR", type=non_empty_path,
                   help="where to write Polygraphy files (default: ARTIFACTS/polygraphy)")
    add_json_arg(p, "the report")
    p.set_defaults(func=run)


def run(args) -> int:
    from restok.measure.parity import run_check

    reference = None
    if args.artifacts and (args.checkpoint or args.tokenizer or args.generator):
        if args.preset or args.weights_seed is not None or given_flags(args, ("precision", "max_batch", "opset", "no_cfg",
                                                                              "no_encoder", "kv_cache")):
            raise CLIError("with --artifacts, only --checkpoint or --tokenizer/--generator may be given (the reference)")
        if bool(args.tokenizer) != bool(args.generator):
            raise CLIError("--tokenizer and --generator go together")
        reference = ((Path(args.checkpoint) / "tokenizer", Path(args.checkpoint) / "generator") if args.checkpoint
                     else (args.tokenizer, args.generator))
        args.checkpoint = args.tokenizer = args.generator = None
    folder = artifacts(args)
    opts = check_runtime_args(args)
    m = read_manifest(folder, args)
    overrides = {"max_logit_error": args.max_logit_error, "min_token_agreement": args.min_token_agreement,
                 "min_psnr": args.min_psnr}
    report = run_check(folder, images=args.images, seed=args.seed, threads=args.threads, thresholds=overrides,
                       polygraphy_dir=Path(args.polygraphy_dir) if args.polygraphy_dir else folder / "polygraphy",
                       backend=args.backend, reference_device=args.device or "cpu", manifest=m,
                       reference=reference, **opts)
    from restok.tensorrt.lint import tensorrt_line, tensorrt_summary

    report["tensorrt"] = tensorrt_summary(folder)  # reported; TensorRT itself is checked with --backend tensorrt
    write_json(report, args.json)
    print(report["summary"], flush=True, file=sys.stderr)
    print(tensorrt_line(report["tensorrt"]), flush=True, file=sys.stderr)
    return EXIT_OK if report["passed"] else EXIT_FAILED
