"""The local Ray instance of the tests marked ``ray`` (tests/serving/test_ray.py, tests/jobs/test_sample_ray.py),
started once per session: 4 logical CPUs on the 2-core machine (a 2-actor Ray Data pool with num_cpus=2
starves its read tasks). The tests that use it run last, together, so Ray is up only while they run and is
shut down at the end of the session. Registered from tests/conftest.py; imports ray only when a test needs
it (the test files skip without the ray extra)."""

import pytest


@pytest.fixture(scope="session")
def ray_instance():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    try:
        from ray import serve
    except ImportError:  # Ray without Serve: nothing of it to shut down
        pass
    else:
        serve.shutdown()
    ray.shutdown()


def pytest_collection_modifyitems(items):
    items.sort(key=lambda it: "ray_instance" in getattr(it, "fixturenames", ()))  # stable: the Ray tests last
