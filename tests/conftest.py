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
