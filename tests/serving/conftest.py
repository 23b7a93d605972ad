"""One real server for the tests of tests/serving/ that share it (the app's and the load generator's)."""

import pytest


@pytest.fixture(scope="package")
def server(tiny_artifacts):
    from tests.support.server import Server  # needs the serve extra: the test files skip without it

    s = Server(tiny_artifacts, "--batch-limit", "4", "--max-wait-ms", "30", "--max-queue", "12")
    yield s
    s.stop()
