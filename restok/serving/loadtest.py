"""``restok loadtest``: a bounded async load on a restok server (httpx): throughput, latency percentiles,
failures by kind and the server's own batch-size histogram (from /metrics).

Two modes:

* closed loop (default): ``concurrency`` workers, each sending its next request when its last one is answered;
* open loop (``rate``): requests start on a seeded Poisson schedule of ``rate`` per second whatever the server
  does, at most ``concurrency`` in flight; an arrival that finds ``concurrency`` requests still in flight is
  *dropped* (not sent, counted as a failure) rather than queued, so that a slow server cannot slow the offered
  load down (no coordinated omission). How late each request started against its schedule is reported.

Every run stops by itself after ``requests`` requests or ``max_seconds`` (requests in flight then are waited
for, up to ``timeout``), or early once ``max_connect_failures`` requests in a row could not connect (the
server is gone). A request that fails is counted by its kind: its HTTP status ("429", "503") or its error
("ConnectError", "RemoteProtocolError", "ReadTimeout"); the report is made whatever happened to the server.
A server that cannot be reached at all before the run is an error (:class:`ServerUnreachable`, an OSError).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time

import numpy as np

# a request that could not even open a connection: what "the server is gone" looks like
CONNECT_FAILURES = ("ConnectError", "ConnectTimeout")
RESPONSE_FORMATS = ("b64_json", "png", "tokens")


class ServerUnreachable(ConnectionError):
    """The server did not answer before the run (exit code 3: the environment)."""


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


def _transport_errors():
    """httpx errors that mean the server (or the network) is not answering; not a bad URL (those stay errors)."""
    import httpx

    return (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ProxyError)


def _scrape(client, url: str, headers: dict) -> tuple[dict | None, str | None]:
    """(batch histogram, None) from GET /metrics, or (None, why not). Never raises for a server that is gone."""
    try:
        r = client.get(url.rstrip("/") + "/metrics", headers=headers)
    except _transport_errors() as e:
        return None, f"GET /metrics failed: {type(e).__name__}: {e}"
    if r.status_code != 200:
        return None, f"GET /metrics answered {r.status_code}"
    return _batch_histogram(r.text), None


def batch_size_delta(before: tuple[dict | None, str | None], after: tuple[dict | None, str | None]
                     ) -> tuple[dict | None, str | None]:
    """The server's batches during the run: (after - before per bucket, None), or (None, why not) when a scrape
    is missing or a count went down (the counters were reset: a restarted server, another replica answered)."""
    (b, why_b), (a, why_a) = before, after
    if b is None:
        return None, f"no /metrics before the run ({why_b})"
    if a is None:
        return None, f"no /metrics after the run ({why_a})"
    if not a and not b:
        return None, "no restok_batch_size histogram in /metrics"
    if any(a.get(k, 0) < v for k, v in b.items()):
        return None, "counter reset"
    return {k: a[k] - b.get(k, 0) for k in a}, None


def default_body(response_format: str = "b64_json") -> dict:
    """One image of class 0 per request; b64_json by default, so that the server's PNG encoding is measured."""
    return {"class_labels": [0], "response_format": response_format}


def _images_per_request(body: dict) -> int:
    labels = body.get("class_labels")
    n = body.get("n", 1)
    return (len(labels) if isinstance(labels, list) and labels else 1) * (n if isinstance(n, int) and n > 0 else 1)


def _percentiles(values_ms: list[float], qs=(50, 90, 95, 99)) -> dict:
    """{p50: .., ..., mean, max} in ms rounded to 0.01, or every value None when there are none (JSON has no NaN)."""
    keys = [f"p{q}" for q in qs] + ["mean", "max"]
    if not values_ms:
        return dict.fromkeys(keys)
    a = np.asarray(values_ms, dtype=float)
    vals = [float(np.percentile(a, q)) for q in qs] + [float(a.mean()), float(a.max())]
    return {k: round(v, 2) for k, v in zip(keys, vals)}


async def run_load(url: str, concurrency: int, requests: int, body: dict | None = None, api_key: str | None = None,
                   timeout: float = 120.0, max_seconds: float = 600.0, *, rate: float | None = None, seed: int = 0,
                   max_connect_failures: int = 10, allow_statuses: tuple[str, ...] = ()) -> dict:
    """Run the load and return the report (see the module's docstring). ``rate`` None: closed loop of
    ``concurrency``; else open loop at ``rate`` requests/s (Poisson, arrival times from ``seed``) with at most
    ``concurrency`` in flight. Request i asks for image seed ``seed + i``. ``allow_statuses``: HTTP statuses
    counted but not failures (e.g. "429" for an overload test). ``max_connect_failures`` 0: never stop early."""
    import httpx

    from restok.sampling_params import SEED_LIMIT

    if concurrency < 1 or requests < 1 or not max_seconds > 0 or not timeout > 0:
        raise ValueError("concurrency and requests must be >= 1, max seconds and timeout > 0")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a finite number > 0 requests per second, got {rate}")
    if max_connect_failures < 0:
        raise ValueError("max connect failures must be >= 0")
    body = dict(default_body() if body is None else body)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/images/generations"
    images_per_request = _images_per_request(body)
    allowed = {str(s) for s in allow_statuses}

    with httpx.Client(timeout=min(timeout, 30.0)) as c:
        try:  # the server must answer (any status) before the run: else exit 3, not a report of failures
            c.get(url.rstrip("/") + "/health/live")
        except _transport_errors() as e:
            raise ServerUnreachable(f"{url} is not reachable: {type(e).__name__}: {e or 'no answer'} "
                                    "(is the server running?)") from None
        before = _scrape(c, url, headers)

    latencies: list[float] = []
    lateness: list[float] = []
    statuses: dict[str, int] = {}
    response_bytes = [0]
    state = {"consecutive_connect_failures": 0, "server_gone": False, "dropped": 0, "sent": 0}
    deadline = time.monotonic() + max_seconds

    async def one(client, i: int) -> None:
        state["sent"] += 1
        t = time.monotonic()
        try:
            r = await client.post(endpoint, json={**body, "seed": (seed + i) % SEED_LIMIT}, headers=headers)
            status = str(r.status_code)
            response_bytes[0] += len(r.content)
        except httpx.HTTPError as e:
            status = type(e).__name__
        statuses[status] = statuses.get(status, 0) + 1
        if status in CONNECT_FAILURES:
            state["consecutive_connect_failures"] += 1
            if max_connect_failures and state["consecutive_connect_failures"] >= max_connect_failures:
                state["server_gone"] = True
        else:
            state["consecutive_connect_failures"] = 0
        if status == "200":
            latencies.append(time.monotonic() - t)

    def stopping() -> bool:
        return state["server_gone"] or time.monotonic() > deadline

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    schedule_seconds = None
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if rate is None:
            counter = iter(range(requests))

            async def worker():
                for i in counter:
                    if stopping():
                        return
                    await one(client, i)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=requests)
            arrivals = np.cumsum(gaps)
            inflight: set[asyncio.Task] = set()
            for i, at in enumerate(arrivals):
                due = t0 + float(at)
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                if stopping():
                    break
                schedule_seconds = float(at)
                if len(inflight) >= concurrency:
                    state["dropped"] += 1
                    continue
                lateness.append(time.monotonic() - due)
                task = asyncio.create_task(one(client, i))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            if inflight:
                await asyncio.gather(*inflight)
    wall = time.monotonic() - t0
    with httpx.Client(timeout=min(timeout, 10.0)) as c:
        after = _scrape(c, url, headers)
    batches, batches_reason = batch_size_delta(before, after)

    ok = statuses.get("200", 0)
    sent = state["sent"]
    errors = {k: v for k, v in sorted(statuses.items()) if k != "200"}
    failures = {k: v for k, v in errors.items() if k not in allowed}
    if state["dropped"]:
        failures["dropped"] = state["dropped"]
    not_sent = requests - sent - state["dropped"]
    stopped = ("server gone" if state["server_gone"] else "time" if time.monotonic() > deadline and not_sent
               else "requests")
    offered = ((sent + state["dropped"]) / schedule_seconds if rate is not None and schedule_seconds
               else sent / wall if wall > 0 else None)
    return {
        "url": url, "mode": "closed" if rate is None else "open", "concurrency": concurrency, "rate": rate,
        "seed": seed, "response_format": body.get("response_format", "b64_json"),
        "images_per_request": images_per_request,
        "requests": sent, "requests_asked": requests, "dropped": state["dropped"], "not_sent": not_sent,
        "seconds": round(wall, 3), "ok": ok,
        "statuses": dict(sorted(statuses.items())), "errors_by_status": errors,
        "failures": failures, "failed": sum(failures.values()),
        "offered_per_second": round(offered, 3) if offered else None,
        "requests_per_second": round(ok / wall, 3) if wall > 0 else None,
        "images_per_second": round(ok * images_per_request / wall, 3) if wall > 0 else None,
        "latency_ms": _percentiles([x * 1000 for x in latencies]),
        "launch_lateness_ms": _percentiles([x * 1000 for x in lateness], (50, 99)) if rate is not None else None,
        "response_bytes_mean": round(response_bytes[0] / ok) if ok else None,
        "server_batch_sizes": batches, "server_batch_sizes_reason": batches_reason,
        "stopped": stopped, "stopped_by_time": stopped == "time",
    }


def _ms(v) -> str:
    return "-" if v is None else f"{v} ms"


def format_result(r: dict) -> str:
    lat = r["latency_ms"]
    mode = (f"open loop at {r['rate']}/s (offered {r['offered_per_second']}/s, at most {r['concurrency']} in flight)"
            if r["mode"] == "open" else f"closed loop of {r['concurrency']}")
    text = (f"{mode}: {r['ok']}/{r['requests']} ok in {r['seconds']}s: {r['requests_per_second']} requests/s, "
            f"{r['images_per_second']} images/s, latency p50 {_ms(lat['p50'])} p90 {_ms(lat['p90'])} "
            f"p99 {_ms(lat['p99'])}; failures {json.dumps(r['failures'])}")
    if r["stopped"] == "server gone":
        text += f"; stopped early: the server is gone ({r['not_sent']} requests not sent)"
    elif r["stopped"] == "time":
        text += f"; stopped by --max-seconds ({r['not_sent']} requests not sent)"
    batches = (json.dumps(r["server_batch_sizes"]) if r["server_batch_sizes"] is not None
               else f"unknown ({r['server_batch_sizes_reason']})")
    return text + f"; server batch sizes {batches}"
