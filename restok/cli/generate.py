"""``restok generate``: class-conditional images from an export (the runtime splits them into runs)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

from restok.cli.common import (EXIT_OK, CLIError, add_artifacts_arg, add_export_args, add_json_arg, add_model_args,
                               add_runtime_args, add_sampling_args, artifacts, non_empty_path, read_manifest,
                               resolve_backend, sampling_from, say, write_json)

SUMMARY = "summary.json"
RUN_MARK = "restok-generate"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate class-conditional images (PNGs, a grid, tokens, a JSON summary)",
                       description="Generate images from an export on a backend, in runs of up to the export's max "
                                   "batch. Writes one PNG per image, grid.png, tokens.npy and summary.json (timings "
                                   "per pass and for decoding). The output folder is written as a whole: a new run "
                                   "replaces a previous run's files atomically, and other files are kept.")
    add_artifacts_arg(p)
    add_model_args(p)
    add_export_args(p)
    add_runtime_args(p)
    add_sampling_args(p)
    p.add_argument("--out", required=True, metavar="DIR", type=non_empty_path, help="output folder")
    add_json_arg(p, "the summary")
    p.set_defaults(func=run)


def run_files(folder: Path) -> list[str]:
    """The files a previous ``restok generate`` wrote into ``folder`` (from its summary.json)."""
    try:
        doc = json.loads((folder / SUMMARY).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("kind") != RUN_MARK:
        return []
    return [SUMMARY, *(Path(f).name for f in doc.get("images", [])), "grid.png", "tokens.npy"]


def check_out(out: Path) -> None:
    """A new folder, an empty one, or a previous run's; never the working folder or one of its parents."""
    from restok.fileutil import check_writable

    res = out.resolve()
    cwd = Path.cwd().resolve()
    if res == cwd or res in cwd.parents:
        raise CLIError(f"--out {out} is the working folder or one of its parents; choose a subfolder (e.g. --out out/run)")
    if res.exists():
        if not res.is_dir():
            raise CLIError(f"--out {out} exists and is not a folder")
        if any(res.iterdir()) and not run_files(res):
            raise CLIError(f"--out {out} holds files that are not a restok generate run; choose an empty or new folder")
    check_writable(res)


def run(args) -> int:
    from tqdm import tqdm

    from restok.fileutil import staged
    from restok.images import make_grid, save_png
    from restok.runtime import Pipeline

    sampling = sampling_from(args)
    out = Path(args.out)
    check_out(out)
    folder = artifacts(args)
    manifest = read_manifest(folder, args)
    backend, opts = resolve_backend(args, folder, manifest)
    with Pipeline(folder, backend=backend, threads=args.threads, manifest=manifest, **opts) as pipe:
        m = pipe.manifest
        precision = getattr(pipe.backend, "precision", m.precision)
        classes = args.classes if args.classes is not None else list(range(min(m.num_classes, 8)))
        bad = [c for c in classes if not 0 <= c < m.num_classes]
        if bad:
            raise CLIError(f"class ids {bad} are outside [0, {m.num_classes}) for this model")
        images, tokens, step_times, t_dec, t_fused, t_in = [], [], np.zeros(m.num_steps), 0.0, 0.0, 0.0
        with tqdm(total=len(classes), desc=f"generating ({backend})", unit="img", file=sys.stderr,
                  disable=None) as bar:
            for g in pipe.runs(classes, sampling, seed=args.seed, output="uint8"):
                if g.step_seconds:
                    step_times += g.step_seconds
                t_dec += g.decode_seconds
                t_fused += g.fused_seconds
                t_in += g.input_seconds
                images.append(g.images)
                tokens.append(g.tokens)
                bar.update(len(g.tokens))
    images = np.concatenate(images)
    fused = t_fused > 0
    total = t_fused if fused else float(step_times.sum()) + t_dec
    with staged(out, owned=run_files) as stage:
        files = [save_png(img, stage / f"{i:04d}_class{c}.png").name for i, (c, img) in enumerate(zip(classes, images))]
        save_png(make_grid(images), stage / "grid.png")
        buf = io.BytesIO()  # numpy's own file writing reports a full disk without errno: write the bytes ourselves
        np.save(buf, np.concatenate(tokens))
        (stage / "tokens.npy").write_bytes(buf.getvalue())
        summary = {
            "kind": RUN_MARK, "artifacts": str(folder), "backend": backend,
            "precision": precision,
            "max_batch": m.max_batch, "num_steps": m.num_steps, "classes": classes, "seed": args.seed,
            "sampling": sampling.to_dict(),
            "seconds": {"steps": None if fused else [round(t, 5) for t in step_times],
                        "generate": round(t_fused if fused else float(step_times.sum()), 4),
                        "decode": None if fused else round(t_dec, 4), "fused": fused, "inputs": round(t_in, 5)},
            "images_per_second": round(len(classes) / max(total, 1e-9), 3),
            "images": [str(out.resolve() / f) for f in files], "grid": str(out.resolve() / "grid.png"),
            "tokens": str(out.resolve() / "tokens.npy"),
        }
        (stage / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    write_json(summary, args.json)
    if args.json != "-":
        timing = (f"{summary['seconds']['generate']}s generate + decode in one fused run" if fused else
                  f"{summary['seconds']['generate']}s generate, {summary['seconds']['decode']}s decode")
        say(args, f"wrote {len(files)} images and {summary['grid']} ({timing}, {backend})")
    return EXIT_OK
