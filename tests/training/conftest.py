"""The codes of 40 digits (10 crops each) by the tiny tokenizer, extracted once for tests/training/."""

import pytest

from restok.training.codes import extract_codes
from restok.training.data import DigitsDataset


@pytest.fixture(scope="package")
def codes_dir(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("codes")
    data = DigitsDataset(32, "train")
    data.raw, data.labels = data.raw[:40], data.labels[:40]
    extract_codes(tiny_tokenizer, data, out, crops="ten", flip=False, batch_size=16, shard_size=16, progress=False)
    return out
