"""restok serve (restok.serving.app): a real server process on a free port, spoken to over HTTP (images
byte-identical to restok generate, every error status, the API key, /metrics, deadlines and disconnects,
SIGTERM draining), and the backend-error path in-process."""

import base64
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install 'restok[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'restok[serve]'")

from tests.support.server import Server, generate_pngs  # noqa: E402


def test_images_equal_restok_generate_whatever_the_batch(server, tiny_artifacts, tmp_path):
    """Two requests arriving together share runs; each image is byte for byte what restok generate writes
    for its seed and index."""
    reqs = [({"class_labels": [1, 2, 3], "seed": 7}, [1, 2, 3]), ({"class_labels": [4], "n": 2, "seed": 9}, [4, 4])]
    with ThreadPoolExecutor(2) as pool:
        resps = list(pool.map(lambda r: server.post(r[0]), reqs))
    sizes = set()
    for (body, classes), r in zip(reqs, resps):
        assert r.status_code == 200, r.text
        doc = r.json()
        assert [d["class_label"] for d in doc["data"]] == classes and [d["index"] for d in doc["data"]] == list(
            range(len(classes)))
        assert all(d["seed"] == body["seed"] for d in doc["data"])
        got = [base64.b64decode(d["b64_json"]) for d in doc["data"]]
        assert got == generate_pngs(tiny_artifacts, tmp_path, classes, body["seed"])
        sizes.update(doc["timings"]["batch_sizes"])
    assert max(sizes) > 1  # the two requests did share a run
    png = server.post({"class_labels": [2], "seed": 7, "response_format": "png"})
    assert png.headers["content-type"] == "image/png" and png.content == generate_pngs(tiny_artifacts, tmp_path, [2], 7)[0]
    drawn = server.post({"class_labels": [5], "response_format": "tokens"}).json()["data"][0]
    assert isinstance(drawn["seed"], int) and len(drawn["tokens"]) == 128  # a seed left out is drawn and echoed


def test_error_statuses(server):
    assert server.post({"class_labels": [1]}, headers={}).status_code == 401
    assert server.post({"class_labels": [1]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert server.get("/metrics", headers={}).status_code == 200  # scrapers have no key (--protect-metrics)
    assert server.get("/health/ready", headers={}).status_code == 200  # nor have probes
    for body, field in (({"class_labels": [12]}, "class_labels"), ({"class_labels": [1], "temperature": "nan"},
                         "temperature"), ({"class_labels": [1], "top_p": 2}, "top_p"), ({"class_labels": []},
                         "class_labels"), ({"class_labels": [1], "n": 13}, "n"),
                        ({"class_labels": [1], "cfg_schedule": "sigmoid"}, "cfg_schedule"),
                        ({"class_labels": [1, 2], "response_format": "png"}, "response_format"),
                        ({"class_labels": [1], "colour": "red"}, "colour")):
        r = server.post(body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]  # OpenAI's error body: the SDK raises BadRequestError with .param
        assert field in (err["param"] or "") and err["message"] and err["type"] == "invalid_request_error", r.text
    # overload: a bounded queue of 12 images answers 429 with Retry-After, never 5xx
    with ThreadPoolExecutor(8) as pool:
        resps = list(pool.map(lambda i: server.post({"class_labels": [i % 10], "n": 6, "seed": i}), range(8)))
    codes = [r.status_code for r in resps]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    assert all(r.headers.get("retry-after") for r in resps if r.status_code == 429)
    assert server.get("/health/ready").status_code == 200


def test_models_and_metrics(server):
    card = server.get("/v1/models").json()["data"][0]
    assert card["max_batch"] == 4 and card["num_classes"] == 10 and card["schedule"]["num_steps"] == 9
    server.post({"class_labels": [1], "response_format": "tokens"})
    text = server.get("/metrics").text
    for name in ('restok_requests_total{status="200"}', 'restok_requests_total{status="400"}', "restok_images_total",
                 "restok_request_seconds_bucket", "restok_queue_seconds_bucket", "restok_batch_run_seconds_bucket",
                 'restok_batch_size_bucket{le="4.0"}', 'restok_pass_seconds_bucket{le=', "restok_queued_images",
                 "restok_running_images", f'artifacts_sha256="{card["artifacts_sha256"]}"'):
        assert name in text, name


def test_deadline_and_disconnect(tiny_artifacts):
    s = Server(tiny_artifacts, "--batch-limit", "1", "--request-timeout", "0.3", key=None)
    try:
        r = s.post({"class_labels": list(range(10)), "n": 2, "response_format": "tokens"})
        assert r.status_code == 504 and "--request-timeout" in r.text
        # a client that goes away: its queued images are dropped, the server keeps serving
        with pytest.raises(httpx.ReadTimeout):
            s.post({"class_labels": list(range(10)), "response_format": "tokens"}, timeout=0.1)
        time.sleep(1.0)
        assert s.get("/health/ready").status_code == 200
        assert 'restok_queued_images 0.0' in s.get("/metrics").text
        assert s.post({"class_labels": [3], "response_format": "tokens"}).status_code == 200
    finally:
        s.stop()


def test_sigterm_drains(tiny_artifacts):
    s = Server(tiny_artifacts, "--batch-limit", "2", key=None)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(s.post, {"class_labels": list(range(10)), "n": 3, "response_format": "tokens"})
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert s.get("/health/ready").status_code == 503  # not ready while it drains
        assert s.post({"class_labels": [1]}).status_code == 503
        r = long.result(timeout=120)
    assert r.status_code == 200 and len(r.json()["data"]) == 30  # the in-flight work finished
    assert s.proc.wait(timeout=60) == 0


def test_a_failing_backend_fails_its_requests_only(tiny_artifacts):
    """A run that raises answers its requests with 500 and the server goes on (the app in-process: the
    fault is injected into its service)."""
    from fastapi.testclient import TestClient

    from restok.serving.app import ServeConfig, Service, create_app

    class Flaky(Service):
        def _run_batch(self, jobs):
            if any(j.label == 9 for j in jobs):
                raise RuntimeError("device lost")
            return super()._run_batch(jobs)

    cfg = ServeConfig(str(tiny_artifacts), batch_limit=1, warmup=False)
    with TestClient(create_app(cfg, Flaky(cfg))) as client:
        bad = client.post("/v1/images/generations", json={"class_labels": [9]})
        assert bad.status_code == 500 and "device lost" in bad.text
        assert client.post("/v1/images/generations", json={"class_labels": [1]}).status_code == 200


def test_access_log_request_ids_and_metrics_of_every_answer(tiny_artifacts, capsys):
    """One JSON line per API request with its id (the client's X-Request-ID, else a new one, echoed), and
    every answer counted by status with its latency — framework 404s and body-limit 413s included."""
    from fastapi.testclient import TestClient

    from restok.serving.app import ServeConfig, create_app

    cfg = ServeConfig(str(tiny_artifacts), batch_limit=2, warmup=False)
    with TestClient(create_app(cfg)) as client:
        capsys.readouterr()
        ok = client.post("/v1/images/generations", json={"prompt": "4", "response_format": "tokens"},
                         headers={"X-Request-ID": "job-42.a"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "job-42.a"
        odd = client.post("/v1/images/generations", json={"prompt": "4"}, headers={"X-Request-ID": "a b<script>"})
        assert odd.status_code == 200 and len(odd.headers["x-request-id"]) == 32 != "a b"  # not echoed: made
        assert client.get("/nowhere").status_code == 404
        assert client.post("/v1/images/generations", content=b"x" * (2 << 20),
                           headers={"content-type": "application/json"}).status_code == 413
        assert client.get("/health/ready").status_code == 200  # probes: neither logged nor counted
        text = client.get("/metrics").text
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [(d["request_id"], d["status"]) for d in lines][:1] == [("job-42.a", 200)]
    assert lines[0]["images"] == 1 and lines[0]["path"] == "/v1/images/generations" and lines[0]["ms"] > 0
    assert [d["status"] for d in lines] == [200, 200, 404, 413], lines
    for name in ('restok_requests_total{status="200"} 2.0', 'restok_requests_total{status="404"} 1.0',
                 'restok_requests_total{status="413"} 1.0', 'restok_request_seconds_count{status="200"} 2.0',
                 "process_resident_memory_bytes", "process_open_fds"):
        assert name in text, name
    assert 'status="503"' not in text and "restok_requests_total{status=\"200\"} 3.0" not in text
