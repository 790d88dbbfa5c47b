"""Least-squares init from the normal equations equals the pseudo-inverse solution (issue 13, item 2).

``LeastSquaresFit`` (one Gram matrix per front position, summed batch by batch, Cholesky or a truncated
eigendecomposition) against ``pinv_with_bias`` + ``least_squares_solution`` (the direct float64 pseudo-inverse with
the official cutoff): on random well-conditioned data, on rank-deficient and ill-conditioned data (where the
Cholesky path must not be taken and pinv's truncation must be reproduced), and through ``SNNet.init_stitching_layers``
for the ViT demo (shared layers get the mean of their solutions) and CNN/Swin stages (NCHW and (B, H, W, C)).
"""

from __future__ import annotations

import copy

import pytest
import torch

from snexport.families.registry import build_module, describe_model, family_of
from snexport.stitching.layers import LeastSquaresFit, least_squares_solution, pinv_with_bias, solve_normal_equations
from snexport.stitching.plan import plan_stitches
from snexport.stitching.snnet import SNNet

RTOL = 1e-5


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want.double()) / torch.linalg.norm(want.double()))


def _fit(x: torch.Tensor, ys: list[torch.Tensor], batch_rows: int, min_rows: int = 1024):
    fit = LeastSquaresFit(x.shape[1], [y.shape[1] for y in ys], min_rows=min_rows)
    for start in range(0, x.shape[0], batch_rows):
        fit.add(x[start:start + batch_rows], [y[start:start + batch_rows] for y in ys])
    return fit.solve()


def _assert_equals_pinv(x: torch.Tensor, ys: list[torch.Tensor], solutions) -> None:
    x_pinv = pinv_with_bias(x)
    for y, (w, b) in zip(ys, solutions):
        w_ref, b_ref = least_squares_solution(x_pinv, y)
        assert w.shape == w_ref.shape and b.shape == b_ref.shape
        err = _relative_error(torch.cat([w, b[:, None]], 1), torch.cat([w_ref, b_ref[:, None]], 1))
        assert err < RTOL, err


def test_well_conditioned_features_take_cholesky_and_equal_pinv_for_every_target():
    torch.manual_seed(0)
    x = torch.randn(3000, 24) * torch.linspace(0.1, 3.0, 24) + 0.5  # uneven scales, non-zero mean
    ys = [x @ torch.randn(24, 16) + torch.randn(3000, 16), torch.randn(3000, 5)]  # fit + noise, pure noise
    solutions, method = _fit(x, ys, batch_rows=700)  # uneven batches: the last one is short
    assert method == "cholesky"
    _assert_equals_pinv(x, ys, solutions)


@pytest.mark.parametrize("case", ["duplicate_column", "dead_channel", "constant_channel", "near_collinear"])
def test_rank_deficient_or_ill_conditioned_features_go_to_eigh_and_keep_pinvs_truncation(case):
    """A Cholesky of the Gram matrix would solve these (or fail); pinv drops directions under its cutoff and so
    must the normal-equations path: same solution, not a huge-weight one."""
    torch.manual_seed(1)
    x = torch.randn(2500, 20)
    if case == "duplicate_column":
        x[:, 3] = x[:, 7]
    elif case == "dead_channel":  # a ReLU channel that never fires
        x[:, 5] = 0.0
    elif case == "constant_channel":  # collinear with the bias column
        x[:, 2] = 1.5
    else:  # σ_min/σ_max ~ 1e-6: under pinv's cutoff (2500·eps(float32) = 3e-4), above float64 noise
        x[:, 9] = x[:, 4] + 1e-6 * torch.randn(2500)
    ys = [x @ torch.randn(20, 12) + 0.1 * torch.randn(2500, 12)]
    solutions, method = _fit(x, ys, batch_rows=1000)
    assert method == "eigh"
    _assert_equals_pinv(x, ys, solutions)
    assert float(solutions[0][0].abs().max()) < 100  # the truncated solution, not 1/σ_min-sized weights


def test_spectrum_near_the_cutoff_is_not_trusted_to_cholesky():
    """Singular values just above pinv's cutoff: Cholesky succeeds, but only a certified margin lets it be used;
    whichever path is taken, the answer is pinv's."""
    torch.manual_seed(2)
    rows, n = 4000, 12
    q, _ = torch.linalg.qr(torch.randn(rows, n, dtype=torch.float64))
    rtol = rows * torch.finfo(torch.float32).eps
    sigma = torch.logspace(0, float(torch.log10(torch.tensor(rtol * 1.5))), n, dtype=torch.float64)
    x = (q * sigma).float()
    ys = [torch.randn(rows, 3)]
    solutions, _ = _fit(x, ys, batch_rows=4000)
    _assert_equals_pinv(x, ys, solutions)


def test_few_rows_use_the_pseudo_inverse_itself():
    torch.manual_seed(3)
    x, y = torch.randn(300, 10), torch.randn(300, 4)
    solutions, method = _fit(x, [y], batch_rows=100)
    assert method == "pinv"
    _assert_equals_pinv(x, [y], solutions)


def test_solve_normal_equations_matches_pinv_on_a_singular_gram_matrix():
    torch.manual_seed(4)
    a = torch.randn(2000, 6, dtype=torch.float64)
    a = torch.cat([a, a[:, :2] @ torch.randn(2, 3, dtype=torch.float64)], 1)  # rank 6 of 9
    y = torch.randn(2000, 2, dtype=torch.float64)
    m, method = solve_normal_equations(a.T @ a, a.T @ y, rows=2000)
    assert method == "eigh"
    want = torch.linalg.pinv(a, rtol=2000 * torch.finfo(torch.float32).eps) @ y
    assert _relative_error(m, want) < RTOL


def test_bad_batches_are_refused():
    fit = LeastSquaresFit(4, [3])
    with pytest.raises(ValueError, match="targets"):
        fit.add(torch.randn(5, 4), [])
    with pytest.raises(ValueError, match="do not fit"):
        fit.add(torch.randn(5, 4), [torch.randn(5, 2)])
    with pytest.raises(ValueError, match="no rows"):
        fit.solve()


# --------------------------------------------------------------------- through SNNet.init_stitching_layers


def _pinv_reference(net: SNNet, images: torch.Tensor, batch_size: int = 32) -> dict[str, tuple]:
    """The pre-issue-13 path: every feature map kept, pinv([X, 1]) per front position, one solution per target,
    a shared layer the mean of its targets' solutions. Same batches as the new path (same float32 features)."""
    plan = net.plan
    feats: dict[tuple[int, int], torch.Tensor] = {}
    with torch.no_grad():
        for i, (spec, model) in enumerate(zip(plan.anchors, net.anchors)):
            family = family_of(spec)
            stem, units = family.stem(model.eval()), family.units(model)
            chunks: dict[int, list] = {}
            for start in range(0, len(images), batch_size):
                x = stem(images[start:start + batch_size])
                chunks.setdefault(0, []).append(x)
                for b, unit in enumerate(units):
                    x = unit(x)
                    chunks.setdefault(b + 1, []).append(x)
            feats.update({(i, p): torch.cat(c) for p, c in chunks.items()})
    solutions: dict[str, list] = {}
    for t in plan.ls_targets():
        fi, bi = net._index[t.front], net._index[t.back]
        layout_f, layout_b = plan.anchors[fi].stage_layout[t.stage], plan.anchors[bi].stage_layout[t.stage]
        x_pinv = pinv_with_bias(feats[(fi, t.cut + 1)], layout_f)
        solutions.setdefault(net._key(t.front, t.back, t.layer), []).append(
            least_squares_solution(x_pinv, feats[(bi, t.resume)], layout_b))
    return {key: (sum(w for w, _ in sols) / len(sols), sum(b for _, b in sols) / len(sols), len(sols))
            for key, sols in solutions.items()}


def _assert_layers_equal_reference(net: SNNet, reference: dict) -> None:
    assert set(reference) == set(net.stitch_layers.keys())
    for key, (w_ref, b_ref, _) in reference.items():
        layer = net.stitch_layers[key]
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)  # a 1x1 conv's (C_out, C_in, 1, 1) too
        err = _relative_error(torch.cat([w, layer.bias.detach()[:, None]], 1),
                              torch.cat([w_ref, b_ref[:, None]], 1))
        assert err < RTOL, (key, err)


def test_demo_vit_init_equals_pinv_with_shared_layers_averaged(random_snnet):
    net = copy.deepcopy(random_snnet)
    torch.manual_seed(5)
    images = torch.randn(100, 1, 8, 8)
    calls = []
    info = net.init_stitching_layers(images, progress=lambda done, total: calls.append((done, total)))
    targets = len(net.plan.ls_targets())
    assert calls == [(i + 1, targets) for i in range(targets)]  # one call per target: a bar ends full
    reference = _pinv_reference(net, images)
    assert any(count > 1 for _, _, count in reference.values())  # the plan shares layers: means are tested
    assert info["targets"] == len(net.plan.ls_targets()) and info["layers"] == len(reference)
    assert sum(info["solved_by"].values()) == info["front_positions"]
    _assert_layers_equal_reference(net, reference)


_RESNET = dict(in_chans=1, num_classes=10, stem_type="deep", stem_width=4, zero_init_last=False,
               pretrained_cfg_overlay={"input_size": (1, 32, 32)})
_SWIN = dict(img_size=32, patch_size=4, window_size=4, in_chans=1, num_classes=10, embed_dim=16,
             depths=(2, 2, 4, 1), num_heads=(1, 2, 2, 4))


@pytest.mark.parametrize("group", ["resnet", "resnet_to_swin"])
def test_cnn_init_equals_pinv_on_nchw_features(group):
    """ResNet→ResNet: 1x1 convs fitted on NCHW maps (pixels as rows); ResNet→Swin: NCHW front, (B, H, W, C) back."""
    front = describe_model("res_a", "resnet18", dict(_RESNET, layers=[1, 2, 2, 1], channels=[4, 8, 16, 32]))
    back = (describe_model("res_b", "resnet50", dict(_RESNET, layers=[1, 2, 3, 1], channels=[4, 8, 16, 32]))
            if group == "resnet" else describe_model("swin_b", "swin_tiny_patch4_window7_224", _SWIN))
    plan = plan_stitches([front, back])
    torch.manual_seed(0)
    net = SNNet(plan, [build_module(a).eval() for a in plan.anchors]).eval()
    images = torch.randn(100, 1, 32, 32)  # stage maps 8x8 … 2x2: 6400 … 400 rows, both solve paths
    info = net.init_stitching_layers(images)
    assert "nchw" in {plan.anchors[0].stage_layout[t.stage] for t in plan.ls_targets()}
    assert len(info["solved_by"]) >= 1
    _assert_layers_equal_reference(net, _pinv_reference(net, images))
