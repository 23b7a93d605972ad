"""``restok train``, ``restok extract-codes`` and ``restok evaluate``: the PyTorch side."""

from __future__ import annotations

import sys

from restok.cli.common import (EXIT_OK, CLIError, add_artifacts_arg, add_export_args, add_json_arg, add_model_args,
                               add_sampling_args, artifacts, non_empty_path, positive_int, say, sampling_from,
                               write_json)


def add_parsers(sub) -> None:
    tr = sub.add_parser("train", help="train a tokenizer or a generator (single process or under torchrun)",
                        description="Train with a JSON config plus key=value overrides. Run under torchrun for "
                                    "several processes (DDP; FSDP on GPUs with fsdp=true). --resume continues "
                                    "from the newest complete checkpoint in the config's out folder, exactly, and "
                                    "refuses settings or data that differ from the checkpoint's (see "
                                    "--resume-override); a new run refuses an out folder that already holds "
                                    "checkpoints unless --overwrite.")
    tr.add_argument("what", choices=("tokenizer", "generator"), help="which model")
    tr.add_argument("--config", metavar="JSON", type=non_empty_path,
                    help="a config file (fields: see restok/training/train_*.py)")
    g = tr.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start again in an out folder that holds checkpoints "
                   "(its checkpoints are replaced as the new run saves)")
    tr.add_argument("--resume-override", nargs="+", action="extend", default=[], metavar="NAME",
                    help="with --resume: settings allowed to differ from the checkpoint's. A resume compares every "
                         "config field with the checkpoint's and the data's content (data_content for the tokenizer, "
                         "codes_content for the generator: file names and sizes) with the checkpoint's, and refuses "
                         "any difference not named here; steps is compared too (the cosine schedule ends at it). Never "
                         "compared, as they do not change results: out, device, fsdp, workers, log_every, save_every, "
                         "sample_every, keep, stop_at, trace_samples, tokenizer. Names may be comma-separated")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=2000 lr=3e-4")
    tr.set_defaults(func=run_train)

    xc = sub.add_parser("extract-codes", help="tokenize a dataset once, in resumable shards, for generator training",
                        description="Tokenize every image (several crops) into shards of token ids; an interrupted run "
                                    "resumes at the first missing shard.")
    xc.add_argument("--tokenizer", required=True, metavar="PATH", type=non_empty_path, help="tokenizer checkpoint")
    xc.add_argument("--preset", default="L", help="architecture for a bare state dict (default L)")
    xc.add_argument("--data", required=True, help="digits | folder:PATH | wds:PATTERN")
    xc.add_argument("--out", required=True, metavar="DIR", type=non_empty_path,
                    help="output folder (resumes if it holds a partial run)")
    xc.add_argument("--crops", choices=("ten", "center"), default="ten", help="ten crops (default) or the centre crop")
    xc.add_argument("--no-flip", action="store_true", help="leave out the flipped crops (e.g. for digits)")
    xc.add_argument("--batch", type=positive_int, default=64, help="images per batch (default 64)")
    xc.add_argument("--shard-size", type=positive_int, default=10000, help="images per shard (default 10000)")
    xc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    xc.set_defaults(func=run_extract_codes)

    ev = sub.add_parser("evaluate", help="tokenizer reconstruction metrics, or digit class accuracy of generations")
    ev.add_argument("what", choices=("tokenizer", "digits"), help="tokenizer: PSNR, codebook usage/entropy; "
                    "digits: how often generated digits are classified as requested")
    ev.add_argument("--data", default="digits:test", help="tokenizer: evaluation images (default digits:test)")
    add_artifacts_arg(ev, " (digits)")
    add_model_args(ev)
    add_export_args(ev)
    ev.add_argument("--per-class", type=positive_int, default=10, help="digits: generated images per class (default 10)")
    add_sampling_args(ev, classes=False)
    add_json_arg(ev, "the result")
    ev.set_defaults(func=run_evaluate)


def run_train(args) -> int:
    from restok.training.common import check_override_names, load_config

    if args.what == "tokenizer":
        from restok.training.train_tokenizer import TokenizerTrainConfig as Cfg
        from restok.training.train_tokenizer import train_tokenizer as train
    else:
        from restok.training.train_generator import GeneratorTrainConfig as Cfg
        from restok.training.train_generator import train_generator as train
    allowed, overrides = _split_resume_override(args.resume_override, args.overrides)
    if allowed and not args.resume:
        raise CLIError("--resume-override applies only with --resume")
    try:
        check_override_names(Cfg, allowed)
    except ValueError as e:
        raise CLIError(f"--resume-override: {e}") from None
    cfg = load_config(Cfg, args.config, overrides)
    out = train(cfg, resume=args.resume, overwrite=args.overwrite, resume_override=allowed)
    print(f"trained {args.what}: {out}", file=sys.stderr)
    return EXIT_OK


def _split_resume_override(words: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """(setting names, KEY=VALUE overrides): --resume-override takes every word after it, so the KEY=VALUE
    overrides written after it go back where they belong (a setting name never holds '=')."""
    names = [n for w in words if "=" not in w for n in w.split(",") if n]
    return names, [*overrides, *(w for w in words if "=" in w)]


def run_extract_codes(args) -> int:
    from restok.checkpoints import load_tokenizer
    from restok.training.codes import extract_codes
    from restok.training.data import open_dataset

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device cuda: PyTorch sees no CUDA device here; use --device cpu")
    tok = load_tokenizer(args.tokenizer, args.preset)
    data = open_dataset(args.data, tok.cfg.image_size, train=False)
    import shlex

    command = "restok extract-codes " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    out = extract_codes(tok, data, args.out, crops=args.crops, flip=not args.no_flip, batch_size=args.batch,
                        shard_size=args.shard_size, device=args.device, command=command)
    print(f"codes of {len(data)} images in {out}", file=sys.stderr)
    return EXIT_OK


def run_evaluate(args) -> int:
    if args.what == "tokenizer":
        from restok.checkpoints import load_tokenizer
        from restok.training.data import open_dataset
        from restok.training.evaluate import tokenizer_metrics

        if not args.tokenizer or args.artifacts or args.generator or args.checkpoint:
            raise CLIError("evaluate tokenizer takes --tokenizer PATH (and --preset for a bare state dict) only")
        tok = load_tokenizer(args.tokenizer, args.preset or "L")
        res = tokenizer_metrics(tok, open_dataset(args.data, tok.cfg.image_size, train=False))
    else:
        from restok.runtime import Pipeline
        from restok.training.evaluate import generated_class_accuracy

        sampling = sampling_from(args)
        with Pipeline(artifacts(args)) as pipe:
            m = pipe.manifest

            def images(labels):
                return pipe.generate(labels, sampling, seed=args.seed).images

            res = generated_class_accuracy(images, m.num_classes, args.per_class)
    write_json(res, args.json)
    if args.json != "-":
        import json

        say(args, json.dumps(res, indent=2))
    return EXIT_OK
