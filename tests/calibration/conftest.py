"""An INT8 (W8A8, max ranges) calibration of the tiny export, made once for tests/calibration/."""

import pytest

from restok.calibration import CalibrationOptions, calibrate
from tests.support.calibration import PERMISSIVE


@pytest.fixture(scope="package")
def int8_artifacts(tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    r = calibrate(tiny_artifacts, out, CalibrationOptions(precision="int8", method="max", **PERMISSIVE), threads=1)
    assert r["passed"]
    return out
