"""Image output shared by every backend (numpy + Pillow, no torch)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from restok.fileutil import atomic_path


def psnr(a: np.ndarray, b: np.ndarray, *, clip: bool = False, uint8: bool = False, per_image: bool = False):
    """PSNR in dB of images with values nominally in [0, 1] (the one PSNR of restok).

    ``clip``: compare what would be displayed (values clipped to [0, 1]); ``uint8``: after rounding to 8 bits
    (the official tokenizer evaluation); ``per_image``: one value per image of a batch [B, ...] instead of one
    over everything. Identical inputs give inf."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if clip or uint8:
        a, b = np.clip(a, 0.0, 1.0), np.clip(b, 0.0, 1.0)
    if uint8:
        a, b = np.round(a * 255.0) / 255.0, np.round(b * 255.0) / 255.0
    err = (a - b) ** 2
    mse = err.reshape(len(err), -1).mean(axis=1) if per_image else np.asarray(err.mean())
    with np.errstate(divide="ignore"):
        out = np.where(mse == 0, np.inf, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-300)))
    return out if per_image else float(out)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [B, 3, H, W] nominally in [0, 1] -> uint8 [B, H, W, 3], as the official sampler does
    (clamp(255 x, 0, 255) then truncation)."""
    x = np.clip(np.asarray(images, dtype=np.float32) * 255.0, 0.0, 255.0)
    return x.astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images_u8: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one uint8 [rows*H', cols*W', 3] image with ``pad`` white pixels between."""
    B, H, W, C = images_u8.shape
    cols = columns or min(B, 8)
    rows = math.ceil(B / cols)
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = images_u8[i]
    return grid


def png_bytes(image_u8: np.ndarray) -> bytes:
    """One uint8 [H, W, 3] image as PNG file bytes (what save_png writes, byte for byte)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="PNG")
    return buf.getvalue()


def encode_image(image_u8: np.ndarray, fmt: str = "png") -> bytes:
    """One image as PNG (lossless, what restok generate writes), JPEG or WebP (quality 95)."""
    if fmt == "png":
        return png_bytes(image_u8)
    import io

    from PIL import Image

    if fmt not in ("jpeg", "webp"):
        raise ValueError(f"output format must be png, jpeg or webp, got {fmt!r}")
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format=fmt.upper(), quality=95)
    return buf.getvalue()


def save_png(image_u8: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one uint8 [H, W, 3] image atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png_bytes(image_u8))
    return Path(path)
