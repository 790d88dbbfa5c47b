"""Export, simplification, validation, FP16 cast and the export stage, on tiny real timm ViTs."""

import json
import logging
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

from snexport.errors import ExportValidationError, SnexportError
from snexport.export.fp16 import cast_to_fp16
from snexport.export.onnx_export import export_onnx, read_metadata
from snexport.export.simplify import simplifier_version, simplify
from snexport.export.stage import ExportStageError, export_stitches, safe_file_stem
from snexport.export.validate import (
    FP16_GATES,
    compare_logits,
    reference_logits,
    run_onnx,
    validate_fp16_onnx,
    validate_onnx,
)
from snexport.hashing import atomic_path, atomic_write_json, sha256_file
from snexport.records import Artifact, Stitch

DEPTH = 2
SHAPE = (1, 8, 8)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1, num_classes=10,
        embed_dim=32, depth=DEPTH, num_heads=2,
    ).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(123).standard_normal((16, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def ts_onnx(model, tmp_path_factory):
    """One TorchScript export shared by the read-only tests (the fast exporter)."""
    path = tmp_path_factory.mktemp("ts") / "m.onnx"
    info = export_onnx(model, SHAPE, path, batch=2, exporter="torchscript", metadata={"stitch_id": "a:1>b:2"})
    return path, info


def op_counts(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def value_types(model_proto):
    inferred = onnx.shape_inference.infer_shapes(model_proto)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            types[n.output[0]] = n.attribute[0].t.data_type
    return types


# ----------------------------------------------------------------------------- light imports, hashing


def test_importing_export_package_imports_no_heavy_module():
    code = ("import sys, snexport.export, snexport.hashing; "
            "heavy = {'torch', 'onnx', 'onnxruntime', 'tensorrt', 'numpy'} & set(sys.modules); "
            "sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_atomic_path_commits_only_complete_files(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp file
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's 0600
    atomic_write_json(tmp_path / "x.json", {"a": (1, 2)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}
    import hashlib

    assert sha256_file(target) == hashlib.sha256(b"whole").hexdigest()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- export


def check_exported_file(path, info, batch):
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [batch, *SHAPE]  # static: no symbolic dims
    assert info["input_shape"] == (batch, *SHAPE) and info["output_shape"] == (batch, 10)
    assert info["opset"] == 18
    ops = Counter(n.op_type for n in m.graph.node)
    # one LayerNormalization per norm (2 per block + the final norm), no ReduceMean/Pow decomposition
    assert ops["LayerNormalization"] == 2 * DEPTH + 1
    assert ops["ReduceMean"] == 0 and ops["Pow"] == 0
    assert all(t.data_location != TensorProto.EXTERNAL for t in m.graph.initializer)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .data side file, no temp left


def test_torchscript_export(ts_onnx, model, inputs):
    path, info = ts_onnx
    assert info["exporter_kind"] == "torchscript" and info["exporter"].startswith("torch.onnx torchscript ")
    assert info["fallback_reason"] is None and info["versions"]["torch"]
    check_exported_file(path, info, batch=2)
    assert read_metadata(path) == {"stitch_id": "a:1>b:2"}
    # odd sample count exercises the padding of the last static batch
    np.testing.assert_allclose(run_onnx(path, inputs[:5]), reference_logits(model, inputs[:5]), rtol=1e-4, atol=1e-5)


def test_dynamo_export_is_self_contained_with_stable_names(model, inputs, tmp_path):
    path = tmp_path / "d.onnx"
    info = export_onnx(model, SHAPE, path, batch=1, exporter="dynamo", metadata={"stitch_id": "x", "route": "r"})
    assert info["exporter_kind"] == "dynamo" and "onnxscript" in info["versions"]
    check_exported_file(path, info, batch=1)
    assert read_metadata(path) == {"stitch_id": "x", "route": "r"}
    validate_onnx(path, model, inputs)


def test_opset_below_17_is_refused_before_anything_is_written(model, tmp_path):
    with pytest.raises(SnexportError, match="opset 16 is below 17"):
        export_onnx(model, SHAPE, tmp_path / "m.onnx", opset=16, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_opset_17_export_keeps_layernorm_as_one_op(model, tmp_path):
    info = export_onnx(model, SHAPE, tmp_path / "m.onnx", opset=17, exporter="torchscript")
    assert info["opset"] == 17
    assert op_counts(tmp_path / "m.onnx")["LayerNormalization"] == 2 * DEPTH + 1


class DataDependentBranch(torch.nn.Module):
    """torch.export cannot export a branch on a tensor's value; TorchScript tracing records the taken branch."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class NoTorchScriptSymbolic(torch.nn.Module):
    """``torch.isin`` has no TorchScript ONNX symbolic; the dynamo exporter translates it."""

    def forward(self, x):
        return torch.isin(x.flatten(1), torch.tensor([0.0, 1.0])).float()


def test_auto_tries_torchscript_first_and_keeps_its_graph(tmp_path, caplog):
    # TorchScript traces the branch taken; the default order never pays for dynamo when TorchScript works.
    with caplog.at_level(logging.WARNING, logger="snexport.export"):
        info = export_onnx(DataDependentBranch(), SHAPE, tmp_path / "m.onnx", exporter="auto")
    assert info["exporter_kind"] == "torchscript" and info["fallback_reason"] is None
    assert not caplog.records


def test_auto_falls_back_to_dynamo_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="snexport.export"):
        info = export_onnx(NoTorchScriptSymbolic(), SHAPE, tmp_path / "m.onnx", exporter="auto")
    assert info["exporter_kind"] == "dynamo"
    assert "isin" in info["fallback_reason"]
    assert "\x1b[" not in info["fallback_reason"]  # no terminal colour codes in records
    assert any("falling back to the dynamo exporter" in r.message for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_dynamo_only_reports_failure_and_leaves_no_file(tmp_path):
    with pytest.raises(SnexportError, match="dynamo ONNX export failed.*--exporter torchscript"):
        export_onnx(DataDependentBranch(), SHAPE, tmp_path / "m.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


class Crashes(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_failed_export_never_leaves_a_file_at_the_final_path(tmp_path):
    (tmp_path / "old.onnx").write_bytes(b"previous good file")
    with pytest.raises(SnexportError, match="TorchScript ONNX export failed"):
        export_onnx(Crashes(), SHAPE, tmp_path / "old.onnx", exporter="torchscript")
    assert (tmp_path / "old.onnx").read_bytes() == b"previous good file"  # untouched, not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


def test_export_restores_training_mode(tmp_path):
    m = tiny_vit().train()
    export_onnx(m, SHAPE, tmp_path / "m.onnx", exporter="torchscript")
    assert m.training


# ----------------------------------------------------------------------------- simplify


@pytest.mark.parametrize("tool", ["onnxsim", "onnxslim", "none"])
def test_simplify_keeps_outputs_metadata_and_layernorm(ts_onnx, inputs, tmp_path, tool):
    src, _ = ts_onnx
    out = tmp_path / "s.onnx"
    name = simplify(src, out, tool)
    assert name == simplifier_version(tool)
    assert name == "none" or name.split()[0] == tool and name.split()[1][0].isdigit()
    np.testing.assert_allclose(run_onnx(out, inputs), run_onnx(src, inputs), rtol=1e-5, atol=1e-6)
    assert read_metadata(out) == {"stitch_id": "a:1>b:2"}  # exactly: nothing lost, no onnxsim.* noise
    assert op_counts(out)["LayerNormalization"] == 2 * DEPTH + 1
    if tool != "none":
        assert sum(op_counts(out).values()) < sum(op_counts(src).values())


@pytest.mark.parametrize("tool", ["onnxsim", "onnxslim"])
def test_simplifier_never_sees_the_weights_and_gives_them_back_unchanged(ts_onnx, inputs, tool, monkeypatch):
    import onnxsim
    import onnxslim

    from snexport.export.simplify import STRIP_BYTES, simplify_model

    src, _ = ts_onnx
    model = onnx.load(str(src))
    before = {t.name: t.raw_data for t in model.graph.initializer}
    seen = []  # what the tool was handed: a spy on the real tool, which still does the work
    real = {"onnxsim": onnxsim.simplify, "onnxslim": onnxslim.slim}[tool]

    def spy(m, *a, **kw):
        seen.append(max((len(t.raw_data) for t in m.graph.initializer), default=0))
        return real(m, *a, **kw)

    monkeypatch.setattr(onnxsim if tool == "onnxsim" else onnxslim, "simplify" if tool == "onnxsim" else "slim", spy)
    out = simplify_model(model, tool)
    assert seen and seen[0] < STRIP_BYTES  # the weights went around the tool, not through it
    after = {t.name: t.raw_data for t in out.graph.initializer}
    big = {k for k, v in before.items() if len(v) >= STRIP_BYTES}
    assert big and all(after[k] == before[k] for k in big)  # every weight back, bit for bit, as an initializer
    assert not big & {i.name for i in out.graph.input}
    np.testing.assert_allclose(run_onnx(out.SerializeToString(), inputs), run_onnx(src, inputs), rtol=1e-5, atol=1e-6)
    assert sum(Counter(n.op_type for n in out.graph.node).values()) < sum(op_counts(src).values())


def test_a_failing_simplifier_leaves_the_callers_model_whole(ts_onnx, monkeypatch):
    import onnxsim

    from snexport.export.simplify import simplify_model

    model = onnx.load(str(ts_onnx[0]))
    before = model.SerializeToString()
    monkeypatch.setattr(onnxsim, "simplify", lambda m, *a, **kw: (_ for _ in ()).throw(RuntimeError("C++ says no")))
    with pytest.raises(SnexportError, match="onnxsim failed.*C\\+\\+ says no.*--simplifier onnxslim"):
        simplify_model(model, "onnxsim")
    restored = onnx.ModelProto()
    restored.ParseFromString(before)
    assert {t.name for t in model.graph.initializer} == {t.name for t in restored.graph.initializer}
    assert [i.name for i in model.graph.input] == [i.name for i in restored.graph.input]


def test_export_model_works_in_memory_and_run_onnx_takes_the_bytes(model, inputs, tmp_path, monkeypatch):
    from snexport.export.onnx_export import export_model

    monkeypatch.chdir(tmp_path)
    proto, info = export_model(model, SHAPE, exporter="torchscript", metadata={"k": "v"})
    assert list(tmp_path.iterdir()) == []  # no file, not even a temporary one
    assert "size_bytes" not in info and info["input_shape"] == (1, *SHAPE)
    assert {p.key: p.value for p in proto.metadata_props} == {"k": "v"}
    np.testing.assert_allclose(run_onnx(proto.SerializeToString(), inputs), reference_logits(model, inputs),
                               rtol=1e-4, atol=1e-5)
    # with_bytes: the exporter's own serialization of the same graph (what the stage validates as the raw export)
    for kind in ("torchscript", "dynamo"):
        proto, _, data = export_model(model, SHAPE, exporter=kind, with_bytes=True)
        assert onnx.load_from_string(data).graph == proto.graph


def test_tensorrt_check_of_the_weightless_skeleton_matches_the_full_model(ts_onnx):
    from snexport.export.stage import _to_skeleton
    from snexport.export.trt_compat import check_tensorrt_compat

    full = check_tensorrt_compat(ts_onnx[0])
    skeleton = _to_skeleton(onnx.load(str(ts_onnx[0])))
    assert max(len(t.raw_data) for t in skeleton.graph.initializer) < 4096
    assert check_tensorrt_compat(skeleton) == full


def test_unknown_simplifier_is_refused(ts_onnx, tmp_path):
    with pytest.raises(SnexportError, match="unknown simplifier"):
        simplify(ts_onnx[0], tmp_path / "s.onnx", "polygraphy")


# ----------------------------------------------------------------------------- validation


def test_validation_passes_for_a_good_export(ts_onnx, model, inputs):
    figures = validate_onnx(ts_onnx[0], model, inputs, stitch_id="a:1>b:2")
    assert figures["samples"] == len(inputs)
    assert figures["rel_max_abs"] <= 1e-4 and figures["cosine"] >= 0.99999 and figures["top1_agreement"] == 1.0
    assert figures["max_abs"] == pytest.approx(figures["rel_max_abs"] * figures["logit_scale"])


def test_validation_against_a_perturbed_module_lists_every_failure(ts_onnx, inputs):
    wrong = tiny_vit()
    with torch.no_grad():
        wrong.head.weight.copy_(torch.randn_like(wrong.head.weight))  # same architecture, different logits
    with pytest.raises(ExportValidationError) as err:
        validate_onnx(ts_onnx[0], wrong, inputs, stitch_id="a:1>b:2")
    failures = err.value.failures
    assert err.value.stitch_id == "a:1>b:2"
    assert len(failures) == 3
    assert any("max abs error" in f for f in failures)
    assert any("cosine" in f for f in failures)
    assert any("top-1 agreement" in f for f in failures)
    assert all(f in str(err.value) for f in failures)


def test_compare_logits_rules():
    ref = np.array([[1.0, 2.0, 3.0], [5.0, 5.00001, 0.0]])
    # sample 1 is a near-tie (within the max-abs tolerance): the export picking class 0 is not a disagreement
    figs, fails = compare_logits(ref, np.array([[1.0, 2.0, 3.0], [5.00001, 5.0, 0.0]]))
    assert fails == [] and figs["top1_agreement"] == 1.0
    # ... but the same flip with a margin beyond the tolerance is
    figs, fails = compare_logits(np.array([[5.0, 5.1, 0.0]]), np.array([[5.1, 5.0, 0.0]]), rtol_scale=None,
                                 min_cosine=0.0)
    assert figs["top1_agreement"] == 0.0 and len(fails) == 1
    figs, fails = compare_logits(ref, np.array([[1.0, 3.5, 3.0], [5.0, 5.00001, 0.0]]), rtol_scale=None,
                                 min_cosine=0.0, require_top1=1.0)
    assert figs["top1_agreement"] == 0.5 and len(fails) == 1 and "1 of 2 samples differ" in fails[0]
    figs, fails = compare_logits(ref, np.array([[np.nan, 2.0, 3.0], [5.0, 5.0, 0.0]]))
    assert any("non-finite" in f for f in fails)
    _, fails = compare_logits(ref, np.zeros((2, 4)))
    assert fails == ["output shape (2, 4) differs from reference (2, 3)"]
    figs, fails = compare_logits(np.zeros((1, 3)), np.zeros((1, 3)))
    assert fails == [] and figs["cosine"] == 1.0 and figs["rel_max_abs"] == 0.0


# ----------------------------------------------------------------------------- FP16


def test_fp16_cast_runs_layernorm_and_softmax_in_fp32_and_matches_fp32_reference(ts_onnx, model, inputs, tmp_path):
    out = tmp_path / "fp16.onnx"
    cast_to_fp16(ts_onnx[0], out)
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    types = value_types(m)
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    # FP32 I/O
    assert m.graph.input[0].type.tensor_type.elem_type == F32
    assert m.graph.output[0].type.tensor_type.elem_type == F32
    kept = [n for n in m.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(kept) == 2 * DEPTH + 1 + DEPTH
    for n in kept:
        assert all(types[i] == F32 for i in n.input if i), n.name
        assert all(types[o] == F32 for o in n.output if o), n.name
    heavy = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert heavy and all(types[i] == F16 for n in heavy for i in n.input if i)
    float_inits = [t for t in m.graph.initializer if t.data_type in (F32, F16)]
    assert sum(t.data_type == F16 for t in float_inits) > sum(t.data_type == F32 for t in float_inits)
    assert read_metadata(out) == read_metadata(ts_onnx[0])

    figures = validate_fp16_onnx(out, model, inputs, stitch_id="fp16")
    assert figures["gates"] == FP16_GATES and figures["cosine"] >= 0.999
    assert figures["max_abs"] > 1e-6  # it really computes in reduced precision, not a copy of the FP32 model


def test_fp16_cast_of_dynamo_export(model, inputs, tmp_path):
    src = tmp_path / "d.onnx"
    export_onnx(model, SHAPE, src, exporter="dynamo")
    cast_to_fp16(src, tmp_path / "d16.onnx")
    validate_fp16_onnx(tmp_path / "d16.onnx", model, inputs)


def test_fp16_cast_clips_out_of_range_weights_and_handles_a_kept_op_as_output(tmp_path):
    # y = Softmax(x @ W + B): W has a value beyond FP16's range; the graph output comes straight from Softmax.
    w = np.array([[1.0, 2.0], [1e6, -0.5]], np.float32)
    b = np.array([0.25, -0.25], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["z"]),
         helper.make_node("Softmax", ["z"], ["y"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    out = tmp_path / "g16.onnx"
    cast_to_fp16(src, out)
    m = onnx.load(str(out))
    w16 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W"))
    assert w16.dtype == np.float16 and np.isfinite(w16).all() and w16.max() == np.float16(65504)
    x = np.array([[1e-5, 0.0], [0.5, 0.5], [-1.0, 2.0]], np.float32)
    z = x @ np.clip(w, -65504, 65504) + b
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(run_onnx(out, x), expected, atol=2e-3)
    assert m.graph.node[-1].op_type == "Identity"  # FP32 Softmax result feeds the output directly


def test_fp16_cast_keeps_an_all_fp32_path_free_of_round_trips(tmp_path):
    # input → LayerNorm → Softmax → output: everything is a kept op, so no value should pass through FP16.
    scale = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "scale"], ["n"], axis=-1),
         helper.make_node("Softmax", ["n"], ["y"], axis=-1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [scale])
    src, out = tmp_path / "g.onnx", tmp_path / "g16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    cast_to_fp16(src, out)
    m = onnx.load(str(out))
    assert [n.op_type for n in m.graph.node] == ["LayerNormalization", "Softmax", "Identity"]
    assert m.graph.initializer[0].data_type == TensorProto.FLOAT  # read only by LayerNorm: stays exact
    x = np.array([[1.0, 2.0, 4.0], [0.1, -0.2, 0.3]], np.float32)
    np.testing.assert_allclose(run_onnx(out, x), run_onnx(src, x), rtol=1e-6)


def test_naive_fp16_leaves_layernorm_in_fp16(ts_onnx, tmp_path):
    """The control case for the graph check above: with no kept ops nothing stays FP32."""
    out = tmp_path / "naive.onnx"
    cast_to_fp16(ts_onnx[0], out, keep_fp32_ops=())
    types = value_types(onnx.load(str(out)))
    ln = [n for n in onnx.load(str(out)).graph.node if n.op_type == "LayerNormalization"]
    assert all(types[n.input[0]] == TensorProto.FLOAT16 for n in ln)


# ----------------------------------------------------------------------------- stage


def stitch(sid, blocks=DEPTH):
    return Stitch(id=sid, front=sid.split(":")[0], back=sid.split(">")[-1].split(":")[0], cut=None, resume=None,
                  layer=None, blocks=blocks, gflops=0.01, params=1000)


IDS = ["tiny_a", "tiny_a:0>tiny_b:1", "tiny_b"]


class Materializer:
    """The stage's only view of the SN-Net: id → module. Records calls so tests can see what was redone."""

    def __init__(self, broken=()):
        self.models = {sid: tiny_vit(seed=i) for i, sid in enumerate(IDS)}
        self.broken = set(broken)
        self.calls = []

    def __call__(self, sid):
        self.calls.append(sid)
        if sid in self.broken:
            raise RuntimeError(f"cannot build {sid}")
        return self.models[sid]


def run_stage(build, mat, **kw):
    kw.setdefault("exporter", "torchscript")
    kw.setdefault("simplifier", "onnxsim")
    return export_stitches(build, [stitch(s) for s in IDS], mat, SHAPE, **kw)


def mtimes(build):
    return {p.name: p.stat().st_mtime_ns for p in (build / "engines").iterdir()}


def test_safe_file_stem_is_readable_unique_and_portable():
    assert safe_file_stem("deit_s:3>deit_b:4") == "deit_s.3+deit_b.4"
    assert safe_file_stem("deit_s") == "deit_s"
    tricky = ["a:b", "a.b", "a+b", "a>b", "a%2Eb", "A", "a", "a/b", "a\\b", "ä", "nul", "nul:1", "a b"]
    stems = [safe_file_stem(s) for s in tricky]
    assert len({s.lower() for s in stems}) == len(tricky)  # unique even on case-insensitive filesystems
    for s in stems:
        assert all(c.isalnum() or c in "._+-%" for c in s)
        assert s.split(".")[0].lower() not in {"nul", "con", "aux", "prn"}


def test_stage_exports_validates_and_records_every_stitch(tmp_path):
    mat = Materializer()
    calib = np.random.default_rng(5).standard_normal((3, *SHAPE)).astype(np.float32)
    ticks = []
    arts = export_stitches(tmp_path, [stitch(s) for s in IDS], mat, SHAPE, calib, exporter="torchscript",
                           simplifier="onnxslim", batch=1, weights_hash="w1",
                           progress=lambda n, description: ticks.append(description))
    assert [a.stitch_id for a in arts] == IDS
    assert len(ticks) == 3 and all("exported" in t for t in ticks)
    doc = json.loads((tmp_path / "exports.json").read_text())
    assert [Artifact.from_dict(d) for d in doc] == arts
    a = arts[1]
    assert a.file == "engines/tiny_a.0+tiny_b.1.onnx" and a.format == "onnx" and a.precision == "fp32"
    assert a.sha256 == sha256_file(tmp_path / a.file) and a.size_bytes == (tmp_path / a.file).stat().st_size
    assert a.input_name == "input" and a.input_shape == (1, *SHAPE) and a.output_shape == (1, 10)
    assert a.opset == 18 and a.exporter.startswith("torch.onnx torchscript") and a.simplifier.startswith("onnxslim ")
    assert a.validation["samples"] == 4 + 3 and a.validation["inputs"] == {"random": 4, "seed": 0, "images": 3}
    assert a.validation["cosine"] >= 0.99999 and a.validation["top1_agreement"] == 1.0
    assert a.validation["tensorrt_compat"]["ok"] is True
    assert len(a.versions["settings_hash"]) == 64
    meta = read_metadata(tmp_path / a.file)
    assert meta["snexport.stitch_id"] == "tiny_a:0>tiny_b:1" and json.loads(meta["snexport.route"])["back"] == "tiny_b"
    assert sorted(p.name for p in (tmp_path / "engines").iterdir() if p.is_file()) == sorted(
        ["tiny_a.onnx", "tiny_a.0+tiny_b.1.onnx", "tiny_b.onnx"])
    # Shipped reference: the validation inputs once, and each stitch's PyTorch logits, hashed in its record.
    ref = a.reference
    inputs, logits = np.load(tmp_path / ref["inputs"]), np.load(tmp_path / ref["logits"])
    assert inputs.shape == (4 + 3, *SHAPE) and np.array_equal(inputs[4:], calib)
    assert ref["logits_sha256"] == sha256_file(tmp_path / ref["logits"])
    module = mat(a.stitch_id).eval()
    with torch.no_grad():
        np.testing.assert_allclose(logits, module(torch.from_numpy(inputs)).numpy(), rtol=1e-5, atol=1e-5)
    assert len({x.reference["inputs"] for x in arts}) == 1  # one inputs file serves every stitch


def test_stage_records_the_seconds_of_every_phase(tmp_path):
    arts = run_stage(tmp_path, Materializer(), formats=("onnx", "onnx-fp16"))
    # No "validate_export": the exporter's own graph is run only when the simplified one fails its check.
    assert set(arts[0].validation["seconds"]) == {"materialize", "reference", "export", "simplify",
                                                  "validate_simplified", "tensorrt_check", "write_and_hash"}
    assert set(arts[1].validation["seconds"]) == {"cast", "validate", "write_and_hash"}
    assert all(v >= 0 for a in arts for v in a.validation["seconds"].values())


def test_stage_resume_redoes_exactly_the_corrupt_and_missing_files(tmp_path):
    mat = Materializer()
    first = run_stage(tmp_path, mat)
    assert mat.calls == IDS

    # nothing changed: nothing is materialized or rewritten
    before = mtimes(tmp_path)
    mat.calls.clear()
    again = run_stage(tmp_path, mat)
    assert mat.calls == [] and again == first and mtimes(tmp_path) == before

    # simulate a killed run: a half-written temp file, a corrupted export, a deleted export
    engines = tmp_path / "engines"
    (engines / ".tiny_b.onnx.k1ll3d.tmp").write_bytes(b"half an export")
    corrupt = engines / "tiny_a.0+tiny_b.1.onnx"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    corrupt.write_bytes(bytes(data))
    (engines / "tiny_b.onnx").unlink()
    untouched = engines / "tiny_a.onnx"
    untouched_mtime = untouched.stat().st_mtime_ns

    mat.calls.clear()
    redone = run_stage(tmp_path, mat)
    assert mat.calls == ["tiny_a:0>tiny_b:1", "tiny_b"]
    assert untouched.stat().st_mtime_ns == untouched_mtime
    assert not list(engines.glob("*.tmp")) and not list(engines.glob(".*"))
    for art in redone:
        assert sha256_file(tmp_path / art.file) == art.sha256
    assert [a.sha256 for a in redone] == [a.sha256 for a in first]  # export is deterministic


def test_stage_redoes_everything_when_settings_change(tmp_path):
    mat = Materializer()
    run_stage(tmp_path, mat)
    mat.calls.clear()
    arts = run_stage(tmp_path, mat, opset=17)
    assert mat.calls == IDS and {a.opset for a in arts} == {17}
    mat.calls.clear()
    run_stage(tmp_path, mat, opset=17, weights_hash="fine-tuned")
    assert mat.calls == IDS


def test_stage_collects_failures_and_finishes_the_rest(tmp_path):
    mat = Materializer(broken={"tiny_a:0>tiny_b:1"})
    with pytest.raises(ExportStageError) as err:
        run_stage(tmp_path, mat)
    e = err.value
    assert list(e.failures) == ["tiny_a:0>tiny_b:1"] and "cannot build" in e.failures["tiny_a:0>tiny_b:1"]
    assert [a.stitch_id for a in e.artifacts] == ["tiny_a", "tiny_b"]
    assert "1 of 3 stitches failed" in str(e)
    doc = json.loads((tmp_path / "exports.json").read_text())
    assert [d["stitch_id"] for d in doc] == ["tiny_a", "tiny_b"]

    mat.broken.clear()
    mat.calls.clear()
    arts = run_stage(tmp_path, mat)
    assert mat.calls == ["tiny_a:0>tiny_b:1"] and len(arts) == 3


class Noisy(torch.nn.Module):
    """Exports fine but does not compute what PyTorch computes (fresh noise per run)."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_vit()

    def forward(self, x):
        y = self.vit(x)
        return y + 10 * torch.randn_like(y)


def test_stage_reports_validation_failures_with_their_figures(tmp_path):
    mat = Materializer()
    mat.models["tiny_b"] = Noisy()
    with pytest.raises(ExportStageError) as err:
        run_stage(tmp_path, mat)
    msg = err.value.failures["tiny_b"]
    assert "failed validation" in msg and "cosine" in msg
    assert "as exported, before simplifying" in msg  # the exporter's graph fails too: not the simplifier's doing
    assert not (tmp_path / "engines" / "tiny_b.onnx").exists()


def test_stage_blames_a_simplifier_that_breaks_a_model_the_exporter_got_right(tmp_path, monkeypatch):
    import importlib

    simplify_module = importlib.import_module("snexport.export.simplify")  # the package's `simplify` is the function

    real = simplify_module.simplify_model

    def breaking(model, tool, label=""):
        out = real(model, tool, label=label)
        big = max(out.graph.initializer, key=lambda t: len(t.raw_data))
        weights = onnx.numpy_helper.to_array(big)
        big.CopyFrom(onnx.numpy_helper.from_array(-weights, big.name))  # what a wrong fold would do
        return out

    monkeypatch.setattr(simplify_module, "simplify_model", breaking)
    with pytest.raises(ExportStageError) as err:
        export_stitches(tmp_path, [stitch("tiny_a")], Materializer(), SHAPE, exporter="torchscript")
    msg = err.value.failures["tiny_a"]
    assert "failed validation" in msg and "onnxsim broke it" in msg and "as exported" not in msg
    assert not (tmp_path / "engines" / "tiny_a.onnx").exists()


def test_stage_fp16_artifacts(tmp_path):
    mat = Materializer()
    arts = run_stage(tmp_path, mat, formats=("onnx", "onnx-fp16"))
    assert [(a.stitch_id, a.precision) for a in arts] == [(s, p) for s in IDS for p in ("fp32", "fp16")]
    for fp32, fp16 in zip(arts[::2], arts[1::2]):
        assert fp16.file == fp32.file[:-len(".onnx")] + ".fp16.onnx"
        assert fp16.source_sha256 == fp32.sha256 and fp16.input_dtype == "float32"
        assert fp16.validation["cosine"] >= 0.999 and fp16.validation["gates"]["min_cosine"] == 0.999
        assert read_metadata(tmp_path / fp16.file)["snexport.precision"] == "fp16"
    mat.calls.clear()
    assert run_stage(tmp_path, mat, formats=("onnx", "onnx-fp16")) == arts and mat.calls == []
    # FP32 re-exported under new settings without FP16: the FP16 records cast from the old files are dropped
    run_stage(tmp_path, mat, opset=17)
    doc = json.loads((tmp_path / "exports.json").read_text())
    assert sorted((d["stitch_id"], d["precision"], d["opset"]) for d in doc) == sorted((s, "fp32", 17) for s in IDS)


def test_stage_refuses_unknown_format_and_bad_calibration_shape(tmp_path):
    with pytest.raises(SnexportError, match="unknown export format"):
        run_stage(tmp_path, Materializer(), formats=("tensorrt",))
    with pytest.raises(SnexportError, match="calibration images"):
        run_stage(tmp_path, Materializer(), calib_images=np.zeros((2, 3, 8, 8), np.float32))
