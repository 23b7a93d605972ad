"""``restok loadtest``: a bounded load on a restok server; throughput, latency percentiles, errors, batches."""

from __future__ import annotations

import asyncio
import json

from restok.cli.common import EXIT_OK, add_json_arg, finite_float, non_empty_path, positive_int, say, write_json


def add_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="a bounded load on a restok server: throughput, p50/p90/p99, errors",
                       description="Send --requests generation requests with --concurrency in flight (httpx, "
                                   "async) and report throughput, latency percentiles, errors by status and the "
                                   "server's batch-size histogram (from /metrics). Stops by itself after the "
                                   "requests or --max-seconds. Needs pip install 'restok[serve]'.")
    p.add_argument("--url", required=True, type=non_empty_path, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (default 8)")
    p.add_argument("--requests", type=positive_int, default=100, help="requests in all (default 100)")
    p.add_argument("--body", default='{"class_labels": [0], "response_format": "tokens"}',
                   help="the request body as JSON (each request gets its own seed)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--timeout", type=finite_float, default=120.0, help="per-request timeout in seconds (default 120)")
    p.add_argument("--max-seconds", type=finite_float, default=600.0, help="stop after this long (default 600)")
    add_json_arg(p, "the results")
    p.set_defaults(func=run)


def run(args) -> int:
    from restok.serving.loadtest import format_result, run_load

    try:
        body = json.loads(args.body)
    except ValueError as e:
        raise ValueError(f"--body is not JSON: {e}") from e
    res = asyncio.run(run_load(args.url, args.concurrency, args.requests, body, args.api_key, args.timeout,
                               args.max_seconds))
    write_json(res, args.json)
    if args.json != "-":
        say(args, format_result(res))
    return EXIT_OK
