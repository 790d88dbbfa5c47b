"""Stitch graphs composed from per-piece graphs (snexport/export/compose.py) against whole-stitch traces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from snexport.export.compose import PieceGraphs
from snexport.export.int8 import FLOAT_WEIGHTS_KEY
from snexport.export.stage import export_stitches

SHAPE = (1, 8, 8)


def _ort(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def _meta(path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def v2_net():
    """Demo anchors with round-trip (SN-Netv2) routes: one-layer and two-layer stitches, and the anchors."""
    from snexport.families.registry import describe_anchors, load_anchor
    from snexport.stitching.plan import PlanSettings, plan_stitches
    from snexport.stitching.snnet import SNNet

    names = ["demo_s", "demo_m"]
    plan = plan_stitches(describe_anchors(names), PlanSettings(two_way=True))
    torch.manual_seed(0)
    net = SNNet(plan, [load_anchor(n, random_init=True, seed=i) for i, n in enumerate(names)]).eval()
    with torch.no_grad():
        for layer in net.stitch_layers.values():
            for p in layer.parameters():
                p.normal_(0, 0.3)
    return net


IDS = ["demo_s", "demo_s:2>demo_m:3", "demo_m:0-1>demo_s:2-3>demo_m:4-5", "demo_m", "demo_m:0>demo_s:1"]


def test_composed_stitches_compute_what_traced_ones_do(v2_net, tmp_path):
    stitches = [v2_net.plan.get(i) for i in IDS]
    composed = export_stitches(tmp_path / "c", stitches, v2_net.materialize, SHAPE, compose=True)
    traced = export_stitches(tmp_path / "t", stitches, v2_net.materialize, SHAPE, compose=False)
    x = np.random.default_rng(1).standard_normal((5, *SHAPE)).astype(np.float32)
    for c, t in zip(composed, traced):
        module = v2_net.materialize(c.stitch_id)
        assert c.validation["composed_from_pieces"] == len(module.pieces())
        assert "composed_from_pieces" not in t.validation
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_ort(tmp_path / "c" / c.file, x), ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_ort(tmp_path / "c" / c.file, x), _ort(tmp_path / "t" / t.file, x),
                                   rtol=1e-4, atol=1e-5)
        # The int8 export keeps the stitching layers float: found in the composed graph as in the traced one.
        kept_c = json.loads(_meta(tmp_path / "c" / c.file)[FLOAT_WEIGHTS_KEY])
        kept_t = json.loads(_meta(tmp_path / "t" / t.file)[FLOAT_WEIGHTS_KEY])
        assert len(kept_c) == len(kept_t) == 2 * c.stitch_id.count(">"), (c.stitch_id, kept_c, kept_t)


def test_each_piece_is_exported_once_per_run(v2_net):
    pieces = PieceGraphs(opset=18, exporter="torchscript", simplifier="onnxsim")
    seen = set()
    for sid in IDS:
        module = v2_net.materialize(sid)
        composed, info = pieces.compose(module, SHAPE)
        seen |= {key for _, key, _ in module.pieces()}
        assert len(pieces) == len(seen)  # a piece met again is not exported again
        assert info["composed_from"] == len(module.pieces()) and info["output_shape"] == (1, 10)
        model = composed.skeleton()
        stitch_nodes = [n.name for n in model.graph.node if n.name.startswith("/stitch")]
        assert bool(stitch_nodes) == (">" in sid)
        assert len({t.name for t in model.graph.initializer}) == len(model.graph.initializer)


def test_spliced_bytes_parse_to_the_model_with_every_weight_inline(v2_net):
    import onnx

    pieces = PieceGraphs(opset=18, exporter="torchscript", simplifier="onnxsim")
    composed, _ = pieces.compose(v2_net.materialize("demo_m:0-1>demo_s:2-3>demo_m:4-5"), SHAPE,
                                 metadata={"k": "v"})
    assert composed._big, "the demo's block weights are large enough to be spliced"
    expected = onnx.ModelProto()
    expected.CopyFrom(composed.model)
    for stub, body in composed._big:  # the slow way: each weight parsed and put in the graph
        full = onnx.TensorProto.FromString(body)
        full.name = stub.name
        expected.graph.initializer.append(full)
    parsed = onnx.load_from_string(composed.serialize())
    assert parsed == expected
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in parsed.graph.initializer)
    assert {p.key: p.value for p in parsed.metadata_props}["k"] == "v"
    onnx.checker.check_model(parsed)


def test_a_composed_graph_that_fails_validation_is_traced_whole(v2_net, tmp_path, monkeypatch, caplog):
    from snexport.export.compose import ComposedModel

    real = ComposedModel.serialize

    def broken(self):  # a composition bug: one weight scaled
        import onnx
        from onnx import numpy_helper

        model = onnx.load_from_string(real(self))
        big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * 1.5, big.name))
        return model.SerializeToString()

    monkeypatch.setattr(ComposedModel, "serialize", broken)
    sid = "demo_s:2>demo_m:3"
    [art] = export_stitches(tmp_path, [v2_net.plan.get(sid)], v2_net.materialize, SHAPE)
    assert "composed_from_pieces" not in art.validation and art.validation["cosine"] > 0.99999
    assert "tracing it whole" in caplog.text
    x = np.random.default_rng(2).standard_normal((3, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        ref = v2_net.materialize(sid)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort(tmp_path / art.file, x), ref, rtol=1e-4, atol=1e-5)


def test_modules_without_pieces_are_traced_whole(v2_net, tmp_path):
    sid = "demo_s:2>demo_m:3"
    module = v2_net.materialize(sid)
    module.piece_keys = None  # a module from elsewhere: no keyed pieces
    [art] = export_stitches(tmp_path, [v2_net.plan.get(sid)], lambda _: module, SHAPE)
    assert "composed_from_pieces" not in art.validation and art.validation["top1_agreement"] == 1.0


def test_a_piece_that_cannot_be_traced_alone_makes_its_stitches_traced_whole(v2_net, tmp_path, monkeypatch):
    from snexport.errors import SnexportError

    real, tries = PieceGraphs._export_piece, []

    def refuse_heads(self, piece, shape, label):
        if "#head" in label:
            tries.append(label)
            raise SnexportError(f"{label}: TorchScript ONNX export failed")
        return real(self, piece, shape, label)

    monkeypatch.setattr(PieceGraphs, "_export_piece", refuse_heads)
    ids = ["demo_s:2>demo_m:3", "demo_s:1>demo_m:2"]  # both end in demo_m's head
    arts = export_stitches(tmp_path, [v2_net.plan.get(i) for i in ids], v2_net.materialize, SHAPE)
    assert [a.stitch_id for a in arts] == ids
    assert all("composed_from_pieces" not in a.validation and a.validation["top1_agreement"] == 1.0 for a in arts)
    assert len(tries) == 1  # the refusal is remembered for the run, not retried per stitch
