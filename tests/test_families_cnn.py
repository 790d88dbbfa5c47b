"""Swin and ResNet families: the official counts and FLOPs, stage-wise routes, stitching layers per layout, and
tiny real timm Swins and ResNets through the SN-Net, the build directory and ONNX export."""

from __future__ import annotations

import pytest
import torch

from snexport.errors import IncompatibleAnchorsError
from snexport.families import flops, swin
from snexport.families.registry import build_module, describe_anchor, describe_anchors, describe_model
from snexport.stitching.layers import ChannelsLastLinear, assign_mean_solution, least_squares_solution, pinv_with_bias
from snexport.stitching.plan import path_cost, plan_stitches, stage_paired_pairs, stage_unpaired_pairs
from snexport.stitching.snnet import SNNet

# --------------------------------------------------------------------------- official numbers (meta device)

# fvcore totals of the official results files (notes: identical to fvcore on timm 1.0.31 at 1x3x224x224).
OFFICIAL_ANCHOR_FLOPS = {"swin_ti": 4_509_194_496, "swin_s": 8_768_534_784, "swin_b": 15_467_826_176,
                         "resnet18": 1_819_065_856, "resnet50": 4_111_512_576}


def test_official_anchor_flops_to_the_unit():
    for name, expected in OFFICIAL_ANCHOR_FLOPS.items():
        spec = describe_anchor(name)
        assert path_cost(spec, spec, None, None)[0] == expected, name
        assert spec.stem_flops + sum(spec.unit_flops) + spec.head_flops == expected
    assert [round(describe_anchor(n).gflops, 2) for n in OFFICIAL_ANCHOR_FLOPS] == [4.51, 8.77, 15.47, 1.82, 4.11]


def _per_stage(plan) -> dict:
    out: dict = {}
    for s in plan.stitch_only:
        out[s.stage] = out.get(s.stage, 0) + 1
    return out


@pytest.mark.parametrize("names,total,layers,stages", [
    (["swin_b", "swin_ti", "swin_s"], 41, 27, {0: 2, 1: 2, 2: 34}),
    (["resnet18", "resnet50"], 10, 4, {1: 3, 2: 5}),
    (["swin_ti", "resnet18"], 8, 3, {1: 1, 2: 5}),  # ResNet-18 is smaller: it becomes the front
])
def test_official_counts(names, total, layers, stages):
    plan = plan_stitches(describe_anchors(names))
    assert len(plan.stitches) == total and plan.num_layers == layers
    assert _per_stage(plan) == stages
    for s in plan.stitch_only:  # within one stage, never back into a stage's first (downsampling) unit
        f, b = plan.anchor(s.front), plan.anchor(s.back)
        assert f.unit_stage[s.cut] == b.unit_stage[s.resume] == s.stage
        assert b.unit_stage[s.resume - 1] == s.stage


def _flat(spec, stage: int, block: int) -> int:
    return spec.unit_stage.index(stage) + block


# Stitched routes whose fvcore totals the official results files give (stage, j, k are stage-local).
OFFICIAL_ROUTES = [
    ("resnet18", "resnet50", 1, 0, 1, 3_755_463_680), ("resnet18", "resnet50", 1, 1, 2, 3_767_505_920),
    ("resnet18", "resnet50", 2, 1, 5, 2_490_225_664), ("resnet18", "swin_ti", 1, 0, 1, 4_095_543_552),
    ("resnet18", "swin_ti", 2, 1, 5, 2_542_345_472), ("swin_ti", "swin_s", 2, 0, 2, 8_442_491_136),
    ("swin_s", "swin_b", 0, 0, 1, 15_220_458_496), ("swin_s", "swin_b", 2, 16, 17, 9_667_129_344),
]


@pytest.mark.parametrize("front,back,stage,j,k,expected", OFFICIAL_ROUTES)
def test_official_stitch_flops_to_the_unit(front, back, stage, j, k, expected):
    f, b = describe_anchor(front), describe_anchor(back)
    cut, resume = _flat(f, stage, j), _flat(b, stage, k)
    assert path_cost(f, b, cut, resume)[0] == expected
    plan = plan_stitches([f, b])
    assert plan.get(f"{front}:{cut}>{back}:{resume}").stage == stage  # and the plan enumerates it


def test_unpaired_layer_sharing_follows_the_official_zip():
    # The n-th emitted pair gets layer floor(n·d_f/d_b), not its front block's id (notes §1.3).
    assert stage_unpaired_pairs(2, 4) == [(0, 1, 0), (1, 2, 0), (1, 3, 1)]
    assert stage_unpaired_pairs(2, 6) == [(0, 1, 0), (0, 2, 0), (1, 3, 0), (1, 4, 1), (1, 5, 1)]
    assert stage_paired_pairs(6) == [(m, m + 1, m) for m in range(5)]
    assert stage_paired_pairs(1) == []
    plan = plan_stitches(describe_anchors(["swin_ti", "swin_s"]))
    t, s = plan.anchors
    groups: dict = {}
    for st in plan.stitch_only:
        if st.stage == 2:
            local = (st.cut - t.unit_stage.index(2), st.resume - s.unit_stage.index(2))
            groups.setdefault(st.layer, []).append(local)
    assert list(groups.values()) == [
        [(0, 1), (0, 2), (1, 3)], [(1, 4), (1, 5), (2, 6)], [(2, 7), (2, 8), (3, 9)],
        [(3, 10), (3, 11), (4, 12)], [(4, 13), (4, 14), (5, 15)], [(5, 16), (5, 17)]]


def test_swin_params_count_the_front_patch_merging_the_official_code_omits():
    plan = plan_stitches(describe_anchors(["swin_ti", "swin_s"]))
    t = plan.anchors[0]
    stage2 = [s for s in plan.stitch_only if s.stage == 2]
    first = stage2[0]  # official cfg 7, T→S stage 2 (0, 1): 49,383,154 params in its results file
    assert first.cut == t.unit_stage.index(2)
    assert first.params == 49_383_154 + 74_496 + 296_448  # + the PatchMergings of stages 1 and 2 it runs


def test_staged_and_plain_anchors_are_refused_together():
    with pytest.raises(IncompatibleAnchorsError, match="plain ViT"):
        plan_stitches(describe_anchors(["deit_s", "swin_ti"]))


# ------------------------------------------------------------------------------ tiny real Swins and ResNets

_SWIN = dict(img_size=32, patch_size=4, window_size=4, in_chans=1, num_classes=10)
# zero_init_last=False: timm zeroes each block's last BN scale at init, which makes random blocks identities and
# their features nearly rank-deficient (LS weights in the hundreds); trained anchors look like this instead.
_RESNET = dict(in_chans=1, num_classes=10, stem_type="deep", stem_width=4, zero_init_last=False,
               pretrained_cfg_overlay={"input_size": (1, 32, 32)})


@pytest.fixture(scope="module")
def tiny():
    """Tiny anchors at 32x32 (stage maps 8x8, 4x4, 2x2, 1x1), described on the meta device like real ones."""
    sw = "swin_tiny_patch4_window7_224"
    return {
        "swin_a": describe_model("swin_a", sw, dict(_SWIN, embed_dim=8, depths=(2, 2, 2, 1), num_heads=(1, 1, 2, 2))),
        "swin_b": describe_model("swin_b", sw, dict(_SWIN, embed_dim=16, depths=(2, 2, 4, 1), num_heads=(1, 2, 2, 4))),
        "res_a": describe_model("res_a", "resnet18", dict(_RESNET, layers=[1, 2, 2, 1], channels=[4, 8, 16, 32])),
        "res_b": describe_model("res_b", "resnet50", dict(_RESNET, layers=[1, 2, 3, 1], channels=[4, 8, 16, 32])),
    }


GROUPS = {"swin": ("swin_a", "swin_b"), "resnet": ("res_a", "res_b"), "resnet_to_swin": ("res_a", "swin_b")}


def _net(tiny, group: str) -> SNNet:
    plan = plan_stitches([tiny[n] for n in GROUPS[group]])
    torch.manual_seed(0)
    return SNNet(plan, [build_module(a).eval() for a in plan.anchors]).eval()


@pytest.mark.parametrize("group", list(GROUPS))
def test_routes_materialize_params_and_flops_agree(tiny, group):
    net = _net(tiny, group)
    plan = net.plan
    assert len(plan.stitch_only) > 0
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for i, a in enumerate(plan.anchors):
            assert torch.allclose(net(x, a.name), net.anchors[i](x), atol=1e-5)
        for s in plan.stitches:
            module = net.materialize(s.id)
            assert torch.equal(module(x), net(x, s.id)), s.id
            assert sum(p.numel() for p in module.parameters()) == s.params, s.id
            # The plan's cost (from per-unit costs in the specs) is what counting the exported module gives.
            counted, _ = flops.count_flops(module, torch.empty(1, 1, 32, 32), swin._flop_rules())
            assert counted == path_cost(plan.anchor(s.front), plan.anchor(s.back), s.cut, s.resume)[0], s.id


def test_stitching_layers_follow_the_stage_layouts(tiny):
    swin_layers = list(_net(tiny, "swin").stitch_layers.values())
    assert all(type(m) is torch.nn.Linear for m in swin_layers)
    assert [m.in_features for m in swin_layers] == [8, 16, 32, 32]  # one layer per stage width (8·2^s → 16·2^s)
    conv = list(_net(tiny, "resnet").stitch_layers.values())
    assert all(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.bias is not None for m in conv)
    assert [(m.in_channels, m.out_channels) for m in conv] == [(8, 32), (16, 64)]  # BasicBlock → Bottleneck widths
    mixed = list(_net(tiny, "resnet_to_swin").stitch_layers.values())
    assert all(isinstance(m, ChannelsLastLinear) for m in mixed)
    x = torch.randn(2, 8, 4, 4)
    y = mixed[0](x)  # NCHW in, Swin's (B, H, W, C) out at the same H×W
    assert y.shape == (2, 4, 4, 32)
    assert torch.allclose(y, torch.nn.functional.linear(x.permute(0, 2, 3, 1), mixed[0].weight, mixed[0].bias))


def test_least_squares_recovers_an_exact_conv_map_on_nchw():
    torch.manual_seed(0)
    x = torch.randn(50, 6, 5, 5)
    conv = torch.nn.Conv2d(6, 9, 1)
    with torch.no_grad():
        y = conv(x)
    w, b = least_squares_solution(pinv_with_bias(x, "nchw"), y, "nchw")
    fitted = torch.nn.Conv2d(6, 9, 1)
    assign_mean_solution(fitted, [(w, b)])
    assert torch.allclose(fitted.weight, conv.weight, atol=1e-4) and torch.allclose(fitted.bias, conv.bias, atol=1e-4)


@pytest.mark.parametrize("group", list(GROUPS))
def test_ls_init_solves_the_least_squares_problem_per_stage(tiny, group):
    """After init, a layer serving one stitch is the least-squares map of its calibration features (rows = images
    × pixels, channels last, whatever the layouts): its residual is that of an independent float64 lstsq."""
    from snexport.families.registry import family_of
    from snexport.stitching.layers import feature_rows

    net = _net(tiny, group)
    images = torch.randn(60, 1, 32, 32)
    info = net.init_stitching_layers(images)
    assert info["layers"] == net.plan.num_layers
    users: dict = {}
    for s in net.plan.stitch_only:
        users.setdefault((s.front, s.back, s.layer), []).append(s)
    own = [v[0] for v in users.values() if len(v) == 1]
    assert own
    for s in own:
        fi, bi = net._index[s.front], net._index[s.back]
        fspec, bspec = net.plan.anchors[fi], net.plan.anchors[bi]
        f_fam, b_fam = family_of(fspec), family_of(bspec)
        with torch.no_grad():
            x = f_fam.stem(net.anchors[fi])(images)
            for unit in f_fam.units(net.anchors[fi])[: s.cut + 1]:
                x = unit(x)
            y = b_fam.stem(net.anchors[bi])(images)
            for unit in b_fam.units(net.anchors[bi])[: s.resume]:
                y = unit(y)
            mapped = net.stitch_layers[net._key(s.front, s.back, s.layer)](x)
        assert mapped.shape == y.shape
        layout_f, layout_b = fspec.stage_layout[s.stage], bspec.stage_layout[s.stage]
        xr, yr = feature_rows(x, layout_f).double(), feature_rows(y, layout_b).double()
        a = torch.cat([xr, torch.ones(len(xr), 1, dtype=torch.float64)], 1)
        best = (a @ torch.linalg.lstsq(a, yr, driver="gelsd").solution - yr).pow(2).mean()
        got = (feature_rows(mapped, layout_b).double() - yr).pow(2).mean()
        # (float32 weights of a float64 solve: within 2% of the optimum; a row-order mix-up would be far off)
        assert got <= best * 1.02 + 1e-9, (s.id, float(got), float(best))
        assert got < (yr - yr.mean(0)).pow(2).mean()  # and it beats the best constant map


def test_swin_build_dir_roundtrip_recomputes_window_buffers(tiny, tmp_path):
    """Loading rebuilds anchors on the meta device; Swin's masks and position indices are in no weights file."""
    from snexport.stitching.store import BuildDir

    net = _net(tiny, "swin")
    net.init_stitching_layers(torch.randn(20, 1, 32, 32))
    build = BuildDir(tmp_path / "b")
    build.save_plan(net.plan, {})
    build.save_snnet(net)
    loaded = build.load_snnet()
    masks = [m.attn_mask for m in loaded.anchors[1].modules() if getattr(m, "attn_mask", None) is not None]
    assert masks and all(t.device.type == "cpu" for t in masks)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for s in net.plan.stitches:
            assert torch.equal(loaded(x, s.id), net(x, s.id)), s.id


def test_mismatched_stage_sizes_are_refused_naming_them(tiny):
    coarse = describe_model("swin_p2", "swin_tiny_patch4_window7_224",
                            dict(_SWIN, patch_size=2, embed_dim=8, depths=(2, 2, 2, 1), num_heads=(1, 1, 2, 2)))
    with pytest.raises(IncompatibleAnchorsError, match="same feature-map size") as info:
        plan_stitches([tiny["res_a"], coarse])
    assert "[64, 16, 4, 1]" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("group", ["resnet", "resnet_to_swin", "swin"])
def test_cnn_and_swin_stitches_export_validate_and_pass_the_tensorrt_check(tiny, group, tmp_path):
    import numpy as np

    from snexport.export.stage import export_stitches

    net = _net(tiny, group)
    net.init_stitching_layers(torch.randn(100, 1, 32, 32))
    chosen = [net.plan.stitches[0], net.plan.stitch_only[-1], net.plan.stitches[1]]
    calib = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    arts = export_stitches(tmp_path, chosen, net.materialize, (1, 32, 32), calib, exporter="auto",
                           simplifier="onnxsim", formats=("onnx", "onnx-fp16"))
    assert {a.precision for a in arts} == {"fp32", "fp16"}  # the FP16 cast passed its gates against PyTorch
    from snexport.export.trt_compat import check_tensorrt_compat

    ops: set = set()
    for a in arts:
        if a.precision == "fp32":
            assert a.validation["top1_agreement"] == 1.0 and a.validation["cosine"] > 0.9999, a.validation
            assert a.validation["composed_from_pieces"] > 2  # composed from per-piece graphs, not traced whole
            assert a.validation["tensorrt_compat"]["ok"] is True, a.validation["tensorrt_compat"]
            ops |= set(check_tensorrt_compat(tmp_path / a.file)["ops"])
    assert ("MaxPool" in ops) == (group != "swin")  # the ResNet stem
    assert "Conv" in ops  # ResNet's convolutions, Swin's patch embedding
    assert ("LayerNormalization" in ops and "Softmax" in ops) == (group != "resnet")


# --------------------------------------------------------------------- the CNN demo family through every stage

DEMO_CNN = ["demo_cnn_s", "demo_cnn_m", "demo_cnn_l"]
QUICK_PROFILE = """
description = "x86 CPU, short measurements for tests"
backend = "onnxruntime"
precision = "fp32"
threads = 1
memory_budget_mb = 512

[measurement]
warmup = 3
iterations = 20
min_duration_s = 0.05
max_duration_s = 1.0
percentiles = [50, 90, 99]
"""


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "quick-cpu.toml"
    path.write_text(QUICK_PROFILE)
    return str(path)


def test_demo_cnn_plan_uses_the_unpaired_rule_in_both_stitched_stages():
    plan = plan_stitches(describe_anchors(DEMO_CNN))
    assert len(plan.stitches) == 16 and plan.num_layers == 8 and _per_stage(plan) == {1: 5, 2: 8}
    assert plan.anchors[0].img_size == (32, 32) and plan.anchors[0].in_chans == 1
    assert [a.stage_widths for a in plan.anchors] == [(2, 4, 8, 16), (4, 8, 16, 32), (8, 16, 32, 64)]


def test_demo_cnn_random_init_through_every_stage(tmp_path, quick_profile):
    """Stitch, fine-tune (BatchNorm statistics kept), evaluate, export + validate + pack, bench, manifest,
    selector: the real pipeline on random-init tiny ResNets (no anchor training, so it stays quick)."""
    import json

    from safetensors.torch import load_file

    from snexport import buildfiles as files
    from snexport.device.manifest import read_manifest
    from snexport.pipeline.run import BuildOptions, run_build, selector_demo

    ids = ["demo_cnn_s", "demo_cnn_s:3>demo_cnn_m:5", "demo_cnn_m:5>demo_cnn_l:7", "demo_cnn_l"]
    opts = BuildOptions(out=tmp_path / "b", anchors=DEMO_CNN, target=quick_profile, random_init=True,
                        data="digits", epochs=1, stitches=",".join(ids))
    lines: list[str] = []
    result = run_build(opts, say=lines.append, show_progress=False)
    build = result["build"]
    assert result["profiled"] and "[2/6] train: 1/1 epochs" in "\n".join(lines)
    before, after = load_file(str(build.path(files.TRAIN_INIT))), load_file(str(build.snnet_path))
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    convs = [k for k in before if k.startswith("anchors.") and k.endswith("conv1.weight")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)  # BN statistics kept
    assert any(not torch.equal(before[k], after[k]) for k in convs)  # while the anchors did train
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("stitch_layers."))

    evals = [json.loads(line) for line in build.path(files.EVAL).read_text().splitlines()]
    assert len(evals) == 16 and all(e["top1"] is not None for e in evals)
    manifest = read_manifest(build.manifest_path)
    engines = {e["stitch_id"]: e for e in manifest["engines"]}
    assert sorted(engines) == sorted(ids)
    exported = {a["stitch_id"]: a for a in json.loads(build.path(files.EXPORTS).read_text())}
    for sid in ids[1:3]:  # the stitches: a 1x1 conv between ResNet stages, exported and checked against PyTorch
        v = exported[sid]["validation"]
        assert v["top1_agreement"] == 1.0 and v["cosine"] > 0.9999 and v["tensorrt_compat"]["ok"], v
    shown = selector_demo(build, say=lines.append)
    assert len(shown) == 3 and shown[-1]["engine"] in engines


def test_tensorrt_check_refuses_1d_pooling_and_keeps_2d():
    from onnx import TensorProto, helper

    from snexport.export.trt_compat import check_tensorrt_compat

    def pool(kernel, shape):
        node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=kernel, name="pool")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        return check_tensorrt_compat(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))

    assert pool([3, 3], [1, 4, 8, 8])["ok"]  # ResNet's stem pool
    assert any(u.startswith("MaxPool: 2D or 3D pooling only") for u in pool([3], [1, 4, 8])["unsupported"])


@pytest.mark.long
def test_demo_cnn_build_end_to_end_with_trained_anchors(tmp_path, quick_profile):
    """`snexport build --anchors demo_cnn` as the CLI runs it (anchors trained once per checkout into
    .pytest_cache, fine-tuning shortened to 2 epochs): a real accuracy ladder, and the selector switches."""
    from snexport.families.registry import split_anchor_names
    from snexport.pipeline.run import BuildOptions, run_build, selector_demo

    opts = BuildOptions(out=tmp_path / "cnn", anchors=split_anchor_names("demo_cnn"), target=quick_profile, epochs=2)
    lines: list[str] = []
    result = run_build(opts, say=lines.append, show_progress=False)
    build = result["build"]
    top1 = {r.stitch_id: r.top1 for r in build.read_eval().values()}
    s, m, big = (top1[n] for n in DEMO_CNN)
    assert s + 3 < m and m + 3 < big, top1  # measured 83.3 / 90.8 / 97.8 after the default 10 epochs
    stitches = sorted(t for sid, t in top1.items() if ">" in sid)
    # median stitch above 3x chance (10%); measured 42% after 2 epochs, 65% after the default 10
    assert len(stitches) == 13 and stitches[len(stitches) // 2] > 30, top1
    shown = selector_demo(build, say=lines.append)
    assert len({row["engine"] for row in shown}) >= 2  # tight and loose budgets pick different engines


def test_cli_plan_prints_the_official_swin_family():
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "snexport.cli.app", "plan", "--anchors", "swin", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert len(doc["anchors"]) + len(doc["stitches"]) == 41 and doc["num_layers"] == 27
    assert [(a["name"], a["family"], a["gflops"]) for a in doc["anchors"]] == [
        ("swin_ti", "swin", 4.509), ("swin_s", "swin", 8.769), ("swin_b", "swin", 15.468)]
    assert [s["stage"] for s in doc["stitches"]].count(2) == 34
