"""``restok serve``: OpenAI's Images API over one pipeline with dynamic batching (FastAPI + uvicorn).

Routes: POST /v1/images/generations (the OpenAI SDK's ``images.generate``: the prompt names a class),
GET /v1/models and /v1/models/{id}, /health/live, /health/ready (after a warm-up run, until a drain
starts), /metrics (Prometheus). Every error has OpenAI's body (restok.serving.errors). The backend runs in its own thread (the scheduler's), PNG
encoding in a thread pool: the event loop never blocks. The same app runs on uvicorn (``serve``) and as
a Ray Serve deployment (``restok.serving.ray_serve``).
"""

import asyncio
import base64
import hmac
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from restok.class_names import PromptError, class_names_for
from restok.noise import noise_keys
from restok.sampling_params import SEED_LIMIT, SamplingParams
from restok.serving.access import AccessLog
from restok.serving.errors import APIError, install_error_handlers
from restok.serving.limits import BodyLimits
from restok.serving.metrics import ServerMetrics
from restok.serving.scheduler import BatchScheduler, DeadlineExceeded, ImageJob, QueueFull


@dataclass
class ServeConfig:
    artifacts: str
    backend: str = "onnxruntime"
    threads: int | None = None
    backend_options: dict = field(default_factory=dict)
    batch_limit: int | None = None  # most images in one run; default: the export's max batch
    max_wait_ms: float = 10.0
    max_queue: int = 256  # images
    request_timeout: float = 120.0  # seconds from arrival; images not started by then are dropped (504)
    api_key: str | None = None
    protect_metrics: bool = False  # /metrics needs the API key too (health routes never do: probes have no key)
    warmup: bool = True
    verify: bool = True
    access_log: bool = True  # one JSON line per request on stderr
    header_timeout: float = 10.0  # seconds a connection has to send a request's headers (then it is closed)
    body_timeout: float = 30.0  # seconds a request's body has to arrive (then 408)

    def validate(self, export_max_batch: int) -> None:
        if self.batch_limit is not None and not 1 <= self.batch_limit <= export_max_batch:
            raise ValueError(f"--batch-limit must be in 1..{export_max_batch} (the export's max batch), got {self.batch_limit}")
        if not self.max_wait_ms >= 0 or not self.request_timeout > 0 or self.max_queue < 1:
            raise ValueError("--max-wait-ms must be >= 0, --request-timeout > 0 and --max-queue >= 1")
        if not (0 < self.header_timeout < float("inf") and 0 < self.body_timeout < float("inf")):
            raise ValueError("--header-timeout and --body-timeout must be finite numbers of seconds > 0")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty (an unset variable?); give a key, or leave --api-key and "
                             "RESTOK_API_KEY out to serve without one")


class Service:
    """The pipeline, its scheduler and metrics: one per server process (one per Ray replica)."""

    def __init__(self, cfg: ServeConfig):
        from restok.manifest import Manifest
        from restok.runtime import Pipeline

        manifest = Manifest.read(cfg.artifacts, verify=cfg.verify)
        cfg.validate(manifest.max_batch)
        self.cfg = cfg
        self.pipe = Pipeline(cfg.artifacts, cfg.backend, threads=cfg.threads, manifest=manifest, **cfg.backend_options)
        self.manifest = self.pipe.manifest
        self.batch_limit = cfg.batch_limit or self.manifest.max_batch
        self.metrics = ServerMetrics(self.manifest, cfg.backend, self.batch_limit)
        self.class_names = class_names_for(self.manifest.num_classes)
        self.created = int(os.stat(Path(cfg.artifacts) / "manifest.json").st_mtime)
        self.scheduler = BatchScheduler(self._run_batch, self.batch_limit, cfg.max_wait_ms, cfg.max_queue,
                                        observe=self.metrics.observe)
        self.ready = False
        self.draining = False
        self.inflight = 0

    def _run_batch(self, jobs: list[ImageJob]):
        """On the backend thread: one run of the pipeline for the jobs' images."""
        g = self.pipe.generate([j.label for j in jobs], [j.params for j in jobs],
                               keys=np.stack([j.keys for j in jobs]), output="uint8")
        return g.tokens, g.images, g.step_seconds

    def warm_up(self) -> None:
        """One run at the batch limit (ONNX Runtime plans its memory; CUDA-graph backends capture)."""
        jobs = [ImageJob(0, SamplingParams(), noise_keys(0, 1)[0], 0.0) for _ in range(self.batch_limit)]
        self._run_batch(jobs)

    @property
    def model_id(self) -> str:
        m = self.manifest
        return f"restok-{m.generator.get('dim')}d-{m.vocab_size}v"

    def model_card(self) -> dict:
        m = self.manifest
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "restok",
                "precision": m.precision, "backend": self.cfg.backend, "max_batch": self.manifest.max_batch, "batch_limit": self.batch_limit,
                "num_classes": m.num_classes, "image_size": m.image_size, "kv_cache": m.kv_cache,
                "schedule": {"num_steps": m.num_steps, "new_positions": m.har_schedule().new_positions},
                "artifacts_sha256": self.metrics.artifacts_sha256}


MAX_IMAGES_PER_REQUEST = 4096  # the request model's own bound; the server's --max-queue bounds it further
MAX_BODY_BYTES = 1 << 20


def _request_model() -> type[BaseModel]:
    """The request body: OpenAI's Images API fields (model, prompt, n, size, response_format, output_format;
    quality, style and user accepted and ignored), restok's extensions (class_labels, seed), then every
    SamplingParams setting with its own default and bounds (one declaration: restok.sampling_params)."""
    text = lambda n, **kw: (str | None, Field(None, max_length=n, **kw))  # noqa: E731
    fields: dict = {
        "model": text(256, description="the served model's id (GET /v1/models); optional"),
        "prompt": text(1000, description="a class: its name from the model's list (case-insensitive) or its id"),
        "class_labels": (list[int] | None, Field(None, min_length=1, max_length=MAX_IMAGES_PER_REQUEST,
                                                  description="restok: class ids, one image each (wins over prompt)")),
        "n": (int, Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST, description="images per class")),
        "size": text(32, description="the model's native size (e.g. 256x256) or auto"),
        "quality": text(64, description="accepted and ignored"), "style": text(64, description="accepted and ignored"),
        "user": text(256, description="accepted and ignored"),
        "seed": (int | None, Field(None, ge=0, lt=SEED_LIMIT)),
    }
    for st in SamplingParams.settings():
        if st.choices:
            fields[st.name] = (Literal[st.choices], Field(st.default, description=st.help))  # type: ignore[valid-type]
        else:
            extra = {"allow_inf_nan": False} if st.kind is float else {}
            fields[st.name] = (st.kind, Field(st.default, ge=st.lo, le=st.hi, description=st.help, **extra))
    fields["response_format"] = (Literal["b64_json", "url", "png", "tokens"], "b64_json")
    fields["output_format"] = (Literal["png", "jpeg", "webp"], "png")
    return create_model("GenerationRequest", __config__=ConfigDict(extra="forbid"), **fields)


GenerationRequest = _request_model()


def _labels_of(body, svc: "Service") -> tuple[list[int], list[str]]:
    """The classes asked for (class_labels, else the prompt's class) and each one's name; APIError otherwise."""
    names = svc.class_names
    if body.class_labels is not None:
        bad = [i for i, c in enumerate(body.class_labels) if not 0 <= c < svc.manifest.num_classes]
        if bad:
            raise APIError(400, f"class ids must be in [0, {svc.manifest.num_classes}), got {body.class_labels[bad[0]]}",
                           f"class_labels[{bad[0]}]", "invalid_value")
        classes = list(body.class_labels)
    elif body.prompt is not None:
        try:
            classes = [names.resolve(body.prompt)]
        except PromptError as e:
            raise APIError(400, str(e), "prompt", "invalid_value") from None
    else:
        raise APIError(400, "give a prompt (a class name or id) or class_labels", "prompt", "missing_required_parameter")
    return classes, [names.label(c) for c in classes]


def _check_request(body, svc: "Service") -> None:
    """OpenAI fields restok cannot honour: a clear 4xx naming the field."""
    if body.model is not None and body.model != svc.model_id:
        raise APIError(404, f"the model {body.model!r} is not served here; this server serves {svc.model_id!r}",
                       "model", "model_not_found")
    size = svc.manifest.image_size
    if body.size is not None and body.size not in ("auto", f"{size}x{size}"):
        raise APIError(400, f"size {body.size!r} is not available: this model makes {size}x{size} images",
                       "size", "invalid_value")
    if body.response_format == "url":
        raise APIError(400, "response_format url is not supported: this server keeps no images; use b64_json",
                       "response_format", "invalid_value")
    if body.output_format != "png" and body.response_format not in ("b64_json",):
        raise APIError(400, "output_format applies to response_format b64_json", "output_format", "invalid_value")


def create_app(cfg: ServeConfig, service: Service | None = None, reporter=None) -> FastAPI:
    """The FastAPI app; the service (pipeline + scheduler) is made at startup unless given. ``reporter()``,
    called at startup, gives a replica's link to its siblings (restok.serving.cluster: summed /metrics and
    the drain flag under Ray Serve)."""
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("RESTOK_API_KEY") or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or await asyncio.to_thread(Service, cfg)
        app.state.service = svc
        svc.scheduler.start()
        if cfg.warmup:
            await asyncio.to_thread(svc.warm_up)
        svc.ready = True
        rep = reporter() if reporter is not None else None
        app.state.reporter = rep
        if rep is not None:
            rep.start(svc)
        try:
            yield
        finally:
            svc.ready = False
            if rep is not None:
                await rep.stop()
            await svc.scheduler.stop()
            svc.pipe.close()

    closed = api_key is not None  # the API's own description is not given to whoever asks
    app = FastAPI(title="restok", lifespan=lifespan, docs_url=None if closed else "/docs",
                  redoc_url=None if closed else "/redoc", openapi_url=None if closed else "/openapi.json")

    def record(status: int, seconds: float) -> None:
        svc = getattr(app.state, "service", None)
        if svc is not None:
            svc.metrics.request(str(status), seconds)

    install_error_handlers(app)
    app.add_middleware(BodyLimits, max_bytes=MAX_BODY_BYTES, timeout=cfg.body_timeout)
    app.add_middleware(AccessLog, record=record, log=cfg.access_log)  # outermost

    async def authorized(request: Request):
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        want = f"Bearer {api_key}"
        if not hmac.compare_digest(got.encode(), want.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None, "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})

    metrics_auth = [Depends(authorized)] if cfg.protect_metrics else []

    @app.post("/v1/images/generations", dependencies=[Depends(authorized)])
    async def generations(body: GenerationRequest, request: Request):
        t0 = time.monotonic()
        svc: Service = request.app.state.service
        m = svc.metrics
        if svc.draining or not svc.ready:
            raise APIError(503, "the server is not ready (starting or shutting down); retry", None, "not_ready",
                           {"Retry-After": "1"})
        _check_request(body, svc)
        classes, names = _labels_of(body, svc)
        count_images = len(classes) * body.n  # bounded before anything of that size is built
        if count_images > svc.cfg.max_queue:
            raise APIError(400, f"{count_images} images in one request; at most {svc.cfg.max_queue} (--max-queue)",
                           "n", "invalid_value")
        if body.response_format == "png" and count_images != 1:
            raise APIError(400, "png returns one image; use b64_json for several", "response_format", "invalid_value")
        labels = [c for c in classes for _ in range(body.n)]
        label_names = [nm for nm in names for _ in range(body.n)]
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        params = SamplingParams(**{st.name: getattr(body, st.name) for st in SamplingParams.settings()})
        if params.guided and not svc.manifest.guided:
            raise APIError(400, "this model was exported without guidance: cfg_scale must be <= 1", "cfg_scale",
                           "invalid_value")
        keys = noise_keys(seed, len(labels))
        deadline = t0 + svc.cfg.request_timeout
        request_id = object()
        jobs = [ImageJob(c, params, keys[i], deadline, request=request_id) for i, c in enumerate(labels)]
        try:
            futures = svc.scheduler.submit(jobs)
        except QueueFull as e:
            raise APIError(429, f"overloaded: {e}; retry later", None, "rate_limit_exceeded", {"Retry-After": "1"}) from None
        svc.inflight += 1
        try:
            pending = set(futures)
            while pending:
                done, pending = await asyncio.wait(pending, timeout=0.05)
                if pending and await request.is_disconnected():  # free the images nobody will read
                    for j in jobs:
                        j.cancelled = True
                    return Response(status_code=499)
                if pending and time.monotonic() > deadline:
                    for j in jobs:
                        j.cancelled = True
                    raise APIError(504, f"the request took longer than {svc.cfg.request_timeout}s (--request-timeout)",
                                   None, "timeout")
            try:
                results = [f.result() for f in futures]
            except DeadlineExceeded as e:
                raise APIError(504, str(e), None, "timeout") from None
            except Exception as e:  # the backend failed on this request's images
                raise APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "generation_failed") from None
        finally:
            svc.inflight -= 1
        m.images(len(results))
        request.state.access = {"images": len(results), "queue_ms": round(max(r.queue_seconds for r in results) * 1000, 3),
                                "batch_sizes": sorted({r.batch_size for r in results})}
        timings = {"queue_ms": round(max(r.queue_seconds for r in results) * 1000, 3),
                   "run_ms": round(sum({id(r.run_seconds): r.run_seconds for r in results}.values()) * 1000, 3),
                   "total_ms": round((time.monotonic() - t0) * 1000, 3),
                   "batch_sizes": sorted({r.batch_size for r in results})}
        if body.response_format == "png":
            from restok.images import png_bytes

            png = await asyncio.to_thread(png_bytes, results[0].image)
            return Response(png, media_type="image/png", headers={"X-Restok-Seed": str(seed)})
        data = []
        if body.response_format == "b64_json":
            from restok.images import encode_image

            blobs = await asyncio.to_thread(lambda: [encode_image(r.image, body.output_format) for r in results])
            data = [{"b64_json": base64.b64encode(b).decode()} for b in blobs]
        else:
            data = [{"tokens": r.tokens.tolist()} for r in results]
        for i, (d, c, nm) in enumerate(zip(data, labels, label_names)):
            d.update(revised_prompt=nm, class_label=c, seed=seed, index=i)
        size = svc.manifest.image_size
        return {"created": int(time.time()), "data": data, "size": f"{size}x{size}",
                "output_format": body.output_format if body.response_format == "b64_json" else None,
                "timings": timings}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models(request: Request):
        return {"object": "list", "data": [request.app.state.service.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str, request: Request):
        svc: Service = request.app.state.service
        if model_id != svc.model_id:
            raise APIError(404, f"the model {model_id!r} is not served here; this server serves {svc.model_id!r}",
                           "model", "model_not_found")
        return svc.model_card()

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready(request: Request):
        svc = getattr(request.app.state, "service", None)
        ok = svc is not None and svc.ready and not svc.draining
        return Response('{"ready": %s}' % ("true" if ok else "false"), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.get("/metrics", dependencies=metrics_auth)
    async def metrics(request: Request):
        svc: Service = request.app.state.service
        text, content_type = svc.metrics.render()
        rep = getattr(request.app.state, "reporter", None)
        if rep is not None:  # under Ray: the sum over every replica, whichever one answers
            text = await rep.render(svc)
        return PlainTextResponse(text, media_type=content_type)

    return app


def bind_socket(host: str, port: int):
    """The listening socket, bound before the model loads: a port in use or not allowed is one error line at
    once, and port 0 gives the real port to announce."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, drain_seconds: float = 25.0) -> None:
    """Run on uvicorn until SIGTERM/SIGINT: readiness goes false (503) while queued and running work
    finishes (up to ``drain_seconds``; new generation requests get 503), then the server exits with 0. A
    second signal stops at once."""
    import uvicorn

    from restok.serving.limits import header_timeout_protocol

    sock = bind_socket(host, port)
    app = create_app(cfg)

    class DrainingServer(uvicorn.Server):
        drain_started = False

        def handle_exit(self, sig, frame) -> None:
            svc = getattr(app.state, "service", None)
            if self.drain_started or svc is None:
                self.should_exit = True
                return
            self.drain_started = True
            svc.draining = True
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(svc)))

        async def _drain(self, svc) -> None:
            end = time.monotonic() + drain_seconds
            while (svc.inflight or not svc.scheduler.idle) and time.monotonic() < end:
                await asyncio.sleep(0.05)
            self.should_exit = True

    server = DrainingServer(uvicorn.Config(app, log_level="warning", access_log=False,
                                           http=header_timeout_protocol(cfg.header_timeout), timeout_keep_alive=5,
                                           timeout_graceful_shutdown=2))  # the drain above already waited
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"restok serve: http://{shown}:{bound_port} ({cfg.backend}, {Path(cfg.artifacts).name})", flush=True)
    server.run(sockets=[sock])
