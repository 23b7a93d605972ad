"""Fixtures every test folder shares: the tiny models, a copy of the tiny export to damage, and (from the
plugins in tests/support/) the exported artifacts with their background exports, and the Ray instance."""

import shutil

import pytest
import torch

torch.set_num_threads(2)

pytest_plugins = ["tests.support.exports", "tests.support.ray"]


@pytest.fixture(scope="session")
def tiny_generator():
    from restok.models.presets import build_generator

    return build_generator("tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from restok.models.presets import build_tokenizer

    return build_tokenizer("tiny", seed=0)


@pytest.fixture
def copy(tiny_artifacts, tmp_path):
    d = tmp_path / "art"
    shutil.copytree(tiny_artifacts, d, copy_function=shutil.copy2)  # like cp -a: mtimes kept
    return d
