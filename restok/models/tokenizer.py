"""ResTok: a 1D image tokenizer with hierarchical residuals (arXiv 2601.03955), checkpoint-compatible.

Pipeline: image [0,1] -> ImageNet normalisation -> CNN pixel encoder -> 1x1 patch embedding -> a ViT over
[image tokens | latent tokens] that merges image tokens into coarser levels at a few layers (residual
merging) -> per-level 1x1 projections to an 8-d code -> L2-normalised VQ -> ids. Decoding: normalised
codebook rows -> a ViT over [latent tokens | learned image queries] -> 1x1 conv -> CNN pixel decoder.

Quirks of the official code that change outputs or keys are reproduced on purpose (see the spec, section F):
the merge keeps every other token of the flattened sequence (nearest, not average pooling); the encoder
output is reinterpreted without a transpose before the per-level projections (``is_legacy``); the CNN
ResnetBlock applies its shortcut conv to the block output, not to its input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from restok.configs import config_from_dict
from restok.models.layers import GroupNorm, LayerNorm, ViTBlock, no_autocast, rope_2d
from restok.schedule import level_blocks, pooling_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TokenizerConfig:
    """Architecture of a ResTok tokenizer. Defaults are ResTok-L/128."""

    image_size: int = 256
    codebook_size: int = 8192
    token_size: int = 8
    num_latent_tokens: int = 128
    num_min_tokens: int = 4
    enc_width: int = 1024
    enc_layers: int = 24
    enc_heads: int = 16
    dec_width: int = 1024
    dec_layers: int = 24
    dec_heads: int = 16
    hierarchy_stages: int = 4
    residual_image_tokens: bool = True
    residual_latent_tokens: bool = True
    is_legacy: bool = True
    rope_theta: float = 10000.0
    use_l2_norm: bool = True
    commitment_cost: float = 0.25
    cnn_hidden: int = 128
    cnn_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    cnn_res_blocks: int = 2
    cnn_z_channels: int = 256
    # training only: nested-dropout probability of keeping all tokens is 1 - drop_prob
    drop_prob: float = 0.2
    # training only: width of the frozen features to align to (adds vf_proj / vf_proj_dec); 0 = none
    vf_feature_dim: int = 0

    def __post_init__(self) -> None:
        self.cnn_channel_mult = tuple(int(m) for m in self.cnn_channel_mult)
        level_blocks(self.num_latent_tokens)
        for name in ("enc", "dec"):
            w, h = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if w % h or (w // h) % 4:
                raise ValueError(f"{name}_width {w} / {name}_heads {h} must give a head_dim divisible by 4")
        g = self.grid_size
        if self.image_size % g or g * 2 ** (len(self.cnn_channel_mult) - 1) != self.image_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the CNN stride")
        for n in level_blocks(self.num_latent_tokens):
            ph, pw = pooling_grid(n)
            if g % ph or g % pw:
                raise ValueError(f"token grid {g}x{g} cannot be pooled to {ph}x{pw} for a level of {n} tokens")
        if g % 2 ** max(self.hierarchy_stages - 1, 0):
            raise ValueError(f"token grid width {g} cannot be halved {self.hierarchy_stages - 1} times")
        for m in self.cnn_channel_mult:
            if (self.cnn_hidden * m) % 32:
                raise ValueError("CNN channel counts must be multiples of 32 (GroupNorm with 32 groups)")

    @property
    def grid_size(self) -> int:
        """Side of the ViT's image-token grid (16 for ResTok-L: 256 px / CNN stride 16)."""
        return self.image_size // 2 ** (len(self.cnn_channel_mult) - 1)

    @property
    def merge_layers(self) -> list[int]:
        """Encoder layers that end with a residual merge: int(i/S*L)-1 for i=1..S-1 (5, 11, 17 for L)."""
        S, L = self.hierarchy_stages, self.enc_layers
        return [int(i / S * L) - 1 for i in range(1, S)] if S > 0 else []

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cnn_channel_mult"] = list(self.cnn_channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return config_from_dict(cls, d, "tokenizer config")


# ----------------------------------------------------------------------------- CNN (MaskGIT VQGAN)


class Conv2dSame(nn.Conv2d):
    """TF 'same' padding for odd kernels at stride 1 (what the official Conv2dSame computes here)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, bias: bool = True):
        super().__init__(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv x2. Official quirk (kept): the shortcut of a channel-changing block is a conv of the
    block *output* (out->out channels), giving h + nin(h) instead of h + nin(x)."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNorm(32, cin, eps=1e-6)
        self.conv1 = Conv2dSame(cin, cout, 3, bias=False)
        self.norm2 = GroupNorm(32, cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2dSame(cout, cout, 3, bias=False)
        self.nin_shortcut = Conv2dSame(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int, upsample_conv: bool):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_blocks)])
        if upsample_conv:
            self.upsample_conv = Conv2dSame(cout, cout, 3)


class PixelEncoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        hid, mult = cfg.cnn_hidden, cfg.cnn_channel_mult
        self.conv_in = Conv2dSame(3, hid, 3, bias=False)
        ins = (1,) + mult
        self.down = nn.ModuleList(
            [_Level(hid * ins[i], hid * mult[i], cfg.cnn_res_blocks, False) for i in range(len(mult))]
        )
        c = hid * mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(c, c) for _ in range(cfg.cnn_res_blocks)])
        self.norm_out = GroupNorm(32, c, eps=1e-6)
        self.conv_out = Conv2dSame(c, cfg.cnn_z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.down):
            for b in level.block:
                x = b(x)
            if i != len(self.down) - 1:
                x = F.avg_pool2d(x, kernel_size=2, stride=2)
        for b in self.mid:
            x = b(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class PixelDecoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        hid, mult = cfg.cnn_hidden, cfg.cnn_channel_mult
        n = len(mult)
        c = hid * mult[-1]
        self.conv_in = Conv2dSame(cfg.cnn_z_channels, c, 3)
        self.mid = nn.ModuleList([ResnetBlock(c, c) for _ in range(cfg.cnn_res_blocks)])
        self.up = nn.ModuleList(
            [
                _Level(hid * (mult[-1] if i == n - 1 else mult[i + 1]), hid * mult[i], cfg.cnn_res_blocks, i != 0)
                for i in range(n)
            ]
        )
        self.norm_out = GroupNorm(32, hid * mult[0], eps=1e-6)
        self.conv_out = Conv2dSame(hid * mult[0], 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for b in self.mid:
            x = b(x)
        for level in reversed(self.up):  # up.{n-1} first
            for b in level.block:
                x = b(x)
            if hasattr(level, "upsample_conv"):
                x = level.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))


# ------------------------------------------------------------------------------------- helpers


def _level_rows(blocks: list[int], embeddings: nn.ParameterList) -> torch.Tensor:
    """[sum(blocks), D]: embedding k repeated for each token of level k."""
    return torch.cat([e.expand(n, -1) for e, n in zip(embeddings, blocks)], dim=0)


def _grid_ids(h: int, w: int, offset: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([r.reshape(-1), c.reshape(-1)], dim=1) + offset


def _line_ids(n: int, offset: int) -> torch.Tensor:
    return (torch.arange(n) + offset)[:, None].expand(n, 2)


def _level_ids(sizes: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])


# -------------------------------------------------------------------------------------- encoder


class ResTokEncoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.enc_width
        self.blocks_sizes = level_blocks(cfg.num_latent_tokens)
        scale = D**-0.5
        self.patch_embed = nn.Conv2d(cfg.cnn_z_channels, D, kernel_size=1)
        self.ln_pre = LayerNorm(D)
        self.blocks = nn.ModuleList([ViTBlock(D, cfg.enc_heads) for _ in range(cfg.enc_layers)])
        self.ln_post = LayerNorm(D)
        self.level_embedding = nn.ParameterList(
            [nn.Parameter(scale * torch.randn(1, D)) for _ in range(len(cfg.merge_layers) + 1)]
        )
        self.latent_token_level_embedding = nn.ParameterList(
            [nn.Parameter(scale * torch.randn(1, D)) for _ in self.blocks_sizes]
        )
        self.conv_out = nn.ModuleList([nn.Conv2d(D, cfg.token_size, kernel_size=1) for _ in self.blocks_sizes])
        self._stages = self._build_stages()

    def _build_stages(self) -> list[dict]:
        """Mask and RoPE ids for each layout the sequence goes through (one per merge, plus the first)."""
        g, n_lat = self.cfg.grid_size, self.cfg.num_latent_tokens
        grids = [(g, g)]
        stages = []
        for _ in range(len(self.cfg.merge_layers) + 1):
            ids, off = [], 0
            for h, w in grids:
                ids.append(_grid_ids(h, w, off))
                off += h * w
            ids.append(_line_ids(n_lat, off))
            # level ids: image grids coarse->fine, then the latent blocks; attend iff level(q) >= level(k)
            lv = _level_ids([h * w for h, w in grids] + self.blocks_sizes)
            rope = rope_2d(torch.cat(ids), self.cfg.enc_width // self.cfg.enc_heads, self.cfg.rope_theta)
            stages.append({"rope": rope, "mask": (lv[:, None] >= lv[None, :])[None, None]})  # 4-D for TensorRT
            grids = [(grids[0][0], grids[0][1] // 2)] + grids
        return stages

    def _latent_init(self, f: torch.Tensor) -> torch.Tensor:
        """Residual multi-level pooling of the feature map f [B,D,H,W] into [B, N, D] (Algorithm 1)."""
        H, W = f.shape[-2:]
        rest, out = f, []
        for n in self.blocks_sizes:
            ph, pw = pooling_grid(n)
            pooled = F.avg_pool2d(rest, kernel_size=(H // ph, W // pw))
            out.append(pooled.flatten(2).transpose(1, 2))
            if self.cfg.residual_latent_tokens:
                rest = rest - F.interpolate(pooled, size=(H, W), mode="nearest")
        return torch.cat(out, dim=1)

    def forward(self, feats: torch.Tensor) -> dict:
        """CNN features [B, z, g, g] -> dict(z=[B, token_size, 1, N], image_tokens=[...] coarse->fine)."""
        cfg = self.cfg
        B = feats.shape[0]
        f = self.patch_embed(feats)
        latent = self._latent_init(f) + _level_rows(self.blocks_sizes, self.latent_token_level_embedding)
        x = f.flatten(2).transpose(1, 2) + self.level_embedding[0]
        x = self.ln_pre(torch.cat([x, latent], dim=1))
        stage, level = 0, 1
        merges = set(cfg.merge_layers)
        for i, blk in enumerate(self.blocks):
            st = self._stages[stage]
            rope = tuple(t.to(x.device) for t in st["rope"])
            x = blk.attend(x, rope, st["mask"].to(x.device))
            if i in merges:
                n = self._image_sizes(stage)[0]  # the coarsest image level, at the front
                coarse = x[:, 0:n:2]
                fine = x[:, :n]
                if cfg.residual_image_tokens:
                    fine = fine - coarse.repeat_interleave(2, dim=1)
                x = torch.cat([coarse, fine, x[:, n:]], dim=1)
            x = blk.feed_forward(x)
            if i in merges:
                x = torch.cat([x[:, : n // 2] + self.level_embedding[level], x[:, n // 2 :]], dim=1)
                level += 1
                stage += 1
        N = cfg.num_latent_tokens
        latent = self.ln_post(x[:, -N:])
        if cfg.is_legacy:  # official quirk: reinterpret [B, N, D] memory as [B, D, N, 1] (no transpose)
            latent = latent.reshape(B, cfg.enc_width, N, 1)
        else:
            latent = latent.reshape(B, N, cfg.enc_width, 1).permute(0, 2, 1, 3)
        outs, s = [], 0
        for conv, n in zip(self.conv_out, self.blocks_sizes):
            outs.append(conv(latent[:, :, s : s + n]))
            s += n
        z = torch.cat(outs, dim=2).reshape(B, cfg.token_size, 1, N)
        sizes = self._image_sizes(stage)
        image_tokens = list(torch.split(x[:, :-N], sizes, dim=1))
        return {"z": z, "image_tokens": image_tokens}

    def _image_sizes(self, stage: int) -> list[int]:
        """Token counts of the image levels, coarse -> fine, after ``stage`` merges."""
        g = self.cfg.grid_size
        return [g * g // 2**k for k in range(stage, -1, -1)]


# -------------------------------------------------------------------------------------- decoder


class ResTokDecoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dec_width
        scale = D**-0.5
        self.blocks_sizes = level_blocks(cfg.num_latent_tokens)
        self.latent_mask_token = nn.Parameter(scale * torch.randn(1, 1, cfg.token_size))
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, D))
        if cfg.vf_feature_dim:
            self.feat_mask_token = nn.Parameter(scale * torch.randn(1, 1, D))
        self.ln_pre = LayerNorm(D)
        self.blocks = nn.ModuleList([ViTBlock(D, cfg.dec_heads) for _ in range(cfg.dec_layers)])
        self.ln_post = LayerNorm(D)
        self.ffn = nn.Conv2d(D, cfg.cnn_z_channels, 1)
        self.latent_token_level_embedding = nn.ParameterList(
            [nn.Parameter(scale * torch.randn(1, D)) for _ in self.blocks_sizes]
        )
        self.decoder_embed = nn.ModuleList([nn.Linear(cfg.token_size, D) for _ in self.blocks_sizes])
        g, N = cfg.grid_size, cfg.num_latent_tokens
        # float32 tables computed once (plain attributes: not weights, and not cast by .half())
        self._rope = rope_2d(torch.cat([_line_ids(N, 0), _grid_ids(g, g, N)]), D // cfg.dec_heads, cfg.rope_theta)

    def forward(self, codes: torch.Tensor, num_tokens=None, with_features: bool = False):
        """codes [B, N, token_size] -> features [B, z, g, g] for the pixel decoder.

        ``num_tokens``: keep only the first n codes (an int, or a per-sample tensor/list), replacing the
        rest by the learned mask token (nested-dropout decoding). ``with_features`` also runs the
        feature-alignment queries (training) and returns their pre-ln_post output [B, D, g, g].
        """
        cfg = self.cfg
        B, N, _ = codes.shape
        if num_tokens is not None:
            n = torch.as_tensor(num_tokens, device=codes.device).reshape(-1, 1)
            keep = (torch.arange(N, device=codes.device)[None, :] < n)[..., None]
            codes = torch.where(keep, codes, self.latent_mask_token.to(codes.dtype).expand_as(codes))
        x = torch.cat(
            [emb(c) for emb, c in zip(self.decoder_embed, torch.split(codes, self.blocks_sizes, dim=1))], dim=1
        )
        g2 = cfg.grid_size**2
        queries = self.mask_token.expand(B, g2, -1).to(x.dtype)
        if with_features:
            queries = torch.cat([queries, self.feat_mask_token.expand(B, g2, -1).to(x.dtype)], dim=0)
            x = torch.cat([x, x], dim=0)
        x = x + _level_rows(self.blocks_sizes, self.latent_token_level_embedding)
        x = self.ln_pre(torch.cat([x, queries], dim=1))
        rope = tuple(t.to(x.device) for t in self._rope)
        for blk in self.blocks:
            x = blk(x, rope, None)
        x = x[:, N:]
        feats = None
        if with_features:
            x, feats = x[:B], x[B:]
            feats = feats.transpose(1, 2).reshape(B, cfg.dec_width, cfg.grid_size, cfg.grid_size)
        x = self.ln_post(x).transpose(1, 2).reshape(B, cfg.dec_width, cfg.grid_size, cfg.grid_size)
        x = self.ffn(x)
        return (x, feats) if with_features else x


# ------------------------------------------------------------------------------------ quantizer


class VectorQuantizer(nn.Module):
    """Nearest code by squared distance between L2-normalised vectors (ties go to the lowest index)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.token_size)
        self.embedding.weight.data.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.cfg.use_l2_norm else w

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> code vectors [..., token_size] (normalised rows)."""
        z = self.embedding(ids)
        return F.normalize(z, dim=-1) if self.cfg.use_l2_norm else z

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """z [B, N, token_size] -> (straight-through codes [B, N, c], ids [B, N], losses)."""
        with no_autocast(z.device.type):
            z = z.float()
            flat = z.reshape(-1, z.shape[-1])
            if self.cfg.use_l2_norm:
                flat = F.normalize(flat, dim=-1)
                z = F.normalize(z, dim=-1)
            emb = self.codebook()
            d = (flat**2).sum(1, keepdim=True) + (emb**2).sum(1) - 2 * flat @ emb.T
            ids = d.argmin(dim=1).reshape(z.shape[:-1])
            zq = self.lookup(ids)
            commitment = self.cfg.commitment_cost * torch.mean((zq.detach() - z) ** 2)
            codebook = torch.mean((zq - z.detach()) ** 2)
            zq = z + (zq - z).detach()
        return zq, ids, {"quantizer_loss": commitment + codebook, "commitment_loss": commitment, "codebook_loss": codebook}


# ------------------------------------------------------------------------------------ tokenizer


class ResTok(nn.Module):
    """The tokenizer. Public API: ``encode(images) -> ids``, ``decode(ids, num_tokens=None) -> images``."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ResTokEncoder(cfg)
        self.decoder = ResTokDecoder(cfg)
        self.pixel_encoder = PixelEncoder(cfg)
        self.pixel_decoder = PixelDecoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        if cfg.vf_feature_dim:
            self.vf_proj = nn.Conv2d(cfg.enc_width, cfg.vf_feature_dim, 1, bias=False)
            self.vf_proj_dec = nn.Conv2d(cfg.dec_width, cfg.vf_feature_dim, 1, bias=False)
        self.register_buffer("imnet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imnet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # -- input checks
    def _check_images(self, images: torch.Tensor) -> None:
        s = self.cfg.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor [B, 3, {s}, {s}] with values in [0, 1]; got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")

    def _check_ids(self, ids: torch.Tensor) -> None:
        N, V = self.cfg.num_latent_tokens, self.cfg.codebook_size
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] != N:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"token ids must be an integer tensor [B, {N}]; got {shape}")
        if ids.is_floating_point():
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V}); got values in [{int(ids.min())}, {int(ids.max())}]")

    # -- building blocks (also used by training)
    def encode_codes(self, images: torch.Tensor) -> dict:
        """images -> dict(codes [B,N,c] straight-through, ids [B,N], losses..., image_tokens)."""
        x = (images - self.imnet_mean) / self.imnet_std
        enc = self.encoder(self.pixel_encoder(x))
        z = enc["z"].reshape(enc["z"].shape[0], self.cfg.token_size, -1).transpose(1, 2)
        codes, ids, losses = self.quantize(z)
        return {"codes": codes, "ids": ids, "image_tokens": enc["image_tokens"], **losses}

    def decode_codes(self, codes: torch.Tensor, num_tokens=None) -> torch.Tensor:
        feats = self.decoder(codes, num_tokens)
        with no_autocast(codes.device.type):  # the official runs the pixel decoder in fp32 under autocast
            return self.pixel_decoder(feats.to(self.pixel_decoder.conv_in.weight.dtype))

    # -- public API
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, S, S] in [0, 1] -> ids int64 [B, N]."""
        self._check_images(images)
        return self.encode_codes(images.float())["ids"].long()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """ids [B, N] -> images float [B, 3, S, S], nominally in [0, 1] but not clamped (like the official).

        ``num_tokens`` keeps only the first n latent tokens (nested-dropout decoding)."""
        self._check_ids(ids)
        N = self.cfg.num_latent_tokens
        if num_tokens is not None and not (1 <= int(num_tokens) <= N):
            raise ValueError(f"num_tokens must be in [1, {N}], got {num_tokens}")
        return self.decode_codes(self.quantize.lookup(ids.long()), num_tokens)

    def forward(self, images: torch.Tensor, num_tokens=None) -> tuple[torch.Tensor, dict]:
        """Reconstruction for training: (images_hat, dict of ids/losses/features)."""
        enc = self.encode_codes(images)
        return self.decode_codes(enc["codes"], num_tokens), enc

    @property
    def nested_dropout_options(self) -> list[int]:
        """Kept-token counts sampled by nested dropout in training ([4, 8, ..., 128] for L)."""
        N, m = self.cfg.num_latent_tokens, self.cfg.num_min_tokens
        opts, s = [], 0
        for n in level_blocks(N):
            s += n
            if s >= m:
                opts.append(s)
        return opts

    @property
    def nested_dropout_probs(self) -> list[float]:
        """Official weights: 2^i for the short options, (sum 2^i)*(int(1/p)-1) for keeping all tokens."""
        k = len(self.nested_dropout_options)
        if self.cfg.drop_prob <= 0:
            return [0.0] * (k - 1) + [1.0]
        w = [2.0**i for i in range(k - 1)]
        w.append(sum(w) * (int(1 / self.cfg.drop_prob) - 1))
        total = sum(w)
        return [x / total for x in w]


__all__ = ["TokenizerConfig", "ResTok", "IMAGENET_MEAN", "IMAGENET_STD"]
