"""restok serve as real clients meet it: the official ``openai`` SDK unmodified (images, models, every error
class), start-up errors as one line, the bounds on what a client can hold (body size, half-sent
requests), a failing request inside a shared run, and random request bodies that never get a 5xx."""

import base64
import json
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install 'restok[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'restok[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install 'restok[dev]'")

from tests.support.cli import ENV, one_line_error, run_cli  # noqa: E402
from tests.support.server import KEY, generate_pngs  # noqa: E402


def _client(server, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_the_sdk_generates_what_restok_generate_writes(server, tiny_artifacts, tmp_path):
    client = _client(server)
    [card] = client.models.list().data
    assert client.models.retrieve(card.id).id == card.id and isinstance(card.created, int) and card.created > 0
    size = server.get("/v1/models").json()["data"][0]["image_size"]
    # the call a user of OpenAI's SDK writes, with restok's seed as an extra field
    res = client.images.generate(model=card.id, prompt="Three", n=2, size=f"{size}x{size}", quality="standard",
                                 user="alice", extra_body={"seed": 7})
    assert [d.revised_prompt for d in res.data] == ["three", "three"] and res.size == f"{size}x{size}"
    assert [base64.b64decode(d.b64_json) for d in res.data] == generate_pngs(tiny_artifacts, tmp_path, [3, 3], 7)
    by_id = client.images.generate(prompt="3", extra_body={"seed": 7})  # a class id as the prompt
    assert base64.b64decode(by_id.data[0].b64_json) == generate_pngs(tiny_artifacts, tmp_path, [3, 3], 7)[0]
    webp = client.images.generate(prompt="3", output_format="webp", extra_body={"seed": 7})
    assert base64.b64decode(webp.data[0].b64_json)[8:12] == b"WEBP"


def test_the_sdk_raises_its_own_error_classes(server):
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="unicorn")
    assert e.value.param == "prompt" and "unicorn" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="three", extra_body={"top_p": 2})
    assert e.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="three", size="1024x1024")
    assert e.value.param == "size" and "x" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="three", response_format="url")
    assert e.value.param == "response_format"
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="three")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").images.generate(prompt="three")
    # a bounded queue of 12 images: more at once is RateLimitError (429), never a server error
    errors = []

    def one(i):
        try:
            client.images.generate(prompt=str(i % 10), n=6, extra_body={"seed": i, "response_format": "tokens"})
        except openai.APIStatusError as err:
            errors.append(err)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))
    assert errors and all(isinstance(err, openai.RateLimitError) for err in errors), errors
    assert server.get("/health/ready").status_code == 200


def test_bodies_over_the_limit_and_bodies_that_are_not_json(server):
    big = server.post({"class_labels": [1], "user": "x" * (2 << 20)})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    # 1 MiB + 64 KiB with no Content-Length (chunked): counted as it comes, refused at its last chunk
    chunks = (b"x" * (64 << 10) for _ in range(17))
    chunked = httpx.post(server.url + "/v1/images/generations", content=chunks, timeout=30,
                         headers={**server.headers, "content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    nan = httpx.post(server.url + "/v1/images/generations", content=b'{"class_labels": [1], "temperature": NaN}',
                     headers={**server.headers, "content-type": "application/json"}, timeout=30)
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "temperature"  # NaN is not a temperature
    broken = httpx.post(server.url + "/v1/images/generations", content=b'{"class_labels": [1',
                        headers={**server.headers, "content-type": "application/json"}, timeout=30)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    missing = server.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong_method = server.get("/v1/images/generations")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


def test_half_sent_requests_are_closed_and_do_not_hold_the_server(server):
    """A client that opens connections and never finishes its request's headers is cut off after
    --header-timeout (3 s here); one that sends its headers and only part of its body gets 408 after
    --body-timeout (3 s here); meanwhile the server answers everyone else."""
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")  # no blank line: headers unfinished
        socks.append(s)
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    slow.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"class_".encode())
    assert server.post({"class_labels": [2], "response_format": "tokens"}).status_code == 200
    t0 = time.monotonic()
    assert socks[0].recv(1024) == b""  # closed by the server, nothing answered
    assert 1.5 < time.monotonic() - t0 < 20
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = slow.recv(4096)
        if not chunk:
            break
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(body)["error"]["code"] == "timeout"
    for s in [*socks, slow]:
        s.close()
    left = socket.create_connection(("127.0.0.1", server.port), timeout=30)  # leaves before its body is whole
    left.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "X-Request-ID: left-early\r\nContent-Length: 100\r\n\r\n{".encode())
    time.sleep(0.3)
    left.close()
    assert server.get("/health/ready").status_code == 200
    end = time.time() + 10
    while '"left-early"' not in server.log() and time.time() < end:
        time.sleep(0.1)
    logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert [d["status"] for d in logged if d["request_id"] == "left-early"] == [499]  # not a 500: nothing failed
    assert 408 in [d["status"] for d in logged]


def _serve(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "restok", "serve", *map(str, args)], env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_start_up_errors_are_one_line(tiny_artifacts):
    art = ["--artifacts", tiny_artifacts]
    for args, env, words in ((["--port", "99999"], None, "0..65535"),
                             (["--max-wait-ms", "-1"], None, "--max-wait-ms"),
                             (["--batch-limit", "99"], None, "max batch"),
                             (["--api-key", ""], None, "empty"),
                             ([], {"RESTOK_API_KEY": " "}, "RESTOK_API_KEY"),
                             ([], {"RESTOK_SERVE_PORT": "http"}, "RESTOK_SERVE_PORT"),
                             (["--protect-metrics"], None, "API key"),
                             (["--ray", "--header-timeout", "3"], None, "--header-timeout applies without --ray")):
        rc, _, err = run_cli("serve", *art, *args, env=env, timeout=120)
        assert rc == 2 and words in err, (args, env, err[-1500:])
        one_line_error(err)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        rc, _, err = run_cli("serve", *art, "--port", taken.getsockname()[1], timeout=120)
        assert rc == 3 and "choose another --port" in err, err[-1500:]
        one_line_error(err)


def test_port_zero_announces_the_real_port_and_env_sets_options(tiny_artifacts):
    p = _serve("--artifacts", tiny_artifacts, env={"RESTOK_SERVE_PORT": "0", "RESTOK_SERVE_MAX_QUEUE": "3"})
    try:
        line = p.stdout.readline()
        assert line.startswith("restok serve: http://127.0.0.1:"), line + p.stderr.read()[-2000:]
        url = line.split()[2]
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/images/generations", json={"class_labels": [1], "n": 4}, timeout=60)
        assert r.status_code == 400 and "--max-queue" in r.json()["error"]["message"]  # RESTOK_SERVE_MAX_QUEUE=3
    finally:
        p.terminate()
        assert p.wait(timeout=60) == 0


def test_a_failing_request_in_a_shared_run_fails_alone(tiny_artifacts):
    """Two requests batched together, one of which the backend cannot run: only that one gets 500."""
    from fastapi.testclient import TestClient

    from restok.serving.app import ServeConfig, Service, create_app

    runs = []

    class Flaky(Service):
        def _run_batch(self, jobs):
            runs.append(len(jobs))
            if any(j.label == 9 for j in jobs):
                raise RuntimeError("device lost")
            return super()._run_batch(jobs)

    cfg = ServeConfig(str(tiny_artifacts), batch_limit=4, max_wait_ms=500, warmup=False)
    svc = Flaky(cfg)
    with TestClient(create_app(cfg, svc)) as client, ThreadPoolExecutor(2) as pool:
        post = lambda body: client.post("/v1/images/generations", json=body)  # noqa: E731
        bad, good = pool.map(post, [{"class_labels": [9], "response_format": "tokens"},
                                    {"class_labels": [1, 2], "response_format": "tokens", "seed": 3}])
    assert bad.status_code == 500 and "device lost" in bad.json()["error"]["message"]
    assert good.status_code == 200 and [d["class_label"] for d in good.json()["data"]] == [1, 2]
    assert runs[0] == 3 and sorted(runs[1:]) == [1, 2]  # one shared run, then each request alone


FIELDS = ["model", "prompt", "class_labels", "n", "size", "quality", "style", "user", "seed", "cfg_scale",
          "cfg_schedule", "cfg_start", "temperature", "top_k", "top_p", "response_format", "output_format"]


def _random_value(rng: random.Random, depth=0):
    kind = rng.randrange(11 if depth < 2 else 8)
    return [lambda: None, lambda: rng.choice([True, False]), lambda: rng.randint(-3, 12),
            lambda: rng.choice([2**31, 2**63, -2**63, 10**30]), lambda: rng.uniform(-5, 5),
            lambda: rng.choice([1e308, -0.0, 1e-320]),
            lambda: rng.choice(["", "three", "3", "Nine", "b64_json", "tokens", "png", "webp", "url", "auto",
                                "1024x1024", "sigmoid", "linear", "\u00e9\u6f22\U0001F600", "0x10", " 1 "]),
            lambda: "z" * rng.choice([1, 300, 5000]),
            lambda: [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
            lambda: [rng.randint(0, 9) for _ in range(rng.randrange(1, 6))],
            lambda: {"k": _random_value(rng, depth + 1)}][kind]()


VALID = {"n": lambda rng: rng.randint(1, 2), "seed": lambda rng: rng.randrange(2**40), "size": lambda rng: "auto",
         "quality": lambda rng: "hd", "user": lambda rng: "u1", "cfg_scale": lambda rng: rng.uniform(0, 5),
         "cfg_schedule": lambda rng: rng.choice(["step", "linear", "constant"]), "top_k": lambda rng: rng.randint(0, 50),
         "temperature": lambda rng: rng.uniform(0, 2), "top_p": lambda rng: rng.uniform(0, 1),
         "class_labels": lambda rng: [rng.randint(0, 9) for _ in range(rng.randint(1, 3))]}


def test_random_bodies_get_a_json_answer_and_never_a_server_error(server):
    """Valid bodies with 0-2 fields made random: a correct 200 or a 4xx in OpenAI's body, never a 5xx."""
    rng = random.Random(2026)
    statuses = {}
    for _ in range(120):
        body = {"prompt": rng.choice(["5", "Seven"]), "response_format": "tokens"}
        for f in rng.sample(sorted(VALID), rng.randrange(0, 4)):
            body[f] = VALID[f](rng)
        for f in rng.sample(FIELDS, rng.choice([0, 0, 1, 2])):
            body[f] = _random_value(rng)
        if rng.random() < 0.05:
            body[rng.choice(["colour", "", "__proto__"])] = 1
        r = server.post(body, timeout=120)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 404, 429), (body, r.status_code, r.text[:500])
        if r.status_code == 200:
            if r.headers["content-type"] == "image/png":
                continue
            data = r.json()["data"]
            want = len(body["class_labels"]) if isinstance(body.get("class_labels"), list) else 1
            assert len(data) == want * body.get("n", 1), (body, len(data))
        else:
            err = r.json()["error"]
            assert err["message"] and err["type"] and len(err["message"]) < 2000, (body, r.text[:500])
    assert statuses.get(200, 0) >= 5 and statuses.get(400, 0) >= 20, statuses
    assert server.get("/health/ready").status_code == 200
    assert json.loads(server.get("/health/live").text)["status"] == "live"
