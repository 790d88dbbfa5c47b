"""Stitch enumeration, counts and FLOPs against snnet-spec.md."""

from __future__ import annotations

import pytest

from snexport.families.registry import describe_anchor, describe_anchors
from snexport.errors import IncompatibleAnchorsError, UnknownModelError, UnknownStitchError
from snexport.stitching.plan import PlanSettings, paired_pairs, plan_stitches, unpaired_pairs


@pytest.mark.parametrize(
    "window,stride,pairs,layers",
    [(2, 1, 34, 11), (1, 1, 12, 12), (2, 2, 24, 6), (3, 1, 54, 10), (3, 2, 44, 6), (4, 1, 72, 9), (4, 2, 64, 5)],
)
def test_paired_counts_at_depth_12(window, stride, pairs, layers):
    out = paired_pairs(12, window, stride)
    assert len(out) == pairs
    assert len({layer for _, _, layer in out}) == layers
    assert len({(j, k) for j, k, _ in out}) == pairs  # no pair emitted twice


def test_paired_layer_sharing_pattern():
    by_layer: dict[int, set] = {}
    for j, k, layer in paired_pairs(12):
        by_layer.setdefault(layer, set()).add((j, k))
    assert by_layer[0] == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for m in range(1, 11):
        assert by_layer[m] == {(m, m + 1), (m + 1, m), (m + 1, m + 1)}


@pytest.mark.parametrize("d_front,d_back", [(12, 24), (6, 9), (5, 7), (3, 12)])
def test_unpaired_nearest_interpolation(d_front, d_back):
    out = unpaired_pairs(d_front, d_back)
    expected = [(i * d_front // d_back, i) for i in range(d_back) if i * d_front // d_back < i]
    assert [(j, k) for j, k, _ in out] == expected
    assert [layer for _, _, layer in out] == list(range(len(out)))
    assert all(0 <= j < d_front and 0 <= k < d_back for j, k, _ in out)


def test_deit_family_counts_and_flops():
    plan = plan_stitches(describe_anchors(["deit_b", "deit_ti", "deit_s"]))  # order given is not size order
    assert [a.name for a in plan.anchors] == ["deit_ti", "deit_s", "deit_b"]
    assert len(plan.stitches) == 71 and len(plan.stitch_only) == 68 and plan.num_layers == 22
    assert [round(a.gflops, 3) for a in plan.anchors] == [1.258, 4.608, 17.583]
    assert not any(s.front == "deit_ti" and s.back == "deit_b" for s in plan.stitch_only)  # nearest stitching
    two = plan_stitches(describe_anchors(["deit_s", "deit_b"]))
    assert len(two.stitches) == 36 and two.num_layers == 11


def test_stitch_depth_follows_cut_and_resume():
    plan = plan_stitches(describe_anchors(["deit_s", "deit_b"]))
    for s in plan.stitch_only:
        assert s.blocks == {1: 12, 0: 13, -1: 14}[s.resume - s.cut]


def test_stitch_flops_by_hand():
    s_spec, b_spec = describe_anchor("deit_s"), describe_anchor("deit_b")
    stitch = plan_stitches([s_spec, b_spec]).get("deit_s:3>deit_b:4")
    n = 197

    def block(c):
        return 10 * n * c + 12 * n * c * c + 2 * n * n * c

    by_hand = 196 * 384 * 768 + 4 * block(384) + n * 384 * 768 + 8 * block(768) + 5 * n * 768 + 768 * 1000
    assert stitch.gflops == pytest.approx(by_hand / 1e9, abs=1e-6)
    assert stitch.blocks == 12


def test_params_match_materialized_module(random_snnet):
    for s in random_snnet.plan.stitches:
        module = random_snnet.materialize(s.id)
        assert sum(p.numel() for p in module.parameters()) == s.params, s.id


def test_unequal_depth_family_plans():
    plan = plan_stitches(describe_anchors(["deit_s", "vit_l"]))
    assert len(plan.stitch_only) == 23 and plan.num_layers == 23
    assert plan.stitch_only[0].id == "deit_s:0>vit_l:1"


def test_two_way_and_all_pairs():
    names = ["deit_ti", "deit_s", "deit_b"]
    # SN-Netv2 per neighbouring pair: 11 S→L + 11 L→S + 55 + 55 round trips, twice.
    assert len(plan_stitches(describe_anchors(names), PlanSettings(two_way=True)).stitch_only) == 2 * 132
    # v1 without nearest: Ti→S, Ti→B, S→B (34 each) and 627 Ti→S→B routes (official 732 with the anchors).
    assert len(plan_stitches(describe_anchors(names), PlanSettings(nearest=False)).stitch_only) == 729


def test_plan_hash_is_stable_and_setting_sensitive():
    specs = describe_anchors(["deit_s", "deit_b"])
    assert plan_stitches(specs).hash == plan_stitches(list(reversed(specs))).hash
    assert plan_stitches(specs).hash != plan_stitches(specs, PlanSettings(window=3)).hash


def test_incompatible_anchors_are_refused():
    with pytest.raises(IncompatibleAnchorsError, match="image size"):
        plan_stitches(describe_anchors(["deit_s", "deit_b384"]))
    with pytest.raises(IncompatibleAnchorsError, match="patch size"):
        plan_stitches(describe_anchors(["deit_s", "vit_base_patch32_224"]))
    with pytest.raises(IncompatibleAnchorsError, match="not a plain ViT"):
        describe_anchor("deit_small_distilled_patch16_224")
    with pytest.raises(IncompatibleAnchorsError, match="at least two"):
        plan_stitches(describe_anchors(["deit_s"]))


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="deit_s"):
        describe_anchor("deit_sm")


def test_unknown_stitch_lists_valid_ids(demo_plan):
    with pytest.raises(UnknownStitchError, match="demo_s:0>demo_m:0"):
        demo_plan.get("demo_s:0>demo_m:9")
