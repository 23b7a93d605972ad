"""``restok bench``: latency per pass, per decode and end to end, across backends and batch sizes, in one run."""

from __future__ import annotations

from pathlib import Path

from restok.cli.common import (EXIT_OK, CLIError, add_export_args, add_json_arg, add_model_args, add_verify_arg, artifacts,
                               backend_options, non_empty_path, non_negative_int, positive_int, read_manifest, say,
                               write_json)


def add_parser(sub) -> None:
    from restok.runtime.backend import backend_names

    p = sub.add_parser("bench", help="latency per pass, per decode and end to end, across backends, in one run",
                       description="Time the pipeline on each backend, interleaving runs so that every backend sees "
                                   "the same machine load; report medians, p90s, images/s, host input cost, memory "
                                   "and the speed ratio between backends.")
    p.add_argument("--artifacts", metavar="DIR", action="append", type=non_empty_path,
                   help="export folder(s); repeat to compare exports in one run")
    add_model_args(p)
    add_export_args(p)
    p.add_argument("--backends", default="onnxruntime,torch",
                   help=f"comma-separated from {', '.join(backend_names())} (default onnxruntime,torch)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1], help="images per run (default 1); several "
                   "values measure each batch size with the same loaded backends")
    p.add_argument("--device", default=None, help="device of the torch reference (default cpu) and of the cuda backend "
                   "(default cuda)")
    p.add_argument("--compute-precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="of the openvino and cuda backends (see restok generate --help)")
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs per backend (default 5)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    add_verify_arg(p)
    add_json_arg(p, "the results")
    p.set_defaults(func=run)


def run(args) -> int:
    from restok.measure.bench import format_table, run_bench
    from restok.runtime.backend import backend_names

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in backend_names()]
    if unknown or not backends:
        raise CLIError(f"unknown backends {unknown}; choose from {', '.join(backend_names())}")
    if args.device is not None and not {"torch", "cuda"} & set(backends):
        raise CLIError("--device applies to the torch and cuda backends, neither of which is among --backends")
    if args.compute_precision is not None and not {"openvino", "cuda"} & set(backends):
        raise CLIError("--compute-precision applies to the openvino and cuda backends, neither of which is among --backends")
    if args.compute_precision == "fp16" and "openvino" in backends:
        raise CLIError("--compute-precision fp16 applies to the cuda backend; openvino computes in fp32 or bf16")
    options = {b: backend_options(b, args.device, args.compute_precision) for b in backends}
    if args.artifacts and len(args.artifacts) > 1:
        folders = [Path(a) for a in args.artifacts]
        args.artifacts = args.artifacts[0]
        artifacts(args)  # refuses model/export options next to --artifacts
    else:
        args.artifacts = args.artifacts[0] if args.artifacts else None
        folders = [artifacts(args)]
    results = []
    for f in folders:
        results += run_bench(f, backends, batches=args.batch, runs=args.runs, warmup=args.warmup,
                             threads=args.threads, options=options, manifest=read_manifest(f, args))
    write_json({"results": results}, args.json)
    say(args, format_table(results))
    return EXIT_OK
