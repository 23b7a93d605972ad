"""The generator model (restok.models.generator): cached passes equal teacher forcing, bad teacher-forcing
input is refused, the official init zeroes the output head (and the seeded presets do not)."""

import pytest
import torch


def _cached_logits_in_layout(gen, ids, labels, schedule):
    """Run every pass over the KV cache with teacher-forced inputs; concatenate their logits."""
    caches = gen.new_kv_caches(ids.shape[0], schedule)
    out = []
    with torch.no_grad():
        for st in schedule.steps:
            toks = ids[:, list(st.token_inputs)] if st.token_inputs else None
            out.append(gen.forward_step(st, toks, labels, caches, schedule))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("mode", ["har", "vanilla"])
def test_cached_steps_equal_teacher_forcing(tiny_generator, mode):
    gen = tiny_generator
    sched = gen.schedule if mode == "har" else gen.vanilla_schedule()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, gen.cfg.vocab_size, (3, 128), generator=g)
    labels = torch.tensor([0, 5, gen.cfg.null_class])
    with torch.no_grad():
        tf = gen(ids, labels, sched)
    assert tf.std() > 0.5  # the logits vary: the comparison is not vacuous
    cached = _cached_logits_in_layout(gen, ids, labels, sched)
    assert (cached - tf).abs().max().item() < 1e-4


def test_bad_teacher_forcing_input(tiny_generator):
    gen = tiny_generator
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1024\)"):
        gen(torch.full((1, 128), 1024), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[B, 128\]"):
        gen(torch.zeros(1, 100, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="class labels"):
        gen(torch.zeros(1, 128, dtype=torch.long), torch.tensor([11]))


def test_official_init_zeroes_head_and_presets_do_not():
    from restok.models.presets import build_generator

    assert build_generator("tiny").output.weight.abs().max() == 0
    assert build_generator("tiny", seed=3).output.weight.abs().min() > 0
