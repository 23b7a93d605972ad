"""Datasets and a deterministic, resumable, rank-sharded batcher.

Images are float32 [3, S, S] in [0, 1] (what the tokenizer takes). Every random choice a sample needs
(crop, flip, which stored crop of a code, nested-dropout length, class dropout) comes from a generator
seeded by (seed, step, position in the global batch), never from a process-wide RNG: a run resumed from
a checkpoint, or split over several processes, sees exactly the same samples and choices.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def sample_rng(seed: int, step: int, position: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(step), int(position), int(salt)])


def _sha(parts) -> str:
    """A short hash of strings or bytes: the identity part of a data fingerprint."""
    h = hashlib.sha256()
    for x in parts:
        h.update(x if isinstance(x, bytes) else str(x).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def data_fingerprint(dataset) -> str:
    """What a resumed run compares to know it trains on the same data: cheap (names and sizes, no pixels read),
    independent of where the data lies, so a moved folder matches and an added, removed or rewritten file
    does not."""
    return dataset.fingerprint()


# --------------------------------------------------------------------------------- transforms


def _open_image(source, where: str):
    """A PIL RGB image from a path or a file object; what is not a readable image is bad input."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            im.load()
    except (UnidentifiedImageError, SyntaxError, ValueError) as e:  # not an image, or a truncated one
        raise ValueError(f"{where} is not a readable image ({e}); remove it from the dataset") from e
    except OSError as e:
        if e.errno is None:  # PIL's "image file is truncated" and friends carry no errno: bad data
            raise ValueError(f"{where} is not a readable image ({e}); remove it from the dataset") from e
        raise
    return to_rgb(im, where)


ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")  # PIL modes with an alpha channel (La, RGBa: premultiplied)


def to_rgb(im, where: str):
    """8-bit RGB by the image's real value range. PIL's own ``convert("RGB")`` clips 16-bit grey at 255 (a
    16-bit PNG turns almost all white) and drops alpha (showing whatever colour transparent pixels hide), so:
    16-bit grey is scaled by 255/65535, transparency is composited over white (as a viewer shows it),
    palettes, 1-bit, CMYK and YCbCr go through PIL; 32-bit integer or float pixels, whose range no file
    states, are refused."""
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # a 16-bit grey PNG
        return _grey16_to_rgb(im)
    if im.mode in ("I", "F"):
        kind = "32-bit integer" if im.mode == "I" else "floating-point"
        raise ValueError(f"{where} has {kind} pixels (PIL mode {im.mode}) of no known range; "
                         "save it as an 8- or 16-bit PNG or a JPEG")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _grey16_to_rgb(im):
    """0..65535 grey -> 0..255 (value / 257, rounded: 0 stays black, 65535 is white)."""
    from PIL import Image

    grey = np.clip(np.round(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _pil_to_array(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


def resize_center_crop(img, size: int):
    """Eval transform: shorter side to ``size`` (bicubic), then the centre square."""
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img, size: int, rng: np.random.Generator, max_scale: float = 1.25, flip: bool = True):
    """Train transform (official random_crop_arr): shorter side to a random length in
    [size, max_scale * size], a random size x size crop, a random horizontal flip."""
    from PIL import Image

    short = int(rng.integers(size, int(size * max_scale) + 1))
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    img = img.crop((left, top, left + size, top + size))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def crops_for_codes(img, size: int, mode: str, flip: bool = True) -> list:
    """Crops tokenized per image by extract-codes: 'ten' = 4 corners + centre of a 1.1x resize (and their
    flips); 'center' = the centre crop (and its flip). Flips are left out with ``flip=False``."""
    from PIL import Image

    if mode == "center":
        base = [resize_center_crop(img, size)]
    elif mode == "ten":
        big = resize_center_crop(img, int(round(size * 1.1)))
        W = big.size[0]
        offs = [(0, 0), (W - size, 0), (0, W - size), (W - size, W - size), ((W - size) // 2, (W - size) // 2)]
        base = [big.crop((x, y, x + size, y + size)) for x, y in offs]
    else:
        raise ValueError(f"crop mode must be 'ten' or 'center', got {mode!r}")
    return base + ([c.transpose(Image.FLIP_LEFT_RIGHT) for c in base] if flip else [])


# ---------------------------------------------------------------------------------- datasets


class DigitsDataset:
    """The 1,797 8x8 digits that ship with scikit-learn, upscaled (bilinear) to S x S, dark ink on white.

    Offline and small: the demo dataset. ``split``: 'train' (all but the last ``holdout``), 'test' (the
    last ``holdout``) or 'all'."""

    num_classes = 10

    def __init__(self, image_size: int = 64, split: str = "train", holdout: int = 297):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
        d = load_digits()
        x, y = d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)
        if split == "train":
            x, y = x[:-holdout], y[:-holdout]
        elif split == "test":
            x, y = x[-holdout:], y[-holdout:]
        elif split != "all":
            raise ValueError(f"split must be train, test or all, got {split!r}")
        self.raw, self.labels, self.image_size = x, y, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def pil(self, i: int):
        from PIL import Image

        g = Image.fromarray(((1.0 - self.raw[i]) * 255).round().astype(np.uint8), mode="L")
        return g.resize((self.image_size, self.image_size), Image.BILINEAR).convert("RGB")

    def get(self, i: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        return _pil_to_array(self.pil(i)), int(self.labels[i])

    def fingerprint(self) -> str:
        return f"scikit-learn digits, {len(self)} images, sha256 {_sha([self.raw.tobytes(), self.labels.tobytes()])}"


class ImageFolderDataset:
    """root/<class name>/<image>: classes in sorted order. Random resized crops and flips when ``train``."""

    def __init__(self, root: str | Path, image_size: int, train: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{root} has no class subfolders (expected root/<class>/<image>)")
        self.items = [(p, c) for c, name in enumerate(self.classes)
                      for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        if not self.items:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
        self.num_classes = len(self.classes)
        self.root, self.image_size, self.train = root, image_size, train

    def __len__(self) -> int:
        return len(self.items)

    def label(self, i: int) -> int:
        return self.items[i][1]

    def pil(self, i: int):
        path = self.items[i][0]
        return _open_image(path, str(path))

    def get(self, i: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        img = self.pil(i)
        if self.train and rng is not None:
            img = random_resized_crop(img, self.image_size, rng)
        else:
            img = resize_center_crop(img, self.image_size)
        return _pil_to_array(img), self.items[i][1]

    def fingerprint(self) -> str:
        sizes = [p.stat().st_size for p, _ in self.items]
        h = _sha(f"{p.relative_to(self.root).as_posix()}:{n}" for (p, _), n in zip(self.items, sizes))
        return f"{len(self.items)} images, {sum(sizes)} bytes, names and sizes sha256 {h}"


def expand_braces(pattern: str) -> list[str]:
    """'shard-{0000..0003}.tar' -> the four names (webdataset's brace notation)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    return [n for i in range(int(a), int(b) + 1)
            for n in expand_braces(pattern[: m.start()] + str(i).zfill(len(a)) + pattern[m.end():])]


class WebDatasetShards:
    """Webdataset tar shards (samples grouped by basename: an image member and a .cls label), indexed once
    so that samples can be read in any order."""

    def __init__(self, pattern: str, image_size: int, train: bool = True):
        self.paths = [Path(p) for p in expand_braces(pattern)]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"webdataset shards not found: {', '.join(missing[:5])}")
        self.index: list[tuple[int, tarfile.TarInfo, int]] = []
        for si, p in enumerate(self.paths):
            with tarfile.open(p) as tf:
                groups: dict[str, dict] = {}
                for mem in tf.getmembers():
                    if not mem.isfile():
                        continue
                    key, _, ext = mem.name.partition(".")
                    groups.setdefault(key, {})[ext.lower()] = mem
                for key, g in groups.items():
                    img = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
                    if img is None or "cls" not in g:
                        continue
                    label = int(tf.extractfile(g["cls"]).read().decode().strip())
                    self.index.append((si, img, label))
        if not self.index:
            raise ValueError(f"no (image, cls) samples in {pattern}")
        self.num_classes = max(lbl for _, _, lbl in self.index) + 1
        self.image_size, self.train = image_size, train

    def __len__(self) -> int:
        return len(self.index)

    def label(self, i: int) -> int:
        return self.index[i][2]

    def pil(self, i: int):
        si, mem, _ = self.index[i]
        with tarfile.open(self.paths[si]) as tf:
            data = tf.extractfile(mem).read()
        return _open_image(io.BytesIO(data), f"{self.paths[si]}: member {mem.name}")

    def get(self, i: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        img = self.pil(i)
        img = random_resized_crop(img, self.image_size, rng) if self.train and rng is not None else resize_center_crop(img, self.image_size)
        return _pil_to_array(img), self.index[i][2]

    def fingerprint(self) -> str:
        sizes = [p.stat().st_size for p in self.paths]
        h = _sha(f"{p.name}:{n}" for p, n in zip(self.paths, sizes))
        return f"{len(self.paths)} shards, {len(self.index)} samples, {sum(sizes)} bytes, names and sizes sha256 {h}"


class CodesDataset:
    """Token ids written by ``restok extract-codes``: each item is one of its stored crops (chosen per
    sample) and its label."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        idx = folder / "index.json"
        if not idx.is_file():
            raise FileNotFoundError(f"{idx} not found: run restok extract-codes --out {folder} first")
        try:
            self.meta = json.loads(idx.read_text())
            shards, total = self.meta["shards"], int(self.meta["num_images"])
            size = int(self.meta["shard_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{idx} is not a restok codes index ({e}); run restok extract-codes again") from e
        done = sum(int(sh["count"]) for sh in shards)
        if done < total:
            have = {sh["file"] for sh in shards}
            missing = [f"shard_{i:05d}.npz" for i in range(-(-total // size)) if f"shard_{i:05d}.npz" not in have]
            how = self.meta.get("resume_command") or f"restok extract-codes ... --out {folder}"
            raise ValueError(f"{folder} holds codes of {done} of {total} images (an unfinished extract-codes run; "
                             f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                             f"finish it first: {how}")
        codes, labels = [], []
        for sh in shards:
            path = folder / sh["file"]
            try:
                with np.load(path) as z:
                    codes.append(z["codes"])
                    labels.append(z["labels"])
            except Exception as e:  # truncated or not an npz (BadZipFile, EOFError, ValueError, KeyError, ...)
                raise ValueError(f"{path} is damaged ({type(e).__name__}); delete it and its entry in index.json, "
                                 "then rerun restok extract-codes to rewrite it") from e
            if len(labels[-1]) != int(sh["count"]):
                raise ValueError(f"{path} holds {len(labels[-1])} images, index.json says {sh['count']}; "
                                 "delete it and rerun restok extract-codes")
        self.codes = np.concatenate(codes)
        self.labels = np.concatenate(labels)
        self.num_classes = int(self.meta.get("num_classes", int(self.labels.max()) + 1))
        self.folder = folder

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        crops = self.codes[i]
        c = int(rng.integers(len(crops))) if rng is not None else 0
        return crops[c].astype(np.int64), int(self.labels[i])

    def fingerprint(self) -> str:
        """The index (tokenizer hash, crops, shard counts; not the command that wrote it) and the shard sizes."""
        meta = {k: v for k, v in self.meta.items() if k != "resume_command"}
        sizes = [(self.folder / sh["file"]).stat().st_size for sh in self.meta["shards"]]
        h = _sha([json.dumps(meta, sort_keys=True), *sizes])
        return f"{len(self)} coded images, {sum(sizes)} bytes, index and sizes sha256 {h}"


def open_dataset(spec: str, image_size: int, train: bool = True):
    """'digits' | 'digits:test' | 'folder:PATH' | 'wds:PATTERN' | a folder path."""
    if spec in ("digits", "digits:train"):
        return DigitsDataset(image_size, "train")
    if spec in ("digits:test", "digits:all"):
        return DigitsDataset(image_size, spec.split(":")[1])
    if spec.startswith("wds:"):
        return WebDatasetShards(spec[4:], image_size, train)
    if spec.startswith("folder:"):
        spec = spec[7:]
    return ImageFolderDataset(spec, image_size, train)


# ----------------------------------------------------------------------------------- batching


class Batcher:
    """Batches of a global size, in a per-epoch seeded order, split across ranks.

    ``batch(step)`` gives this rank's items for the global step ``step``: the order does not depend on
    the number of processes, and a resumed run continues exactly where it stopped."""

    def __init__(self, dataset, global_batch: int, seed: int, rank: int = 0, world: int = 1, workers: int = 0):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        if len(dataset) < global_batch:
            raise ValueError(f"the dataset has {len(dataset)} items, fewer than one batch of {global_batch}")
        self.ds, self.G, self.seed, self.rank, self.world = dataset, global_batch, seed, rank, world
        self.per_epoch = len(dataset) // global_batch
        self._orders: dict[int, np.ndarray] = {}
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))}
        return self._orders[epoch]

    def positions(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, global positions) of this rank's share of global batch ``step``."""
        epoch, k = divmod(step, self.per_epoch)
        idx = self.order(epoch)[k * self.G : (k + 1) * self.G]
        per = self.G // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return idx[sl], np.arange(self.G)[sl]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (stacked items, labels int64, global positions)."""
        idx, pos = self.positions(step)
        work = lambda ip: self.ds.get(int(ip[0]), sample_rng(self.seed, step, int(ip[1])))  # noqa: E731
        items = list(self.pool.map(work, zip(idx, pos))) if self.pool else [work(ip) for ip in zip(idx, pos)]
        return np.stack([x for x, _ in items]), np.asarray([y for _, y in items], dtype=np.int64), pos
