"""The same HTTP app as a Ray Serve deployment: replicas each own a backend (and, on GPU clusters, a GPU);
Ray routes requests between them; autoscaling between --replicas and --max-replicas on queued requests.

    restok serve --ray --replicas 2                       # a local Ray instance (or RAY_ADDRESS)
    serve run restok.serving.ray_serve:app_builder artifacts=/data/art/L replicas=4 gpus_per_replica=1 \\
        backend=tensorrt                                   # a cluster, with Ray's own CLI
"""

from __future__ import annotations

import dataclasses
import signal
import threading

from restok.serving.app import ServeConfig, create_app

APP_NAME = "restok"


def _replica_reporter():
    """In a replica: its link to the application's metrics board (restok.serving.cluster)."""
    from ray import serve

    from restok.serving.cluster import ReplicaReporter

    ctx = serve.get_replica_context()
    return ReplicaReporter(ctx.app_name, ctx.replica_id.unique_id)


def build(cfg: ServeConfig, replicas: int = 1, max_replicas: int | None = None, gpus: float = 0.0,
          cpus: float = 1.0, drain_seconds: float = 25.0):
    """A bound Ray Serve application of the restok app (each replica starts its own service). A CPU
    backend's replica computes on as many threads as it has CPUs (no oversubscription between replicas)."""
    from ray import serve

    if cfg.threads is None and cfg.backend not in ("cuda", "tensorrt"):
        cfg = dataclasses.replace(cfg, threads=max(1, int(cpus)))
    app = create_app(cfg, reporter=_replica_reporter)
    scaling = ({"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                       "target_ongoing_requests": 2}}
               if max_replicas and max_replicas > replicas else {"num_replicas": replicas})

    @serve.deployment(name="restok", ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                      max_ongoing_requests=max(cfg.max_queue, 1), graceful_shutdown_timeout_s=drain_seconds,
                      graceful_shutdown_wait_loop_s=0.5, **scaling)
    @serve.ingress(app)
    class RestokReplica:
        """One replica: the FastAPI app's lifespan builds its pipeline, scheduler and metrics."""

    return RestokReplica.bind()


APP_ARGS = ("artifacts", "backend", "replicas", "max_replicas", "gpus_per_replica", "cpus_per_replica", "threads",
            "batch_limit", "max_wait_ms", "max_queue", "request_timeout", "body_timeout", "api_key", "drain_seconds")


def app_builder(args: dict):
    """For ``serve run restok.serving.ray_serve:app_builder key=value ...`` and Serve config files (keys:
    APP_ARGS; an unknown key is an error, not a silent default)."""
    unknown = sorted(set(args) - set(APP_ARGS))
    if unknown:
        raise ValueError(f"unknown restok app argument {unknown[0]!r}; the arguments are: {', '.join(APP_ARGS)}")
    if "artifacts" not in args:
        raise ValueError("the restok app needs artifacts=PATH (an export folder on every node)")
    opt = lambda name, kind, default=None: kind(args[name]) if args.get(name) not in (None, "") else default  # noqa: E731
    cfg = ServeConfig(str(args["artifacts"]), backend=opt("backend", str, "onnxruntime"), threads=opt("threads", int),
                      batch_limit=opt("batch_limit", int), max_wait_ms=opt("max_wait_ms", float, 10.0),
                      max_queue=opt("max_queue", int, 256), request_timeout=opt("request_timeout", float, 120.0),
                      body_timeout=opt("body_timeout", float, ServeConfig.body_timeout), api_key=opt("api_key", str))
    return build(cfg, opt("replicas", int, 1), opt("max_replicas", int), opt("gpus_per_replica", float, 0.0),
                 opt("cpus_per_replica", float, 1.0), opt("drain_seconds", float, 25.0))


def run_ray(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
            max_replicas: int | None = None, gpus: float = 0.0, cpus: float = 1.0, drain_seconds: float = 25.0) -> None:
    """Start (or join, with RAY_ADDRESS) Ray, deploy, and serve until SIGTERM/SIGINT; then every replica
    drains (503 for new work, queued and running work finishes, up to ``drain_seconds``) before Serve stops."""
    import ray
    from ray import serve

    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise ImportError(f"restok serve --ray needs the ray extra: pip install 'restok[ray]' ({e})") from e
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(cfg, replicas, max_replicas, gpus, cpus, drain_seconds), name=APP_NAME, route_prefix="/")
    print(f"restok serve: http://{host}:{port} on Ray Serve ({replicas} replica(s), {cfg.backend})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    from restok.serving.cluster import drain

    if not drain(APP_NAME, drain_seconds):
        print(f"restok serve: work still running after --drain-seconds {drain_seconds:g}; stopping", flush=True)
    serve.shutdown()
    ray.shutdown()
