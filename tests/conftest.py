import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_generator():
    from restok.models.presets import build_generator

    return build_generator("tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from restok.models.presets import build_tokenizer

    return build_tokenizer("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """The tiny preset (seeded random weights) exported through the CLI: fp32, batch 2, guided."""
    from restok.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "tiny_fp32_b2"
    assert main(["export", "--preset", "tiny", "--batch", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_artifacts_fp16(tmp_path_factory):
    from restok.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "tiny_fp16_b1"
    assert main(["export", "--preset", "tiny", "--precision", "fp16", "--no-encoder", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_artifacts_inplace(tmp_path_factory):
    """The same model with the in-place KV cache (TensorScatter, opset 24)."""
    from restok.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "tiny_inplace_b2"
    assert main(["export", "--preset", "tiny", "--batch", "2", "--kv-cache", "inplace", "--no-encoder",
                 "--out", str(out)]) == 0
    return out
