"""The HAR schedule: sizes, layout, mask and CFG ratios, checked against the spec's numbers and against
an independent construction of the official mask."""

import numpy as np
import pytest

from restok.schedule import HARSchedule, cfg_scale_at, level_blocks, pooling_grid


def official_group_mask(n_latent: int, ar: int) -> np.ndarray:
    """The official construction, written independently: level ids over [1,1,2,4,...], attend iff
    level(q) >= level(k), then the first ar rows strictly causal and blind to every later column."""
    blocks = level_blocks(n_latent)
    lv = np.concatenate([np.full(n, i) for i, n in enumerate(blocks)])
    m = lv[:, None] >= lv[None, :]
    m[:ar, :ar] = np.tril(np.ones((ar, ar), dtype=bool))
    m[:ar, ar:] = False
    return m


def test_official_har_numbers():
    s = HARSchedule()
    assert s.num_steps == 9 and s.seq_len == 128
    assert s.new_positions == [1, 1, 1, 1, 4, 8, 16, 32, 64]
    assert s.cache_lengths == [0, 1, 2, 3, 4, 8, 16, 32, 64]
    assert [st.total for st in s.steps] == [1, 2, 3, 4, 8, 16, 32, 64, 128]
    assert [st.cfg_ratio for st in s.steps] == [k / 8 for k in range(9)]
    assert [st.kind for st in s.steps] == ["prefill"] + ["ar"] * 3 + ["har"] * 5
    assert s.num_special_tokens_used == 63


def test_layout_matches_spec():
    lay = HARSchedule().layout
    assert lay[0] == ("class", 0)
    assert lay[1:5] == tuple(("token", i) for i in range(4))
    assert lay[5:8] == tuple(("special", j) for j in range(3))
    assert lay[8:12] == tuple(("token", i) for i in range(4, 8))
    assert lay[12:16] == tuple(("special", j) for j in range(3, 7))
    assert lay[64:96] == tuple(("token", i) for i in range(32, 64))
    assert lay[96:128] == tuple(("special", j) for j in range(31, 63))


def test_step_inputs_and_predictions():
    s = HARSchedule()
    st = s.steps
    assert st[4].token_inputs == (3,) and st[4].special_inputs == (0, 1, 2) and st[4].predicts == (4, 5, 6, 7)
    assert st[5].token_inputs == tuple(range(4, 8)) and st[5].special_inputs == tuple(range(3, 7))
    assert st[8].predicts == tuple(range(64, 128))
    # every pass embeds exactly what the previous pass predicted (so outputs feed the next graph directly)
    for prev, cur in zip(st, st[1:]):
        assert cur.token_inputs == prev.predicts[-len(cur.token_inputs):]
        assert len(cur.token_inputs) + len(cur.special_inputs) == cur.num_new
    assert sorted(i for x in st for i in x.predicts) == list(range(128))


@pytest.mark.parametrize("n,ar", [(128, 4), (128, 2), (32, 4), (64, 8), (16, 16)])
def test_mask_equals_official_construction(n, ar):
    s = HARSchedule(n, ar)
    assert np.array_equal(s.attention_mask, official_group_mask(n, ar))


def test_mask_content():
    m = HARSchedule().attention_mask
    assert not m[2, 3] and m[3, 2]  # the AR prefix is strictly causal
    assert m[4].sum() == 8 and m[4, :8].all()  # row 4 sees 0..7
    assert m[64].all()  # the last group sees everything
    assert not m[0, 1:].any()


def test_vanilla_schedule():
    v = HARSchedule().vanilla()
    assert v.is_vanilla and v.num_steps == 128 and v.seq_len == 128
    assert v.new_positions == [1] * 128 and v.cache_lengths == list(range(128))
    assert np.array_equal(v.attention_mask, np.tril(np.ones((128, 128), dtype=bool)))
    assert all(st.special_inputs == () for st in v.steps)
    assert v.steps[5].cfg_ratio == 5 / 127


def test_round_trip_and_errors():
    s = HARSchedule()
    assert HARSchedule.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="power of two"):
        HARSchedule(96, 4)
    with pytest.raises(ValueError, match="ar_tokens"):
        HARSchedule(128, 3)
    with pytest.raises(ValueError, match="ar_tokens"):
        HARSchedule(128, 1)
    with pytest.raises(ValueError, match="cls_tokens"):
        HARSchedule(128, 4, 2)


def test_levels_and_pooling():
    assert level_blocks(128) == [1, 1, 2, 4, 8, 16, 32, 64]
    assert [pooling_grid(n) for n in level_blocks(128)] == [(1, 1), (1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8)]


def test_cfg_step_schedule_official_values():
    s = HARSchedule()
    scales = [cfg_scale_at("step", 3.75, st.cfg_ratio, 0.25) for st in s.steps]
    assert scales == [1.0001, 1.0001] + [3.75] * 7
    assert cfg_scale_at("constant", 2.0, 0.3) == 2.0
    assert cfg_scale_at("linear", 3.0, 0.5) == pytest.approx(2.0001)
    assert cfg_scale_at("cosine", 3.0, 1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown cfg schedule"):
        cfg_scale_at("sigmoid", 3.0, 0.5)
