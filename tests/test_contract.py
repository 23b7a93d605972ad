"""The graph I/O contract (restok.contract) of an export: one generator graph for every pass and batch size,
the roles and shapes the manifest records for its inputs and outputs, the ONNX file agreeing, the binding
plan resolving every pass from the schedule, and the weights stored once."""

import onnx

from restok.manifest import Manifest
from restok.models.presets import build_generator
from restok.runtime.plan import BindingPlan
from restok.schedule import HARSchedule


def test_one_generator_graph_and_its_contract(tiny_artifacts):
    m = Manifest.read(tiny_artifacts)
    assert set(m.graphs) == {"generator", "decoder", "encoder"} and m.max_batch == 4 and m.guided
    g = m.graphs["generator"]
    roles = {t.name: t.role for t in g.inputs}
    assert roles["tokens"] == "tokens" and roles["noise_keys"] == "noise_keys" and roles["positions"] == "positions"
    assert {n for n, r in roles.items() if r == "sampling"} == {"cfg_scale", "temperature", "top_k", "top_p"}
    assert g.input("tokens").shape == ("rows", "new") and g.input("noise_keys").shape == ("batch", 8)
    assert g.input("cfg_scale").shape == ("batch",) and g.input("past_key_0").shape == ("rows", 4, "past", 32)
    assert g.output("present_key_0").feeds == "past_key_0" and g.output("logits").shape == ("rows", "new", 1024)
    # the ONNX file agrees: symbolic batch, new positions and past length
    model = onnx.load(str(tiny_artifacts / g.file), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims["tokens"][1] == "new" and isinstance(dims["tokens"][0], str) and dims["past_key_0"][2] == "past"
    # the plan resolves every pass from the schedule
    plan = BindingPlan(m)
    s = HARSchedule()
    for p, st in zip(plan.passes, s.steps):
        tok = next(b for b in p.inputs if b.tensor.role == "tokens")
        assert plan.shape(tok, 3, p) == (6, st.num_new)
        if st.cached:
            past = next(b for b in p.inputs if b.tensor.name == "past_key_0")
            assert plan.shape(past, 1, p) == (2, 4, st.cached, 32) and past.buffer == f"kv.{st.index - 1}.present_key_0"
        assert p.tokens_width == len(st.token_inputs)
    # the weights are stored once
    gen_bytes = (tiny_artifacts / "generator" / "weights.bin").stat().st_size
    params = sum(p.numel() for p in build_generator("tiny").parameters())
    assert 4 * params <= gen_bytes < 1.1 * 4 * params
    onnx.checker.check_model(str(tiny_artifacts / g.file))
