"""INT8 / FP8 / weight-only INT8 Q/DQ graphs from FP32 artifacts, calibrated on generation traces, with a
quality gate on ONNX Runtime."""

from restok.calibration.calibrator import CalibrationOptions, calibrate, collect_traces, quality_report

__all__ = ["CalibrationOptions", "calibrate", "collect_traces", "quality_report"]
