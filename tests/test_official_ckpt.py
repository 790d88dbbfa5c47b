"""`snexport stitch --from-official`: checkpoints in the official SN-Net v1 DeiT / SN-Netv2 layouts, written here
from random weights, load into a build whose every configuration gives the official model's logits.

The reference is a port of the official forwards written below from the documented facts (notes §3-4): the v1
DeiT route ends without the final norm, the v2 route with it; stitching layers map all tokens; v2 layers are
stitch_layers[anchor just left][i] and LoRA adds B·A/r (alpha = 1). It runs on the raw state dict with functional
ops only, sharing nothing with snexport's modules. Anchors: the bundled demo ViTs (depth 6), so the official
enumerations are generalised from 12 blocks to d (v1 windows 0..d-2; v2's unused S→L layer is d_s - 1).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from snexport.errors import BuildDirError, WeightsError
from snexport.families.registry import build_module, describe_anchor
from snexport.stitching.official import anchor_state_for_timm, load_official, official_stage

HEADS = 2  # the demo ViTs' heads (not recoverable from a state dict)
PATCH = 2


# ------------------------------------------------------------------ the official forward, ported from the facts


def _embed(sd, x):
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    return torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]


def _block(sd, i, x):
    p = f"blocks.{i}."
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
        b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // HEADS) ** -0.5).softmax(dim=-1)
    h = F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = x + h
    h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + h


def _head(sd, x, norm: bool):
    if norm:
        x = F.layer_norm(x, (x.shape[-1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


def _transform(layer, x):
    w = layer["weight"]
    if "lora_A" in layer:  # eval: merged W + B·A·(alpha / r), alpha = 1
        w = w + layer["lora_B"] @ layer["lora_A"] / layer["lora_A"].shape[0]
    return F.linear(x, w, layer["bias"])


def _anchor_sd(state, i):
    prefix = f"anchors.{i}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _layer(state, p, layer):
    prefix = f"stitch_layers.{p}.{layer}.transform."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def official_route_forward(state, x, segments, norm: bool):
    """segments: [(anchor index, first block, last block, layer after it as (P, L) or None)]."""
    sds = {i: _anchor_sd(state, i) for i, *_ in segments}
    x = _embed(sds[segments[0][0]], x)
    for anchor, first, last, layer in segments:
        for b in range(first, last + 1):
            x = _block(sds[anchor], b, x)
        if layer is not None:
            x = _transform(_layer(state, *layer), x)
    return _head(sds[segments[-1][0]], x, norm)


# ------------------------------------------------------------------ official enumerations (generalised to depth d)


def v1_pairs(depth):
    """paired_stitching(depth, 2, 1): ordered pairs of each window, first occurrence's window = layer."""
    out = {}
    for m in range(depth - 1):
        for j, k in ((m, m), (m, m + 1), (m + 1, m), (m + 1, m + 1)):
            out.setdefault((j, k), m)
    return out


def v1_configs(names, depth, nearest):
    """{our id: (segments, norm)}: anchors, one-hop routes per pair, and a→b→c routes without nearest."""
    combos = [c for c in itertools.combinations(range(len(names)), 2) if not nearest or c[1] == c[0] + 1]
    out = {n: ([(i, 0, depth - 1, None)], True) for i, n in enumerate(names)}
    pairs = v1_pairs(depth)
    for p, (a, b) in enumerate(combos):
        for (j, k), layer in pairs.items():
            out[f"{names[a]}:{j}>{names[b]}:{k}"] = ([(a, 0, j, (p, layer)), (b, k, depth - 1, None)], False)
    if not nearest:
        p01, p12 = combos.index((0, 1)), combos.index((1, 2))
        for (j, k), l1 in pairs.items():
            for (m, e), l2 in pairs.items():
                if m >= k:
                    sid = f"{names[0]}:0-{j}>{names[1]}:{k}-{m}>{names[2]}:{e}-{depth - 1}"
                    out[sid] = ([(0, 0, j, (p01, l1)), (1, k, m, (p12, l2)), (2, e, depth - 1, None)], False)
    return out


def v2_configs(names, ds, dl):
    """get_stitch_configs_bidirection, generalised: routes as inclusive block ranges per anchor, final norm on."""
    r = dl // ds
    S, L = names
    sl = [(i, (i + 1) * r, i) for i in range(ds) if i != ds - 1]  # the official `front != 11`, for d_s = 12
    ls = [(i, i // r + 1, i // r) for i in range(dl - 1) if (r == 1 or i % 2 == 1)]
    out = {S: ([(0, 0, ds - 1, None)], True), L: ([(1, 0, dl - 1, None)], True)}
    for c, e, lay in sl:
        out[f"{S}:{c}>{L}:{e}"] = ([(0, 0, c, (0, lay)), (1, e, dl - 1, None)], True)
    for i, m, lay in ls:
        out[f"{L}:{i}>{S}:{m}"] = ([(1, 0, i, (1, lay)), (0, m, ds - 1, None)], True)
    for (i, m, l1), (c, e, l2) in itertools.product(ls, sl):
        if c >= m:
            out[f"{L}:0-{i}>{S}:{m}-{c}>{L}:{e}-{dl - 1}"] = (
                [(1, 0, i, (1, l1)), (0, m, c, (0, l2)), (1, e, dl - 1, None)], True)
    for (c, e, l1), (i, m, l2) in itertools.product(sl, ls):
        if i >= e:
            out[f"{S}:0-{c}>{L}:{e}-{i}>{S}:{m}-{ds - 1}"] = (
                [(0, 0, c, (0, l1)), (1, e, i, (1, l2)), (0, m, ds - 1, None)], True)
    return out


# ------------------------------------------------------------------ checkpoints in the official layout


def _random_anchor_states(names, seed):
    torch.manual_seed(seed)
    state = {}
    for i, name in enumerate(names):
        model = build_module(describe_anchor(name))
        for k, v in model.state_dict().items():
            # Norms away from identity, so skipping or applying the final norm shows in the logits.
            state[f"anchors.{i}.{k}"] = v + 0.2 * torch.randn_like(v) if "norm" in k else v.clone()
    return state


def _random_layer(cin, cout, rank=0):
    layer = {"weight": torch.randn(cout, cin) / cin ** 0.5, "bias": 0.1 * torch.randn(cout)}
    if rank:
        layer.update(lora_A=torch.randn(rank, cin), lora_B=torch.randn(cout, rank))  # trained: B no longer zero
    return layer


def _put(state, p, layer, tensors):
    for k, v in tensors.items():
        state[f"stitch_layers.{p}.{layer}.transform.{k}"] = v


def v1_checkpoint(path, names, nearest):
    widths = [describe_anchor(n).width for n in names]
    state = _random_anchor_states(names, seed=1)
    combos = [c for c in itertools.combinations(range(len(names)), 2) if not nearest or c[1] == c[0] + 1]
    for p, (a, b) in enumerate(combos):
        for layer in range(describe_anchor(names[a]).depth - 1):
            _put(state, p, layer, _random_layer(widths[a], widths[b]))
    torch.save({"model": state, "epoch": 3}, path)
    return state


def v2_checkpoint(path, names, rank):
    ws, wl = (describe_anchor(n).width for n in names)
    ds = describe_anchor(names[0]).depth
    state = _random_anchor_states(names, seed=2)
    for i in range(ds):  # 0..d_s-1, the last one unused (as in the official checkpoints)
        _put(state, 0, i, _random_layer(ws, wl, rank))
    for m in range(ds - 1):
        _put(state, 1, m, _random_layer(wl, ws, rank))
    torch.save({"model": state}, path)
    return state


def _check_every_config(net, state, expected):
    assert sorted(net.config_ids) == sorted(expected)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for n, (sid, (segments, norm)) in enumerate(expected.items()):
            ours = net(x, sid)
            ref = official_route_forward(state, x, segments, norm)
            assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), sid
            if n % 7 == 0:  # the exported form (materialize, LoRA merged) is the same function
                assert torch.allclose(net.materialize(sid)(x), ref, atol=1e-5, rtol=1e-4), sid


def test_v1_deit_checkpoint_reproduces_every_configuration(tmp_path):
    names = ["demo_s", "demo_m", "demo_l"]
    state = v1_checkpoint(tmp_path / "snnet_deit.pth", names, nearest=True)
    net, method = load_official(tmp_path / "snnet_deit.pth")
    assert method == "SN-Net" and not net.plan.settings.final_norm and net.plan.settings.params == "paper"
    _check_every_config(net, state, v1_configs(names, 6, nearest=True))


def test_v1_checkpoint_without_nearest_has_three_anchor_routes(tmp_path):
    names = ["demo_s", "demo_m", "demo_l"]
    state = v1_checkpoint(tmp_path / "all.pth", names, nearest=False)
    net, _ = load_official(tmp_path / "all.pth")
    expected = v1_configs(names, 6, nearest=False)
    assert not net.plan.settings.nearest and len(expected) == 3 + 3 * 16 + sum(
        1 for (j, k) in v1_pairs(6) for (m, e) in v1_pairs(6) if m >= k)
    _check_every_config(net, state, expected)


@pytest.mark.parametrize("rank", [0, 4])
def test_v2_checkpoint_reproduces_every_configuration(tmp_path, rank):
    names = ["demo_s", "demo_m"]
    state = v2_checkpoint(tmp_path / "v2.pth", names, rank)
    net, method = load_official(tmp_path / "v2.pth")
    s = net.plan.settings
    assert method == "SN-Netv2" and s.two_way and s.final_norm and s.lora_rank == rank
    expected = v2_configs(names, 6, 6)
    assert len(expected) == 2 + 5 + 5 + 10 + 10
    _check_every_config(net, state, expected)


def test_cli_from_official_writes_a_build(tmp_path):
    from typer.testing import CliRunner

    from snexport.cli.app import app
    from snexport.stitching.store import BuildDir

    state = v2_checkpoint(tmp_path / "v2.pth", ["demo_s", "demo_m"], rank=4)
    result = CliRunner().invoke(app, ["stitch", "--from-official", str(tmp_path / "v2.pth"), "--out",
                                      str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "official SN-Netv2" in result.output
    net = BuildDir(tmp_path / "b").load_snnet()
    sid = "demo_m:0-1>demo_s:2-3>demo_m:4-5"
    segments, norm = v2_configs(["demo_s", "demo_m"], 6, 6)[sid]
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x, sid), official_route_forward(state, x, segments, norm), atol=1e-5, rtol=1e-4)
    # The stored build keeps the factors apart (lora_A/lora_B), as the official checkpoint did.
    assert any(k.endswith("lora_A") for k in net.state_dict())
    # A second run into the same directory refuses, leaving the build as it was.
    again = CliRunner().invoke(app, ["stitch", "--from-official", str(tmp_path / "v2.pth"), "--out",
                                     str(tmp_path / "b")])
    assert again.exit_code != 0
    assert isinstance(again.exception, BuildDirError) and "--force" in str(again.exception)


def test_deit3_layer_scale_keys_map_to_timm():
    import timm

    model = timm.create_model("deit3_small_patch16_224", pretrained=False, num_classes=10, depth=2)
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
                for k, v in model.state_dict().items()}
    assert "blocks.0.gamma_1" in official and tuple(official["pos_embed"].shape) == (1, 196, 384)
    assert model.load_state_dict(anchor_state_for_timm(official), strict=True)


def test_not_an_official_checkpoint_is_refused(tmp_path):
    torch.save({"model": {"blocks.0.weight": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="no SN-Net state dict"):
        load_official(tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="no such file"):
        official_stage(tmp_path / "b", tmp_path / "missing.pth")
    assert not (tmp_path / "b").exists()
