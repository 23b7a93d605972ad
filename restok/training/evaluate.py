"""Evaluation: tokenizer reconstruction PSNR, codebook usage and entropy; for the digits, how often
generated images are classified as the requested class by a classifier trained on the real digits."""

from __future__ import annotations

import math

import numpy as np
import torch

from restok.images import psnr


@torch.no_grad()
def tokenizer_metrics(tok, data, batch_size: int = 64) -> dict:
    """Mean per-image PSNR on ``data`` (all of it), codebook usage (fraction of codes used) and codebook
    entropy H = -sum p log2 p of the code frequencies (bits; at most log2 of the codebook size)."""
    device = next(tok.parameters()).device
    psnrs, counts = [], np.zeros(tok.cfg.codebook_size, dtype=np.int64)
    tok.eval()
    for s in range(0, len(data), batch_size):
        x = np.stack([data.get(i)[0] for i in range(s, min(len(data), s + batch_size))])
        xt = torch.from_numpy(x).to(device)
        ids = tok.encode(xt)
        rec = tok.decode(ids).float().cpu().numpy()
        psnrs.append(psnr(x, rec, uint8=True, per_image=True))
        counts += np.bincount(ids.cpu().numpy().reshape(-1), minlength=tok.cfg.codebook_size)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "images": len(data),
        "psnr_db": float(np.mean(np.concatenate(psnrs))),
        "codebook_usage": float((counts > 0).mean()),
        "codebook_entropy_bits": float(-(nz * np.log2(nz)).sum()),
        "codebook_entropy_max_bits": math.log2(tok.cfg.codebook_size),
    }


def _digit_features(images: np.ndarray) -> np.ndarray:
    """[B, 3, S, S] in [0, 1] (dark ink on white) -> the 64 sklearn-digits features (8x8 ink, 0..16)."""
    g = np.clip(images, 0, 1).mean(axis=1)
    B, S, _ = g.shape
    k = S // 8
    small = g[:, : 8 * k, : 8 * k].reshape(B, 8, k, 8, k).mean(axis=(2, 4))
    return ((1.0 - small) * 16.0).reshape(B, 64)


class DigitsClassifier:
    """Logistic regression on the real training digits (the same split as the DigitsDataset)."""

    def __init__(self, holdout: int = 297):
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        d = load_digits()
        x, y = d.data.astype(np.float64), d.target
        self.model = LogisticRegression(max_iter=5000).fit(x[:-holdout], y[:-holdout])
        self.holdout_accuracy = float((self.model.predict(x[-holdout:]) == y[-holdout:]).mean())

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(_digit_features(images))

    def accuracy_on_real(self, data) -> float:
        x = np.stack([data.get(i)[0] for i in range(len(data))])
        y = np.asarray([data.label(i) for i in range(len(data))])
        return float((self.predict(x) == y).mean())


def generated_class_accuracy(generate_images, num_classes: int = 10, per_class: int = 10) -> dict:
    """``generate_images(labels) -> images [B, 3, S, S]``; the fraction classified as requested."""
    clf = DigitsClassifier()
    labels = np.repeat(np.arange(num_classes), per_class)
    images = generate_images(labels.tolist())
    pred = clf.predict(np.asarray(images))
    per = {int(c): float((pred[labels == c] == c).mean()) for c in range(num_classes)}
    return {"accuracy": float((pred == labels).mean()), "per_class": per, "images": int(len(labels)),
            "classifier_holdout_accuracy": clf.holdout_accuracy}
