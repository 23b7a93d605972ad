"""``restok calibrate``: INT8 / FP8 / weight-only INT8 Q/DQ artifacts (or int8-dynamic for CPUs) with a gate."""

from __future__ import annotations

import sys

from restok.cli.common import (EXIT_FAILED, EXIT_OK, add_json_arg, finite_float, non_empty_path, non_negative_int,
                               positive_int, write_json)


def add_parser(sub) -> None:
    from restok.calibration.qdq import LINEAR_OPS
    from restok.manifest import QUANTIZED

    p = sub.add_parser("calibrate", help="INT8 / FP8 / weight-only INT8 Q/DQ artifacts with a quality gate",
                       description="Calibrate on FP32 generation traces, write Q/DQ versions of the generator and "
                                   "of the tokenizer decoder as a new artifacts folder, and gate it on ONNX Runtime "
                                   "against the FP32 artifacts (token agreement, decoded PSNR). A failed gate writes "
                                   "nothing and exits 1.")
    p.add_argument("--artifacts", required=True, metavar="DIR", type=non_empty_path, help="FP32 artifacts (restok export)")
    p.add_argument("--precision", required=True, choices=QUANTIZED,
                   help="int8 (W8A8), fp8 (E4M3 W8A8), int8-weight-only (these three: Q/DQ for TensorRT), or "
                        "int8-dynamic (ONNX Runtime CPU only: int8 GEMMs with per-call activation ranges, "
                        "no calibration data; the fast CPU path)")
    p.add_argument("--samples", type=positive_int, default=32, help="calibration generations (default 32)")
    p.add_argument("--method", choices=("percentile", "max"), default="percentile",
                   help="activation ranges: the largest per-sample percentile of |x| (--percentile; default), which "
                        "clips rare outliers, or max |x| over the samples (on the bundled model: 90.9%% vs 88.8%% "
                        "sampled tokens equal to fp32)")
    p.add_argument("--percentile", type=finite_float, default=99.99, help="with --method percentile (default 99.99)")
    p.add_argument("--classes", type=non_negative_int, nargs="+", help="calibration class ids (default: all, cycled)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the LM head (kept in FP32 by default)")
    p.add_argument("--quantize-down-proj", action="store_true",
                   help="also quantize the SwiGLU down projections (kept in FP32 by default: their inputs have "
                        "outliers; on the bundled model INT8 W8A8 keeps 94.0%% of tokens with them in FP32, 88.7%% without)")
    p.add_argument("--no-decoder", action="store_true", help="keep the tokenizer decoder in FP32")
    p.add_argument("--exclude-node", action="append", default=[], metavar="NAME", help="keep this node in FP32 (repeatable)")
    p.add_argument("--exclude-op", action="append", default=[], choices=LINEAR_OPS,
                   help="keep every node of this op type in FP32 (repeatable)")
    p.add_argument("--gate-images", type=positive_int, default=64, help="images for the quality gate (default 64)")
    p.add_argument("--min-token-agreement", type=finite_float, default=0.9,
                   help="gate: sampled tokens equal to FP32 (default 0.9)")
    p.add_argument("--min-psnr", type=finite_float, default=30.0, help="gate: decoded-image PSNR vs FP32 in dB (default 30)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out", required=True, metavar="DIR", type=non_empty_path, help="the new artifacts folder")
    add_json_arg(p, "the report")
    p.set_defaults(func=run)


def run(args) -> int:
    from restok.calibration import CalibrationOptions, calibrate
    from restok.fileutil import check_writable

    opts = CalibrationOptions(
        precision=args.precision, samples=args.samples, method=args.method, percentile=args.percentile,
        classes=tuple(args.classes or ()),
        quantize_head=args.quantize_head, quantize_down_proj=args.quantize_down_proj,
        quantize_decoder=not args.no_decoder,
        exclude_nodes=tuple(args.exclude_node), exclude_ops=tuple(args.exclude_op), gate_images=args.gate_images,
        min_token_agreement=args.min_token_agreement, min_psnr=args.min_psnr,
    )
    check_writable(args.out)
    report = calibrate(args.artifacts, args.out, opts, threads=args.threads)
    if report["passed"] and args.precision != "int8-dynamic":  # int8-dynamic is for ONNX Runtime only
        from restok.tensorrt.lint import tensorrt_line, tensorrt_summary

        report["tensorrt"] = tensorrt_summary(args.out)
        print(tensorrt_line(report["tensorrt"]), file=sys.stderr)
    write_json(report, args.json)
    q = report["quality"]
    verdict = "PASS" if report["passed"] else "FAIL (nothing written)"
    print(f"{verdict} {args.precision}: token agreement {q['token_agreement']:.4f} over {q['images']} images "
          f"(gate {args.min_token_agreement}), decoder PSNR {q['decoder_psnr_db']:.1f} dB (gate {args.min_psnr}), "
          f"max logits error {max(s['logits_max_abs_error'] for s in q['steps']):.3g}", file=sys.stderr)
    return EXIT_OK if report["passed"] else EXIT_FAILED
