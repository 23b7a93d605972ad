"""Helpers the test files share: the exported-artifact fixtures and their background exports (exports.py),
the session's Ray instance (ray.py), restok's CLI in a subprocess (cli.py), a real ``restok serve`` process
(server.py), a simulated CUDA runtime and TensorRT (fake_device.py), calibration options (calibration.py)."""
