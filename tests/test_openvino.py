"""OpenVINO behind the backend table: the runner on real ONNX files, `snexport bench` measuring it beside ONNX
Runtime per engine, the manifest recording the backend, and the selector opening each engine with it.

Runs real OpenVINO (the dev group installs it); without it the module is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import pytest

from snexport.errors import BackendUnavailableError, BuildDirError, ProfileError

pytest.importorskip("openvino", reason="OpenVINO is not installed here (pip install 'snexport[openvino]')")

np = pytest.importorskip("numpy")

QUICK_PROFILE = """
description = "x86 CPU, short measurements for the OpenVINO tests"
backend = "onnxruntime"
precision = "fp32"
threads = 1

[measurement]
rounds = 2
warmup = 2
iterations = 10
min_duration_s = 0.02
max_duration_s = 1.0
percentiles = [50, 90, 99]
"""


def _tiny_onnx(path, seed=0):
    """x (1, 64) -> softmax(gelu(x W1 + b) W2): real ops a ViT block uses, small enough to check against numpy."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((64, 96)).astype(np.float32) * 0.1, rng.standard_normal(96).astype(np.float32)
    w2 = rng.standard_normal((96, 10)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    def reference(x):
        z = np.maximum(x @ w1 + b1, 0) @ w2
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    return reference


# -- the runner ------------------------------------------------------------------------------------------------


def test_runner_contract_settings_and_threads(tmp_path):
    from snexport.device.runtime import open_runner
    from snexport.device.runtime.base import Runner
    from snexport.device.runtime.openvino_runner import OpenVinoRunner

    reference = _tiny_onnx(tmp_path / "tiny.onnx")
    runner = open_runner(tmp_path / "tiny.onnx", backend="openvino", threads=1)
    assert isinstance(runner, OpenVinoRunner) and isinstance(runner, Runner)
    assert (runner.input_name, runner.input_shape, runner.input_dtype) == ("x", (1, 64), "float32")
    assert (runner.output_name, runner.output_shape) == ("y", (1, 10))
    s = runner.settings
    assert (s["backend"], s["threads"], s["performance_hint"], s["num_streams"], s["precision_hint"]) == \
        ("openvino", 1, "LATENCY", 1, "f32")
    # What the compiled model reports, not what was asked: the f32 hint is what keeps an fp32 engine fp32 on CPUs
    # whose default is bf16.
    assert s["applied"] == {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                            "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
    assert s["openvino"] and json.dumps(s)  # plain JSON for the manifest

    xs = np.random.default_rng(1).standard_normal((8, 1, 64)).astype(np.float32)
    want = [reference(x) for x in xs]
    assert all(np.allclose(runner.run(x), w, rtol=1e-5, atol=1e-6) for x, w in zip(xs, want))
    assert runner.run(xs[0].astype(np.float64)).dtype == np.float32  # cast to the model's input type

    # Several threads on one runner (the selector runs outside its lock): each gets its own request.
    results: dict = {}

    def work(i):
        results[i] = [runner.run(x) for x in xs]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.allclose(r, w, rtol=1e-5, atol=1e-6) for i in results for r, w in zip(results[i], want))
    runner.close()
    runner.load()  # load after close builds it again
    assert np.allclose(runner.run(xs[0]), want[0], rtol=1e-5, atol=1e-6)
    runner.close()


def test_bad_files_and_settings_are_one_line_errors(tmp_path):
    from snexport.device.runtime import open_runner
    from snexport.device.runtime.openvino_runner import OpenVinoRunner

    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(BuildDirError, match="OpenVINO cannot open .*junk.onnx"):
        open_runner(tmp_path / "junk.onnx", backend="openvino")
    with pytest.raises(BuildDirError, match="no ONNX file"):
        open_runner(tmp_path / "missing.onnx", backend="openvino")
    with pytest.raises(ProfileError, match="precision_hint"):
        OpenVinoRunner(tmp_path / "junk.onnx", precision_hint="int4")
    with pytest.raises(ProfileError, match="performance_hint"):
        OpenVinoRunner(tmp_path / "junk.onnx", performance_hint="FAST")


def test_table_entry_drives_aliases_files_and_options():
    from snexport.device.profiles import load_profile
    from snexport.device.runtime.backends import BACKENDS, cpu_backends, resolve_backend

    assert resolve_backend("ov") == resolve_backend("OpenVINO") == "openvino"
    assert resolve_backend("ort") == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tflite'"):
        resolve_backend("tflite")
    assert cpu_backends() == ["onnxruntime", "openvino"]
    spec = BACKENDS["openvino"]
    assert spec.packs == ("engines/pack",) and spec.precisions == ("fp32",) and not spec.validated_where_made
    x86 = load_profile("x86-cpu")
    assert x86.runner_options("openvino") == {} and x86.runner_options() == {"providers": ["cpu"]}


def test_profile_backends_key(tmp_path):
    from snexport.device.profiles import load_profile

    path = tmp_path / "p.toml"
    both = 'precision = "fp32"\nbackends = ["onnxruntime", "openvino"]'
    path.write_text(QUICK_PROFILE.replace('precision = "fp32"', both))
    assert load_profile(path).backends == ("onnxruntime", "openvino")
    assert load_profile(path).runner_options("openvino") == {"threads": 1}
    path.write_text(QUICK_PROFILE.replace('precision = "fp32"', 'precision = "fp32"\nbackends = ["tensorrt"]'))
    with pytest.raises(ProfileError, match="cannot stand in for 'onnxruntime'"):
        load_profile(path)
    path.write_text(QUICK_PROFILE.replace('precision = "fp32"', 'precision = "fp32"\nbackends = ["ov"]'))
    with pytest.raises(ProfileError, match="backends\\[0\\]"):
        load_profile(path)


def test_best_backend_is_fastest_beyond_noise_then_smallest():
    from snexport.device.pareto import best_backend

    def m(p50, lo, hi, mb):
        return {"latency_p50_ms": p50, "latency_ci_ms": (lo, hi), "memory_mb": mb}

    order = ["onnxruntime", "openvino"]
    # Faster beyond the noise wins, though it costs more memory (the engine is then costed with its own memory).
    assert best_backend({"onnxruntime": m(94, 93, 95, 90), "openvino": m(86, 85, 87, 180)}, order) == "openvino"
    # Overlapping intervals: the measurement cannot order them, so the smaller in memory wins ...
    assert best_backend({"onnxruntime": m(94, 90, 98, 90), "openvino": m(92, 88, 97, 180)}, order) == "onnxruntime"
    # ... and with equal memory, the profile's own backend (first in the preference).
    assert best_backend({"onnxruntime": m(94, 90, 98, 0), "openvino": m(92, 88, 97, 0)}, order) == "onnxruntime"
    assert best_backend({"onnxruntime": m(94, 90, 98, 0), "openvino": m(92, 88, 97, 0)}, order[::-1]) == "openvino"
    with pytest.raises(ValueError):
        best_backend({}, order)


# -- a real exported demo build ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(demo_build, tmp_path_factory):
    """Three demo engines (two anchors and a stitch) exported with the portable pack, as `snexport export` does."""
    from snexport.buildfiles import BuildFiles
    from snexport.device.profiles import load_profile
    from snexport.export.deploy import export_stage
    from snexport.stitching.store import BuildDir

    root = tmp_path_factory.mktemp("ov") / "build"
    shutil.copytree(demo_build.root, root)
    profile_path = root.parent / "quick-cpu.toml"
    profile_path.write_text(QUICK_PROFILE)
    build = BuildDir(root)
    stitch = next(s.id for s in build.load_plan().stitches if not s.is_anchor)
    export_stage(build, f"demo_s,{stitch},demo_l", pack=True, profile=load_profile(profile_path), show_progress=False)
    return {"root": root, "profile": str(profile_path), "files": BuildFiles(root)}


def _copy(exported, tmp_path):
    from snexport.buildfiles import BuildFiles

    shutil.copytree(exported["root"], tmp_path / "b")
    return BuildFiles(tmp_path / "b")


def test_openvino_runs_the_portable_pack_like_the_standalone_file(exported):
    from snexport.device import deployset
    from snexport.device.runtime import open_runner
    from snexport.device.tensorrt_build import read_reference
    from snexport.device.validate import run_runner, validate_runner

    build = exported["files"]
    standalone = {a.stitch_id: a for a in deployset.onnx_for(build, "fp32")}
    packed = deployset.complete_pack(build, "engines/pack", list(standalone.values()))
    assert packed and all(a.weights_file for a in packed)  # external data in the one shared weights file
    for a in packed:
        inputs, logits = read_reference(build, a)
        ov = open_runner(build.root / a.file, backend="openvino", threads=1)
        figures, failures = validate_runner(ov, logits, inputs)
        assert failures == [] and figures["cosine"] > 0.99999 and figures["provider"] == "openvino"
        ort = open_runner(build.root / standalone[a.stitch_id].file, threads=1)
        assert np.allclose(run_runner(ov, inputs), run_runner(ort, inputs), rtol=1e-4, atol=1e-4)
        # The gate is real: logits of another stitch do not pass it.
        other = next(b for b in packed if b.stitch_id != a.stitch_id)
        assert validate_runner(ov, read_reference(build, other)[1], inputs)[1]
        ov.close()
        ort.close()


def _cli(*args):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "snexport.cli.app", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_bench_measures_each_engine_on_both_and_the_selector_opens_the_chosen(exported, tmp_path):
    from snexport.buildfiles import read_jsonl
    from snexport.device.manifest import read_manifest
    from snexport.device.rounds import RUNTIME_TOLERANCE, pick_within
    from snexport.device.runtime.backends import BACKENDS
    from snexport.device.selector import Selector, SelectorWarning

    build = _copy(exported, tmp_path)
    done = _cli("bench", str(build.root), "--target", exported["profile"], "--backends", "ort,ov", "--quick", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["backends"] == ["onnxruntime", "openvino"]
    manifest = read_manifest(build.manifest_path)
    key = out["device_key"]
    assert manifest["devices"][key]["settings"]["backends"] == ["onnxruntime", "openvino"]
    for e in manifest["engines"]:
        m = e["measurements"][key]
        by = m["by_backend"]
        assert set(by) == {"onnxruntime", "openvino"} and m["backend"] == out["chosen"][e["stitch_id"]]
        # The choice follows the rule on the very figures the manifest shows: the paired screening's medians, the
        # profile's own runtime unless the other is more than 10 % faster.
        assert m["backend"] == pick_within({b: f["screen_ms"] for b, f in by.items()}, ["onnxruntime", "openvino"],
                                           RUNTIME_TOLERANCE)
        assert m["latency_ms"]["p50"] == pytest.approx(by[m["backend"]]["latency_p50_ms"], rel=1e-6)
        # The chosen runtime was timed in the rounds, the other keeps its screening figures.
        assert by[m["backend"]]["latency_source"] == "interleaved rounds"
        assert all(f["latency_source"].startswith("screening") for b, f in by.items() if b != m["backend"])
        # The entry names the file that runtime runs: ORT its optimized pack, OpenVINO the portable one.
        assert e["file"] == by[m["backend"]]["file"]
        assert e["file"].startswith("engines/pack-ort/" if m["backend"] == "onnxruntime" else "engines/pack/")
        assert m["runner"]["backend"] == m["backend"] and m["runner"].get("threads", 1) == 1
        assert by["openvino"]["cosine_vs_reference"] > 0.99999
    lines = [r for r in read_jsonl(build.profile_path) if r["device_key"] == key]
    assert len(lines) == 2 * len(manifest["engines"])  # one per (engine, backend)
    assert sorted(r["engine_id"] for r in lines if r["chosen"]) == sorted(e["stitch_id"] for e in manifest["engines"])
    assert all("validation" in r for r in lines if r["backend"] == "openvino")

    with Selector(build.manifest_path, mode="preload") as sel:
        x = np.zeros(sel.engines[0].input_shape, np.float32)
        for info in sel.engines:
            assert info.backend == manifest_backend(manifest, key, info.id)
            sel.switch(info.id)
            assert sel._slots[info.id].runner.backend == info.backend  # opened with the measured runtime
            assert np.isfinite(sel.run(x)).all()


    # The same manifest on a machine where one of the runtimes is missing: each engine measured fastest on it runs
    # on the other measured runtime, from that runtime's own (verified) file and with its own numbers.
    for missing, other in (("onnxruntime", "openvino"), ("openvino", "onnxruntime")):
        with pytest.MonkeyPatch.context() as mp:
            _hide_package(mp, missing)
            moved = [e for e in manifest["engines"] if e["measurements"][key]["backend"] == missing]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sel = Selector(build.manifest_path, mode="preload")
            said = [str(w.message) for w in caught if issubclass(w.category, SelectorWarning)]
            with sel:
                if moved:
                    assert any("is not installed" in m and f"run on {BACKENDS[other].label}" in m for m in said), said
                    # The recorded front was taken on the other runtime's numbers: every engine is a candidate.
                    assert sorted(i.id for i in sel.engines) == sorted(e["stitch_id"] for e in manifest["engines"])
                else:
                    assert not said
                for e in moved:
                    info, figures = sel.info(e["stitch_id"]), e["measurements"][key]["by_backend"][other]
                    assert info.backend == other and info.file == build.root / figures["file"]
                    assert info.latency_ms == figures["latency_ms"]["p90"] and info.memory_mb == figures["memory_mb"]
                    sel.switch(info.id)
                    assert sel._slots[info.id].runner.backend == other
                    assert np.isfinite(sel.run(np.zeros(info.input_shape, np.float32))).all()


def _hide_package(mp, name):
    """This machine as one without ``name`` installed: what ``runtime_available`` looks for is not found."""
    import importlib.util

    real = importlib.util.find_spec
    mp.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n.split(".")[0] == name else real(n, *a, **k))


def manifest_backend(manifest, key, stitch_id):
    return next(e["measurements"][key]["backend"] for e in manifest["engines"] if e["stitch_id"] == stitch_id)


@pytest.mark.slow
def test_openvino_alone_and_its_memory_cost(exported, tmp_path):
    from snexport.device.bench import bench_stage
    from snexport.device.profiles import load_profile
    from snexport.device.runtime import open_runner
    from snexport.device.runtime.openvino_runner import OpenVinoRunner
    from snexport.device.selector import Selector

    build = _copy(exported, tmp_path)
    result = bench_stage(build, load_profile(exported["profile"]), show_progress=False, switch_repeats=2, quick=True,
                         backends=["openvino"])
    assert set(result["chosen"].values()) == {"openvino"}
    manifest = result["manifest"]
    assert all(e["file"].startswith("engines/pack/") and "by_backend" not in e["measurements"][result["device_key"]]
               for e in manifest["engines"])
    every = [e["stitch_id"] for e in manifest["engines"]]
    with Selector(build.manifest_path, mode="preload", candidates=every) as sel:
        ids = [e.id for e in sel.engines]
        assert sorted(ids) == sorted(every) and all(isinstance(sel._slots[i].runner, OpenVinoRunner) for i in ids)
        assert sel._slots[ids[0]].runner.threads == 1  # the measured thread count travels to the selector
        pack = manifest["engines"][0]["weights_file"]
        assert sel.shared_weights() == {pack: every}  # OpenVINO maps the one weights file (page cache shared)
        # The preload cost counts the shared file once: below the sum of the engines' own costs.
        assert 0 < sel.memory_cost_mb(ids) < sum(sel.info(i).memory_mb for i in ids)
        x = np.random.default_rng(0).standard_normal(sel.engines[0].input_shape).astype(np.float32)
        for info in sel.engines:
            sel.switch(info.id)
            with open_runner(build.root / info.file, backend="onnxruntime", threads=1) as ort:
                assert np.allclose(sel.run(x), ort.run(x), rtol=1e-4, atol=1e-4)
    # Measured on OpenVINO alone, on a machine without it: nothing else was measured, so nothing is run on figures
    # that belong to another runtime; one line says what to do.
    with pytest.MonkeyPatch.context() as mp:
        _hide_package(mp, "openvino")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(BackendUnavailableError, match=r"can run here: OpenVINO is not installed "
                               r".*snexport\[openvino\].*snexport bench"):
                Selector(build.manifest_path, mode="preload")
        assert any("had no other runtime measured and are left out" in str(w.message) for w in caught)


@pytest.mark.slow
def test_openvino_refused_where_it_cannot_be_checked(exported, tmp_path):
    from snexport.device.bench import bench_stage
    from snexport.device.deployset import onnx_for
    from snexport.device.profiles import load_profile

    build = _copy(exported, tmp_path)
    victim = onnx_for(build, "fp32")[0]
    logits = build.root / victim.reference["logits"]
    logits.write_bytes(logits.read_bytes()[:-4] + b"\0\0\0\0")  # the shipped reference no longer matches its hash
    profile = load_profile(exported["profile"])
    with pytest.raises(BackendUnavailableError, match=f"no measured backend runs {victim.stitch_id} correctly"):
        bench_stage(build, profile, show_progress=False, quick=True, switch_repeats=2, backends=["openvino"])
    result = bench_stage(build, profile, show_progress=False, quick=True, switch_repeats=2,
                         backends=["onnxruntime", "openvino"])
    assert result["chosen"][victim.stitch_id] == "onnxruntime"
    refused = result["measurements"][victim.stitch_id]["by_backend"]["openvino"]["refused"]
    assert "OpenVINO" in refused and "altered" in refused
