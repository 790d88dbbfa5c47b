"""SN-Netv2 as published: two-way enumeration (134), v1 without nearest (732), official FLOPs and params
conventions, multi-hop routes as one static module, LoRA stitching layers (frozen LS weight, factors stored,
merged on export), FLOPs-grouped sampling."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from snexport.families.registry import describe_anchors
from snexport.stitching.plan import PlanSettings, StitchPlan, plan_stitches, route_cost

DEMO = ["demo_s", "demo_m", "demo_l"]


def _closed_form_vit(width: int, blocks: int, tokens: int = 197) -> int:
    """fvcore's DeiT count per block (notes §2.6): 10·N·C (2 LN) + 12·N·C² (qkv, proj, mlp) + 2·N²·C (attention)."""
    return blocks * (10 * tokens * width + 12 * tokens * width ** 2 + 2 * tokens ** 2 * width)


def _stem_head(width: int, norm: bool = True) -> int:
    return 196 * width * 768 + (5 * 197 * width if norm else 0) + width * 1000


@pytest.mark.parametrize("names", [["deit_s", "deit_b"], ["deit3_s", "deit3_l"], ["deit3_b", "deit3_l"]])
def test_two_way_is_the_official_134(names):
    plan = plan_stitches(describe_anchors(names), PlanSettings(two_way=True))
    assert len(plan.stitches) == 134
    kinds = Counter(len(s.route) for s in plan.stitches)
    assert kinds == {1: 2, 2: 22, 3: 110}  # anchors, 11 S→L + 11 L→S, 55 L→S→L + 55 S→L→S
    assert plan.num_layers == 22  # S→L layer d_s-1 (S whole, then L's head) is never used
    assert len(plan.ls_targets()) == 22  # one least-squares solve per layer, as v2 does
    assert len({s.id for s in plan.stitches}) == 134


def test_two_way_routes_and_official_flops():
    plan = plan_stitches(describe_anchors(["deit3_s", "deit3_l"]), PlanSettings(two_way=True))
    ids = [s.id for s in plan.stitches]
    # Official ids 14 (L→S [[0,1],[1,12]]), 25 (L→S→L [[0,1],[1,1],[4,24]]), 80 (S→L→S [[0,0],[2,3],[2,12]]).
    assert "deit3_l:1>deit3_s:1" in ids
    assert "deit3_l:0-1>deit3_s:1-1>deit3_l:4-23" in ids
    assert "deit3_s:0-0>deit3_l:2-3>deit3_s:2-11" in ids
    assert "deit3_s:11>deit3_l:24" not in ids  # official id 13, excluded from all_cfgs
    s, l = 384, 1024
    # S→L i=3: S blocks 0..3, layer 3 (197·384·1024), L blocks 8..23, L's final norm and head (v2 keeps the norm).
    want = (196 * s * 768 + _closed_form_vit(s, 4) + 197 * s * l + _closed_form_vit(l, 16)
            + 5 * 197 * l + l * 1000)
    assert plan.get("deit3_s:3>deit3_l:8").gflops == pytest.approx(want / 1e9, abs=1e-6)
    # L→S→L (official id 25): L 0..1, L→S layer 0, S 1..1, S→L layer 1, L 4..23.
    want = (196 * l * 768 + _closed_form_vit(l, 2) + 197 * l * s + _closed_form_vit(s, 1) + 197 * s * l
            + _closed_form_vit(l, 20) + 5 * 197 * l + l * 1000)
    got = plan.get("deit3_l:0-1>deit3_s:1-1>deit3_l:4-23")
    assert got.gflops == pytest.approx(want / 1e9, abs=1e-6)
    assert got.layers == (0, 1) and got.route == (("deit3_l", 0, 1), ("deit3_s", 1, 1), ("deit3_l", 4, 23))
    # Anchors: the official fvcore figures (notes §2.6).
    assert plan.get("deit3_s").gflops == pytest.approx(4.608338304, abs=1e-6)
    assert plan.get("deit3_l").gflops == pytest.approx(61.604135936, abs=1e-6)


def test_v1_without_nearest_is_732_with_official_conventions():
    plan = plan_stitches(describe_anchors(["deit_ti", "deit_s", "deit_b"]),
                         PlanSettings(nearest=False, final_norm=False, params="paper"))
    assert len(plan.stitches) == 732  # 3 + 34·3 (Ti→S, Ti→B, S→B) + 627 Ti→S→B
    assert sum(s.is_multi_hop for s in plan.stitches) == 627
    assert plan.num_layers == 33
    first = plan.get("deit_ti:0>deit_s:0")  # official cfg 3: FLOPs without S's final norm, paper params
    assert round(first.gflops * 1e9) == pytest.approx(4_696_010_496, abs=1000)
    assert first.params == 22_345_960
    # Ti→S→B: Ti 0..0 → S 1..5 → B 5..11, no final norm.
    three = plan.get("deit_ti:0-0>deit_s:1-5>deit_b:5-11")
    want = (196 * 192 * 768 + _closed_form_vit(192, 1) + 197 * 192 * 384 + _closed_form_vit(384, 5)
            + 197 * 384 * 768 + _closed_form_vit(768, 7) + 768 * 1000)
    assert three.gflops == pytest.approx(want / 1e9, abs=1e-6)
    # Our default (module params, final norm on) is recorded beside the paper's count.
    assert three.params_module == three.params_paper + 197 * 192 + 192 - 2 * 768  # cls+pos of Ti; no B norm


def test_settings_round_trip_and_old_hashes():
    plan = plan_stitches(describe_anchors(DEMO), PlanSettings(two_way=True, lora_rank=4))
    again = StitchPlan.from_dict(plan.to_dict())
    assert again == plan and again.hash == plan.hash
    # Settings added for v2 stay out of the hash at their defaults: plans written before them keep theirs.
    assert "lora_rank" not in PlanSettings().hash_dict() and "final_norm" not in PlanSettings().hash_dict()
    assert plan_stitches(describe_anchors(DEMO), PlanSettings(final_norm=False)).hash != \
        plan_stitches(describe_anchors(DEMO)).hash


def test_multi_hop_materialize_equals_snnet_forward():
    from snexport.families.registry import load_anchor
    from snexport.stitching.snnet import SNNet

    plan = plan_stitches(describe_anchors(DEMO[:2]), PlanSettings(two_way=True, lora_rank=3))
    net = SNNet(plan, [load_anchor(n, random_init=True) for n in DEMO[:2]]).eval()
    with torch.no_grad():
        for layer in net.stitch_layers.values():  # a trained update: B no longer zero
            layer.lora_B.normal_()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        for sid in ("demo_m:0-1>demo_s:2-3>demo_m:4-5", "demo_s:0-0>demo_m:1-4>demo_s:5-5", "demo_s:2>demo_m:3"):
            ref = net(x, sid)
            alone = net.materialize(sid)
            assert torch.allclose(alone(x), ref, atol=1e-6)
            # merged: plain Linear layers, no LoRA factors left in the exported module
            assert not any("lora" in k for k in alone.state_dict())
            assert len(alone.stitches) == (1 if sid.count(">") == 2 else 0)


def test_lora_layers_frozen_weight_and_stored_factors(tmp_path):
    from snexport.families.registry import load_anchor
    from snexport.stitching.snnet import SNNet
    from snexport.stitching.store import BuildDir
    from snexport.training.train import ConfigSampler, group_weights, sampling_mode, TrainSettings

    plan = plan_stitches(describe_anchors(DEMO[:2]), PlanSettings(two_way=True, lora_rank=2))
    net = SNNet(plan, [load_anchor(n, random_init=True) for n in DEMO[:2]])
    layer = next(iter(net.stitch_layers.values()))
    assert not layer.weight.requires_grad and layer.bias.requires_grad and layer.lora_A.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0  # starts at exactly the least-squares map
    build = BuildDir(tmp_path / "b")
    build.root.mkdir()
    build.save_plan(plan, {})
    build.save_snnet(net)
    stored = build.load_snnet().state_dict()
    assert any(k.endswith("lora_A") for k in stored) and any(k.endswith("lora_B") for k in stored)
    # Sampling: v2 plans default to FLOPs-grouped; flops_sampling_k weights groups linearly (i/k + 1/G).
    assert sampling_mode(TrainSettings(), plan) == "flops"
    assert sampling_mode(TrainSettings(), plan_stitches(describe_anchors(DEMO))) == "uniform"
    w = group_weights(4, 2.0)
    assert w == pytest.approx([x / sum([0.25, 0.75, 1.25, 1.75]) for x in [0.25, 0.75, 1.25, 1.75]])
    sampler = ConfigSampler(plan.stitches, "flops", 0.0004, seed=0, flops_k=0.5)
    assert len(sampler.groups) > 2
    picks = Counter(id(next(g for g in sampler.groups if c in g)) for c in (sampler() for _ in range(3000)))
    first, last = id(sampler.groups[0]), id(sampler.groups[-1])
    assert picks[last] > 2 * picks[first]  # heavier groups drawn more often


def test_lora_export_has_the_ops_of_a_plain_stitch(tmp_path):
    import onnx

    from snexport.export.onnx_export import export_onnx
    from snexport.families.registry import load_anchor
    from snexport.stitching.snnet import SNNet

    anchors = [load_anchor(n, random_init=True) for n in DEMO[:2]]
    sid = "demo_m:0-1>demo_s:2-3>demo_m:4-5"
    shapes = {}
    for rank in (0, 4):
        plan = plan_stitches(describe_anchors(DEMO[:2]), PlanSettings(two_way=True, lora_rank=rank))
        net = SNNet(plan, anchors).eval()
        path = tmp_path / f"r{rank}.onnx"
        export_onnx(net.materialize(sid), (1, 8, 8), path, exporter="torchscript")
        m = onnx.load(str(path))
        shapes[rank] = ([n.op_type for n in m.graph.node],
                        sorted((tuple(t.dims) for t in m.graph.initializer)))
    assert shapes[0] == shapes[4]


def test_v2_refusals():
    from snexport.errors import IncompatibleAnchorsError, SettingsError

    with pytest.raises(SettingsError, match="--two-way"):
        PlanSettings(two_way=True, window=3).check()
    with pytest.raises(SettingsError, match="lora"):
        PlanSettings(lora_rank=-1).check()
    with pytest.raises(IncompatibleAnchorsError, match="two-way"):
        plan_stitches(describe_anchors(["demo_cnn_s", "demo_cnn_m"]), PlanSettings(two_way=True))


def test_route_cost_matches_path_cost_for_one_hop():
    specs = {a.name: a for a in describe_anchors(DEMO)}
    cost = route_cost(specs, (("demo_s", 0, 2), ("demo_m", 3, 5)))
    plan = plan_stitches(describe_anchors(DEMO))
    s = plan.get("demo_s:2>demo_m:3")
    assert s.gflops == pytest.approx(cost["flops"] / 1e9, abs=1e-6) and s.params == cost["params_module"]


def test_manifest_route_of_a_multi_hop_engine_validates():
    import copy

    from snexport.export.deploy import stitch_facts

    plan = plan_stitches(describe_anchors(DEMO[:2]), PlanSettings(two_way=True))
    facts = stitch_facts(plan.get("demo_m:0-1>demo_s:2-3>demo_m:4-5"), None)
    assert facts["route"]["hops"] == [["demo_m", 0, 1], ["demo_s", 2, 3], ["demo_m", 4, 5]]
    assert len(facts["route"]["layers"]) == 2
    one_hop = stitch_facts(plan.get("demo_s:2>demo_m:3"), None)
    assert "hops" not in one_hop["route"]  # v1-shaped routes stay as they were
    from snexport.device.manifest import SchemaValidator, load_schema

    schema = load_schema()
    route_schema = dict(schema["$defs"]["route"], **{"$defs": schema["$defs"]})
    validator = SchemaValidator(route_schema)
    assert validator.issues(facts["route"]) == [] and validator.issues(one_hop["route"]) == []
    bad = copy.deepcopy(facts["route"])
    bad["hops"] = [["demo_m", 0]]
    assert any("hops" in str(issue) for issue in validator.issues(bad))
