"""The binding plan (restok.runtime.plan) on its own: the buffers it asks every backend to allocate, how the
passes chain, the shapes it resolves per pass and batch, what the host supplies per run."""

import numpy as np
import pytest

from restok.manifest import Manifest
from restok.runtime.plan import CONSTANT, HOST_INPUT, STATE, BindingPlan, RunInputs
from restok.runtime.pipeline import Pipeline
from restok.sampling_params import SamplingParams


def test_host_inputs_are_small(tiny_artifacts):
    """The host supplies 8 noise keys per image plus a few settings: well under 1 KiB per image."""
    plan = BindingPlan(Manifest.read(tiny_artifacts))
    per_image = plan.host_bytes(4) / 4
    assert 32 <= per_image <= 256, per_image


def test_concat_plan_chains_the_passes(tiny_artifacts):
    m = Manifest.read(tiny_artifacts)
    plan = BindingPlan(m)
    steps = m.har_schedule().steps
    assert [p.index for p in plan.passes] == list(range(len(steps)))
    B, R = m.max_batch, m.rows(m.max_batch)
    for p, st in zip(plan.passes, steps):
        tokens = next(b for b in p.inputs if b.tensor.role == "tokens")
        assert plan.buffers[tokens.buffer].shape == (R, st.num_new)
        assert plan.buffers[tokens.buffer].kind == (HOST_INPUT if st.index == 0 else STATE)
        # pass i's tokens input takes pass i-1's predictions in its first columns
        assert p.tokens_from == (None if st.index == 0 else f"next_tokens.{st.index - 1}")
        assert p.tokens_width == (0 if st.index == 0 else steps[st.index - 1].num_new)
        past = [b for b in p.inputs if b.tensor.role == "kv_past"]
        assert past and all(plan.shape(b, 3, p)[2] == st.cached for b in past)  # the past of this pass
        if st.index:  # ... is the previous pass's present buffer, not a copy
            prev = {b.tensor.feeds: b.buffer for b in plan.passes[st.index - 1].outputs if b.tensor.role == "kv_present"}
            assert all(b.buffer == prev[b.tensor.name] for b in past)
        assert {plan.buffers[b.buffer].kind for b in p.inputs if b.tensor.role in ("embed_sources", "positions")} == {CONSTANT}
    assert plan.constants()["positions.4"].tolist() == list(steps[4].position_ids)
    dec_in, dec_out = plan.decoder
    assert plan.buffers[dec_in[0].buffer].shape == (B, m.num_tokens)
    assert plan.shape(dec_out[0], 3) == (3, 3, m.image_size, m.image_size)


def test_inplace_plan_shares_one_cache_buffer(tiny_artifacts_inplace):
    plan = BindingPlan(Manifest.read(tiny_artifacts_inplace))
    caches = {b.buffer for p in plan.passes for b in p.inputs if b.tensor.role == "kv_cache"}
    outs = {b.buffer for p in plan.passes for b in p.outputs if b.tensor.role == "kv_cache_out"}
    assert caches == outs and len(caches) == 2 * 4  # one buffer per layer and key/value, in and out of every pass


def test_host_values_lay_out_one_run(tiny_artifacts):
    """Pass 0's tokens hold the labels then the null class (guided), each setting one value per image, the
    per-pass guidance scale from the schedule."""
    p = Pipeline(tiny_artifacts)
    m = p.manifest
    run = p._run_inputs(np.array([3, 5]), [SamplingParams(), SamplingParams(top_k=7, cfg_scale=1.0)],
                        np.arange(16, dtype=np.int32).reshape(2, 8))
    values = p.backend.plan.host_values(run)
    assert values["tokens.0"][:, 0].tolist() == [3, 5, m.null_class, m.null_class]
    assert values["top_k"].tolist() == [0, 7] and values["noise_keys"].shape == (2, 8)
    sched = m.har_schedule()
    assert values["cfg_scale.8"].tolist() == pytest.approx(SamplingParams().cfg_scales(sched)[8:] + [1.0])
    assert values["cfg_scale.0"][1] == 1.0 and values["cfg_scale.0"][0] < values["cfg_scale.8"][0]


def test_padded_runs_add_inert_images():
    run = RunInputs(np.array([4, 2]), np.ones((2, 8), np.int32), np.full((9, 2), 3.0, np.float32),
                    np.array([0.5, 1.0], np.float32), np.array([3, 0]), np.array([0.9, 1.0], np.float32))
    padded = run.padded(4)
    assert padded.batch == 4 and padded.labels.tolist() == [4, 2, 0, 0]
    assert padded.cfg_scales[:, 2:].tolist() == [[1.0, 1.0]] * 9 and padded.top_k.tolist() == [3, 0, 0, 0]
    assert padded.top_p.tolist()[2:] == [1.0, 1.0] and not padded.noise_keys[2:].any()
    assert run.needs_top_k and run.needs_top_p and run.padded(2) is run
    with pytest.raises(ValueError, match="cannot pad"):
        run.padded(1)
