"""Static TensorRT-compatibility check on exported ViTs and hand-built ONNX graphs (no TensorRT needed)."""

import numpy as np
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

from snexport.export.onnx_export import export_onnx
from snexport.export.trt_compat import SUPPORTED_OPS, check_tensorrt_compat, opset_range, summarize


def make_model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=imports)


def vi(name, dtype=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_exported_tiny_vit_is_compatible(tmp_path):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                          num_classes=10, embed_dim=32, depth=2, num_heads=2)
    path = tmp_path / "m.onnx"
    export_onnx(m, (1, 8, 8), path, exporter="torchscript")
    report = check_tensorrt_compat(path)
    assert report["ok"] and report["unsupported"] == [] and report["opset"] == 18
    assert report["ops"]["LayerNormalization"] == 5 and report["ops"]["MatMul"] > 0
    assert summarize(report) is None


def test_unsupported_op_is_flagged_with_its_nodes():
    nodes = [helper.make_node("Unique", ["x"], ["y"], name="dedup"), helper.make_node("Relu", ["x"], ["r"])]
    report = check_tensorrt_compat(make_model(nodes, [vi("x", shape=(4,))], [vi("y", shape=(None,)), vi("r", shape=(4,))]))
    assert not report["ok"]
    assert report["ops"] == {"Relu": 1, "Unique": 1}
    assert report["unsupported"] == ["Unique is not supported by the TensorRT ONNX parser (1 node: dedup)"]
    assert "Unique" in summarize(report)


def test_custom_domain_op_needs_a_plugin():
    nodes = [helper.make_node("FusedGelu", ["x"], ["y"], domain="com.microsoft", name="g0")]
    report = check_tensorrt_compat(make_model(nodes, [vi("x")], [vi("y")], extra_opsets=[("com.microsoft", 1)]))
    assert not report["ok"]
    assert any("com.microsoft::FusedGelu" in u and "plugin" in u for u in report["unsupported"])
    assert any("custom domain 'com.microsoft'" in w for w in report["warnings"])


def test_opset_range_depends_on_the_target():
    assert opset_range("10.3") == (9, 20) and opset_range("10.15") == (9, 24) and opset_range("11.1") == (9, 24)
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")], opset=21)
    old = check_tensorrt_compat(model, target="10.3")
    assert not old["ok"] and old["unsupported"] == ["opset 21 is outside TensorRT 10.3's supported range 9-20"]
    assert check_tensorrt_compat(model, target="10.15")["ok"]


def test_op_added_in_a_later_release_is_flagged_for_older_targets():
    assert SUPPORTED_OPS["RotaryEmbedding"][1] == "10.15"
    model = make_model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("RMSNormalization", ["y", "s"], ["z"])],
                       [vi("x"), vi("s", shape=(4,))], [vi("z")], opset=23)
    report = check_tensorrt_compat(model, target="11.0")
    assert report["ok"], report
    assert any("needs TensorRT 10.15" in u for u in check_tensorrt_compat(model, target="10.8")["unsupported"])


def test_per_op_data_types_are_checked():
    # Erf is defined for integers in ONNX, but TensorRT implements it for floating point only.
    model = make_model([helper.make_node("Erf", ["x"], ["y"], name="e")], [vi("x", TensorProto.INT32)],
                       [vi("y", TensorProto.INT32)])
    report = check_tensorrt_compat(model)
    assert report["unsupported"] == ["Erf on INT32 data is not supported (TensorRT supports FP32, FP16, BF16) (1 node: e)"]
    # Where's first input is the condition: the data type is that of input 1
    where = make_model([helper.make_node("Where", ["c", "a", "b"], ["y"])],
                       [vi("c", TensorProto.BOOL), vi("a"), vi("b")], [vi("y")])
    assert check_tensorrt_compat(where)["ok"]


def test_double_is_a_warning_and_int16_is_unsupported():
    double = make_model([helper.make_node("Add", ["x", "x"], ["y"])], [vi("x", TensorProto.DOUBLE)],
                        [vi("y", TensorProto.DOUBLE)])
    report = check_tensorrt_compat(double)
    assert report["ok"] and any("DOUBLE" in w and "FLT_MAX" in w for w in report["warnings"])
    int16 = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", TensorProto.INT16)],
                       [vi("y", TensorProto.INT16)])
    report = check_tensorrt_compat(int16)
    assert not report["ok"] and any("INT16" in u for u in report["unsupported"])


def test_static_restrictions_from_the_support_matrix():
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    ln = helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean", "inv_std"], name="ln")
    reduce = helper.make_node("ReduceMean", ["x", "axes"], ["m"], name="rm")  # axes computed at run time
    model = make_model([ln, reduce], [vi("x"), vi("axes", TensorProto.INT64, (1,))],
                       [vi("y"), vi("mean", shape=(2, 1)), vi("inv_std", shape=(2, 1)), vi("m", shape=(None, None))],
                       inits=[scale])
    unsupported = check_tensorrt_compat(model)["unsupported"]
    assert any(u.startswith("LayerNormalization: only the first output") for u in unsupported)
    assert any(u.startswith("ReduceMean: `axes` must be an initializer") for u in unsupported)
    # the same ReduceMean with constant axes is fine
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    ok = make_model([helper.make_node("ReduceMean", ["x", "axes"], ["m"])], [vi("x")], [vi("m", shape=(2, 1))],
                    inits=[axes])
    assert check_tensorrt_compat(ok)["ok"]


@pytest.mark.parametrize("many", [5])
def test_many_offending_nodes_are_summarised_in_one_entry(many):
    nodes = [helper.make_node("Unique", ["x"], [f"y{i}"], name=f"u{i}") for i in range(many)]
    outs = [vi(f"y{i}", shape=(None,)) for i in range(many)]
    report = check_tensorrt_compat(make_model(nodes, [vi("x", shape=(4,))], outs))
    assert report["unsupported"] == [f"Unique is not supported by the TensorRT ONNX parser ({many} nodes: u0, u1, u2, ...)"]
