"""Export and runtime: one generator graph for every pass and batch size, the graph I/O contract in the
manifest, PyTorch vs ONNX Runtime parity (fp32 and fp16), batch invariance, per-image sampling settings, a
torch-free runtime, Polygraphy replay files, and clear errors for damaged or mismatched artifacts."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from restok.manifest import ArtifactError, Manifest
from restok.models.presets import build_generator
from restok.measure.parity import run_check
from restok.runtime import Pipeline, SamplingParams
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


def test_host_inputs_are_small(tiny_artifacts):
    """The host supplies 8 noise keys per image plus a few settings: well under 1 KiB per image."""
    plan = BindingPlan(Manifest.read(tiny_artifacts))
    per_image = plan.host_bytes(4) / 4
    assert 32 <= per_image <= 256, per_image


def test_parity_fp32(tiny_artifacts):
    r = run_check(tiny_artifacts, images=16)
    assert r["passed"], r["summary"]
    assert len(r["steps"]) == 9
    for s in r["steps"]:
        assert s["logits_max_abs_error"] <= 1e-3
        assert s["logits_std"] > 0.1  # the compared logits vary: the check is not vacuous
        assert s["tokens_identical"] == 1.0
    assert r["generation"]["token_agreement"] == 1.0 and r["generation"]["identical_images"] == 16
    assert r["decoder"]["psnr_db"] >= 60 and r["decoder"]["image_std"] > 0.05
    assert r["encoder"]["ids_identical"] == 1.0


def test_polygraphy_replay_of_a_pass(tiny_artifacts, tmp_path):
    r = run_check(tiny_artifacts, images=2, polygraphy_dir=tmp_path / "pg")
    cmd = r["polygraphy"]["replay"]["generator_pass5"].split() + ["--atol", "1e-3", "--rtol", "1e-3"]
    exe = shutil.which("polygraphy") or str(__import__("pathlib").Path(sys.executable).parent / "polygraphy")
    p = subprocess.run([exe] + cmd[1:], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "PASSED" in p.stdout + p.stderr


def test_fp16_graphs(tiny_artifacts_fp16):
    m = Manifest.read(tiny_artifacts_fp16)
    g = m.graphs["generator"]
    assert g.input("past_key_0").dtype == "float16" and g.output("logits").dtype == "float32"
    # norms and softmax stay in float32
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_artifacts_fp16 / g.file), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    ops = [n for n in model.graph.node if n.op_type in ("Softmax", "ReduceMean", "LayerNormalization")]
    assert ops and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in ops)
    r = run_check(tiny_artifacts_fp16, images=32)
    assert r["passed"]  # fp16 is reported, not gated, by default
    # what fp16 really achieves on this model (measured: 99.6% of tokens over 64 images, 53.7 dB): bound it
    # close to that (one image that diverges early costs 3% of the tokens of 32)
    assert r["generation"]["token_agreement"] >= 0.96, r["summary"]
    assert r["decoder"]["psnr_db"] >= 50, r["summary"]


TORCH_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, Block())
"""


def test_runtime_without_torch(tiny_artifacts, tmp_path):
    ref = Pipeline(tiny_artifacts, "torch").generate([3, 7], seed=4)
    code = TORCH_BLOCK + f"""
import numpy as np
from restok.runtime import Pipeline
g = Pipeline({str(tiny_artifacts)!r}).generate([3, 7], seed=4)
np.save({str(tmp_path / 'tok.npy')!r}, g.tokens)
np.save({str(tmp_path / 'img.npy')!r}, g.images)
assert "torch" not in sys.modules
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "tok.npy"), ref.tokens)
    assert np.abs(np.load(tmp_path / "img.npy") - ref.images).max() < 1e-3


def test_batch_invariance(tiny_artifacts):
    """Image k of a run is the same, bit for bit, generated alone or in a batch of any size."""
    p = Pipeline(tiny_artifacts)
    labels = [3, 1, 4, 1]
    full = p.generate(labels, seed=7)
    for k in range(4):
        solo = p.generate([labels[k]], seed=7, noise_start=k)
        assert np.array_equal(solo.tokens[0], full.tokens[k]) and np.array_equal(solo.images[0], full.images[k]), k
    mid = p.generate(labels[1:3], seed=7, noise_start=1)
    assert np.array_equal(mid.images, full.images[1:3])
    again = p.generate(labels, seed=7)  # stale buffers from smaller runs change nothing
    assert np.array_equal(again.tokens, full.tokens)


def test_sampling_parameters_are_per_image_inputs(tiny_artifacts):
    """One export serves every sampling setting, one batch mixes settings, and ONNX Runtime follows the
    reference for each."""
    ort, ref = Pipeline(tiny_artifacts), Pipeline(tiny_artifacts, "torch")
    settings = [SamplingParams(cfg_scale=1.0, top_p=1.0), SamplingParams(top_k=5, top_p=1.0, temperature=0.7),
                SamplingParams(cfg_schedule="linear", cfg_scale=2.0, top_p=0.5), SamplingParams()]
    mixed = ort.generate([1, 2, 3, 4], settings, seed=9)
    assert np.array_equal(mixed.tokens, ref.generate([1, 2, 3, 4], settings, seed=9).tokens)
    for k, sp in enumerate(settings):
        alone = ort.generate([k + 1], sp, seed=9, noise_start=k)
        assert np.array_equal(alone.tokens[0], mixed.tokens[k]), sp
    assert len({mixed.tokens[k].tobytes() for k in range(4)}) == 4
    greedy = ort.generate([1, 2], SamplingParams(top_k=1), seed=1).tokens
    assert np.array_equal(greedy, ort.generate([1, 2], SamplingParams(top_k=1), seed=2).tokens)


@pytest.fixture
def damaged(tiny_artifacts, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, d)
    return d


def test_missing_graph(damaged):
    (damaged / "generator" / "generator.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"generator\.onnx is missing"):
        Manifest.read(damaged)


def test_truncated_weights(damaged):
    w = damaged / "generator" / "weights.bin"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"weights\.bin has 1000 bytes"):
        Pipeline(damaged)


def test_hash_mismatch(damaged):
    p = damaged / "tokenizer" / "decoder.onnx"
    b = bytearray(p.read_bytes())
    b[-10] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(ArtifactError, match=r"decoder\.onnx does not match the sha256"):
        Manifest.read(damaged)


def test_previous_schema_is_refused_with_the_command(damaged):
    mp = damaged / "manifest.json"
    d = json.loads(mp.read_text())
    d["schema_version"] = 1
    mp.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="schema version 1.*re-export.*restok export"):
        Manifest.read(damaged)


def test_bad_labels_and_batch(tiny_artifacts):
    p = Pipeline(tiny_artifacts)
    with pytest.raises(ValueError, match=r"class ids \[10\] are outside \[0, 10\)"):
        p.generate([1, 10])
    with pytest.raises(ValueError, match="non-empty"):
        p.generate([])


def test_inplace_kv_cache(tiny_artifacts_inplace, tiny_artifacts):
    m = Manifest.read(tiny_artifacts_inplace)
    assert m.kv_cache == "inplace" and m.opset == 24 and m.graphs["decoder"].opset == 20
    g = m.graphs["generator"]
    assert g.input("cache_key_0").shape == g.output("cache_key_out_0").shape == ("rows", 4, 128, 32)
    assert g.output("cache_key_out_0").aliases == "cache_key_0"
    model = onnx.load(str(tiny_artifacts_inplace / g.file), load_external_data=False)
    assert sum(n.op_type == "TensorScatter" for n in model.graph.node) == 8  # k and v of 4 layers
    r = run_check(tiny_artifacts_inplace, images=4)
    assert r["passed"], r["summary"]
    # the same tokens as the past/present graph, and one buffer per cache serves every pass
    p = Pipeline(tiny_artifacts_inplace)
    a = p.generate([1, 2], seed=3)
    b = Pipeline(tiny_artifacts).generate([1, 2], seed=3)
    assert np.array_equal(a.tokens, b.tokens)
    assert "kv.cache_key_0" in p.backend.buf and not any(k.startswith("kv.0.") for k in p.backend.buf)
    again = p.generate([1, 2], seed=3)  # stale slots from the previous image are masked
    assert np.array_equal(again.tokens, a.tokens)
    # the past/present fallback (for TensorRT < 10.15) shares weights.bin and draws the same tokens
    fb = m.kv_cache_view("concat")
    assert fb.kv_cache == "concat" and fb.opset == 20 and fb.graphs["generator"].file == "generator/generator.concat.onnx"
    size = lambda d: (d / "generator" / "weights.bin").stat().st_size  # noqa: E731
    assert size(tiny_artifacts_inplace) < 1.05 * size(tiny_artifacts)  # no second copy of the weights
    c = Pipeline(tiny_artifacts_inplace, manifest=fb)
    assert "kv.4.present_key_0" in c.backend.buf and "kv.cache_key_0" not in c.backend.buf
    assert np.array_equal(c.generate([1, 2], seed=3).tokens, a.tokens)
