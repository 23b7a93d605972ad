"""``restok loadtest``: a bounded load on a restok server; throughput, latency percentiles, failures, batches."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from restok.cli.common import (EXIT_FAILED, EXIT_OK, add_json_arg, finite_float, non_empty_path, non_negative_int,
                               positive_int, say, seed_int, write_json)


def _positive_float(text: str) -> float:
    v = finite_float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _status(text: str) -> str:
    if not (text.isdigit() and len(text) == 3):
        raise argparse.ArgumentTypeError(f"expected an HTTP status such as 429, got {text!r}")
    return text


def add_parser(sub) -> None:
    from restok.serving.loadtest import RESPONSE_FORMATS

    p = sub.add_parser(
        "loadtest", help="a bounded load on a restok server: throughput, p50/p90/p99, failures",
        description="Send up to --requests generation requests (POST /v1/images/generations, httpx, async) and "
                    "report throughput, latency percentiles of the answered (200) requests, every status and "
                    "failure by kind, and the server's batch-size histogram (from /metrics, before and after). "
                    "Closed loop by default (--concurrency requests in flight, each worker sending its next "
                    "request when its last is answered); --rate R makes it an open loop (requests start on a "
                    "Poisson schedule whatever the server does). Stops by itself after the requests, after "
                    "--max-seconds, or early once --max-connect-failures requests in a row could not connect "
                    "(the server is gone); the report is written and the summary printed in every case. Exit "
                    "code 0 when every request was answered 200 (or an --allow-status), 1 when any failed (an "
                    "HTTP error, a connection error, a timeout, a dropped open-loop arrival), 2 for bad options, "
                    "3 when the server cannot be reached at all before the run. Needs pip install 'restok[serve]'.")
    p.add_argument("--url", required=True, type=non_empty_path, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=positive_int, default=8,
                   help="closed loop: requests in flight (workers); open loop (--rate): the cap on requests in "
                        "flight (default 8)")
    p.add_argument("--rate", type=_positive_float, default=None, metavar="R",
                   help="open loop: start R requests per second on average (Poisson arrivals from --seed) "
                        "whatever the server does. An arrival that finds --concurrency requests still in flight "
                        "is dropped (not sent, counted as a failure under 'dropped') instead of queued, so a slow "
                        "server cannot slow the offered load; how late each request started against its schedule "
                        "is reported (launch_lateness_ms). Reported: offered_per_second (arrivals per second of "
                        "the schedule) beside the achieved requests_per_second and images_per_second. "
                        "Default: closed loop")
    p.add_argument("--requests", type=positive_int, default=100,
                   help="requests in all (open loop: arrivals, dropped ones included) (default 100)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="request i asks for image seed SEED+i; the open loop's arrival times are drawn from it "
                        "too, so a run's schedule is repeatable (default 0)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--response-format", choices=RESPONSE_FORMATS, default=None,
                     help="what the server returns: b64_json (default: PNG-encoded images, so the server's PNG "
                          "encoding is measured), png (the raw PNG of one image), tokens (token ids only: the "
                          "server skips the PNG encoding); overrides the --body's")
    fmt.add_argument("--tokens", action="store_true", help="same as --response-format tokens")
    p.add_argument("--body", default='{"class_labels": [0]}',
                   help="the request body as a JSON object (default: one image of class 0; OpenAI's "
                        "{\"prompt\": \"tench\"} works too); each request gets its own \"seed\", and "
                        "\"response_format\" b64_json unless the body or --response-format says otherwise")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--timeout", type=_positive_float, default=120.0,
                   help="per-request timeout in seconds; a request past it counts as a ReadTimeout (default 120)")
    p.add_argument("--max-seconds", type=_positive_float, default=600.0,
                   help="stop starting requests after this long; those in flight are waited for, up to --timeout "
                        "(default 600)")
    p.add_argument("--max-connect-failures", type=non_negative_int, default=10, metavar="N",
                   help="stop early once N requests in a row could not connect (ConnectError, ConnectTimeout: "
                        "the server is gone); the rest are reported as not_sent; 0 never stops early (default 10)")
    p.add_argument("--allow-status", type=_status, nargs="+", default=[], metavar="CODE",
                   help="HTTP statuses counted in the report but not as failures, e.g. 429 for an overload test "
                        "(default: every status but 200 is a failure)")
    add_json_arg(p, "the results")
    p.set_defaults(func=run)


def request_body(args) -> dict:
    try:
        body = json.loads(args.body)
    except ValueError as e:
        raise ValueError(f"--body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ValueError(f"--body must be a JSON object, got {type(body).__name__}")
    fmt = "tokens" if args.tokens else args.response_format
    if fmt is not None:
        body["response_format"] = fmt
    body.setdefault("response_format", "b64_json")
    return body


def run(args) -> int:
    from restok.serving.loadtest import format_result, run_load

    body = request_body(args)
    res = asyncio.run(run_load(args.url, args.concurrency, args.requests, body, args.api_key, args.timeout,
                               args.max_seconds, rate=args.rate, seed=args.seed,
                               max_connect_failures=args.max_connect_failures,
                               allow_statuses=tuple(args.allow_status)))
    write_json(res, args.json)
    say(args, format_result(res))
    if res["failed"]:
        print(f"restok loadtest: {res['failed']} of {res['requests'] + res['dropped']} requests failed: "
              f"{json.dumps(res['failures'])}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
