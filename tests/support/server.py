"""``restok serve`` in a subprocess on a free port of 127.0.0.1, for the tests that speak to a real server
over HTTP (tests/serving/). Needs the serve extra: import it after ``pytest.importorskip("httpx")``."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from tests.support.cli import ENV
from tests.support.net import free_port

KEY = "test-key-123"


class Server:
    """``restok serve`` in a subprocess on 127.0.0.1; waits until /health/ready says yes."""

    def __init__(self, artifacts, *args, key=KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        cmd = [sys.executable, "-m", "restok", "serve", "--artifacts", str(artifacts), "--port", str(self.port), *args]
        if key:
            cmd += ["--api-key", key]
        # its output goes to a file, not a pipe: one access-log line per request would fill a pipe nobody
        # reads (64 KiB, a few hundred requests) and block the server
        fd, self.log_path = tempfile.mkstemp(prefix="restok-serve-", suffix=".log")
        with os.fdopen(fd, "w") as out:
            self.proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                if httpx.get(self.url + "/health/ready", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def post(self, body, headers=None, timeout=120):
        return httpx.post(self.url + "/v1/images/generations", json=body, timeout=timeout,
                          headers=self.headers if headers is None else headers)

    def get(self, path, headers=None):
        return httpx.get(self.url + path, headers=self.headers if headers is None else headers, timeout=30)

    def log(self) -> str:
        """What the server has written so far (stdout and stderr: the banner, access-log lines, errors)."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log_path)


def generate_pngs(artifacts, tmp_path, classes, seed) -> list[bytes]:
    """The PNGs restok generate writes for ``classes`` and ``seed``: what the server must answer byte for byte."""
    from restok.cli import main

    out = tmp_path / f"gen_{seed}"
    assert main(["generate", "--artifacts", str(artifacts), "--classes", *map(str, classes), "--seed", str(seed),
                 "--out", str(out)]) == 0
    return [(out / f"{i:04d}_class{c}.png").read_bytes() for i, c in enumerate(classes)]
