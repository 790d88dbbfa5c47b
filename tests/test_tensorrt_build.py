"""TensorRT engine builds: the decision logic and the missing-TensorRT path run everywhere; real builds need a GPU."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from snexport.errors import BackendUnavailableError, SnexportError
from snexport.device.tensorrt_build import build_engine, plan_build, validate_engine


def _has_tensorrt_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


needs_trt = pytest.mark.skipif(not _has_tensorrt_gpu(), reason="needs the tensorrt package and a CUDA GPU")


# ----------------------------------------------------------------------------- decisions (no TensorRT)


def test_tensorrt_10_fp16_uses_the_builder_flag_on_the_fp32_onnx():
    plan = plan_build("10.3.0", "fp16", "m.onnx", fp16_onnx_path="m.fp16.onnx")
    assert plan == {"onnx": Path("m.onnx"), "strongly_typed": False, "fp16_flag": True, "pin_fp32_layers": True}


def test_tensorrt_10_can_opt_into_the_strongly_typed_fp16_onnx():
    plan = plan_build("10.15.1", "fp16", "m.onnx", fp16_onnx_path="m.fp16.onnx", strongly_typed=True)
    assert plan == {"onnx": Path("m.fp16.onnx"), "strongly_typed": True, "fp16_flag": False, "pin_fp32_layers": False}


def test_tensorrt_11_fp16_is_strongly_typed_from_the_fp16_onnx():
    plan = plan_build("11.0.0", "fp16", "m.onnx", fp16_onnx_path="m.fp16.onnx")
    assert plan["onnx"] == Path("m.fp16.onnx") and plan["strongly_typed"] and not plan["fp16_flag"]
    with pytest.raises(SnexportError, match="needs the FP16 ONNX"):
        plan_build("11.0.0", "fp16", "m.onnx")
    with pytest.raises(SnexportError, match="strongly typed"):
        plan_build("11.1.0", "fp32", "m.onnx", strongly_typed=False)


def test_fp32_builds_parse_the_fp32_onnx_on_both_generations():
    assert plan_build("10.3.0", "fp32", "m.onnx") == {
        "onnx": Path("m.onnx"), "strongly_typed": False, "fp16_flag": False, "pin_fp32_layers": False}
    assert plan_build("11.0.0", "fp32", "m.onnx")["strongly_typed"] is True


def test_bad_precision_and_old_tensorrt_are_refused():
    with pytest.raises(SnexportError, match="unknown precision 'int8'"):
        plan_build("10.3.0", "int8", "m.onnx")
    with pytest.raises(BackendUnavailableError, match="too old"):
        plan_build("8.6.1", "fp32", "m.onnx")


def test_missing_tensorrt_gives_one_actionable_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    for call in (lambda: build_engine(tmp_path / "m.onnx", tmp_path / "m.engine"),
                 lambda: validate_engine(tmp_path / "m.engine", np.zeros((1, 10), np.float32),
                                         np.zeros((1, 1, 8, 8), np.float32))):
        with pytest.raises(BackendUnavailableError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith("TensorRT is not installed here") and "the ONNX artifacts are valid" in msg
        assert "snexport bench" in msg
    assert not (tmp_path / "m.engine").exists()


# ----------------------------------------------------------------------------- real builds


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    import timm
    import torch

    from snexport.export.fp16 import cast_to_fp16
    from snexport.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    d = tmp_path_factory.mktemp("trt")
    export_onnx(model, (1, 8, 8), d / "m.onnx", batch=2, exporter="torchscript")
    cast_to_fp16(d / "m.onnx", d / "m.fp16.onnx")
    inputs = np.random.default_rng(0).standard_normal((10, 1, 8, 8)).astype(np.float32)
    return d, model, inputs


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
def test_fp32_engine_builds_validates_and_fills_the_timing_cache(onnx_pair):
    d, model, inputs = onnx_pair
    cache = d / "device.timing-cache"
    info = build_engine(d / "m.onnx", d / "m.engine", precision="fp32", workspace_mb=256, timing_cache_path=cache)
    assert (d / "m.engine").stat().st_size == info["size_bytes"] > 0
    assert info["tensorrt"] and info["gpu"] and cache.stat().st_size > 0 and not info["timing_cache_loaded"]
    again = build_engine(d / "m.onnx", d / "m2.engine", precision="fp32", workspace_mb=256, timing_cache_path=cache)
    assert again["timing_cache_loaded"]
    figures = validate_engine(d / "m.engine", model, inputs, precision="fp32")
    assert figures["top1_agreement"] == 1.0


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
def test_fp16_engine_passes_the_fp16_gates(onnx_pair):
    d, model, inputs = onnx_pair
    info = build_engine(d / "m.onnx", d / "m16.engine", precision="fp16", workspace_mb=256,
                        fp16_onnx_path=d / "m.fp16.onnx", timing_cache_path=d / "device.timing-cache")
    assert info["precision"] == "fp16"
    figures = validate_engine(d / "m16.engine", model, inputs, precision="fp16")
    assert figures["cosine"] >= 0.999


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
def test_parser_errors_are_reported_in_full(tmp_path):
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Unique", ["x"], ["y"], name="dedup")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "bad.onnx"))
    with pytest.raises(SnexportError, match="could not parse bad.onnx.*Unique"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.engine")
    assert not (tmp_path / "bad.engine").exists()
