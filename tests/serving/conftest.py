"""One real server for the tests of tests/serving/ that share it (the app's and the load generator's)."""

import pytest


@pytest.fixture(scope="package")
def server(tiny_artifacts):
    from tests.support.server import Server  # needs the serve extra: the test files skip without it

    # short header and body timeouts: tests/serving/test_openai.py waits them out (every client here sends
    # its headers and body at once)
    s = Server(tiny_artifacts, "--batch-limit", "4", "--max-wait-ms", "30", "--max-queue", "12",
               "--header-timeout", "3", "--body-timeout", "3")
    yield s
    s.stop()
