"""Checkpoints: our format round trip, official formats, strict matching, offline behaviour, atomicity."""

import json

import pytest
import torch
from safetensors.torch import save_file

import restok
from restok.checkpoints import CheckpointError, generator_config_from_official, tokenizer_config_from_official
from restok.models.presets import get_preset


def _same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ
    return True


@pytest.mark.parametrize("as_file", [False, True])
def test_round_trip(tmp_path, tiny_tokenizer, tiny_generator, as_file):
    suffix = ".safetensors" if as_file else ""
    p_tok = restok.save_checkpoint(tiny_tokenizer, tmp_path / f"tok{suffix}")
    p_gen = restok.save_checkpoint(tiny_generator, tmp_path / f"gen{suffix}")
    # the preset argument is ignored: the checkpoint's own config wins
    tok = restok.load_tokenizer(p_tok, preset="L")
    gen = restok.load_generator(p_gen, preset="L")
    assert tok.cfg == tiny_tokenizer.cfg, (tok.cfg, tiny_tokenizer.cfg)
    assert gen.cfg == tiny_generator.cfg, (gen.cfg, tiny_generator.cfg)
    assert _same_params(tok, tiny_tokenizer) and _same_params(gen, tiny_generator)
    assert not tok.training and not gen.training
    ids = torch.randint(0, 1024, (1, 128))
    # same weights, separate instances: equal up to float rounding (kernels may depend on alignment)
    assert torch.allclose(tok.decode(ids), tiny_tokenizer.decode(ids), atol=1e-5)
    with pytest.raises(CheckpointError, match="not a tokenizer"):
        restok.load_tokenizer(p_gen)


def test_bare_official_state_dict_with_prefixes_and_training_keys(tmp_path, tiny_tokenizer, tiny_generator):
    sd = {f"_orig_mod.{k}": v for k, v in tiny_tokenizer.state_dict().items()}
    sd["foundation_model.model.cls_token"] = torch.zeros(1, 1, 8)
    sd["vf_proj.weight"] = torch.zeros(4, 64, 1, 1)
    sd["decoder.feat_mask_token"] = torch.zeros(1, 1, 64)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    tok = restok.load_tokenizer(tmp_path / "pytorch_model.bin", preset="tiny")
    assert _same_params(tok, tiny_tokenizer)
    gsd = {f"module.{k}": v for k, v in tiny_generator.state_dict().items()}
    save_file(gsd, str(tmp_path / "gen.safetensors"))
    assert _same_params(restok.load_generator(tmp_path / "gen.safetensors", preset="tiny"), tiny_generator)


def test_strict_errors_name_the_keys(tmp_path, tiny_generator):
    sd = dict(tiny_generator.state_dict())
    del sd["layers.0.attention.wo.weight"]
    sd["layers.0.attention.bogus"] = torch.zeros(3)
    torch.save(sd, tmp_path / "g.pt")
    with pytest.raises(CheckpointError) as e:
        restok.load_generator(tmp_path / "g.pt", preset="tiny")
    msg = str(e.value)
    assert "missing keys (1): layers.0.attention.wo.weight" in msg
    assert "unexpected keys (1): layers.0.attention.bogus" in msg
    # wrong preset: shape mismatches and a hint with the checkpoint's real shape
    torch.save(dict(tiny_generator.state_dict()), tmp_path / "g2.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches .*dim 128, vocab 1024, 4 layers"):
        restok.load_generator(tmp_path / "g2.pt", preset="B")


def test_hf_snapshot_folder_config_wins(tmp_path, tiny_generator):
    folder = tmp_path / "snap"
    folder.mkdir()
    c = tiny_generator.cfg
    official = dict(dim=c.dim, n_layer=c.n_layer, n_head=c.n_head, n_kv_head=None, multiple_of=256,
                    ffn_dim_multiplier=None, rope_base=10000, norm_eps=1e-5, initializer_range=0.02,
                    token_dropout_p=0.1, attn_dropout_p=0.0, resid_dropout_p=0.1, ffn_dropout_p=0.1,
                    drop_path_rate=0.0, num_classes=c.num_classes, caption_dim=2048, class_dropout_prob=0.1,
                    model_type="c2i", vocab_size=c.vocab_size, cls_token_num=1, block_size=128,
                    max_batch_size=32, max_seq_len=2048, ar_token_num=4, spe_token_num=127)
    (folder / "config.json").write_text(json.dumps(official))
    torch.save({f"_orig_mod.{k}": v for k, v in tiny_generator.state_dict().items()}, folder / "pytorch_model.bin")
    gen = restok.load_generator(folder, preset="L")
    assert gen.cfg == tiny_generator.cfg and _same_params(gen, tiny_generator)


def test_official_tokenizer_config_conversion():
    infer = {
        "model": {"vq_model": dict(
            codebook_size=8192, token_size=8, use_l2_norm=True, commitment_cost=0.25, entropy_loss_ratio=0.0,
            vit_enc_model_size="large", vit_dec_model_size="large", vit_enc_patch_size=16, vit_dec_patch_size=16,
            rope_base_len=10000, num_latent_tokens=128, num_min_tokens=4, test_num_latent_tokens=128,
            merge_tokens=True, hierarchy_stages=4, reduction_ratio=0.5, residual_image_tokens=True,
            residual_latent_tokens=True, learnable_latent_tokens=False, learnable_dec_image_tokens=True,
            multi_quant=True, vae_encoder=True, drop_latent_tokens=False, drop_prob=0.0, latent_hierarchy=True,
            encoder_feature_supervision=False, decoder_feature_supervision=False, learnable_dec_feat_tokens=True)},
        "dataset": {"preprocessing": {"crop_size": 256}},
    }
    cfg = tokenizer_config_from_official(infer)
    assert cfg == type(cfg)(**{**get_preset("L").tokenizer.to_dict(), "drop_prob": 0.0})
    infer["model"]["vq_model"]["learnable_latent_tokens"] = True
    with pytest.raises(CheckpointError, match="learnable_latent_tokens"):
        tokenizer_config_from_official(infer)
    gen = generator_config_from_official({"model": {"generator": {"model_type": "GPT-B", "vocab_size": 8192,
                                                                  "block_size": 128, "gpt_type": "c2i", "har": True}}})
    assert gen == get_preset("B").generator


def test_missing_truncated_and_offline(tmp_path, tiny_generator, monkeypatch):
    with pytest.raises(CheckpointError, match="not found"):
        restok.load_generator(tmp_path / "nope.safetensors")
    p = restok.save_checkpoint(tiny_generator, tmp_path / "g.safetensors")
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is the file complete"):
        restok.load_generator(tmp_path / "cut.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hub"):
        restok.load_generator("restok-test/does-not-exist")


def test_save_is_atomic_and_refuses_foreign_folders(tmp_path, tiny_generator, monkeypatch):
    target = restok.save_checkpoint(tiny_generator, tmp_path / "ckpt")
    before = (target / "model.safetensors").read_bytes()

    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        restok.save_checkpoint(tiny_generator, tmp_path / "ckpt")
    with pytest.raises(OSError, match="disk full"):
        restok.save_checkpoint(tiny_generator, tmp_path / "new.safetensors")
    monkeypatch.undo()
    assert (target / "model.safetensors").read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        restok.save_checkpoint(tiny_generator, foreign)
