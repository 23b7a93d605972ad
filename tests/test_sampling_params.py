"""SamplingParams (restok.sampling_params): the torch-free validation every entry point shares."""

import pytest

from restok.runtime import SamplingParams


@pytest.mark.parametrize("kw,match", [(dict(temperature=float("nan")), "temperature must be a finite"),
                                      (dict(cfg_scale=float("inf")), "cfg_scale must be a finite"),
                                      (dict(cfg_scale=1e300), r"cfg_scale must be a finite number in \[0, 100\]"),
                                      (dict(top_p=1.5), r"top_p must be a finite number in \[0, 1\]"),
                                      (dict(top_k=-1), r"top_k must be an integer in \[0, 2147483647\]"),
                                      (dict(top_k=2.5), "top_k must be an integer"),
                                      (dict(top_k=2**63), "top_k must be an integer"),
                                      (dict(cfg_schedule="sigmoid"), "cfg_schedule must be one of"),
                                      (dict(temperature="1"), "temperature must be a finite number"),
                                      (dict(cfg_start=2.0), r"cfg_start must be a finite number in")])
def test_sampling_params_validate(kw, match):
    """The torch-free validation every entry point shares (CLI, Pipeline, restok.generate)."""
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_every_face_derives_from_sampling_params():
    """The CLI's sampling group and the HTTP request model take their settings, defaults and bounds from
    SamplingParams: one declaration."""
    from restok.cli import build_parser
    from restok.sampling_params import SamplingParams as SP

    settings = SP.settings()
    assert [s.name for s in settings] == ["cfg_scale", "cfg_schedule", "cfg_start", "temperature", "top_k", "top_p"]
    args = build_parser().parse_args(["generate", "--out", "x"])
    assert {s.name: getattr(args, s.name) for s in settings} == {s.name: s.default for s in settings}
    assert SP(**{s.name: getattr(args, s.name) for s in settings}) == SP()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--out", "x", "--cfg-scale", "1e300"])
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from restok.serving.app import GenerationRequest

    fields = GenerationRequest.model_fields
    for s in settings:
        assert fields[s.name].default == s.default, s.name
    body = GenerationRequest(class_labels=[1])
    assert SP(**{s.name: getattr(body, s.name) for s in settings}) == SP()
    from pydantic import ValidationError

    for bad in ({"top_k": 2**63}, {"cfg_scale": 1e300}, {"top_p": 2.0}, {"cfg_schedule": "sigmoid"}):
        with pytest.raises(ValidationError):
            GenerationRequest(class_labels=[1], **bad)


def test_values_are_normalised_and_settings_describe_themselves():
    import numpy as np

    p = SamplingParams(top_k=np.int64(5), cfg_scale=np.float32(2.0), temperature=1)
    assert type(p.top_k) is int and p.top_k == 5 and type(p.cfg_scale) is float and p.temperature == 1.0
    assert SamplingParams(top_k=5.0).top_k == 5
    top_k = next(s for s in SamplingParams.settings() if s.name == "top_k")
    assert top_k.flag == "--top-k" and top_k.describe_range() == "an integer in [0, 2147483647]"
