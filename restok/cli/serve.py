"""``restok serve``: the OpenAI-style HTTP server with dynamic batching, on one machine or on Ray Serve."""

from __future__ import annotations

import os

from restok.cli.common import (EXIT_OK, GPU_BACKENDS, CLIError, add_artifacts_arg, add_export_args, add_model_args,
                               add_runtime_args, artifacts, check_runtime_args, finite_float, non_negative_int,
                               positive_int)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server with dynamic batching (OpenAI-style routes, /metrics, /health)",
                       description="Serve an export over HTTP: POST /v1/images/generations, GET /v1/models, "
                                   "/health/live, /health/ready, /metrics (Prometheus). Images from concurrent "
                                   "requests share runs of up to --batch-limit images (default: the export's max "
                                   "batch, which --max-batch sets when exporting); an image is byte-identical to what "
                                   "restok generate writes for the same seed and index. Without artifacts options "
                                   "it serves the bundled model. SIGTERM stops readiness, finishes queued and "
                                   "running work, then exits. Needs pip install 'restok[serve]' ('restok[ray]' "
                                   "for --ray).")
    add_artifacts_arg(p)
    add_model_args(p)
    add_export_args(p)
    add_runtime_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=non_negative_int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--batch-limit", type=positive_int, default=None, metavar="N",
                   help="most images in one run (default and upper bound: the export's max batch)")
    s.add_argument("--max-wait-ms", type=finite_float, default=10.0,
                   help="how long the first queued image waits for others to join its run (default 10)")
    s.add_argument("--max-queue", type=positive_int, default=256,
                   help="images that may wait; beyond, requests get 429 with Retry-After (default 256)")
    s.add_argument("--request-timeout", type=finite_float, default=120.0,
                   help="seconds before a request gets 504; its images not yet started are dropped (default 120)")
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every request "
                   "(default: $RESTOK_API_KEY if set, else none)")
    r = p.add_argument_group("Ray Serve (scale-out)")
    r.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (local Ray, or RAY_ADDRESS)")
    r.add_argument("--replicas", type=positive_int, default=1, help="replicas, each with its own backend (default 1)")
    r.add_argument("--max-replicas", type=positive_int, default=None,
                   help="autoscale between --replicas and this many replicas on queued requests")
    r.add_argument("--gpus-per-replica", type=finite_float, default=None,
                   help="GPUs per replica (default 1 with --backend cuda or tensorrt, else 0)")
    r.add_argument("--cpus-per-replica", type=finite_float, default=1.0, help="CPUs per replica (default 1)")
    p.set_defaults(func=run)


def config_from(args):
    from restok.serving.app import ServeConfig

    opts = check_runtime_args(args)
    folder = artifacts(args)
    return ServeConfig(str(folder), backend=args.backend, threads=args.threads, backend_options=opts,
                       batch_limit=args.batch_limit, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                       request_timeout=args.request_timeout,
                       api_key=args.api_key or os.environ.get("RESTOK_API_KEY") or None, verify=not args.no_verify)


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"restok serve needs the serve extra: pip install 'restok[serve]' ({e})") from e
    if not args.ray and (args.replicas != 1 or args.max_replicas or args.gpus_per_replica is not None):
        raise CLIError("--replicas, --max-replicas and --gpus-per-replica apply to --ray")
    cfg = config_from(args)
    if args.ray:
        from restok.serving.ray_serve import run_ray

        gpus = args.gpus_per_replica if args.gpus_per_replica is not None else float(args.backend in GPU_BACKENDS)
        run_ray(cfg, host=args.host, port=args.port, replicas=args.replicas, max_replicas=args.max_replicas,
                gpus=gpus, cpus=args.cpus_per_replica)
    else:
        from restok.serving.app import serve

        serve(cfg, host=args.host, port=args.port)
    return EXIT_OK
