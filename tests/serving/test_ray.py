"""Ray Serve (restok.serving.ray_serve) on the session's local Ray instance (tests/support/ray.py): replicas
answer with the same images as restok generate."""

import base64

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'restok[ray]'")
pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'restok[ray]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")

from restok.cli import main  # noqa: E402
from tests.support.net import free_port  # noqa: E402

pytestmark = pytest.mark.ray


def test_ray_serve_replicas_answer_like_generate(ray_instance, tiny_artifacts, tmp_path):
    from ray import serve

    from restok.serving.app import ServeConfig
    from restok.serving.ray_serve import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(ServeConfig(str(tiny_artifacts), batch_limit=4), replicas=2), name="restok", route_prefix="/")
    try:
        status = serve.status().applications["restok"].deployments["restok"]
        assert sum(status.replica_states.values()) == 2 and status.replica_states.get("RUNNING") == 2
        url = f"http://127.0.0.1:{port}"
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
