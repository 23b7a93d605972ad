"""Training data: image folders, webdataset shards, the deterministic rank-sharded batcher."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from restok.training.data import Batcher, DigitsDataset, ImageFolderDataset, WebDatasetShards, expand_braces, open_dataset


def _png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder(tmp_path):
    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.png").write_bytes(_png(color))
    ds = open_dataset(f"folder:{tmp_path}", 16)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds.get(4, np.random.default_rng(0))
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and y == 1
    assert x[2].mean() > 0.9 and x[0].mean() < 0.1  # blue, in [0, 1]
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing", 16)


def test_webdataset_shards(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:04d}.tar", "w") as tf:
            for i in range(3):
                for ext, data in (("png", _png((10 * i, 0, 0))), ("cls", str(s).encode())):
                    info = tarfile.TarInfo(f"s{s}_{i}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    assert expand_braces(str(tmp_path / "shard-{0000..0001}.tar"))[1].endswith("shard-0001.tar")
    ds = WebDatasetShards(str(tmp_path / "shard-{0000..0001}.tar"), 16, train=False)
    assert len(ds) == 6 and ds.num_classes == 2
    x, y = ds.get(5)
    assert x.shape == (3, 16, 16) and y == 1


def test_batcher_is_deterministic_and_splits_across_ranks():
    ds = DigitsDataset(32, "train")
    one = Batcher(ds, 8, seed=3)
    a = one.positions(5)[0]
    r0, r1 = Batcher(ds, 8, seed=3, rank=0, world=2), Batcher(ds, 8, seed=3, rank=1, world=2)
    assert np.array_equal(np.concatenate([r0.positions(5)[0], r1.positions(5)[0]]), a)
    assert not np.array_equal(one.positions(6)[0], a)
    epoch = [i for s in range(one.per_epoch) for i in one.positions(s)[0]]
    assert len(set(epoch)) == len(epoch) == one.per_epoch * 8  # no repeats within an epoch
    x1, y1, _ = one.batch(5)
    x2, y2, _ = Batcher(ds, 8, seed=3, workers=2).batch(5)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    with pytest.raises(ValueError, match="not divisible"):
        Batcher(ds, 9, seed=0, world=2)
