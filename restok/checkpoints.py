"""Official checkpoints in, restok checkpoints out.

``load_tokenizer`` / ``load_generator`` accept:
- a bare official state dict: ``.bin`` / ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``;
- a Hugging Face snapshot folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``); its
  config, when present, wins over ``preset``;
- a Hugging Face hub id such as ``xushu-me/restok_l_128.r256_in1k`` (downloaded with huggingface_hub when
  online; offline it must already be in the local hub cache);
- a restok checkpoint: a folder written by ``save_checkpoint`` or a single ``.safetensors`` carrying our
  config in its metadata.

Keys are matched strictly after removing the known prefixes (``_orig_mod.``, ``module.``) and the known
training-only keys (``foundation_model.*``, ``vf_proj*``, ``feat_mask_token``); any other difference is an
error that lists the keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from restok.fileutil import atomic_path, staged
from restok.models.generator import GeneratorConfig, HARGenerator
from restok.models.presets import get_preset
from restok.models.tokenizer import ResTok, TokenizerConfig

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STRIP_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(ValueError):
    """A checkpoint could not be found, read or matched to the model; the message says what to do."""


# ----------------------------------------------------------------------------------- reading


def _is_training_only(key: str) -> bool:
    return key.startswith("foundation_model.") or key.startswith("vf_proj") or key.endswith("feat_mask_token")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # truncated or not a safetensors file
        raise CheckpointError(f"cannot read {path} as safetensors ({e}); is the file complete?") from e


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True) ({e.__class__.__name__}: {e}); "
            "restok only reads plain tensor state dicts (no pickled code)"
        ) from e
    if isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _read_torch(path), {}
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r} (use .safetensors, .bin, .pt or .pth)")


def _weights_in_folder(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, "pytorch_model.bin", "ema_model.bin", "model.bin", "model.pt"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if len(found) == 1:
        return folder / found[0]
    raise CheckpointError(
        f"no weights file in {folder} (looked for {WEIGHTS_NAME} or pytorch_model.bin"
        + (f"; found several candidates: {', '.join(found)}" if found else "")
        + ")"
    )


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~")) and "\\" not in s


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local file or folder, and huggingface_hub is not installed to fetch it "
            "from the hub; pip install 'restok[hub]', or download the files and pass the folder"
        ) from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face hub ({e.__class__.__name__}: {e}). "
            + ("HF_HUB_OFFLINE is set and the files are not in the local hub cache. " if offline else "")
            + "On a machine without network, download the repository elsewhere "
            f"(huggingface-cli download {repo_id} --local-dir DIR) and pass DIR."
        ) from e


def _resolve(path_or_repo_id: str | os.PathLike) -> tuple[dict, dict[str, str], dict | None, str]:
    """-> (state dict, safetensors metadata, config.json content or None, description)."""
    p = Path(path_or_repo_id).expanduser()
    if not p.exists():
        s = str(path_or_repo_id)
        if _looks_like_hub_id(s):
            p = _download(s)
        else:
            raise CheckpointError(f"checkpoint {s!r} not found (no such file or folder, and not a hub id owner/name)")
    config = None
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            try:
                config = json.loads((p / CONFIG_NAME).read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p / CONFIG_NAME} is not valid JSON ({e})") from e
        weights = _weights_in_folder(p)
    else:
        weights = p
    sd, meta = _read_weights(weights)
    return sd, meta, config, str(weights)


# ----------------------------------------------------------------------------- configs


_VIT_SIZES = {"small": (512, 6, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}
_GPT_SIZES = {
    "GPT-B": (768, 12, 12), "GPT-L": (1024, 24, 16), "GPT-XL": (1280, 36, 20),
    "GPT-XXL": (1536, 48, 24), "GPT-XXXL": (2560, 48, 40),
}


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise CheckpointError(f"unsupported official tokenizer setting: {what} (restok implements the released ResTok)")


def tokenizer_config_from_official(cfg: dict) -> TokenizerConfig:
    """An official ResTok config (the OmegaConf dict saved as config.json) -> TokenizerConfig."""
    vq = cfg.get("model", {}).get("vq_model", cfg.get("vq_model", cfg))
    crop = cfg.get("dataset", {}).get("preprocessing", {}).get("crop_size", 256)
    _require(vq.get("vae_encoder", False), "vae_encoder must be true")
    _require(not vq.get("learnable_latent_tokens", False), "learnable_latent_tokens must be false")
    _require(vq.get("learnable_dec_image_tokens", True), "learnable_dec_image_tokens must be true")
    _require(vq.get("multi_quant", True), "multi_quant must be true")
    _require(vq.get("latent_hierarchy", True), "latent_hierarchy must be true")
    _require(float(vq.get("reduction_ratio", 0.5)) == 0.5, "reduction_ratio must be 0.5")
    _require(vq.get("vit_enc_patch_size", 16) == 16 and vq.get("vit_dec_patch_size", 16) == 16, "patch size 16")
    enc = _VIT_SIZES.get(vq.get("vit_enc_model_size", "large"))
    dec = _VIT_SIZES.get(vq.get("vit_dec_model_size", "large"))
    _require(enc is not None and dec is not None, f"ViT sizes must be one of {list(_VIT_SIZES)}")
    stages = vq.get("hierarchy_stages", 4) if vq.get("merge_tokens", False) else 0
    return TokenizerConfig(
        image_size=int(crop),
        codebook_size=int(vq.get("codebook_size", 8192)),
        token_size=int(vq.get("token_size", 8)),
        num_latent_tokens=int(vq.get("num_latent_tokens", 128)),
        num_min_tokens=int(vq.get("num_min_tokens", 4)),
        enc_width=enc[0], enc_layers=enc[1], enc_heads=enc[2],
        dec_width=dec[0], dec_layers=dec[1], dec_heads=dec[2],
        hierarchy_stages=int(stages),
        residual_image_tokens=bool(vq.get("residual_image_tokens", True)),
        residual_latent_tokens=bool(vq.get("residual_latent_tokens", True)),
        is_legacy=bool(vq.get("is_legacy", True)),
        rope_theta=float(vq.get("rope_base_len", 10000)),
        use_l2_norm=bool(vq.get("use_l2_norm", False)),
        commitment_cost=float(vq.get("commitment_cost", 0.25)),
        drop_prob=float(vq.get("drop_prob", 0.2)),
    )


_GEN_IGNORED = {"max_batch_size", "max_seq_len", "caption_dim", "initializer_range", "model_type"}


def generator_config_from_official(cfg: dict) -> GeneratorConfig:
    """An official generator config (ModelArgs fields, or the OmegaConf ``model.generator`` block)."""
    g = cfg.get("model", {}).get("generator", cfg.get("generator", cfg))
    if "config" in g and isinstance(g["config"], dict):
        g = g["config"]
    kind = g.get("gpt_type", g.get("model_type", "c2i"))
    if kind not in ("c2i",) and kind not in _GPT_SIZES:
        raise CheckpointError(f"unsupported generator type {kind!r}: restok runs class-conditional (c2i) models")
    known = {k: v for k, v in g.items() if k in GeneratorConfig.__dataclass_fields__}
    if g.get("model_type") in _GPT_SIZES:
        dim, n_layer, n_head = _GPT_SIZES[g["model_type"]]
        known.update(dim=dim, n_layer=n_layer, n_head=n_head)
        if "dropout_p" in g:
            known.update(resid_dropout_p=g["dropout_p"], ffn_dropout_p=g["dropout_p"])
    if not g.get("har", True):
        raise CheckpointError("this is a vanilla (non-HAR) LlamaGen config; restok loads HAR generators")
    try:
        return GeneratorConfig(**known)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid generator config: {e}") from e


def _config_for(kind: str, preset: str, meta: dict[str, str], config_json: dict | None, source: str):
    """Our metadata, then our config.json, then an official config.json, then the preset."""
    ours = None
    if meta.get("restok_format"):
        if meta.get("restok_kind") != kind:
            raise CheckpointError(f"{source} is a restok {meta.get('restok_kind')} checkpoint, not a {kind}")
        ours = json.loads(meta["restok_config"])
    elif config_json is not None and "restok_format" in config_json:
        if config_json.get("kind") != kind:
            raise CheckpointError(f"{source} is a restok {config_json.get('kind')} checkpoint, not a {kind}")
        ours = config_json["config"]
    cls = TokenizerConfig if kind == "tokenizer" else GeneratorConfig
    if ours is not None:
        try:
            return cls.from_dict(ours)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: bad restok {kind} config ({e})") from e
    if config_json is not None:
        if kind == "tokenizer":
            return tokenizer_config_from_official(config_json)
        return generator_config_from_official(config_json)
    p = get_preset(preset)
    return p.tokenizer if kind == "tokenizer" else p.generator


# ----------------------------------------------------------------------------- matching


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def match_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, hint: str = "") -> dict:
    """Strip known prefixes and training-only keys, then require an exact key and shape match."""
    expected = model.state_dict()
    clean: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k2 = _strip(k)
        if k2 not in expected and _is_training_only(k2):
            continue
        clean[k2] = v
    missing = sorted(set(expected) - set(clean))
    unexpected = sorted(set(clean) - set(expected))
    shapes = sorted(k for k in set(clean) & set(expected) if tuple(clean[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if shapes:
            parts.append(
                f"shape mismatches ({len(shapes)}): "
                + _fmt_keys([f"{k} {tuple(clean[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes])
            )
        if hint:
            parts.append(hint)
        raise CheckpointError("; ".join(parts))
    return clean


def _generator_hint(sd: dict[str, torch.Tensor]) -> str:
    w = {_strip(k): v for k, v in sd.items()}.get("tok_embeddings.weight")
    if w is None:
        return "this does not look like a LlamaGen generator state dict (no tok_embeddings.weight)"
    n_layer = 1 + max((int(k.split(".")[1]) for k in map(_strip, sd) if k.startswith("layers.")), default=-1)
    return f"the checkpoint has dim {w.shape[1]}, vocab {w.shape[0]}, {n_layer} layers: pick the matching preset"


def _tokenizer_hint(sd: dict[str, torch.Tensor]) -> str:
    w = {_strip(k): v for k, v in sd.items()}.get("encoder.patch_embed.weight")
    if w is None:
        return "this does not look like a ResTok state dict (no encoder.patch_embed.weight)"
    return f"the checkpoint has encoder width {w.shape[0]}: pick the matching preset"


# --------------------------------------------------------------------------------- loading


def weights_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, dtypes, shapes, bytes): ties checkpoints and exports to weights."""
    h = hashlib.sha256()
    for k, v in sorted(sd.items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_recorded_hash(sd: dict, meta: dict[str, str], config_json: dict | None, source: str) -> None:
    """restok checkpoints record their weights' sha256: a modified or corrupt file is refused, not loaded."""
    want = meta.get("restok_weights_sha256") or (config_json or {}).get("weights_sha256")
    if want and weights_sha256(sd) != want:
        raise CheckpointError(f"{source} does not match the sha256 its checkpoint recorded (modified or corrupt); "
                              "restore it from where it came from")


def _load(kind: str, path_or_repo_id, preset: str, device) -> nn.Module:
    sd, meta, config_json, source = _resolve(path_or_repo_id)
    _check_recorded_hash(sd, meta, config_json, source)
    cfg = _config_for(kind, preset, meta, config_json, source)
    model = ResTok(cfg) if kind == "tokenizer" else HARGenerator(cfg)
    hint = (_tokenizer_hint if kind == "tokenizer" else _generator_hint)(sd)
    clean = match_state_dict(model, sd, source, hint)
    model.load_state_dict(clean, strict=True)
    return model.to(device).eval()


def load_tokenizer(path_or_repo_id: str | os.PathLike, preset: str = "L", device: str | torch.device = "cpu") -> ResTok:
    """A ResTok tokenizer in eval mode from an official or restok checkpoint (see the module docstring)."""
    return _load("tokenizer", path_or_repo_id, preset, device)


def load_generator(path_or_repo_id: str | os.PathLike, preset: str = "L", device: str | torch.device = "cpu") -> HARGenerator:
    """A HAR generator in eval mode from an official or restok checkpoint (see the module docstring)."""
    return _load("generator", path_or_repo_id, preset, device)


# --------------------------------------------------------------------------------- writing


def _kind_of(model: nn.Module) -> str:
    if isinstance(model, ResTok):
        return "tokenizer"
    if isinstance(model, HARGenerator):
        return "generator"
    raise TypeError(f"save_checkpoint takes a ResTok or HARGenerator, got {type(model).__name__}")


def _is_restok_folder(p: Path) -> bool:
    try:
        return "restok_format" in json.loads((p / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False


def save_checkpoint(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a restok checkpoint, atomically.

    ``path`` ending in ``.safetensors`` gives one file with the config in its metadata; any other path is a
    folder with ``model.safetensors`` and ``config.json``. Files are written under a temporary name and
    renamed when complete, so an interrupted save never leaves something that loads.
    """
    from safetensors.torch import save_file

    kind = _kind_of(model)
    path = Path(path)
    cfg = model.cfg.to_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    digest = weights_sha256(tensors)
    meta = {"restok_format": str(FORMAT_VERSION), "restok_kind": kind, "restok_config": json.dumps(cfg),
            "restok_weights_sha256": digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not _is_restok_folder(path))):
        raise CheckpointError(f"{path} exists and is not a restok checkpoint; refusing to overwrite it")
    with staged(path, owned=lambda d: [WEIGHTS_NAME, CONFIG_NAME]) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        os.chmod(tmp / WEIGHTS_NAME, 0o644)
        doc = {"restok_format": FORMAT_VERSION, "kind": kind, "config": cfg, "weights_sha256": digest, **(extra or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    return path


__all__ = [
    "CheckpointError",
    "generator_config_from_official",
    "load_generator",
    "load_tokenizer",
    "match_state_dict",
    "save_checkpoint",
    "tokenizer_config_from_official",
]
