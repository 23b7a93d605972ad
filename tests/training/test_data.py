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
    assert ds.fingerprint().startswith("2 shards, 6 samples, ")  # what a resumed run compares


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


def _open(tmp_path, im, name="x.png", **save) -> Image.Image:
    """``im`` written to an image folder of its own and read back as the training data reads it."""
    root = tmp_path / name.replace(".", "_")
    (root / "c").mkdir(parents=True)
    im.save(root / "c" / name, **save)
    return ImageFolderDataset(root, 16, train=False).pil(0)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (values 0..65535) becomes 0..255 by value / 257; PIL's own conversion clipped it at 255,
    making almost every pixel white."""
    ramp = np.round(np.linspace(0, 65535, 64)).astype(np.uint16)
    img16 = Image.fromarray(np.tile(ramp, (32, 1)))
    rgb = _open(tmp_path, img16)
    assert (tmp_path / "x_png" / "c" / "x.png").read_bytes()[24] == 16  # the PNG's bit depth (IHDR)
    px = np.asarray(rgb)
    want = np.round(ramp / 257.0).astype(np.uint8)
    assert rgb.mode == "RGB" and px.shape == (32, 64, 3)
    assert (px == want[None, :, None]).all()
    assert px[0, 0, 0] == 0 and px[0, -1, 0] == 255 and (px == 255).mean() < 0.05
    x, _ = ImageFolderDataset(tmp_path / "x_png", 32, train=False).get(0)  # the centre 32 columns, in [0, 1]
    assert np.allclose(x, np.broadcast_to(want[16:48] / 255.0, (3, 32, 32)), atol=1e-6)


def test_alpha_palette_and_cmyk_images_convert_correctly(tmp_path):
    """Transparency is composited over white (not the colour hidden under it), CMYK becomes RGB; pixels of
    unknown range (32-bit integer, float) are refused with a clear error."""
    la = Image.fromarray(np.stack([np.full((4, 3), 100, np.uint8), np.array([[0, 128, 255]] * 4, np.uint8)], -1))
    assert np.asarray(_open(tmp_path, la, "la.png"))[0, :, 0].tolist() == [255, 177, 100]
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (np.asarray(_open(tmp_path, rgba, "rgba.png")) == 255).all()
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    px = np.asarray(_open(tmp_path, pal, "p.png", transparency=0))  # palette entry 0 (black) is transparent
    assert px[0, 0].tolist() == [255, 0, 0] and px[1, 1].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # cyan
    assert np.abs(np.asarray(_open(tmp_path, cmyk, "cmyk.jpg", quality=95))[4, 4].astype(int) - [0, 255, 255]).max() < 8
    from restok.training.data import _open_image

    unknown_range = ((np.full((4, 4), 70000, np.int32), "32-bit integer"),
                     (np.full((4, 4), 0.5, np.float32), "floating-point"))
    for arr, kind in unknown_range:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="TIFF")
        buf.seek(0)
        with pytest.raises(ValueError, match=f"x.tif has {kind} pixels .* of no known range; save it as an 8- or 16"):
            _open_image(buf, "x.tif")
