"""The same HTTP app as a Ray Serve deployment: replicas each own a backend (and, on GPU clusters, a GPU);
Ray routes requests between them; autoscaling between --replicas and --max-replicas on queued requests.

    restok serve --ray --replicas 2                       # a local Ray instance (or RAY_ADDRESS)
    serve run restok.serving.ray_serve:app_builder artifacts=/data/art/L replicas=4 gpus_per_replica=1 \\
        backend=tensorrt                                   # a cluster, with Ray's own CLI
"""

from __future__ import annotations

import signal
import threading

from restok.serving.app import ServeConfig, create_app


def build(cfg: ServeConfig, replicas: int = 1, max_replicas: int | None = None, gpus: float = 0.0,
          cpus: float = 1.0):
    """A bound Ray Serve application of the restok app (each replica starts its own service)."""
    from ray import serve

    app = create_app(cfg)
    scaling = ({"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                       "target_ongoing_requests": 2}}
               if max_replicas and max_replicas > replicas else {"num_replicas": replicas})

    @serve.deployment(name="restok", ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                      max_ongoing_requests=max(cfg.max_queue, 1), **scaling)
    @serve.ingress(app)
    class RestokReplica:
        """One replica: the FastAPI app's lifespan builds its pipeline, scheduler and metrics."""

    return RestokReplica.bind()


def app_builder(args: dict):
    """For ``serve run restok.serving.ray_serve:app_builder key=value ...`` (keys: artifacts, backend, replicas,
    max_replicas, gpus_per_replica, cpus_per_replica, batch_limit, max_wait_ms, max_queue, api_key)."""
    cfg = ServeConfig(args["artifacts"], backend=args.get("backend", "onnxruntime"),
                      batch_limit=int(args["batch_limit"]) if args.get("batch_limit") else None,
                      max_wait_ms=float(args.get("max_wait_ms", 10.0)), max_queue=int(args.get("max_queue", 256)),
                      api_key=args.get("api_key"))
    return build(cfg, int(args.get("replicas", 1)), int(args["max_replicas"]) if args.get("max_replicas") else None,
                 float(args.get("gpus_per_replica", 0)), float(args.get("cpus_per_replica", 1)))


def run_ray(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
            max_replicas: int | None = None, gpus: float = 0.0, cpus: float = 1.0) -> None:
    """Start (or join, with RAY_ADDRESS) Ray, deploy, and serve until SIGTERM/SIGINT."""
    import ray
    from ray import serve

    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise ImportError(f"restok serve --ray needs the ray extra: pip install 'restok[ray]' ({e})") from e
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(cfg, replicas, max_replicas, gpus, cpus), name="restok", route_prefix="/")
    print(f"restok serve: http://{host}:{port} on Ray Serve ({replicas} replica(s), {cfg.backend})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
