"""``restok export``: the generator (one graph for every pass and batch size) and the tokenizer to ONNX."""

from __future__ import annotations

import time
from pathlib import Path

from restok.cli.common import (EXIT_OK, add_export_args, add_json_arg, add_model_args, export_options, non_empty_path,
                               resolve_models, say, write_json)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export the generator and the tokenizer to ONNX",
                       description="Export one ONNX generator graph that runs every HAR pass for 1..--max-batch images "
                                   "(sampling inside), the tokenizer decoder and encoder, a weights file per model "
                                   "and manifest.json. A preset alone means that architecture with seeded random "
                                   "weights; no model option means the bundled model. The folder is replaced "
                                   "atomically when the export is complete; files restok did not write there "
                                   "(engines, Polygraphy files) are kept.")
    add_model_args(p)
    add_export_args(p)
    p.add_argument("--out", required=True, metavar="DIR", type=non_empty_path, help="output folder")
    add_json_arg(p, "a summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from restok.export import export_artifacts
    from restok.fileutil import check_writable
    from restok.tensorrt.lint import tensorrt_line, tensorrt_summary

    opts = export_options(args)
    opts.validate()
    check_writable(args.out)
    tok, gen, source = resolve_models(args)
    t0 = time.perf_counter()
    m = export_artifacts(tok, gen, args.out, opts, source=source)
    summary = {
        "out": str(Path(args.out).resolve()), "precision": m.precision, "max_batch": m.max_batch, "guided": m.guided,
        "kv_cache": m.kv_cache, "opset": m.opset, "graphs": sorted(m.graphs), "seconds": round(time.perf_counter() - t0, 2),
        "bytes": sum(f["bytes"] for f in m.files.values()), "tensorrt": tensorrt_summary(args.out),
    }
    write_json(summary, args.json)
    if args.json != "-":
        say(args, f"exported {len(m.graphs)} graphs ({summary['bytes'] / 2**20:.1f} MiB, {m.precision}, batches "
                  f"1..{m.max_batch}) to {summary['out']} in {summary['seconds']}s; {tensorrt_line(summary['tensorrt'])}")
    return EXIT_OK
