"""int8 (static QDQ) engines: the quantizer's recipe, the export stage, measured accuracy, manifest, bench, selector.

Tiny real timm ViTs and the cached trained demo build (conftest ``demo_build``), through the real code paths.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import timm
import torch

from snexport.errors import SettingsError, SnexportError
from snexport.export.int8 import FLOAT_WEIGHTS_KEY, INT8_GATES, attention_matmuls, quantize_int8
from snexport.export.stage import ExportStageError, export_stitches
from snexport.export.validate import compare_logits, run_onnx
from snexport.records import Stitch

SHAPE = (1, 8, 8)


class TinyStitched(torch.nn.Module):
    """A two-block timm ViT with a Linear called ``stitch`` between its blocks (the StitchedNet scope name)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                                num_classes=10, embed_dim=32, depth=2, num_heads=2)
        self.vit = vit.eval()
        self.stitch = torch.nn.Linear(32, 32)
        with torch.no_grad():
            self.stitch.weight.copy_(torch.eye(32) + 0.05 * torch.randn(32, 32))
            self.stitch.bias.zero_()

    def forward(self, x):
        v = self.vit
        x = v._pos_embed(v.patch_embed(x))
        x = self.stitch(v.blocks[0](x))
        x = v.norm(v.blocks[1](x))
        return v.head(x[:, 0])


def stitch(sid):
    return Stitch(id=sid, front="a", back="a", cut=None, resume=None, layer=None, blocks=2, gflops=0.01, params=1000)


@pytest.fixture(scope="module")
def images():
    # Calibration and validation images from one distribution (what the stage guarantees: real images or noise).
    rng = np.random.default_rng(7)
    return rng.standard_normal((24, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images):
    """One stage run (FP32 + int8) shared by the read-only tests."""
    root = tmp_path_factory.mktemp("int8")
    models = {"a": TinyStitched(0).eval(), "b": TinyStitched(1).eval()}
    arts = export_stitches(root, [stitch("a"), stitch("b")], models.__getitem__, SHAPE, images[16:],
                           formats=("onnx", "onnx-int8"), int8_calib=images[:16], weights_hash="w")
    return root, models, arts


def test_stage_writes_an_int8_file_per_stitch_validated_against_its_fp32_file(exported, images):
    root, models, arts = exported
    assert [(a.stitch_id, a.precision) for a in arts] == [("a", "fp32"), ("a", "int8"), ("b", "fp32"), ("b", "int8")]
    for fp32, int8 in zip(arts[::2], arts[1::2]):
        assert int8.file == fp32.file[:-len(".onnx")] + ".int8.onnx" and int8.source_sha256 == fp32.sha256
        v = int8.validation
        assert v["compared_with"] == "fp32 onnx" and v["inputs"]["used"] == "images" and v["samples"] == 8
        assert v["gates"] == INT8_GATES and v["cosine"] >= INT8_GATES["min_cosine"]
        assert v["quantization"]["calibration_images"] == 16 and "quantize" in v["seconds"]
        # The recorded figures are what running both files gives (the gate compared real outputs).
        x = images[16:]
        figures, _ = compare_logits(run_onnx(root / fp32.file, x), run_onnx(root / int8.file, x),
                                    rtol_scale=None, min_cosine=0.0, require_top1=0.0)
        assert figures["cosine"] == pytest.approx(v["cosine"], abs=1e-6)
        assert onnx.load(str(root / int8.file)).metadata_props  # metadata travels (stitch id, precision)


def test_int8_recipe_quantizes_weight_matmuls_and_keeps_attention_and_stitch_float(exported):
    root, _, arts = exported
    fp32 = onnx.load(str(root / arts[0].file))
    int8 = onnx.load(str(root / arts[1].file))
    kept = json.loads({p.key: p.value for p in fp32.metadata_props}[FLOAT_WEIGHTS_KEY])
    assert kept, "the stitching layer's weight is found by scope and recorded in the FP32 file"
    producers = {o: n for n in int8.graph.node for o in n.output}
    ints = {t.name for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8}

    def dequantized_weight(name):  # an int8 initializer behind a DequantizeLinear
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in ints

    matmuls = [n for n in int8.graph.node if n.op_type in ("MatMul", "Gemm")]
    attention = set(attention_matmuls(fp32))
    assert len(attention) == 4  # Q·Kᵀ and softmax·V of two blocks
    quantized = [n for n in matmuls if any(dequantized_weight(i) for i in n.input)]
    assert len(quantized) == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block, and the head
    for n in matmuls:
        if n.name in attention:
            assert not any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                           for i in n.input), f"{n.name}: attention stays float"
        if any(i in kept for i in n.input):
            assert n not in quantized, "the stitching layer stays float"


def test_quantizer_refuses_bad_calibration_images_and_a_graph_with_nothing_to_quantize(tmp_path, exported):
    root, _, arts = exported
    data = (root / arts[0].file).read_bytes()
    with pytest.raises(SnexportError, match="calibration needs"):
        quantize_int8(data, np.zeros((0, *SHAPE), np.float32), tmp_path)
    relu = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, *SHAPE])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, *SHAPE])]),
        opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(SnexportError, match="quantized nothing"):
        quantize_int8(relu.SerializeToString(), np.ones((2, *SHAPE), np.float32), tmp_path)
    assert list(tmp_path.iterdir()) == []  # the quantizer's work directory is gone either way


def test_stage_resumes_int8_and_redoes_it_when_calibration_changes(exported, images, tmp_path):
    root, models, arts = exported
    shutil.copytree(root, tmp_path / "b")
    calls = []

    def materialize(sid):
        calls.append(sid)
        return models[sid]

    kw = dict(formats=("onnx", "onnx-int8"), weights_hash="w")
    again = export_stitches(tmp_path / "b", [stitch("a"), stitch("b")], materialize, SHAPE, images[16:],
                            int8_calib=images[:16], **kw)
    assert again == arts and calls == []
    other = export_stitches(tmp_path / "b", [stitch("a")], materialize, SHAPE, images[16:],
                            int8_calib=images[:12], **kw)
    assert other[0] == arts[0]  # the FP32 file is kept ...
    assert other[1].sha256 != arts[1].sha256 and other[1].validation["quantization"]["calibration_images"] == 12


def test_stage_gates_int8_and_drops_the_whole_stitch_on_failure(tmp_path, images):
    models = {"a": TinyStitched(0).eval()}
    with pytest.raises(ExportStageError) as err:
        export_stitches(tmp_path, [stitch("a")], models.__getitem__, SHAPE, images[16:],
                        formats=("onnx", "onnx-int8"), int8_calib=images[:16], int8_gates={"min_cosine": 0.999999})
    assert "int8 vs FP32" in err.value.failures["a"] and "cosine" in err.value.failures["a"]
    assert json.loads((tmp_path / "exports.json").read_text()) == []  # a stitch is all or nothing
    with pytest.raises(SnexportError, match="int8 export needs calibration images"):
        export_stitches(tmp_path, [stitch("a")], models.__getitem__, SHAPE, formats=("onnx", "onnx-int8"))


def test_on_noise_top1_agreement_is_reported_not_gated(tmp_path, images):
    # No real images: the validation inputs are noise, on which an untrained model's classes are near ties.
    models = {"a": TinyStitched(0).eval()}
    [_, int8] = export_stitches(tmp_path, [stitch("a")], models.__getitem__, SHAPE, None,
                                formats=("onnx", "onnx-int8"), int8_calib=images[:16])
    v = int8.validation
    assert v["inputs"]["used"] == "random" and v["gates"]["require_top1"] == 0.0 and "top1_agreement" in v


def test_parse_precisions():
    from snexport.export.deploy import parse_precisions

    assert parse_precisions("int8") == ("fp32", "int8")
    assert parse_precisions("int8, fp32", fp16=True) == ("fp32", "fp16", "int8")
    assert parse_precisions(None) == ("fp32",)
    with pytest.raises(SettingsError, match="unknown precision.*int4"):
        parse_precisions("fp32,int4")


# ----------------------------------------------------------------------------- a real build: accuracy, manifest, bench


@pytest.fixture(scope="module")
def int8_build(demo_build, tmp_path_factory):
    """Two demo stitches exported at FP32 and int8 (top-1 measured on digits:val), packed, and benched (quick)."""
    from snexport.device.bench import bench_stage
    from snexport.device.profiles import load_profile
    from snexport.evaluation.evaluate import evaluate_build
    from snexport.export.deploy import export_stage
    from snexport.stitching.store import BuildDir

    root = tmp_path_factory.mktemp("int8build") / "b"
    shutil.copytree(demo_build.root, root)
    build = BuildDir(root)
    evaluate_build(build, ["demo_s", "demo_s:1>demo_m:2"], show_progress=False)
    profile = load_profile("x86-cpu")
    arts = export_stage(build, "demo_s,demo_s:1>demo_m:2", pack=True, profile=profile, show_progress=False,
                        precisions=("fp32", "int8"))
    bench = bench_stage(build, profile, show_progress=False, quick=True)
    return build, arts, bench


def test_int8_top1_is_measured_on_the_validation_split_and_lands_in_the_manifest(int8_build):
    build, arts, _ = int8_build
    fp32 = build.read_eval()
    int8 = build.read_eval(precision="int8")
    assert set(int8) == {"demo_s", "demo_s:1>demo_m:2"}
    by_id = {(a.stitch_id, a.precision): a for a in arts}
    for sid, rec in int8.items():
        assert rec.engine_sha256 == by_id[(sid, "int8")].sha256 and rec.samples == fp32[sid].samples
        assert rec.dataset == fp32[sid].dataset and 0 <= rec.top1 <= 100
        # Measured, not copied: the file's own top-1 over the split, recomputed here with ONNX Runtime.
        from snexport.data import open_data
        from snexport.export.int8 import onnx_top1

        spec0 = build.load_plan().anchors[0]
        top1, n = onnx_top1(build.root / by_id[(sid, "int8")].file, open_data("digits", spec0.input_shape, 10).val)
        assert (top1, n) == (rec.top1, rec.samples)
    doc = json.loads(build.manifest_path.read_text())
    entries = {(e["stitch_id"], e["precision"]): e for e in doc["engines"]}
    assert set(entries) == {(s, p) for s in int8 for p in ("fp32", "int8")}
    for sid in int8:
        assert entries[(sid, "int8")]["accuracy"]["top1"] == int8[sid].top1
        assert entries[(sid, "int8")]["accuracy"]["source"]["runtime"].startswith("onnxruntime ")
        assert entries[(sid, "fp32")]["accuracy"]["top1"] == fp32[sid].top1
        assert "runtime" not in entries[(sid, "fp32")]["accuracy"]["source"]


def test_int8_engines_share_weights_through_their_own_pack(int8_build):
    build, _, _ = int8_build
    doc = json.loads(build.manifest_path.read_text())
    weights = {e["precision"]: e["weights_file"] for e in doc["engines"]}
    assert weights["int8"] and weights["fp32"] and weights["int8"] != weights["fp32"]
    int8_files = {e["weights_file"] for e in doc["engines"] if e["precision"] == "int8"}
    assert len(int8_files) == 1  # both stitches' int8 files point into one weights file


def test_bench_measures_each_precision_as_its_own_engine_and_the_selector_names_them(int8_build):
    from snexport.device.selector import Selector

    build, _, bench = int8_build
    assert bench["engines"] == 4
    ids = set(bench["measurements"])
    assert ids == {f"{s}#onnx-{p}" for s in ("demo_s", "demo_s:1>demo_m:2") for p in ("fp32", "int8")}
    doc = json.loads(build.manifest_path.read_text())
    key = bench["device_key"]
    for e in doc["engines"]:
        m = e["measurements"][key]
        assert m == {**bench["measurements"][f"{e['stitch_id']}#onnx-{e['precision']}"], "pareto": m["pareto"]}
    rows = {r["id"]: r for r in bench["rows"]}
    for sid in ("demo_s", "demo_s:1>demo_m:2"):  # each engine on its own accuracy
        assert rows[f"{sid}#onnx-int8"]["top1"] == build.read_eval(precision="int8")[sid].top1
    with Selector(build.manifest_path, candidates=sorted(ids), mode="on_demand") as sel:
        assert {e.id for e in sel.engines} == ids
        assert {e.precision for e in sel.engines} == {"fp32", "int8"}
        x = np.zeros((1, *build.load_plan().anchors[0].input_shape), np.float32)
        sel.switch("demo_s#onnx-int8")
        assert sel.run(x).shape == (1, 10)


def test_build_refuses_int8_for_a_tensorrt_target(demo_build, tmp_path):
    from snexport.pipeline.run import BuildOptions, run_build

    shutil.copytree(demo_build.root, tmp_path / "b")
    opts = BuildOptions(out=tmp_path / "b", anchors=["demo_s", "demo_m", "demo_l"], target="jetson-orin-nano",
                        epochs=0, precisions=("fp32", "int8"))
    with pytest.raises(SettingsError, match="int8 engines are made for ONNX Runtime targets"):
        run_build(opts, say=lambda _: None, show_progress=False)


@pytest.mark.parametrize("command", ["build", "export"])
def test_cli_refuses_an_unknown_precision_in_one_line(command, tmp_path):
    import os
    import subprocess
    import sys

    args = ["build", "--out", str(tmp_path / "b")] if command == "build" else ["export", str(tmp_path)]
    # (export: tmp_path is no build directory; the option is checked before the build is read)
    proc = subprocess.run([sys.executable, "-m", "snexport.cli.app", *args, "--precision", "fp32,int4"],
                          capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"), timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "unknown precision(s) int4" in lines[0], proc.stderr
    assert not (tmp_path / "b").exists()


def test_a_bundle_carries_the_int8_engines_with_their_own_accuracy_and_pack(int8_build, tmp_path):
    from snexport.device.bundle import write_bundle

    build, _, _ = int8_build
    write_bundle(build.root, tmp_path / "bundle", show_progress=False)
    doc = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    host = {(e["stitch_id"], e["precision"]): e for e in json.loads(build.manifest_path.read_text())["engines"]}
    shipped = {(e["stitch_id"], e["precision"]): e for e in doc["engines"]}
    assert set(shipped) == set(host)
    for key, e in shipped.items():
        assert e["accuracy"] == host[key]["accuracy"]
        assert (tmp_path / "bundle" / e["file"]).is_file() and (tmp_path / "bundle" / e["weights_file"]).is_file()
