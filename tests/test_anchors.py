"""Anchor resolution and weight loading, including every bad-weights path."""

from __future__ import annotations

import pytest
import torch

from snexport.families.registry import load_anchor, parse_weights_option, resolve_name, split_anchor_names
from snexport.errors import WeightsError


def test_aliases_and_family_shortcuts():
    assert resolve_name("deit_s")[0] == "deit_small_patch16_224"
    assert resolve_name("vit_base_patch16_224.augreg_in21k")[0] == "vit_base_patch16_224.augreg_in21k"
    assert split_anchor_names(None) == ["demo_s", "demo_m", "demo_l"]
    assert split_anchor_names("demo") == ["demo_s", "demo_m", "demo_l"]
    assert split_anchor_names("deit_s, deit_b") == ["deit_s", "deit_b"]


def test_weights_roundtrip_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    src = load_anchor("demo_s", random_init=True, seed=3)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    x = torch.randn(2, 1, 8, 8)
    for name in ("w.safetensors", "w.pth"):
        loaded = load_anchor("demo_s", weights=tmp_path / name)
        with torch.no_grad():
            assert torch.equal(loaded(x), src.eval()(x))


def test_missing_corrupt_and_mismatched_weights(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_anchor("demo_s", weights=tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="corrupt"):
        load_anchor("demo_s", weights=bad)
    other = load_anchor("demo_m", random_init=True)
    torch.save(other.state_dict(), tmp_path / "m.pth")
    with pytest.raises(WeightsError, match="do not fit demo_s"):
        load_anchor("demo_s", weights=tmp_path / "m.pth")


def test_no_weights_offline_names_both_fixes(monkeypatch):
    import snexport.families.registry as anchors

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub access; make that explicit for any machine
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(WeightsError) as info:
        anchors.load_anchor("deit_ti")
    msg = str(info.value)
    assert "--weights deit_ti=PATH" in msg and "--random-init" in msg and "\n" not in msg


def test_weights_option_parsing(tmp_path):
    got = parse_weights_option([f"deit_s={tmp_path}/a.safetensors,deit_b=b.pth"])
    assert got["deit_s"].name == "a.safetensors" and got["deit_b"].name == "b.pth"
    with pytest.raises(WeightsError, match="NAME=PATH"):
        parse_weights_option(["deit_s"])
