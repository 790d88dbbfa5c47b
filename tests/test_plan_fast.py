"""`snexport plan` for known names answers from recorded architecture facts, without torch or timm (issue 13, item 1).

The records (snexport/families/known.json, written by ``python -m snexport.families.record``) must equal what the
meta-device path says for every recorded name, cover every known name, and drive the CLI in a process that never
imports torch, timm or torchvision; names without a record, and records made for another AnchorSpec, go through
the meta device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from snexport.families import registry
from snexport.families.record import known_names
from snexport.families.registry import describe_anchor, recorded_names, recorded_spec
from snexport.stitching.plan import plan_stitches

HEAVY = ("torch", "timm", "torchvision")


def test_records_cover_every_known_name():
    assert recorded_names() == sorted(known_names())
    assert {"deit_s", "deit_base_patch16_224", "deit3_l", "vit_b", "swin_ti", "resnet50", "demo_s",
            "demo_cnn_l"} <= set(recorded_names())


@pytest.mark.slow
def test_recorded_facts_equal_the_meta_device_facts():
    """Every record against a fresh meta-device build (dataclass equality: tuples, floats and kwargs exact)."""
    stale = [n for n in recorded_names() if recorded_spec(n) != describe_anchor(n, recorded=False)]
    assert not stale, f"stale records (run `python -m snexport.families.record`): {stale}"


def _plan_in_subprocess(anchors: str) -> tuple[dict, list[str]]:
    code = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))\n"
        f"sys.argv = ['snexport', 'plan', '--anchors', {anchors!r}, '--json']\n"
        "from snexport.cli.app import main\n"
        "main()\n"
    )
    env = dict(os.environ, COLUMNS="200")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("anchors", ["deit_s,deit_b", "swin_ti,swin_s", "resnet18,resnet50", "demo"])
def test_cli_plan_of_known_names_imports_no_torch_or_timm(anchors):
    from snexport.cli.cmd_plan import plan_json
    from snexport.families.registry import split_anchor_names

    got, heavy = _plan_in_subprocess(anchors)
    assert heavy == []
    # The same plan as from meta-device facts (in this process): records change the speed, nothing else.
    meta = plan_stitches([describe_anchor(n, recorded=False) for n in split_anchor_names(anchors)])
    assert got == json.loads(json.dumps(plan_json(meta)))


def test_unrecorded_names_use_the_meta_device():
    name = "deit_tiny_patch16_224.fb_in1k"  # a timm name with a pretrained tag: not recorded
    assert recorded_spec(name) is None
    spec = describe_anchor(name)
    assert spec.name == name and spec == describe_anchor(name, recorded=False)
    assert spec.unit_flops == recorded_spec("deit_tiny_patch16_224").unit_flops


@pytest.mark.parametrize("content", ["not json", json.dumps({"fields": ["name"], "specs": {"deit_s": {}}})])
def test_damaged_or_stale_records_fall_back_to_the_meta_device(tmp_path, monkeypatch, content):
    """A record file made for another AnchorSpec (or unreadable) is ignored as a whole, never half-used."""
    known = tmp_path / "known.json"
    known.write_text(content)
    monkeypatch.setattr(registry, "KNOWN_FILE", known)
    registry._records.cache_clear()
    registry.recorded_spec.cache_clear()
    try:
        assert recorded_names() == [] and recorded_spec("deit_s") is None
        assert describe_anchor("deit_s").unit_flops  # from the meta device
    finally:
        registry._records.cache_clear()
        registry.recorded_spec.cache_clear()
