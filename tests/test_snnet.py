"""SN-Net routing, materialize, and the least-squares init of stitching layers."""

from __future__ import annotations

import torch

from snexport.stitching.layers import assign_mean_solution, least_squares_solution, make_stitching_layer, pinv_with_bias


def test_anchor_routes_equal_timm_forward(random_snnet):
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        for i, spec in enumerate(random_snnet.plan.anchors):
            assert torch.allclose(random_snnet(x, spec.name), random_snnet.anchors[i](x), atol=1e-6)


def test_materialize_equals_snnet_for_every_configuration(random_snnet):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        for s in random_snnet.plan.stitches:
            module = random_snnet.materialize(s.id)
            assert torch.equal(module(x), random_snnet(x, s.id)), s.id


def test_materialized_module_is_standalone(random_snnet):
    sid = random_snnet.plan.stitch_only[0].id
    module = random_snnet.materialize(sid)
    snnet_ptrs = {p.data_ptr() for p in random_snnet.parameters()}
    assert not snnet_ptrs & {p.data_ptr() for p in module.parameters()}
    assert not module.training
    assert len(module.front_blocks) == random_snnet.plan.get(sid).cut + 1


def test_stitch_differs_from_anchors(random_snnet):
    x = torch.randn(2, 1, 8, 8)
    s = random_snnet.plan.stitch_only[5]
    with torch.no_grad():
        out = random_snnet(x, s.id)
        assert not torch.allclose(out, random_snnet(x, s.front)) and not torch.allclose(out, random_snnet(x, s.back))


def test_least_squares_recovers_an_exact_linear_map():
    torch.manual_seed(0)
    x = torch.randn(500, 7, 16)
    w_true, b_true = torch.randn(32, 16), torch.randn(32)
    y = x @ w_true.T + b_true
    w, b = least_squares_solution(pinv_with_bias(x), y)
    assert torch.allclose(w.float(), w_true, atol=1e-4) and torch.allclose(b.float(), b_true, atol=1e-4)


def test_shared_layer_gets_mean_of_solutions():
    layer = make_stitching_layer(3, 2)
    sols = [(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)),
            (3 * torch.ones(2, 3, dtype=torch.float64), 4 * torch.ones(2, dtype=torch.float64))]
    assign_mean_solution(layer, sols)
    assert torch.allclose(layer.weight, torch.full((2, 3), 2.0)) and torch.allclose(layer.bias, torch.full((2,), 2.0))


def test_ls_init_fits_front_to_back_activations(random_snnet):
    """After init, each unshared layer maps front block j's output close to back block k-1's (in LS sense)."""
    import copy

    net = copy.deepcopy(random_snnet)
    images = torch.randn(100, 1, 8, 8)
    info = net.init_stitching_layers(images)
    assert info["layers"] == net.plan.num_layers and info["calibration_images"] == 100
    # Random init would leave a large residual; LS must beat a zero map by a wide margin on the fitted data.
    s = next(s for s in net.plan.stitch_only if s.cut == 0 and s.resume == 0)
    front, back = net.anchors[0], net.anchors[1]
    from snexport.families.vit_modules import ViTEmbedding

    with torch.no_grad():
        xf = front.blocks[0](ViTEmbedding(front)(images))
        yb = ViTEmbedding(back)(images)
        layer = net.stitch_layers[net._key(s.front, s.back, s.layer)]
        residual = (layer(xf) - yb).pow(2).mean()
    assert residual < 0.5 * yb.pow(2).mean()


def test_ls_init_stitches_beat_chance_on_trained_demo(demo_build):
    """The spec's promise: right after LS init, before training, stitches are far better than chance (10%)."""
    from snexport.evaluation.evaluate import evaluate_build

    results = {r.stitch_id: r for r in evaluate_build(demo_build, show_progress=False)}
    stitches = [r for r in results.values() if ">" in r.stitch_id]
    accs = sorted(r.top1 for r in stitches)
    assert len(stitches) == 32
    assert accs[len(accs) // 2] > 40.0  # median stitch: 4x chance
    anchors = [results[n].top1 for n in ("demo_s", "demo_m", "demo_l")]
    assert anchors[0] < anchors[2]  # a real family: the largest anchor beats the smallest
