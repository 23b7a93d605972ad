"""The ``restok`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from restok.schedule import CFG_SCHEDULES

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the paper's gFID 2.34 settings)")
    g.add_argument("--classes", type=int, nargs="+", help="class ids, one image each (default: 0..9 or fewer)")
    g.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same images on every backend")
    g.add_argument("--cfg-scale", type=float, default=3.75, help="classifier-free guidance scale; <= 1 disables (default 3.75)")
    g.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="step", help="guidance schedule over the steps (default step)")
    g.add_argument("--cfg-start", type=float, default=0.25, help="progress ratio where the 'step' schedule turns guidance on (default 0.25)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables (default)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 disables (default 0.95)")
    g.add_argument("--mode", choices=("har", "vanilla"), default="har", help="9-step HAR (default) or 128-step vanilla AR")
    g.add_argument("--batch", type=int, default=8, help="images per forward batch (default 8)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restok",
        description="ResTok + HAR: generate images, export graphs, build engines, check parity, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser(
        "generate",
        help="generate class-conditional images (PNG per image, a grid, a JSON summary)",
        description="Generate images with the PyTorch reference loop. Without checkpoints, the architecture "
        "of --preset with seeded random weights is used.",
    )
    src = gen.add_argument_group("model")
    src.add_argument("--preset", default="tiny", help="architecture: tiny (default), B or L")
    src.add_argument("--tokenizer", metavar="PATH", help="tokenizer checkpoint (file, folder or hub id)")
    src.add_argument("--generator", metavar="PATH", help="generator checkpoint (file, folder or hub id)")
    src.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights used without checkpoints")
    src.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _add_sampling_args(gen)
    gen.add_argument("--out", required=True, metavar="DIR", help="output folder")
    gen.add_argument("--json", action="store_true", help="print the JSON summary on stdout")
    gen.set_defaults(func=cmd_generate)
    return parser


def _load_models(args):
    import torch

    from restok.checkpoints import load_generator, load_tokenizer
    from restok.models.presets import build_generator, build_tokenizer, get_preset

    get_preset(args.preset)
    tok = load_tokenizer(args.tokenizer, args.preset) if args.tokenizer else build_tokenizer(args.preset, seed=args.weights_seed)
    gen = load_generator(args.generator, args.preset) if args.generator else build_generator(args.preset, seed=args.weights_seed + 1)
    if tok.cfg.codebook_size != gen.cfg.vocab_size or tok.cfg.num_latent_tokens != gen.cfg.block_size:
        raise CLIError(
            f"tokenizer (codebook {tok.cfg.codebook_size}, {tok.cfg.num_latent_tokens} tokens) and generator "
            f"(vocab {gen.cfg.vocab_size}, {gen.cfg.block_size} tokens) do not belong together"
        )
    device = torch.device(args.device)
    return tok.to(device), gen.to(device)


def cmd_generate(args) -> dict:
    import torch
    from tqdm import tqdm

    from restok.generation import check_sampling_args, generate
    from restok.images import make_grid, save_png, to_uint8
    from restok.noise import gumbel_noise

    if args.batch < 1:
        raise CLIError(f"--batch must be >= 1, got {args.batch}")
    check_sampling_args(args.cfg_scale, args.cfg_schedule, args.temperature, args.top_k, args.top_p)
    tok, gen = _load_models(args)
    classes = args.classes if args.classes is not None else list(range(min(gen.cfg.num_classes, 10)))
    bad = [c for c in classes if not 0 <= c < gen.cfg.num_classes]
    if bad:
        raise CLIError(f"class ids {bad} are outside [0, {gen.cfg.num_classes}) for this generator")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    N, V = gen.cfg.block_size, gen.cfg.vocab_size
    t_gen = t_dec = 0.0
    images, tokens = [], []
    with tqdm(total=len(classes), desc="generating", unit="img", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(classes), args.batch):
            labels = torch.tensor(classes[start : start + args.batch])
            noise = gumbel_noise(args.seed, len(labels), N, V, start=start)
            t0 = time.perf_counter()
            ids = generate(gen, labels, cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule,
                           cfg_start=args.cfg_start, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, noise=noise, mode=args.mode)
            t1 = time.perf_counter()
            imgs = tok.decode(ids)
            t2 = time.perf_counter()
            t_gen, t_dec = t_gen + t1 - t0, t_dec + t2 - t1
            images.append(to_uint8(imgs.float().cpu().numpy()))
            tokens.append(ids.cpu().numpy())
            bar.update(len(labels))
    images = np.concatenate(images)
    files = []
    for i, (c, img) in enumerate(zip(classes, images)):
        files.append(str(save_png(img, out / f"{i:04d}_class{c}.png")))
    grid = save_png(make_grid(images), out / "grid.png")
    np.save(out / "tokens.npy", np.concatenate(tokens))
    summary = {
        "backend": "torch",
        "preset": args.preset,
        "tokenizer": args.tokenizer or f"random weights (seed {args.weights_seed})",
        "generator": args.generator or f"random weights (seed {args.weights_seed + 1})",
        "mode": args.mode,
        "num_steps": (gen.schedule if args.mode == "har" else gen.vanilla_schedule()).num_steps,
        "classes": classes,
        "seed": args.seed,
        "sampling": {"cfg_scale": args.cfg_scale, "cfg_schedule": args.cfg_schedule, "cfg_start": args.cfg_start,
                     "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p},
        "seconds": {"generate": round(t_gen, 4), "decode": round(t_dec, 4)},
        "images_per_second": round(len(classes) / max(t_gen + t_dec, 1e-9), 3),
        "images": files,
        "tokens": str(out / "tokens.npy"),
        "grid": str(grid),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except CLIError as e:
        print(f"restok {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # bad input detected by the library (CheckpointError is one)
        print(f"restok {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif isinstance(result, dict) and "grid" in result:
        print(f"wrote {len(result['images'])} images and {result['grid']} "
              f"({result['seconds']['generate']}s generate, {result['seconds']['decode']}s decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
