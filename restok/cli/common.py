"""What every command shares: exit codes, the shared argument groups (one meaning per flag), model
resolution, the per-user export cache, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from restok.sampling_params import SEED_LIMIT

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ENV, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BUG = 0, 1, 2, 3, 130, 143, 70
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "a check or quality gate failed (the report says which)",
    EXIT_USAGE: "bad input or artifacts: an option, a file or a folder is wrong (the message says what to fix)",
    EXIT_ENV: "environment or OS error: permission denied, disk full, a missing package or GPU",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); outputs are left as they were before the command",
    EXIT_TERMINATED: "terminated (SIGTERM; restok serve drains and exits 0 instead); outputs are left as they were",
    EXIT_BUG: "internal error: a bug in restok (set RESTOK_DEBUG=1 for the traceback and report it)",
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        v = _int_at_least(low)(text)
        if v > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {v}")
        return v

    return parse


seed_int = _int_in(0, SEED_LIMIT - 1)  # seeds and stream indices


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def non_empty_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from the command line: printing the path later would fail
        raise argparse.ArgumentTypeError(f"the path {text.encode('utf-8', 'backslashreplace').decode()} holds bytes "
                                         "that are not UTF-8; rename it") from None
    return text


# ------------------------------------------------------------------------------- argument groups


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the bundled model)")
    g.add_argument("--checkpoint", metavar="DIR", type=non_empty_path,
                   help="a folder with tokenizer/ and generator/ restok checkpoints")
    g.add_argument("--tokenizer", metavar="PATH", type=non_empty_path,
                   help="tokenizer checkpoint: file, folder or hub id (with --generator)")
    g.add_argument("--generator", metavar="PATH", type=non_empty_path,
                   help="generator checkpoint: file, folder or hub id (with --tokenizer)")
    g.add_argument("--preset", help="an architecture (tiny, B, L): its shapes for bare state dicts, or alone: "
                                    "seeded random weights")
    g.add_argument("--weights-seed", type=non_negative_int, default=None,
                   help="seed of a preset's random weights (default 0; with --preset alone)")


def add_export_args(p: argparse.ArgumentParser) -> None:
    from restok.contract import KV_CACHES
    from restok.manifest import DEFAULT_MAX_BATCH, PRECISIONS

    e = p.add_argument_group("export")
    e.add_argument("--precision", choices=PRECISIONS, default=None, help="graph precision (default fp32)")
    e.add_argument("--max-batch", type=positive_int, default=None,
                   help=f"largest number of images per run the graphs take (default {DEFAULT_MAX_BATCH}); "
                        "every batch from 1 up to it runs on the same export")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20; 24 with --kv-cache inplace)")
    e.add_argument("--no-cfg", action="store_true", help="export without classifier-free guidance (half the rows)")
    e.add_argument("--no-encoder", action="store_true", help="skip the tokenizer encoder graph")
    e.add_argument("--kv-cache", choices=KV_CACHES, default=None,
                   help="concat: past/present KV per pass (any TensorRT 10.x; default); inplace: one fixed-size "
                        "cache updated with ONNX TensorScatter (opset 24; TensorRT >= 10.15 updates it in place), "
                        "plus a past/present generator graph sharing its weights that older TensorRT builds instead")
    e.add_argument("--no-concat-fallback", action="store_true",
                   help="with --kv-cache inplace: skip the past/present fallback graph (TensorRT >= 10.15 only)")


EXPORT_FLAGS = ("precision", "max_batch", "opset", "no_cfg", "no_encoder", "kv_cache", "no_concat_fallback")
MODEL_FLAGS = ("checkpoint", "tokenizer", "generator", "preset", "weights_seed")


def add_artifacts_arg(p: argparse.ArgumentParser, help_extra: str = "") -> None:
    p.add_argument("--artifacts", metavar="DIR", type=non_empty_path,
                   help="an export folder (restok export); default: the model options below, exported into the "
                        "cache on first use" + help_extra)


GPU_BACKENDS = ("cuda", "tensorrt")


def add_runtime_args(p: argparse.ArgumentParser, backends: tuple[str, ...] | None = None) -> None:
    from restok.runtime.backend import backend_names

    g = p.add_argument_group("runtime")
    choices = backends or (*backend_names(), "auto")
    g.add_argument("--backend", choices=choices, default="onnxruntime",
                   help="onnxruntime (default, CPU), openvino (CPU, bf16 where the CPU has it), cuda (GPU with "
                        "PyTorch: device-resident buffers, CUDA graphs, bf16), tensorrt (GPU; restok build first)"
                        + (", torch (the fp32 reference)" if "torch" in choices else "")
                        + (", or auto: the fastest configuration that passes the quality gate on this machine "
                           "(the cuda backend where a GPU is visible; measured once, then remembered)"
                           if "auto" in choices else ""))
    g.add_argument("--device", default=None,
                   help="device of the backends PyTorch runs: the torch reference (default cpu) and the cuda "
                        "backend (default cuda; cpu to debug it)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    if {"openvino", "cuda"} & set(choices):
        g.add_argument("--compute-precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                       help="openvino: fp32, or bf16 on CPUs with bf16 units (AVX-512 BF16, AMX; auto: bf16 where "
                            "the CPU has it); cuda: bf16 (auto on a GPU), fp16 or fp32. Gated against the fp32 "
                            "graphs: restok check --backend openvino|cuda")
    if set(GPU_BACKENDS) & set(choices):
        g.add_argument("--no-cuda-graphs", action="store_true",
                       help="cuda/tensorrt: launch every kernel instead of replaying CUDA graphs (debugging)")
        g.add_argument("--warmup", action="store_true",
                       help="cuda/tensorrt: capture the CUDA graph of every batch bucket at start-up instead of "
                            "on first use (steady latency from the first request)")
    add_verify_arg(g)


def add_verify_arg(g) -> None:
    g.add_argument("--no-verify", action="store_true",
                   help="skip the size and sha256 check of the artifacts' files (a warning says so); by default a "
                        "file is hashed unless this user already verified it unchanged (same inode, size, mtime, ctime)")


def read_manifest(folder, args):
    """The artifacts' manifest, verified unless --no-verify (which is said on stderr)."""
    from restok.manifest import Manifest

    if getattr(args, "no_verify", False):
        print(f"restok: warning: --no-verify: the files of {folder} are not checked against their sha256",
              file=sys.stderr)
    return Manifest.read(folder, verify=not getattr(args, "no_verify", False))


def add_sampling_args(p: argparse.ArgumentParser, classes: bool = True) -> None:
    """The sampling group: --seed, then one flag per SamplingParams setting (its default, help and bounds)."""
    from restok.sampling_params import SamplingParams

    g = p.add_argument_group("sampling (defaults: the paper's gFID 2.34 settings)")
    if classes:
        g.add_argument("--classes", type=non_negative_int, nargs="+", help="class ids, one image each (default: 0..7 or fewer)")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="random seed; the same seed gives the same images on every backend and batch size (default 0)")
    for s in SamplingParams.settings():
        g.add_argument(s.flag, type=s.parse, default=s.default, metavar=s.name.upper() if not s.choices else None,
                       choices=s.choices, help=f"{s.help} ({'' if s.choices else s.describe_range() + '; '}default {s.default})")


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", metavar="PATH", type=non_empty_path,
                   help=f"write {what} as JSON to PATH ('-' for stdout: then nothing else goes to stdout)")


def sampling_from(args):
    """The SamplingParams of the sampling group's flags."""
    from restok.sampling_params import SamplingParams

    return SamplingParams(**{s.name: getattr(args, s.name) for s in SamplingParams.settings()})


def backend_options(backend: str, device: str | None = None, compute_precision: str | None = None,
                    cuda_graphs: bool = True, warmup: bool = False) -> dict:
    """The options a backend takes, with their defaults (the one place that says which backend takes which)."""
    graphs = {"cuda_graphs": cuda_graphs, "warmup": warmup}
    if backend == "openvino":
        return {"compute_precision": compute_precision or "auto"}
    if backend == "torch":
        return {"device": device or "cpu"}
    if backend == "cuda":
        return {"device": device or "cuda", "compute_precision": compute_precision or "auto", **graphs}
    if backend == "tensorrt":
        return graphs
    return {}


def check_runtime_args(args) -> dict:
    """Backend options; an option the chosen backend would ignore is an error."""
    b = args.backend
    if args.device is not None and b not in ("torch", "cuda") and getattr(args, "command", "") != "check":
        raise CLIError(f"--device applies to the torch and cuda backends (the {b} backend chooses its own device)")
    if args.threads is not None and b in GPU_BACKENDS:
        raise CLIError(f"--threads applies to CPU backends; the {b} backend runs on the GPU")
    cp = getattr(args, "compute_precision", None)
    if cp is not None and b not in ("openvino", "cuda"):
        raise CLIError("--compute-precision applies to the openvino and cuda backends")
    if cp == "fp16" and b == "openvino":
        raise CLIError("--compute-precision fp16 applies to the cuda backend; openvino computes in fp32 or bf16")
    graph_flags = [f for f in ("no_cuda_graphs", "warmup") if getattr(args, f, False)]
    if graph_flags and b not in GPU_BACKENDS:
        raise CLIError(f"--{graph_flags[0].replace('_', '-')} applies to the cuda and tensorrt backends")
    return backend_options(b, args.device, cp, not getattr(args, "no_cuda_graphs", False), getattr(args, "warmup", False))


def resolve_backend(args, folder, manifest) -> tuple[str, dict]:
    """(backend, options); --backend auto measures the CPU backends once on this machine and says its choice."""
    opts = check_runtime_args(args)
    if args.backend != "auto":
        return args.backend, opts
    from restok.runtime.autoselect import choose_backend

    choice = choose_backend(folder, manifest, args.threads)
    print(f"restok: --backend auto chose {choice['label']} ({choice['reason']})", file=sys.stderr)
    return choice["backend"], choice["options"]


def restok_files_near(path: Path) -> tuple[str, Path, list[str]] | None:
    """(what, folder, files) when ``path`` lies in a folder restok wrote (an export, a checkpoint, a sampling job, a
    generate run): that folder's description and the files restok wrote there (relative to it)."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "manifest.json").is_file():
            from restok.manifest import export_files

            return f"the restok export {folder}", folder, ["manifest.json", *export_files(folder)]
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        if isinstance(config, dict) and "restok_format" in config:
            return f"the restok checkpoint {folder}", folder, ["config.json", "model.safetensors"]
        if (folder / "job.json").is_file():
            from restok.jobs.sample import INDEX, SAMPLES, SPEC

            shards = [str(p.relative_to(folder)) for p in (folder / "shards").glob("*")]
            return f"the sampling job {folder}", folder, [SPEC, INDEX, SAMPLES, *shards]
        from restok.cli.generate import run_files

        if run_files(folder):
            return f"the restok generate run {folder}", folder, run_files(folder)
    return None


def check_output_file(where: str | None, flag: str = "--json", out_folder: str | None = None) -> None:
    """Before any work: ``where`` can be written, is no folder (nor the command's --out), and is no file
    of a restok export, checkpoint, sampling job or run that restok wrote there for another purpose."""
    if not where or where == "-":
        return
    from restok.fileutil import check_writable, real_target

    target = real_target(where)
    if target.is_dir():
        raise CLIError(f"{flag} {where} is a folder; give a file path (e.g. {Path(where) / 'result.json'})")
    if out_folder and target == real_target(out_folder):
        raise CLIError(f"{flag} {where} is the output folder (--out); give a file path outside it")
    near = restok_files_near(target)
    if near and target.exists():
        what, folder, files = near
        if str(target.relative_to(folder)) in files:
            raise CLIError(f"{flag} {where} would overwrite a file of {what}; choose another path")
    check_writable(target)


def write_json(doc: dict, where: str | None) -> None:
    if not where:
        return
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    if where == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from restok.fileutil import atomic_write_bytes

        atomic_write_bytes(where, text.encode())


def say(args, text: str) -> None:
    """Human-readable output: stdout, or stderr when stdout carries JSON (--json -)."""
    print(text, file=sys.stderr if getattr(args, "json", None) == "-" else sys.stdout)


# ------------------------------------------------------------------------------- model resolution


def bundled_model() -> Path | None:
    d = Path(__file__).parents[1] / "assets" / "tiny"
    return d if (d / "tokenizer").exists() and (d / "generator").exists() else None


def resolve_models(args):
    """-> (tokenizer, generator, source dict) from the model options."""
    from restok.checkpoints import load_generator, load_tokenizer
    from restok.models.presets import build_generator, build_tokenizer, get_preset

    if bool(args.tokenizer) != bool(args.generator):
        raise CLIError("--tokenizer and --generator go together")
    if args.checkpoint and args.tokenizer:
        raise CLIError("use either --checkpoint DIR or --tokenizer/--generator, not both")
    if args.weights_seed is not None and (args.checkpoint or args.tokenizer or not args.preset):
        raise CLIError("--weights-seed applies to --preset alone (seeded random weights)")
    preset = args.preset
    if preset:
        get_preset(preset)
    folder = Path(args.checkpoint) if args.checkpoint else None
    kind = "checkpoint"
    if folder is None and not args.tokenizer and not preset:
        folder, kind = bundled_model(), "bundled"
        if folder is None:
            preset = "tiny"
            print("restok: no bundled trained model in this install; using the tiny preset with seeded random weights",
                  file=sys.stderr)
    if folder is not None:
        t_path, g_path = folder / "tokenizer", folder / "generator"
    elif args.tokenizer:
        t_path, g_path = args.tokenizer, args.generator
    else:
        s = args.weights_seed or 0
        source = {"kind": "preset", "preset": preset, "tokenizer_seed": s, "generator_seed": s + 1}
        return build_tokenizer(preset, seed=s), build_generator(preset, seed=s + 1), source
    tok = load_tokenizer(t_path, preset or "L")
    gen = load_generator(g_path, preset or "L")
    if kind == "bundled":
        return tok, gen, {"kind": "bundled", "model": "tiny"}
    src = {"kind": "checkpoint", "tokenizer": str(Path(t_path).resolve()) if Path(t_path).exists() else str(t_path),
           "generator": str(Path(g_path).resolve()) if Path(g_path).exists() else str(g_path)}
    if preset:
        src["preset"] = preset
    return tok, gen, src


def export_options(args):
    from restok.export import ExportOptions
    from restok.manifest import DEFAULT_MAX_BATCH

    return ExportOptions(precision=args.precision or "fp32", max_batch=args.max_batch or DEFAULT_MAX_BATCH,
                         guided=not args.no_cfg, opset=args.opset, encoder=not args.no_encoder,
                         kv_cache=args.kv_cache or "concat", concat_fallback=not args.no_concat_fallback)


def given_flags(args, names) -> list[str]:
    out = []
    for o in names:
        v = getattr(args, o, None)
        if v not in (None, False):
            out.append(f"--{o.replace('_', '-')}")
    return out


def artifacts(args) -> Path:
    """--artifacts, or the model options exported into the per-user cache (once; concurrent first uses wait
    for one export instead of each exporting)."""
    if getattr(args, "artifacts", None):
        given = given_flags(args, MODEL_FLAGS + EXPORT_FLAGS)
        if given:
            raise CLIError(f"--artifacts already fixes the model and export options; drop {', '.join(given)}")
        return Path(args.artifacts)
    from restok.export.cache import cached_export

    tok, gen, source = resolve_models(args)
    return cached_export(tok, gen, export_options(args), source)
