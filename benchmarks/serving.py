"""Dynamic batching against one image per batch, measured side by side: real `restok serve` processes on
free loopback ports, driven by `restok loadtest`, alternated for several rounds (the machine's load drifts).

    restok export --out /tmp/bundled
    python benchmarks/serving.py --artifacts /tmp/bundled --json serving.json

Each round starts a server with --batch-limit N (dynamic batching) and one with --batch-limit 1, runs the same
load against each (concurrency C, R requests of one image) and stops it with SIGTERM. Reported: medians
over rounds of images/s and latency percentiles, the paired ratio per round, errors by status, the
server's batch-size histogram. ``--overload`` adds one run with a small queue (16) and twice the
concurrency: it must answer only 200 and 429, and the server must still be ready afterwards.
Needs pip install 'restok[serve]'. Talks only to servers it started, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from report import report

RESTOK = [sys.executable, "-m", "restok"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def serve_and_load(artifacts: str, batch_limit: int, max_queue: int, concurrency: int, requests: int,
                   out: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out.with_suffix(".log"), "w")
    server = subprocess.Popen([*RESTOK, "serve", "--artifacts", artifacts, "--port", str(port), "--batch-limit",
                               str(batch_limit), "--max-queue", str(max_queue)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not ready(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server with --batch-limit {batch_limit} did not become ready: see {log.name}")
            time.sleep(0.3)
        subprocess.run([*RESTOK, "loadtest", "--url", url, "--concurrency", str(concurrency), "--requests",
                        str(requests), "--max-seconds", "600", "--json", str(out), "--tokens",  # batching, not PNG encoding
                        "--allow-status", "429"], check=True,  # the overload run expects 429s
                       stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
        result["ready_after"] = ready(url)
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, help="an export folder (restok export --out DIR)")
    ap.add_argument("--batch-limit", type=int, default=16, help="the dynamic-batching server's batch limit")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--overload", action="store_true", help="add the queue-16, double-concurrency run")
    ap.add_argument("--require", type=float, help="exit 1 unless the paired ratio reaches this (issue 14 asked 3)")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="restok-serving-"))
    runs: dict[str, list[dict]] = {"batched": [], "batch1": []}
    for r in range(a.rounds):
        for name, mb in (("batched", a.batch_limit), ("batch1", 1)):
            res = serve_and_load(a.artifacts, mb, 1024, a.concurrency, a.requests, work / f"{name}_{r}.json")
            runs[name].append(res)
            print(f"round {r} {name}: {res['images_per_second']:.1f} images/s, p99 {res['latency_ms']['p99']} ms, "
                  f"errors {res['errors_by_status']}", file=sys.stderr, flush=True)

    def summary(rs: list[dict]) -> dict:
        return {"images_per_second": statistics.median(x["images_per_second"] for x in rs),
                "latency_ms": {q: statistics.median(x["latency_ms"][q] for x in rs) for q in ("p50", "p90", "p99")},
                "failed_requests": sum(sum(x["errors_by_status"].values()) for x in rs),
                "server_batch_sizes_last_round": rs[-1]["server_batch_sizes"]}

    out = {"artifacts": a.artifacts, "cpu_count": os.cpu_count(), "concurrency": a.concurrency,
           "requests": a.requests, "rounds": a.rounds, "batched": summary(runs["batched"]),
           "batch1": summary(runs["batch1"]),
           "paired_ratio": statistics.median(x["images_per_second"] / y["images_per_second"]
                                             for x, y in zip(runs["batched"], runs["batch1"]))}
    if a.overload:
        res = serve_and_load(a.artifacts, a.batch_limit, 16, 2 * a.concurrency, int(1.5 * a.requests),
                             work / "overload.json")
        out["overload"] = {"status_counts": {"200": res["ok"], **res["errors_by_status"]},
                           "only_200_and_429": set(res["errors_by_status"]) <= {"429"},
                           "ready_after": res["ready_after"]}
    met = [a.require is None or out["paired_ratio"] >= a.require]
    if a.overload:
        met.append(out["overload"]["only_200_and_429"] and out["overload"]["ready_after"])
    report(out, a.json, all(met))


if __name__ == "__main__":
    main()
