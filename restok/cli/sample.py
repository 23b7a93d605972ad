"""``restok sample``: offline sampling jobs in resumable shards -> samples.npz (ADM evaluator format)."""

from __future__ import annotations


from restok.cli.common import (EXIT_OK, EXPORT_FLAGS, GPU_BACKENDS, MODEL_FLAGS, CLIError, add_artifacts_arg,
                               add_export_args, add_json_arg, add_model_args, add_runtime_args, add_sampling_args,
                               artifacts, check_runtime_args, finite_float, given_flags, non_empty_path, positive_int,
                               sampling_from, say, write_json)


def _shard(text: str) -> tuple[int, int]:
    import argparse

    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N (e.g. 0/8), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"expected 0 <= i < N, got {text!r}")
    return i, n


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="offline sampling job in resumable shards -> samples.npz (ADM evaluator format)",
                       description="Generate --per-class images for each class (default: every class), written in "
                                   "shards that are never half-written and each checked against its sha256 record "
                                   "before it is trusted (a killed job resumes where it stopped; a damaged shard is "
                                   "redone), then samples.npz (uint8 [N, S, S, 3] under arr_0, the ADM evaluator's "
                                   "format that LlamaGen and ResTok use) and samples.json (class, seed and index per "
                                   "image). In-process, split with --shard i/N (Slurm arrays, Kubernetes jobs), or as "
                                   "a Ray Data job with --ray. The same seed gives the same images whichever way. "
                                   "--merge joins the folders of --shard runs that each wrote their own --out.")
    add_artifacts_arg(p)
    add_model_args(p)
    add_export_args(p)
    add_runtime_args(p)
    add_sampling_args(p)
    p.add_argument("--per-class", type=positive_int, help="images per class (50 for gFID-50K; required unless --merge)")
    p.add_argument("--out", required=True, metavar="DIR", type=non_empty_path, help="the job's folder")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard file (default 1000)")
    p.add_argument("--shard", type=_shard, default=None, metavar="i/N",
                   help="do only shards s with s mod N == i (another scheduler runs the others); whoever finds every "
                        "shard done writes samples.npz")
    p.add_argument("--merge", nargs="+", metavar="DIR", type=non_empty_path,
                   help="join the folders that --shard i/N runs of one job wrote (each with its job.json) into "
                        "samples.npz + samples.json in --out; the model and sampling options come from the job.json "
                        "files")
    r = p.add_argument_group("Ray Data")
    r.add_argument("--ray", action="store_true", help="run the missing shards as a Ray Data map_batches job, one "
                   "backend per actor (local Ray, or RAY_ADDRESS); needs pip install 'restok[ray]'")
    r.add_argument("--actors", type=positive_int, default=2, help="actors (default 2)")
    r.add_argument("--gpus-per-actor", type=finite_float, default=None,
                   help="GPUs per actor (default 1 with --backend cuda or tensorrt, else 0)")
    add_json_arg(p, "a summary")
    p.set_defaults(func=run)


def _merge_conflicts(args) -> list[str]:
    """The options --merge takes from the job.json files, given anyway."""
    from restok.sampling_params import SamplingParams

    flags = given_flags(args, ("artifacts", "classes", "per_class", *MODEL_FLAGS, *EXPORT_FLAGS))
    flags += ["--seed"] if args.seed != 0 else []
    flags += ["--shard-size"] if args.shard_size != 1000 else []
    return flags + [s.flag for s in SamplingParams.settings() if getattr(args, s.name) != s.default]


def run_merge(args) -> int:
    """--merge DIR ...: one samples.npz from the shard folders of one job."""
    from restok.jobs.sample import merge

    if args.shard is not None or args.ray:
        raise CLIError("--merge joins finished shard folders; it runs no shards: drop --shard/--ray (run those first)")
    given = _merge_conflicts(args)
    if given:
        raise CLIError(f"--merge takes the model and sampling from the folders' job.json; drop {', '.join(given)}")
    path, job = merge(args.merge, args.out)
    n = len(job.classes) * job.per_class
    write_json({"out": args.out, "merged": args.merge, "images": n, "shards": job.num_shards, "samples": str(path)},
               args.json)
    if args.json != "-":
        say(args, f"{path} holds {n} images from {job.num_shards} shard(s) of {len(args.merge)} folder(s)")
    return EXIT_OK


def run(args) -> int:
    from restok.jobs.sample import SampleJob, assemble, manifest_identity, prepare, run_local, run_ray

    if args.merge:
        return run_merge(args)
    if args.per_class is None:
        raise CLIError("--per-class is required (or --merge DIR ... to join the folders of --shard runs)")
    args.shard = args.shard or (0, 1)
    if args.ray and args.shard != (0, 1):
        raise CLIError("--shard splits a job between schedulers; --ray distributes it itself: use one of them")
    if not args.ray and (args.actors != 2 or args.gpus_per_actor is not None):
        raise CLIError("--actors and --gpus-per-actor apply to --ray")
    sampling = sampling_from(args)
    opts = check_runtime_args(args)
    folder = artifacts(args)
    from restok.manifest import Manifest

    m = Manifest.read(folder)
    classes = args.classes if args.classes is not None else list(range(m.num_classes))
    bad = [c for c in classes if not 0 <= c < m.num_classes]
    if bad:
        raise CLIError(f"class ids {bad} are outside [0, {m.num_classes}) for this model")
    job = SampleJob(str(folder), args.out, classes, args.per_class, args.seed, sampling, args.shard_size,
                    args.backend, args.threads, artifacts_sha256=manifest_identity(m))
    prepare(job)
    before = len(job.pending())
    gpus = args.gpus_per_actor if args.gpus_per_actor is not None else float(args.backend in GPU_BACKENDS)
    done = run_ray(job, args.actors, gpus_per_actor=gpus, **opts) if args.ray else \
        run_local(job, args.shard, **opts)
    path = assemble(job)
    summary = {"out": args.out, "images": len(job.labels), "shards": job.num_shards, "done_now": len(done),
               "already_done": job.num_shards - before, "pending": len(job.pending()),
               "samples": str(path) if path else None}
    write_json(summary, args.json)
    if args.json != "-":
        say(args, f"{len(done)} shard(s) written now, {summary['already_done']} before; "
                  + (f"{path} holds {len(job.labels)} images" if path else f"{summary['pending']} shard(s) still missing"))
    return EXIT_OK
