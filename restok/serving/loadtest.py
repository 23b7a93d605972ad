"""``restok loadtest``: a bounded async load on a restok server (httpx): throughput, latency percentiles,
errors by status and the server's own batch-size histogram (from /metrics). Every run stops by itself after
``requests`` requests or ``max_seconds``, whichever comes first."""

import asyncio
import json
import re
import time

import numpy as np


def _batch_histogram(metrics_text: str) -> dict:
    """{upper bound: count} of restok_batch_size from Prometheus text (cumulative buckets made per-bucket)."""
    buckets = []
    for m in re.finditer(r'^restok_batch_size_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', metrics_text, re.M):
        buckets.append((m.group(1), float(m.group(2))))
    out, prev = {}, 0.0
    for le, cum in buckets:
        out[le] = int(cum - prev)
        prev = cum
    return out


def _scrape(client, url: str, headers: dict) -> str:
    r = client.get(url.rstrip("/") + "/metrics", headers=headers)
    return r.text if r.status_code == 200 else ""


async def run_load(url: str, concurrency: int, requests: int, body: dict | None = None, api_key: str | None = None,
                   timeout: float = 120.0, max_seconds: float = 600.0) -> dict:
    import httpx

    if concurrency < 1 or requests < 1 or not max_seconds > 0:
        raise ValueError("concurrency and requests must be >= 1 and max seconds > 0")
    body = body or {"class_labels": [0], "response_format": "tokens"}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/images/generations"
    images_per_request = len(body.get("class_labels", [0])) * int(body.get("n", 1))
    latencies, statuses = [], {}
    counter = iter(range(requests))
    deadline = time.monotonic() + max_seconds
    with httpx.Client(timeout=30) as c:
        before = _batch_histogram(_scrape(c, url, headers))
    t0 = time.monotonic()

    async def worker(client):
        for i in counter:
            if time.monotonic() > deadline:
                return
            t = time.monotonic()
            try:
                r = await client.post(endpoint, json={**body, "seed": i}, headers=headers)
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                latencies.append(time.monotonic() - t)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.monotonic() - t0
    with httpx.Client(timeout=30) as c:
        after = _batch_histogram(_scrape(c, url, headers))
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    ok = statuses.get("200", 0)
    return {
        "url": url, "concurrency": concurrency, "requests": sum(statuses.values()), "seconds": round(wall, 3),
        "ok": ok, "errors_by_status": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "requests_per_second": round(ok / wall, 3), "images_per_second": round(ok * images_per_request / wall, 3),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p90": round(float(np.percentile(lat, 90)), 2),
                       "p99": round(float(np.percentile(lat, 99)), 2), "max": round(float(lat.max()), 2)},
        "server_batch_sizes": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        "stopped_by_time": time.monotonic() > deadline,
    }


def format_result(r: dict) -> str:
    return (f"{r['ok']}/{r['requests']} ok in {r['seconds']}s: {r['images_per_second']} images/s, latency p50 "
            f"{r['latency_ms']['p50']} ms p90 {r['latency_ms']['p90']} ms p99 {r['latency_ms']['p99']} ms; errors "
            f"{json.dumps(r['errors_by_status'])}; server batch sizes {json.dumps(r['server_batch_sizes'])}")
