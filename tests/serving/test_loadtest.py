"""restok loadtest (restok.serving.loadtest) against a real server: every request answered, latencies and the
server's batch sizes reported."""

import json

import pytest

pytest.importorskip("httpx", reason="the serve extra is not installed: pip install 'restok[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'restok[serve]'")

from restok.cli import main  # noqa: E402
from tests.support.server import KEY  # noqa: E402


def test_loadtest_reports(server, tmp_path):
    out = tmp_path / "load.json"
    assert main(["loadtest", "--url", server.url, "--concurrency", "4", "--requests", "12", "--api-key", KEY,
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ok"] == 12 and r["errors_by_status"] == {} and r["latency_ms"]["p99"] >= r["latency_ms"]["p50"] > 0
    assert sum(r["server_batch_sizes"].values()) >= 3
