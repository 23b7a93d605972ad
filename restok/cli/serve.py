"""``restok serve``: the OpenAI-style HTTP server with dynamic batching, on one machine or on Ray Serve."""

from __future__ import annotations

import os

from restok.cli.common import (EXIT_OK, GPU_BACKENDS, CLIError, add_artifacts_arg, add_export_args, add_model_args,
                               add_runtime_args, artifacts, check_runtime_args, finite_float, positive_int, read_manifest)

ENV_PREFIX = "RESTOK_SERVE_"


def _port(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535 (0 picks a free one), got {v}")
    return v


def _non_negative_float(text: str) -> float:
    import argparse

    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    import argparse

    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def _env_defaults(p) -> None:
    """Every option from RESTOK_SERVE_<OPTION> (e.g. RESTOK_SERVE_PORT=8080, RESTOK_SERVE_WARMUP=1), parsed and
    checked like the flag: a container needs no command line. A flag on the command line wins. A bad value
    is reported when serve runs (``run``), never when another command builds its parser."""
    import os

    errors = []
    for a in p._actions:
        if not a.option_strings or a.dest in ("help",):
            continue
        name = ENV_PREFIX + a.dest.upper()
        text = os.environ.get(name)
        if text is None:
            continue
        if a.nargs == 0:  # a switch
            if text.lower() not in ("1", "true", "yes", "0", "false", "no", ""):
                errors.append(f"{name}={text!r}: expected 1/true/yes or 0/false/no")
            else:
                p.set_defaults(**{a.dest: text.lower() in ("1", "true", "yes")})
            continue
        try:
            value = a.type(text) if a.type else text
        except Exception as e:  # argparse's own type errors, said like a flag's
            errors.append(f"{name}={text!r}: {e}")
            continue
        if a.choices and value not in a.choices:
            errors.append(f"{name}={text!r}: choose from {', '.join(map(str, a.choices))}")
            continue
        p.set_defaults(**{a.dest: value})
    p.set_defaults(env_errors=errors)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server with dynamic batching (OpenAI-style routes, /metrics, /health)",
                       description="Serve an export over HTTP: POST /v1/images/generations, GET /v1/models, "
                                   "/health/live, /health/ready, /metrics (Prometheus). Images from concurrent "
                                   "requests share runs of up to --batch-limit images (default: the export's max "
                                   "batch, which --max-batch sets when exporting); an image is byte-identical to what "
                                   "restok generate writes for the same seed and index. Without artifacts options "
                                   "it serves the bundled model. SIGTERM stops readiness, finishes queued and "
                                   "running work (up to --drain-seconds), then exits 0. Every option can be set by "
                                   f"environment as {ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}PORT=8080, "
                                   f"{ENV_PREFIX}MAX_QUEUE=64, {ENV_PREFIX}WARMUP=1); a flag wins. Needs pip install "
                                   "'restok[serve]' ('restok[ray]' for --ray).")
    add_artifacts_arg(p)
    add_model_args(p)
    add_export_args(p)
    add_runtime_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one, announced)")
    s.add_argument("--batch-limit", type=positive_int, default=None, metavar="N",
                   help="most images in one run (default and upper bound: the export's max batch)")
    s.add_argument("--max-wait-ms", type=_non_negative_float, default=10.0,
                   help="how long the first queued image waits for others to join its run (default 10)")
    s.add_argument("--max-queue", type=positive_int, default=256,
                   help="images that may wait; beyond, requests get 429 with Retry-After (default 256)")
    s.add_argument("--request-timeout", type=_positive_float, default=120.0,
                   help="seconds before a request gets 504; its images not yet started are dropped (default 120)")
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on the API routes (default: "
                   "$RESTOK_API_KEY if set, else none; an empty key is refused). /health/* stay open for probes, "
                   "/metrics too unless --protect-metrics; /docs and /openapi.json close")
    s.add_argument("--protect-metrics", action="store_true", help="/metrics needs the API key too")
    s.add_argument("--no-access-log", action="store_true",
                   help="no JSON line per request on stderr (default: one per API request, and per failed probe; "
                        "each with the request id, from X-Request-ID or made, echoed in the response)")
    s.add_argument("--header-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="a connection that has not sent a request's headers by then is closed (default 10; "
                        "not with --ray, where Serve's proxy holds the connections)")
    s.add_argument("--body-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="a request body not received by then gets 408 (default 30)")
    s.add_argument("--drain-seconds", type=_non_negative_float, default=25.0,
                   help="on SIGTERM, how long queued and running work may take before exit (default 25, under "
                        "Kubernetes' 30 s grace period)")
    r = p.add_argument_group("Ray Serve (scale-out)")
    r.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (local Ray, or RAY_ADDRESS)")
    r.add_argument("--replicas", type=positive_int, default=1, help="replicas, each with its own backend (default 1)")
    r.add_argument("--max-replicas", type=positive_int, default=None,
                   help="autoscale between --replicas and this many replicas on queued requests")
    r.add_argument("--gpus-per-replica", type=finite_float, default=None,
                   help="GPUs per replica (default 1 with --backend cuda or tensorrt, else 0)")
    r.add_argument("--cpus-per-replica", type=finite_float, default=1.0, help="CPUs per replica (default 1)")
    p.set_defaults(func=run)
    _env_defaults(p)


def _api_key(args) -> str | None:
    """--api-key, else $RESTOK_API_KEY; a key that is given but empty (an unset variable) is an error."""
    key = args.api_key if args.api_key is not None else os.environ.get("RESTOK_API_KEY")
    if key is not None and not key.strip():
        where = "--api-key" if args.api_key is not None else "RESTOK_API_KEY"
        raise CLIError(f"{where} is empty (an unset variable?); give a key, or leave it out to serve without one")
    return key


def config_from(args):
    """The server's configuration, checked against the export before anything starts."""
    from restok.serving.app import ServeConfig

    opts = check_runtime_args(args)
    key = _api_key(args)
    if args.protect_metrics and key is None:
        raise CLIError("--protect-metrics needs an API key (--api-key or RESTOK_API_KEY)")
    folder = artifacts(args)
    cfg = ServeConfig(str(folder), backend=args.backend, threads=args.threads, backend_options=opts,
                      batch_limit=args.batch_limit, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      request_timeout=args.request_timeout, api_key=key, protect_metrics=args.protect_metrics,
                      access_log=not args.no_access_log, body_timeout=args.body_timeout, verify=not args.no_verify)
    if args.header_timeout is not None:  # None: ServeConfig's default (the flag is refused with --ray)
        cfg.header_timeout = args.header_timeout
    cfg.validate(read_manifest(folder, args).max_batch)
    return cfg


def run(args) -> int:
    if args.env_errors:
        raise CLIError(args.env_errors[0])
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"restok serve needs the serve extra: pip install 'restok[serve]' ({e})") from e
    if not args.ray and (args.replicas != 1 or args.max_replicas or args.gpus_per_replica is not None):
        raise CLIError("--replicas, --max-replicas and --gpus-per-replica apply to --ray")
    if args.ray and args.header_timeout is not None:
        raise CLIError("--header-timeout applies without --ray (under Ray, Serve's proxy holds the connections)")
    cfg = config_from(args)
    if args.ray:
        from restok.serving.ray_serve import run_ray

        gpus = args.gpus_per_replica if args.gpus_per_replica is not None else float(args.backend in GPU_BACKENDS)
        run_ray(cfg, host=args.host, port=args.port, replicas=args.replicas, max_replicas=args.max_replicas,
                gpus=gpus, cpus=args.cpus_per_replica, drain_seconds=args.drain_seconds)
    else:
        from restok.serving.app import serve

        serve(cfg, host=args.host, port=args.port, drain_seconds=args.drain_seconds)
    return EXIT_OK
