"""restok sample --ray (restok.jobs.sample on Ray Data) on the session's local Ray instance
(tests/support/ray.py): equals the in-process job, image for image."""

import numpy as np
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'restok[ray]'")

from restok.cli import main  # noqa: E402

pytestmark = pytest.mark.ray


def test_ray_data_sampling_equals_in_process(ray_instance, tiny_artifacts, tmp_path):
    base = ["sample", "--artifacts", str(tiny_artifacts), "--per-class", "20", "--shard-size", "25", "--seed", "2"]
    assert main(base + ["--out", str(tmp_path / "local")]) == 0
    assert main(base + ["--out", str(tmp_path / "ray"), "--ray", "--actors", "2"]) == 0
    a = np.load(tmp_path / "local" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "ray" / "samples.npz")["arr_0"]
    assert a.shape == (200, 32, 32, 3) and np.array_equal(a, b)
