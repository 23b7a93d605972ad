"""Optional tokenizer losses: perceptual distance, a patch discriminator (hinge GAN) and alignment of the
tokenizer's features to a frozen image encoder. Each needs something the user provides (weights), so all
are off by default and the trainer reports what is off."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_frozen(spec: str, device) -> nn.Module:
    """A frozen feature model: 'timm:<name>' (timm and its weights must be available locally) or the path
    of a TorchScript file. No download happens here."""
    if spec.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ImportError("'timm:' models need timm installed (pip install timm)") from e
        model = timm.create_model(spec[5:], pretrained=True, num_classes=0)
    else:
        model = torch.jit.load(spec, map_location="cpu")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class PatchDiscriminator(nn.Module):
    """A small convolutional patch discriminator (GroupNorm, LeakyReLU), trained with the hinge loss.

    The official ResTok uses a DINO ViT-S feature discriminator; that needs pretrained DINO weights, so
    restok ships this self-contained one instead."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods, c_in = [], 3
        for i in range(layers):
            c_out = channels * 2**i
            mods += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        mods.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)  # [0, 1] images -> [-1, 1]


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def vf_alignment_loss(tok, enc: dict, dec_feats: torch.Tensor, images: torch.Tensor, vf_model: nn.Module,
                      margin: float) -> tuple[torch.Tensor, dict]:
    """relu(1 - margin - cos) between the frozen model's features and the tokenizer's, for the encoder
    (its CLS vs the projected coarsest image level, averaged over tokens) and the decoder (its patch map vs
    the projected decoder feature queries, per position). The frozen model returns (cls [B, C],
    patches [B, C, h, w]) from ImageNet-normalised images."""
    x = (images - tok.imnet_mean) / tok.imnet_std
    with torch.no_grad():
        cls, patches = vf_model(x)
    coarse = enc["image_tokens"][0]  # [B, n, D], before ln_post
    proj = tok.vf_proj(coarse.transpose(1, 2).unsqueeze(2)).mean(dim=(2, 3))  # [B, C]
    enc_cos = F.cosine_similarity(proj, cls.float(), dim=-1)
    dec = tok.vf_proj_dec(dec_feats)  # [B, C, g, g]
    if patches.shape[-2:] != dec.shape[-2:]:
        patches = F.interpolate(patches.float(), size=dec.shape[-2:], mode="bilinear", align_corners=False)
    dec_cos = F.cosine_similarity(dec, patches.float(), dim=1)
    enc_l = F.relu(1 - margin - enc_cos).mean()
    dec_l = F.relu(1 - margin - dec_cos).mean()
    return enc_l + dec_l, {"vf_enc_cos": enc_cos.mean().item(), "vf_dec_cos": dec_cos.mean().item()}
