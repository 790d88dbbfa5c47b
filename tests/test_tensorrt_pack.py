"""TensorRT engine packs as shared segments (snexport.experimental.tensorrt_segments).

The segment plan and the segment ONNX files are checked everywhere (a stitch's chain of segments, run in ONNX
Runtime, must equal the PyTorch stitch); building and running the TensorRT engines needs TensorRT and a GPU and
skips elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from snexport.experimental.tensorrt_segments import (
    OrtSegmentChain,
    Segment,
    SegmentPlan,
    export_segments,
    plan_segments,
    read_segments,
)

DEMO = ["demo_s", "demo_m", "demo_l"]


def units(plan, stitch) -> list[tuple]:
    """(anchor, unit) visited by a stitch, in order, with a layer as ("layer", key)."""
    depth = {a.name: a.depth for a in plan.anchors}
    if stitch.is_anchor:
        return [(stitch.front, u) for u in range(depth[stitch.front] + 2)]
    return ([(stitch.front, u) for u in range(stitch.cut + 2)] + [("layer", (stitch.front, stitch.back, stitch.layer))]
            + [(stitch.back, u) for u in range(stitch.resume + 1, depth[stitch.back] + 2)])


def covered(seg_plan: SegmentPlan, stitch_id: str) -> list[tuple]:
    out = []
    for sid in seg_plan.routes[stitch_id]:
        seg = seg_plan.get(sid)
        if seg.kind == "layer":
            out.append(("layer", (seg.anchor, seg.back, seg.layer)))
        else:
            out += [(seg.anchor, u) for u in range(seg.first, seg.last + 1)]
    return out


def chosen(plan) -> list[str]:
    others = [s.id for s in plan.stitches if not s.is_anchor]
    return [s.id for s in plan.stitches if s.is_anchor] + others[::5]


def test_routes_run_each_stitch_exactly(demo_plan):
    ids = chosen(demo_plan)
    seg_plan = plan_segments(demo_plan, ids)
    for sid in ids:
        assert covered(seg_plan, sid) == units(demo_plan, demo_plan.get(sid))
    # Segments are shared: some segment serves several stitches, and no segment is unused.
    uses = {s.id: sum(s.id in r for r in seg_plan.routes.values()) for s in seg_plan.segments}
    assert min(uses.values()) >= 1 and max(uses.values()) >= 3
    assert SegmentPlan.from_dict(seg_plan.to_dict()) == seg_plan


def test_every_cut_is_forced_by_some_stitch(demo_plan):
    ids = chosen(demo_plan)
    seg_plan = plan_segments(demo_plan, ids)
    # Units after which a chosen stitch leaves an anchor (front: embedding + blocks 0..cut) or enters one (back:
    # blocks from `resume` on, i.e. after unit `resume`): the only places a segment may end early.
    forced = set()
    for sid in ids:
        s = demo_plan.get(sid)
        if not s.is_anchor:
            forced |= {(s.front, s.cut + 1), (s.back, s.resume)}
    early = [g for g in seg_plan.segments if g.kind == "anchor" and g.last != demo_plan.anchor(g.anchor).depth + 1]
    assert early and all((g.anchor, g.last) in forced for g in early)


def test_anchors_alone_are_one_segment_each(demo_plan):
    anchors = [a.name for a in demo_plan.anchors]
    seg_plan = plan_segments(demo_plan, anchors)
    assert [s.id for s in seg_plan.segments] == [f"{a.name}.0-{a.depth + 1}" for a in demo_plan.anchors]
    assert Segment("demo_s.0-7", "anchor", "demo_s", 0, 7).describe(6) == "demo_s: embedding, blocks 0-5, head"


def test_segment_chains_match_the_pytorch_stitches(random_snnet, tmp_path):
    ids = chosen(random_snnet.plan)[:6]
    index = export_segments(tmp_path, random_snnet, ids, num_inputs=2)
    assert read_segments(tmp_path)["hash"] == index["hash"]
    assert set(index["validation"]) == set(ids)
    assert all(v["cosine"] > 0.99999 for v in index["validation"].values())
    # Fewer distinct weights on disk than standalone stitches would carry: segments are shared.
    sizes = {s["id"]: s["size_bytes"] for s in index["segments"]}
    per_stitch = sum(sizes[seg] for route in index["routes"].values() for seg in route)
    assert sum(sizes.values()) < per_stitch
    # And a chain is an ordinary function of its input.
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)
    sessions: dict = {}
    out = OrtSegmentChain(tmp_path, index, ids[-1], sessions).run(x)
    from snexport.export.validate import reference_logits

    np.testing.assert_allclose(out, reference_logits(random_snnet.materialize(ids[-1]), x), rtol=1e-4, atol=1e-5)


def _tensorrt_and_gpu():
    trt = pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT segment engines need a CUDA GPU")
    return trt


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_segment_chains_match_onnx_runtime(random_snnet, tmp_path, cuda_graph):
    _tensorrt_and_gpu()
    from snexport.experimental.tensorrt_segments import SegmentChainRunner, SegmentEnginePool, build_segment_engines

    ids = chosen(random_snnet.plan)[:4]
    index = export_segments(tmp_path, random_snnet, ids)
    build_segment_engines(tmp_path, precision="fp32")
    pool = SegmentEnginePool(tmp_path, "fp32")
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    runners = [SegmentChainRunner(pool, sid, cuda_graph=cuda_graph) for sid in ids]
    for runner in runners:
        runner.load()
    # Each segment engine is deserialized once for all the stitches that use it.
    assert sorted(pool.loaded) == sorted({seg for r in runners for seg in r.route})
    for sid, runner in zip(ids, runners):
        expected = OrtSegmentChain(tmp_path, index, sid).run(x)
        np.testing.assert_allclose(runner.run(x), expected, rtol=1e-3, atol=1e-4)
        runner.close()
    pool.close()
