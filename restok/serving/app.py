"""``restok serve``: an OpenAI-style HTTP API over one pipeline with dynamic batching (FastAPI + uvicorn).

Routes: POST /v1/images/generations, GET /v1/models, /health/live, /health/ready (after a warm-up run,
until a drain starts), /metrics (Prometheus). The backend runs in its own thread (the scheduler's), PNG
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
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from restok.noise import noise_keys
from restok.sampling_params import SEED_LIMIT, SamplingParams
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
    warmup: bool = True
    verify: bool = True

    def validate(self, export_max_batch: int) -> None:
        if self.batch_limit is not None and not 1 <= self.batch_limit <= export_max_batch:
            raise ValueError(f"--batch-limit must be in 1..{export_max_batch} (the export's max batch), got {self.batch_limit}")
        if not self.max_wait_ms >= 0 or not self.request_timeout > 0 or self.max_queue < 1:
            raise ValueError("--max-wait-ms must be >= 0, --request-timeout > 0 and --max-queue >= 1")


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

    def model_card(self) -> dict:
        m = self.manifest
        return {"id": f"restok-{m.generator.get('dim')}d-{m.vocab_size}v", "object": "model", "owned_by": "restok",
                "precision": m.precision, "backend": self.cfg.backend, "max_batch": self.manifest.max_batch, "batch_limit": self.batch_limit,
                "num_classes": m.num_classes, "image_size": m.image_size, "kv_cache": m.kv_cache,
                "schedule": {"num_steps": m.num_steps, "new_positions": m.har_schedule().new_positions},
                "artifacts_sha256": self.metrics.artifacts_sha256}


def _error(status: int, message: str, headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status, headers=headers)


def _field_error(loc: list, message: str):
    """A 422 in FastAPI's own validation format, naming the field."""
    return JSONResponse({"detail": [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]}, status_code=422)


def _request_model() -> type[BaseModel]:
    """The request body: the images asked for, then every SamplingParams setting with its own default and
    bounds (one declaration: restok.sampling_params), then the response format."""
    fields: dict = {"class_labels": (list[int], Field(min_length=1)), "n": (int, Field(1, ge=1)),
                    "seed": (int | None, Field(None, ge=0, lt=SEED_LIMIT))}
    for st in SamplingParams.settings():
        if st.choices:
            fields[st.name] = (Literal[st.choices], Field(st.default, description=st.help))  # type: ignore[valid-type]
        else:
            extra = {"allow_inf_nan": False} if st.kind is float else {}
            fields[st.name] = (st.kind, Field(st.default, ge=st.lo, le=st.hi, description=st.help, **extra))
    fields["response_format"] = (Literal["b64_json", "png", "tokens"], "b64_json")
    return create_model("GenerationRequest", __config__=ConfigDict(extra="forbid"), **fields)


GenerationRequest = _request_model()


def create_app(cfg: ServeConfig, service: Service | None = None) -> FastAPI:
    """The FastAPI app; the service (pipeline + scheduler) is made at startup unless given."""
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("RESTOK_API_KEY") or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or await asyncio.to_thread(Service, cfg)
        app.state.service = svc
        svc.scheduler.start()
        if cfg.warmup:
            await asyncio.to_thread(svc.warm_up)
        svc.ready = True
        try:
            yield
        finally:
            svc.ready = False
            await svc.scheduler.stop()
            svc.pipe.close()

    app = FastAPI(title="restok", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        svc = getattr(request.app.state, "service", None)
        if svc is not None and request.url.path == "/v1/images/generations":
            svc.metrics.request("422")
        return await request_validation_exception_handler(request, exc)

    async def authorized(request: Request):
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        want = f"Bearer {api_key}"
        if not hmac.compare_digest(got.encode(), want.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong API key (Authorization: Bearer KEY)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/images/generations", dependencies=[Depends(authorized)])
    async def generations(body: GenerationRequest, request: Request):
        t0 = time.monotonic()
        svc: Service = request.app.state.service
        m = svc.metrics
        if svc.draining or not svc.ready:
            m.request("503")
            return _error(503, "the server is not ready (starting or shutting down)", {"Retry-After": "1"})
        bad = [i for i, c in enumerate(body.class_labels) if not 0 <= c < svc.manifest.num_classes]
        if bad:
            m.request("422")
            return _field_error(["class_labels", bad[0]], f"class ids must be in [0, {svc.manifest.num_classes})")
        labels = [c for c in body.class_labels for _ in range(body.n)]
        if len(labels) > svc.cfg.max_queue:
            m.request("422")
            return _field_error(["n"], f"{len(labels)} images in one request; at most {svc.cfg.max_queue} (--max-queue)")
        if body.response_format == "png" and len(labels) != 1:
            m.request("422")
            return _field_error(["response_format"], "png returns one image; use b64_json for several")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        params = SamplingParams(**{st.name: getattr(body, st.name) for st in SamplingParams.settings()})
        keys = noise_keys(seed, len(labels))
        deadline = t0 + svc.cfg.request_timeout
        jobs = [ImageJob(c, params, keys[i], deadline) for i, c in enumerate(labels)]
        try:
            futures = svc.scheduler.submit(jobs)
        except QueueFull as e:
            m.request("429")
            return _error(429, f"overloaded: {e}; retry later", {"Retry-After": "1"})
        svc.inflight += 1
        try:
            pending = set(futures)
            while pending:
                done, pending = await asyncio.wait(pending, timeout=0.05)
                if pending and await request.is_disconnected():  # free the images nobody will read
                    for j in jobs:
                        j.cancelled = True
                    m.request("499")
                    return Response(status_code=499)
                if pending and time.monotonic() > deadline:
                    for j in jobs:
                        j.cancelled = True
                    m.request("504")
                    return _error(504, f"the request took longer than {svc.cfg.request_timeout}s (--request-timeout)")
            try:
                results = [f.result() for f in futures]
            except DeadlineExceeded as e:
                m.request("504")
                return _error(504, str(e))
            except Exception as e:  # the backend failed on this run
                m.request("500")
                return _error(500, f"generation failed: {type(e).__name__}: {e}")
        finally:
            svc.inflight -= 1
        m.images(len(results))
        timings = {"queue_ms": round(max(r.queue_seconds for r in results) * 1000, 3),
                   "run_ms": round(sum({id(r.run_seconds): r.run_seconds for r in results}.values()) * 1000, 3),
                   "total_ms": round((time.monotonic() - t0) * 1000, 3),
                   "batch_sizes": sorted({r.batch_size for r in results})}
        m.request("200", time.monotonic() - t0)
        if body.response_format == "png":
            from restok.images import png_bytes

            png = await asyncio.to_thread(png_bytes, results[0].image)
            return Response(png, media_type="image/png", headers={"X-Restok-Seed": str(seed)})
        data = []
        if body.response_format == "b64_json":
            from restok.images import png_bytes

            pngs = await asyncio.to_thread(lambda: [png_bytes(r.image) for r in results])
            data = [{"b64_json": base64.b64encode(p).decode()} for p in pngs]
        else:
            data = [{"tokens": r.tokens.tolist()} for r in results]
        for i, (d, c) in enumerate(zip(data, labels)):
            d.update(class_label=c, seed=seed, index=i)
        return {"created": int(time.time()), "data": data, "timings": timings}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models(request: Request):
        return {"object": "list", "data": [request.app.state.service.model_card()]}

    @app.get("/health/live", dependencies=[Depends(authorized)])
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", dependencies=[Depends(authorized)])
    async def ready(request: Request):
        svc = getattr(request.app.state, "service", None)
        ok = svc is not None and svc.ready and not svc.draining
        return Response('{"ready": %s}' % ("true" if ok else "false"), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics(request: Request):
        text, content_type = request.app.state.service.metrics.render()
        return PlainTextResponse(text, media_type=content_type)

    return app


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, drain_seconds: float = 60.0) -> None:
    """Run on uvicorn until SIGTERM/SIGINT: readiness goes false (503) while queued and running work
    finishes (up to ``drain_seconds``; new generation requests get 503), then the server exits with 0. A
    second signal stops at once."""
    import uvicorn

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

    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=int(drain_seconds)))
    print(f"restok serve: http://{host}:{port} ({cfg.backend}, {Path(cfg.artifacts).name})", flush=True)
    server.run()
