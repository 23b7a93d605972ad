"""restok loadtest (restok.serving.loadtest) against a real server: every request answered, latencies and the
server's batch sizes reported; the open loop keeps its schedule; a server that dies mid-run gives a report of
failures (exit 1), one that never answered an exit 3."""

import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("httpx", reason="the serve extra is not installed: pip install 'restok[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'restok[serve]'")

import httpx  # noqa: E402

from restok.cli import main  # noqa: E402
from restok.serving.loadtest import batch_size_delta  # noqa: E402
from tests.support.cli import ENV, one_line_error, run_cli  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.server import KEY, Server  # noqa: E402


def test_loadtest_reports(server, tmp_path):
    out = tmp_path / "load.json"
    assert main(["loadtest", "--url", server.url, "--concurrency", "4", "--requests", "12", "--api-key", KEY,
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ok"] == 12 and r["errors_by_status"] == {} and r["latency_ms"]["p99"] >= r["latency_ms"]["p50"] > 0
    assert sum(r["server_batch_sizes"].values()) >= 3
    assert r["mode"] == "closed" and r["rate"] is None and r["statuses"] == {"200": 12} and r["failures"] == {}
    assert r["response_format"] == "b64_json" and r["response_bytes_mean"] > 500  # PNGs by default, not tokens
    assert r["images_per_second"] == r["requests_per_second"] > 0


def test_loadtest_open_loop_keeps_its_schedule(server, tmp_path):
    """--rate: Poisson arrivals from --seed, sent on schedule; offered and achieved rates reported."""
    out = tmp_path / "open.json"
    rate, n, seed = 4.0, 12, 3
    assert main(["loadtest", "--url", server.url, "--rate", str(rate), "--requests", str(n), "--seed", str(seed),
                 "--concurrency", "8", "--tokens", "--api-key", KEY, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    last_arrival = float(np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))[-1])
    assert r["mode"] == "open" and r["rate"] == rate and r["response_format"] == "tokens"
    assert r["ok"] == n and r["dropped"] == 0 and r["failures"] == {} and r["statuses"] == {"200": n}
    assert r["seconds"] >= last_arrival  # the last request was not sent before its time
    assert r["offered_per_second"] == pytest.approx(n / last_arrival, rel=0.15)
    assert 0 < r["requests_per_second"] <= r["offered_per_second"] * 1.15
    assert r["launch_lateness_ms"]["p50"] < 250 and r["latency_ms"]["p50"] > 0
    assert sum(r["server_batch_sizes"].values()) >= 1


def _kill_after_images(s: Server, images: int, latest: float) -> threading.Thread:
    """Kill the server (SIGKILL: no drain) once it has made `images` images, or after `latest` seconds."""
    def killer():
        end = time.monotonic() + latest
        while time.monotonic() < end:
            try:
                m = re.search(r"^restok_images_total ([0-9.e+]+)$", s.get("/metrics").text, re.M)
                if m and float(m.group(1)) >= images:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        s.proc.kill()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    return t


def test_loadtest_survives_the_server_dying(tiny_artifacts, tmp_path):
    """The server killed mid-run: connection errors counted by kind, the run stops early, the report is written,
    exit 1 (a check failed), no traceback."""
    s = Server(tiny_artifacts, key=None)
    out = tmp_path / "dead.json"
    try:
        p = subprocess.Popen([sys.executable, "-m", "restok", "loadtest", "--url", s.url, "--concurrency", "4",
                              "--requests", "100000", "--max-seconds", "60", "--json", str(out)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # 8 images made with at most 4 requests in flight: at least 4 answers have reached the load generator
        killer = _kill_after_images(s, 8, latest=20)
        stdout, stderr = p.communicate(timeout=90)
        killer.join()
    finally:
        s.stop()
    assert p.returncode == 1, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    assert "requests failed" in stderr and "the server is gone" in stdout
    r = json.loads(out.read_text())
    assert r["ok"] >= 4 and r["stopped"] == "server gone" and r["not_sent"] > 0
    assert r["failures"].get("ConnectError", 0) >= 10 and r["failed"] == r["requests"] - r["ok"] > 0
    assert set(r["failures"]) <= {"ConnectError", "ConnectTimeout", "ReadError", "RemoteProtocolError",
                                  "WriteError"}, r["failures"]
    assert r["server_batch_sizes"] is None and "/metrics" in r["server_batch_sizes_reason"]
    assert r["latency_ms"]["p50"] > 0  # the answered ones still measured


def test_loadtest_without_a_server_exits_3():
    rc, out, err = run_cli("loadtest", "--url", f"http://127.0.0.1:{free_port()}", "--requests", "3", timeout=120)
    assert rc == 3 and "not reachable" in err and out == "", err
    one_line_error(err)


def test_batch_histogram_never_goes_negative():
    """A missing scrape or counts that went down (a restarted server, another replica) give null and a reason."""
    b = {"1.0": 5, "4.0": 2, "+Inf": 0}
    assert batch_size_delta((b, None), ({"1.0": 6, "4.0": 4, "+Inf": 0}, None)) == ({"1.0": 1, "4.0": 2, "+Inf": 0},
                                                                                     None)
    assert batch_size_delta((b, None), ({"1.0": 1, "4.0": 9, "+Inf": 0}, None)) == (None, "counter reset")
    got, why = batch_size_delta((b, None), (None, "GET /metrics failed: ConnectError"))
    assert got is None and "ConnectError" in why
    got, why = batch_size_delta((None, "GET /metrics answered 401"), (b, None))
    assert got is None and "401" in why
