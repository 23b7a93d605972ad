"""Ray Serve (restok.serving.ray_serve) on the session's local Ray instance (tests/support/ray.py): replicas
answer with the same images as restok generate."""

import base64
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'restok[ray]'")
pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'restok[ray]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")

from restok.cli import main  # noqa: E402
from tests.support.net import free_port  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def serve_url(ray_instance):
    """Serve's HTTP proxy, started once: a running Serve keeps its first port (a later start is ignored)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def test_ray_serve_replicas_answer_like_generate(serve_url, tiny_artifacts, tmp_path):
    from ray import serve

    from restok.serving.app import ServeConfig
    from restok.serving.ray_serve import build

    serve.run(build(ServeConfig(str(tiny_artifacts), batch_limit=4), replicas=2), name="restok", route_prefix="/")
    try:
        status = serve.status().applications["restok"].deployments["restok"]
        assert sum(status.replica_states.values()) == 2 and status.replica_states.get("RUNNING") == 2
        url = serve_url
        assert httpx.get(url + "/health/ready", timeout=30).status_code == 200
        out = tmp_path / "gen"
        assert main(["generate", "--artifacts", str(tiny_artifacts), "--classes", "3", "4", "--seed", "11",
                     "--out", str(out)]) == 0
        want = [(out / f"{i:04d}_class{c}.png").read_bytes() for i, c in enumerate([3, 4])]
        for _ in range(4):  # several requests: Ray routes them over both replicas
            r = httpx.post(url + "/v1/images/generations", json={"class_labels": [3, 4], "seed": 11}, timeout=120)
            assert r.status_code == 200, r.text
            assert [base64.b64decode(d["b64_json"]) for d in r.json()["data"]] == want
    finally:
        serve.delete("restok")


def _images_total(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^restok_images_total (\S+)$", text, re.M).group(1))


def test_ray_metrics_sum_over_replicas_and_a_drain_cuts_no_request(serve_url, tiny_artifacts):
    """Whichever replica answers a scrape, the totals are the sum over both replicas (never going down);
    a drain with 16 requests in flight answers all 16 (200, or 503 when their work had not started)."""
    from ray import serve

    from restok.serving.app import ServeConfig
    import ray

    from restok.serving.cluster import REPORT_SECONDS, drain, get_board
    from restok.serving.ray_serve import build

    name = "restok-cluster-test"
    serve.run(build(ServeConfig(str(tiny_artifacts), batch_limit=2, max_queue=64), replicas=2, drain_seconds=60),
              name=name, route_prefix="/")
    url = serve_url
    post = lambda i, n=1: httpx.post(url + "/v1/images/generations", timeout=120,  # noqa: E731
                                     json={"class_labels": [i % 10], "n": n, "seed": i, "response_format": "tokens"})
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, i) for i in range(40)]
            seen = []
            for _ in range(10):
                seen.append(_images_total(url))
                time.sleep(0.2)
            assert all(f.result().status_code == 200 for f in futures)
        assert seen == sorted(seen), seen  # never a reset, whichever replica answered
        time.sleep(3 * REPORT_SECONDS)
        assert _images_total(url) == 40.0
        text = httpx.get(url + "/metrics", timeout=30).text
        assert len(set(re.findall(r'^process_resident_memory_bytes\{replica="([^"]+)"\}', text, re.M))) == 2
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(post, i, 2) for i in range(16)]
            board, end = get_board(name, create=False), time.time() + 60
            while ray.get(board.busy.remote())[0] == 0 and time.time() < end:  # the replicas hold work
                time.sleep(0.05)
            assert drain(name, 60)
            statuses = [f.result().status_code for f in futures]  # an exception here is a cut request
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        assert httpx.get(url + "/health/ready", timeout=30).status_code == 503  # drained: not ready
    finally:
        serve.delete(name)
