"""Ray Serve (restok.serving.ray_serve) on the session's local Ray instance (tests/support/ray.py): replicas
answer with the same images as restok generate; `restok serve --ray` joined to that instance sums its
metrics over replicas and drains on SIGTERM without cutting a request."""

import base64
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'restok[ray]'")
pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'restok[ray]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")

from restok.cli import main  # noqa: E402
from tests.support.cli import ENV  # noqa: E402
from tests.support.net import free_port  # noqa: E402

pytestmark = pytest.mark.ray



def _images_total(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^restok_images_total (\S+)$", text, re.M).group(1))


def _wait_ready(proc: subprocess.Popen, url: str, seconds: float = 180) -> None:
    end = time.time() + seconds
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(url + "/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"restok serve --ray was not ready in {seconds:g} s")


def test_serve_ray_sums_metrics_over_replicas_and_sigterm_cuts_no_request(ray_instance, tiny_artifacts):
    """`restok serve --ray --replicas 2` as a user starts it (RAY_ADDRESS: the session's instance). Whichever
    replica answers a scrape, the totals are the sum over both, never going down, and end equal to the images
    served; SIGTERM with 16 requests in flight answers all 16 (200, or 503 when their work had not started)
    and the process exits 0. First in this file: it starts and shuts down Serve before serve_url starts it."""
    import ray

    from restok.serving.cluster import REPORT_SECONDS, get_board
    from restok.serving.ray_serve import APP_NAME

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray_env = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}  # RAY_AUTH_MODE=token since ray.init
    proc = subprocess.Popen([sys.executable, "-m", "restok", "serve", "--ray", "--replicas", "2", "--artifacts",
                             str(tiny_artifacts), "--port", str(port), "--batch-limit", "2", "--drain-seconds", "60"],
                            env={**ENV, **ray_env, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    post = lambda i, n=1: httpx.post(url + "/v1/images/generations", timeout=120,  # noqa: E731
                                     json={"class_labels": [i % 10], "n": n, "seed": i, "response_format": "tokens"})
    try:
        _wait_ready(proc, url)
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
            board, end = get_board(APP_NAME, create=False), time.time() + 60
            while ray.get(board.busy.remote())[0] == 0 and time.time() < end:  # the replicas hold work
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            statuses = [f.result().status_code for f in futures]  # an exception here is a cut request
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert "stopping" not in out, out  # drained within --drain-seconds
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            from ray import serve

            serve.shutdown()  # what the killed process left, so serve_url starts afresh

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
