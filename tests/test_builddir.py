"""Build directories: stage skipping, plan/weights mismatch, corrupt files, eval resumption."""

from __future__ import annotations

import json

import pytest

from snexport.stitching.store import BuildDir
from snexport.errors import BuildDirError
from snexport.stitching.stage import stitch_stage

DEMO = ["demo_s", "demo_m", "demo_l"]


@pytest.fixture
def arch_build(tmp_path):
    build, _ = stitch_stage(tmp_path / "b", DEMO, random_init=True, show_progress=False)
    return build


def test_stitch_stage_skips_unchanged_and_refuses_a_different_plan(arch_build):
    before = arch_build.snnet_path.stat().st_mtime_ns
    _, info = stitch_stage(arch_build.root, DEMO, random_init=True, show_progress=False)
    assert info.get("skipped") and arch_build.snnet_path.stat().st_mtime_ns == before
    with pytest.raises(BuildDirError, match="different build"):
        stitch_stage(arch_build.root, ["demo_s", "demo_m"], random_init=True, show_progress=False)
    assert arch_build.snnet_path.stat().st_mtime_ns == before  # nothing built was lost


def test_weights_of_another_plan_are_refused(arch_build, tmp_path):
    other, _ = stitch_stage(tmp_path / "other", ["demo_s", "demo_m"], random_init=True, show_progress=False)
    arch_build.snnet_path.write_bytes(other.snnet_path.read_bytes())
    with pytest.raises(BuildDirError, match="belongs to another plan"):
        arch_build.load_snnet()


def test_truncated_weights_and_edited_plan(arch_build):
    data = arch_build.snnet_path.read_bytes()
    arch_build.snnet_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BuildDirError, match="truncated"):
        arch_build.load_snnet()
    doc = json.loads(arch_build.plan_path.read_text())
    doc["stitches"][3]["layer"] = 7
    arch_build.plan_path.write_text(json.dumps(doc))
    with pytest.raises(BuildDirError, match="edited"):
        arch_build.load_plan()
    arch_build.plan_path.write_text("{\"anchors\": [")
    with pytest.raises(BuildDirError, match="corrupt"):
        arch_build.load_plan()


def test_missing_build_dir_says_how_to_make_one(tmp_path):
    with pytest.raises(BuildDirError, match="snexport stitch"):
        BuildDir(tmp_path / "nothing").require()
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildDirError, match="no plan.json"):
        BuildDir(tmp_path / "empty").load_plan()


def test_weights_roundtrip_through_the_build(arch_build):
    import torch

    net = arch_build.load_snnet()
    x = torch.randn(2, 1, 8, 8)
    sid = net.plan.stitch_only[4].id
    with torch.no_grad():
        assert torch.equal(net(x, sid), arch_build.load_snnet()(x, sid))


def test_random_init_accuracy_is_unknown_and_eval_resumes(arch_build):
    from snexport.evaluation.evaluate import evaluate_build

    results = evaluate_build(arch_build, ["demo_s", "demo_s:0>demo_m:0"], show_progress=False)
    assert all(r.top1 is None and r.samples == 0 for r in results)
    with open(arch_build.eval_path, "a") as fh:
        fh.write('{"stitch_id": "demo_m", "top1"')  # a line cut short by a kill
    assert set(arch_build.read_eval()) == {"demo_s", "demo_s:0>demo_m:0"}
    results = evaluate_build(arch_build, show_progress=False)
    assert len(results) == 35
    lines = [ln for ln in arch_build.eval_path.read_text().splitlines() if ln.strip()]
    assert len(lines) == 2 + 1 + 33  # the first two were not evaluated again
