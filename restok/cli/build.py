"""``restok build``: TensorRT engines for an export (GPU machine with TensorRT)."""

from __future__ import annotations

from restok.cli.common import (EXIT_OK, CLIError, add_json_arg, finite_float, non_empty_path, positive_int, say,
                               write_json)


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="TensorRT engines for an export (GPU machine with TensorRT)",
                       description="Build one TensorRT engine for the generator (one optimization profile per HAR "
                                   "pass, batch 1..max batch, one set of weights) and one for the tokenizer decoder "
                                   "(and the encoder with --encoder), cached under ARTIFACTS/engines/<TensorRT "
                                   "version>/<GPU>/ and keyed by the ONNX hashes, precision, TensorRT version and GPU; "
                                   "a mismatch is refused with what to rebuild. Precision comes from the graphs "
                                   "(strongly typed networks). Records the engine sizes and the device memory one "
                                   "image needs.")
    p.add_argument("--artifacts", required=True, metavar="DIR", type=non_empty_path,
                   help="an export (restok export or calibrate)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "fp8", "int8-weight-only"),
                   help="assert the artifacts' precision (export --precision fp16; calibrate for int8/fp8)")
    p.add_argument("--opt-batch", type=positive_int, default=None,
                   help="the batch size TensorRT tunes kernels for (default: min(8, max batch)); every batch "
                        "from 1 to the export's max batch runs")
    p.add_argument("--encoder", action="store_true", help="also build the tokenizer encoder (restok check uses it)")
    p.add_argument("--workspace", type=finite_float, default=8.0, metavar="GB", help="builder workspace limit (default 8)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    p.add_argument("--timing-cache", metavar="PATH", default="",
                   help="timing cache (default: next to the engines, one per TensorRT version and GPU)")
    p.add_argument("--log-level", choices=("error", "warning", "info", "verbose"), default=None,
                   help="TensorRT's log level (default: $RESTOK_TENSORRT_LOG_LEVEL, else warning)")
    add_json_arg(p, "a summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from restok.tensorrt.builder import BuildOptions, build_engines
    from restok.manifest import QUANTIZED, Manifest

    m = Manifest.read(args.artifacts)
    if args.precision and args.precision != m.precision:
        how = "restok calibrate --precision" if args.precision in QUANTIZED else "restok export --precision"
        raise CLIError(f"{args.artifacts} holds {m.precision} graphs, not {args.precision}; make them with {how} {args.precision}")
    opts = BuildOptions(workspace_gb=args.workspace, opt_level=args.opt_level, timing_cache=args.timing_cache,
                        opt_batch=args.opt_batch, encoder=args.encoder, log_level=args.log_level)
    opts.validate(m)
    info = build_engines(args.artifacts, opts)
    write_json(info, args.json)
    if args.json != "-":
        say(args, f"engines in {info['engines']}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in info["engine_bytes"].items())
            + f"; device memory for one image {info['device_bytes_per_image'] / 2**20:.0f} MiB")
    return EXIT_OK
