"""The whole job on the demo family: select → export → bench → manifest → report → selector, and its bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from snexport.errors import BackendUnavailableError, UnknownStitchError

QUICK_PROFILE = """
description = "x86 CPU, short measurements for tests"
backend = "onnxruntime"
# ONNX Runtime alone (its device-optimized pack): other CPU runtimes are measured beside it in test_openvino.py
backends = ["onnxruntime"]
precision = "fp32"
threads = 1
memory_budget_mb = 512

[measurement]
warmup = 3
iterations = 20
min_duration_s = 0.05
max_duration_s = 2.0
percentiles = [50, 90, 99]
"""


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "quick-cpu.toml"
    path.write_text(QUICK_PROFILE)
    return str(path)


@pytest.fixture(scope="module")
def built(demo_build, quick_profile, tmp_path_factory):
    """run_build on a copy of the LS-initialised demo build (no fine-tuning, to keep the suite short)."""
    import shutil

    from snexport.pipeline.run import BuildOptions, run_build

    out = tmp_path_factory.mktemp("pipeline") / "build"
    shutil.copytree(demo_build.root, out)
    opts = BuildOptions(out=out, anchors=["demo_s", "demo_m", "demo_l"], target=quick_profile, epochs=0)
    lines: list[str] = []
    result = run_build(opts, say=lines.append, show_progress=False)
    result["lines"] = lines
    return result


def test_build_runs_every_stage_and_writes_a_valid_manifest(built):
    from snexport.device.manifest import read_manifest

    build = built["build"]
    assert built["profiled"] and "(unchanged, skipped)" in built["lines"][0]
    manifest = read_manifest(build.manifest_path)
    ids = {e["stitch_id"] for e in manifest["engines"]}
    candidates = {c["id"] for c in built["candidates"]["candidates"]}
    assert ids == candidates and {"demo_s", "demo_l"} <= ids  # both extremes of the FLOPs front are deployed
    key = built["device_key"]
    for e in manifest["engines"]:
        m = e["measurements"][key]
        assert 0 < m["latency_ms"]["p50"] <= m["latency_ms"]["p90"] <= m["latency_ms"]["p99"] <= m["latency_ms"]["max"]
        assert m["load_ms"]["cold"] > 0 and e["accuracy"]["source"]["dataset"] == "digits:val"
        assert (build.root / e["file"]).is_file()
    assert any(e["measurements"][key]["pareto"] for e in manifest["engines"])
    # ONNX Runtime target: engines come from the device-optimized shared-weight pack, one weights file for all.
    assert {e["weights_file"] for e in manifest["engines"]} == {manifest["engines"][0]["weights_file"]}
    assert manifest["engines"][0]["weights_file"].startswith("engines/pack-ort/")
    assert all(e["weights_used_bytes"] <= e["weights_size_bytes"] for e in manifest["engines"])
    assert manifest["devices"][key]["settings"]["measurement"]["iterations"] == 20


def test_report_plot_and_summary(built):
    from snexport.device.report import write_report

    files = write_report(built["build"], built["manifest"], built["device_key"])
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = files["summary"].read_text()
    assert "demo_l (anchor)" in summary and summary.count("\n") == len(built["manifest"]["engines"]) + 2


def test_selector_follows_the_budget(built):
    from snexport.device.selector import Selector
    from snexport.pipeline.run import selector_demo

    shown = selector_demo(built["build"], say=lambda *_: None)
    assert len(shown) == 3
    tight, _, loose = shown
    assert tight["p90_ms"] <= tight["budget_ms"] and loose["p90_ms"] <= loose["budget_ms"]
    with Selector(built["build"].manifest_path) as sel:
        best = max((e for e in sel.engines if e.latency_ms <= loose["budget_ms"]), key=lambda e: e.top1)
    assert loose["top1"] == best.top1


def test_rebench_replaces_this_device_and_keeps_others(built, quick_profile):
    import copy

    from snexport.device.bench import bench_stage
    from snexport.device.profiles import load_profile
    from snexport.device.manifest import read_manifest, write_manifest

    build = built["build"]
    manifest = read_manifest(build.manifest_path)
    key = built["device_key"]
    other = "jetson-orin-agx-test-unit"
    doc = copy.deepcopy(manifest)
    doc["devices"][other] = dict(doc["devices"][key], profile="jetson-orin-agx")
    for e in doc["engines"]:
        e["measurements"][other] = copy.deepcopy(e["measurements"][key])
    write_manifest(build.manifest_path, doc)
    before = {e["stitch_id"]: e["measurements"][key]["latency_ms"]["mean"] for e in doc["engines"]}
    bench_stage(build, load_profile(quick_profile), show_progress=False, switch_repeats=3)
    after = read_manifest(build.manifest_path)
    assert other in after["devices"] and all(other in e["measurements"] for e in after["engines"])
    assert {e["stitch_id"]: e["measurements"][key]["latency_ms"]["mean"] for e in after["engines"]} != before
    lines = [json.loads(ln) for ln in build.profile_path.read_text().splitlines()]
    assert len(lines) == len(after["engines"])  # this device's old lines were replaced, not appended


def test_missing_engine_is_excluded_and_selector_keeps_working(built, tmp_path):
    import shutil

    from snexport.device.selector import Selector

    copy_root = tmp_path / "b"
    shutil.copytree(built["build"].root, copy_root)
    manifest = json.loads((copy_root / "manifest.json").read_text())
    victim = manifest["engines"][0]
    (copy_root / victim["file"]).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Selector(copy_root / "manifest.json") as sel:
            assert victim["stitch_id"] not in {e.stitch_id for e in sel.engines}
            assert sel.choose(latency_ms=1e9).stitch_id != victim["stitch_id"]
    assert any(victim["stitch_id"] in str(w.message) for w in caught)


def test_target_without_its_runtime_stops_after_export(built, tmp_path):
    import shutil

    from snexport.pipeline.run import BuildOptions, run_build

    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here, so the jetson target would profile")
    except ImportError:
        pass
    root = tmp_path / "b"
    shutil.copytree(built["build"].root, root)
    for stale in ("manifest.json", "profile.jsonl"):
        (root / stale).unlink()
    lines: list[str] = []
    result = run_build(BuildOptions(out=root, anchors=["demo_s", "demo_m", "demo_l"], target="jetson-orin",
                                    epochs=0), say=lines.append, show_progress=False)
    assert not result["profiled"] and "snexport bench" in lines[-1]
    assert all(e["measurements"] == {} for e in result["manifest"]["engines"])  # not yet profiled
    from snexport.device.bench import bench_stage
    from snexport.device.profiles import load_profile

    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        bench_stage(result["build"], load_profile("jetson-orin"), show_progress=False)


def test_export_of_unknown_stitch_lists_valid_ids(built):
    from snexport.export.deploy import export_stage

    with pytest.raises(UnknownStitchError, match="Valid ids"):
        export_stage(built["build"], "demo_s:0>demo_m:99", show_progress=False)


def test_cli_select_by_latency_and_budget(built):
    env = dict(os.environ, COLUMNS="200")
    root = str(built["build"].root)
    proc = subprocess.run([sys.executable, "-m", "snexport.cli.app", "select", root, "--by", "latency", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["by"] == "latency" and doc["candidates"]
    proc = subprocess.run([sys.executable, "-m", "snexport.cli.app", "select", root, "--latency-ms", "0.000001",
                           "--strict"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "budget" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_selector_runs_engines_with_the_measured_thread_count(built):
    from snexport.device.selector import Selector

    with Selector(built["build"].manifest_path, mode="on_demand", cache_size=1) as sel:
        assert sel._measured_runner_options() == {"threads": 1}  # the quick profile measured with 1 thread
        sel.switch(sel.choose(latency_ms=1e9))
        slot = next(iter(sel._slots.values()))
        assert slot.runner.settings["intra_op_num_threads"] == 1


def test_plot_axes_fit_what_is_known(built):
    from snexport.device.report import _points, plot_axes

    rows = _points(built["manifest"], built["device_key"])
    assert plot_axes(rows) == (("latency", "measured latency p50 (ms), bars: its confidence interval"),
                               ("top1", "top-1 accuracy (%)"))
    assert all(r["ci"][0] <= r["latency"] <= r["ci"][1] for r in rows)  # interval drawn around each point
    # No energy sensor here: the energy axis falls back to latency rather than plotting nothing.
    assert all(r["energy"] is None for r in rows) and plot_axes(rows, "energy")[0][0] == "latency"
    with_energy = [dict(r, energy=0.1 * (i + 1)) for i, r in enumerate(rows)]
    assert plot_axes(with_energy, "energy")[0] == ("energy", "measured energy per inference (mJ)")
    unmeasured = _points(built["manifest"], None)
    assert plot_axes(unmeasured)[0][0] == "gflops"
    blind = [dict(r, top1=None) for r in unmeasured]  # architecture-only build: accuracy unknown, not profiled
    assert plot_axes(blind)[1][0] == "params_m" and all(r["params_m"] > 0 for r in blind)
    blind_measured = [dict(r, top1=None) for r in rows]
    assert plot_axes(blind_measured)[1][0] == "memory"


@pytest.fixture
def built_copy(built, tmp_path):
    import shutil

    from snexport.stitching.store import BuildDir

    shutil.copytree(built["build"].root, tmp_path / "b")
    return BuildDir(tmp_path / "b")


def test_deployment_follows_the_last_export_only(built_copy, quick_profile):
    from snexport.device.profiles import load_profile
    from snexport.device.deployset import deployable
    from snexport.export.deploy import export_stage

    profile = load_profile(quick_profile)
    before = {a.stitch_id for a in deployable(built_copy, profile)}
    assert len(before) > 2
    export_stage(built_copy, "demo_s,demo_l", pack=False, show_progress=False)
    # exports.json still lists the older files, but only the last export is deployed (the pack's files for these
    # two stitches were made from the same sources, so they may still serve them).
    assert {a.stitch_id for a in deployable(built_copy, profile)} == {"demo_s", "demo_l"}


def test_incomplete_pack_falls_back_to_standalone_files(built_copy, quick_profile):
    import shutil

    from snexport.device.profiles import load_profile
    from snexport.device.pack import PACK_DIR
    from snexport.device.bench import prepare_pack
    from snexport.device.deployset import current_exports, deployable

    profile = load_profile(quick_profile)
    shutil.rmtree(built_copy.root / "engines" / "pack-ort")
    victim = next((built_copy.root / PACK_DIR).glob("*.onnx"))
    victim.unlink()
    assert prepare_pack(built_copy, profile, show_progress=False) == []
    arts = deployable(built_copy, profile)
    exported = {a.stitch_id for a in current_exports(built_copy)}
    assert {a.stitch_id for a in arts} == exported  # nothing silently dropped
    assert all(a.file.startswith("engines/") and "/pack" not in a.file for a in arts)


def test_corrupt_candidates_and_changed_weights(built_copy, quick_profile):
    from snexport.device.bench import bench_stage
    from snexport.device.profiles import load_profile
    from snexport.errors import BuildDirError
    from snexport.export.deploy import resolve_stitches

    built_copy.candidates_path.write_text('{"by":')
    assert resolve_stitches(built_copy, "pareto")  # a corrupt selection is redone, not a traceback
    net = built_copy.load_snnet()
    built_copy.save_snnet(net, trained_epochs=99)  # same values, new file: the weights hash changes
    with pytest.raises(BuildDirError, match="weights changed since the last export"):
        bench_stage(built_copy, load_profile(quick_profile), show_progress=False)
