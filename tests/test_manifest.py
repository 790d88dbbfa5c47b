"""manifest.py: schema, atomic read/write, error messages, merging measurements, device keys."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import jsonschema
import pytest

from snexport.device import manifest as mf
from snexport.errors import ManifestError

SHA_A, SHA_B, SHA_W = "a" * 64, "b" * 64, "c" * 64


def measurement(p90: float, mem: float, pareto: bool = True) -> dict:
    return {
        "latency_ms": {"mean": p90 * 0.8, "std": 0.1, "min": p90 * 0.6, "p50": p90 * 0.8, "p90": p90,
                       "p99": p90 * 1.2, "max": p90 * 1.5, "iterations": 50},
        "throughput_ips": 1000.0 / p90,
        "memory": {"rss_load_delta_mb": mem, "rss_peak_mb": 300.0, "file_mb": 1.5, "device_delta_mb": None},
        "load_ms": {"cold": 12.0, "switch_p50": 0.2, "switch_p99": None},
        "pareto": pareto,
    }


def engine(stitch_id: str, sha: str, route: dict, measurements: dict, **extra) -> dict:
    entry = {
        "stitch_id": stitch_id,
        "route": route,
        "file": f"engines/{stitch_id.replace(':', '_').replace('>', '-')}.onnx",
        "format": "onnx",
        "precision": "fp32",
        "sha256": sha,
        "size_bytes": 1234,
        "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": [1, 10]},
        "accuracy": {"top1": 81.5, "source": {"dataset": "digits:val", "samples": 359}},
        "gflops": 0.02,
        "params": 10_000,
        "weights_file": None,
        "weights_sha256": None,
        "measurements": measurements,
    }
    entry.update(extra)
    return entry


def sample_manifest() -> dict:
    """Two engines (an anchor and a stitch sharing a weights pack), two devices, one engine unprofiled on one."""
    anchor_route = {"front": "s", "back": "s", "cut": None, "resume": None, "layer": None, "blocks": 2}
    stitch_route = {"front": "s", "back": "b", "cut": 0, "resume": 2, "layer": 0, "blocks": 3}
    return {
        "schema_version": 1,
        "build": {
            "anchors": [
                {"name": "s", "timm_name": "vit_tiny_patch16_224", "depth": 2, "width": 16, "gflops": 0.01,
                 "params": 5000},
                {"name": "b", "timm_name": "vit_tiny_patch16_224", "depth": 3, "width": 32, "gflops": 0.03,
                 "params": 20000},
            ],
            "plan": {"window": 2, "stride": 1, "nearest": True, "two_way": False, "hash": "deadbeef"},
            "snexport_version": "0.1.0",
            "created_at": "2026-11-24T05:00:00+00:00",
        },
        "devices": {
            "x86-cpu-xeon-11111111": {"profile": "x86-cpu", "fingerprint": {"cpu": {"model": "Xeon"}},
                                      "settings": {"threads": 2}, "measured_at": "2026-11-24T05:10:00+00:00"},
            "orin-nano-22222222": {"profile": "jetson-orin-nano", "fingerprint": {"board": "Orin Nano"},
                                   "settings": {"power_mode": "15W"}, "measured_at": "2026-11-23T05:10:00+00:00"},
        },
        "engines": [
            engine("s", SHA_A, anchor_route, {"x86-cpu-xeon-11111111": measurement(1.0, 5.0),
                                               "orin-nano-22222222": measurement(0.5, 4.0)}),
            engine("s:0>b:2", SHA_B, stitch_route, {"x86-cpu-xeon-11111111": measurement(2.0, 9.0)},
                   weights_file="engines/pack.bin", weights_sha256=SHA_W, weights_size_bytes=4096,
                   weights_used_bytes=2048, accuracy={"top1": None, "source": "unknown"},
                   versions={"opset": 17}),
        ],
    }


# -- reading and writing ---------------------------------------------------------------------------------------


def test_round_trip_is_exact_and_leaves_no_temp_files(tmp_path):
    data = sample_manifest()
    path = mf.write_manifest(tmp_path, data)
    assert path == tmp_path / "manifest.json"
    assert mf.read_manifest(path) == data
    assert mf.read_manifest(tmp_path) == data  # a build directory means its manifest.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_write_refuses_invalid_data_and_keeps_the_old_file(tmp_path):
    good = sample_manifest()
    mf.write_manifest(tmp_path / "manifest.json", good)
    bad = sample_manifest()
    bad["engines"][0]["precision"] = "int4"
    with pytest.raises(ManifestError, match=r"engines\[0\]\.precision: expected one of \"fp32\", \"fp16\""):
        mf.write_manifest(tmp_path / "manifest.json", bad)
    assert mf.read_manifest(tmp_path / "manifest.json") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("cut", [0, 1, 100, -2])
def test_truncated_manifest_says_corrupt_and_what_to_run(tmp_path, cut):
    path = mf.write_manifest(tmp_path, sample_manifest())
    raw = path.read_bytes()
    path.write_bytes(raw[: max(0, cut if cut >= 0 else len(raw) + cut)])
    with pytest.raises(ManifestError, match=r"truncated or corrupt.*snexport build"):
        mf.read_manifest(path)


def test_nan_is_not_json(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(sample_manifest()).replace('"gflops": 0.02', '"gflops": NaN', 1))
    with pytest.raises(ManifestError, match="truncated or corrupt"):
        mf.read_manifest(path)


def test_missing_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(ManifestError, match="no manifest at .*snexport build"):
        mf.read_manifest(tmp_path / "manifest.json")


# -- hostile manifests (issue 8): limits checked where the file enters ------------------------------------------


def _write_text(tmp_path, text: str):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    return path


def test_deep_nesting_is_refused_before_json_loads_recurses(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000  # json.loads raised RecursionError on this
    path = _write_text(tmp_path, json.dumps(sample_manifest()).replace('"fingerprint": {', f'"x": {deep}, '
                                                                        '"fingerprint": {', 1))
    with pytest.raises(ManifestError, match="nested deeper"):
        mf.read_manifest(path)


@pytest.mark.parametrize("field", ['"rss_load_delta_mb": 5.0', '"gflops": 0.02', '"weights_used_bytes": 2048',
                                   '"p90": 1.0'])
def test_numbers_that_overflow_a_float_are_refused(tmp_path, field):
    # Integers >= 10**309 passed the schema and raised OverflowError in engine_memory_mb, memory_cost_mb,
    # the latency percentile and float(gflops).
    key = field.split(":")[0]
    path = _write_text(tmp_path, json.dumps(sample_manifest()).replace(field, f"{key}: 1{'0' * 309}", 1))
    with pytest.raises(ManifestError, match="out of range"):
        mf.read_manifest(path)


def test_oversized_manifest_is_refused_without_parsing(tmp_path):
    path = _write_text(tmp_path, " " * (mf.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ManifestError, match="limit"):
        mf.read_manifest(path)


@pytest.mark.parametrize("name, problem", [
    ("engines/" + "x" * 300 + ".onnx", "longer than a file system allows"),  # ENAMETOOLONG in the selector
    ("engines/" + "d/" * 2100 + "e.onnx", "longer than a file system allows"),
    (r"engines/a\u0000.onnx", "control characters"),  # a NUL made os.stat raise ValueError
    (r"engines/a\nb.onnx", "control characters"),
])
def test_file_names_the_file_system_cannot_take_are_refused(tmp_path, name, problem):
    data = sample_manifest()
    data["engines"][0]["file"] = "PLACEHOLDER"
    path = _write_text(tmp_path, json.dumps(data).replace("PLACEHOLDER", name))
    with pytest.raises(ManifestError, match=problem):
        mf.read_manifest(path)


@pytest.mark.parametrize("threads", ["four", [], 0, -2, True, 2.5])
def test_device_thread_counts_must_be_whole_numbers(threads):
    data = sample_manifest()
    data["devices"]["x86-cpu-xeon-11111111"]["settings"]["threads"] = threads
    with pytest.raises(ManifestError, match="settings.threads"):
        mf.validate_manifest(data)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d["engines"][1].__setitem__("sha256", 123), r"engines\[1\]\.sha256: expected string, got integer"),
        (lambda d: d["engines"][0]["route"].pop("blocks"), r"engines\[0\]\.route\.blocks: required field is missing"),
        (lambda d: d["engines"][0]["route"].__setitem__("cut", "3"),
         r"engines\[0\]\.route\.cut: expected integer or null"),
        (lambda d: d["engines"][0]["measurements"]["x86-cpu-xeon-11111111"]["latency_ms"].__setitem__("p9O", 1),
         r"engines\[0\]\.measurements\.x86-cpu-xeon-11111111\.latency_ms\.p9O: unknown field"),
        (lambda d: d["engines"][0]["accuracy"].__setitem__("source", {"dataset": "x"}),
         r"engines\[0\]\.accuracy\.source\.samples: required field is missing"),
        (lambda d: d["engines"][0]["accuracy"].__setitem__("source", 7),
         r"engines\[0\]\.accuracy\.source: expected object or \"unknown\", got integer 7"),
        (lambda d: d["engines"][1].__setitem__("weights_file", 5),
         r"engines\[1\]\.weights_file: expected string or null, got integer"),
        (lambda d: d["engines"][0].__setitem__("sha256", "ABC"), r"engines\[0\]\.sha256: does not match"),
        (lambda d: d["engines"][0]["accuracy"].__setitem__("top1", 120),
         r"engines\[0\]\.accuracy\.top1: must be <= 100"),
        (lambda d: d["engines"][0]["input"].pop("dtype"), r"engines\[0\]\.input\.dtype: required field is missing"),
        (lambda d: d["devices"].__setitem__("my box", {"profile": "x"}),
         r'devices\["my box"\]\.fingerprint: required field is missing'),
        (lambda d: d.__setitem__("schema_version", True), r"schema_version: expected integer, got boolean"),
    ],
)
def test_hand_edited_field_is_named_by_its_json_path(tmp_path, edit, expected):
    data = sample_manifest()
    edit(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=expected) as info:
        mf.read_manifest(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d["engines"].append(copy.deepcopy(d["engines"][0])),
         r"engines\[2\]\.stitch_id: duplicates engines\[0\]"),
        (lambda d: d["engines"][0].__setitem__("file", "../../etc/passwd"), r"engines\[0\]\.file: must be relative"),
        (lambda d: d["engines"][0].__setitem__("file", "/abs/x.onnx"), r"engines\[0\]\.file: must be relative"),
        (lambda d: d["engines"][1].__setitem__("weights_sha256", None), r"engines\[1\]\.weights_sha256: must be set"),
        (lambda d: d["devices"].pop("orin-nano-22222222"),
         r"engines\[0\]\.measurements\.orin-nano-22222222: device key is not listed"),
    ],
)
def test_consistency_rules_beyond_the_schema(edit, expected):
    data = sample_manifest()
    edit(data)
    with pytest.raises(ManifestError, match=expected):
        mf.validate_manifest(data)


def test_newer_schema_version_asks_for_an_upgrade():
    data = sample_manifest()
    data["schema_version"] = mf.SCHEMA_VERSION + 1
    data["engines"][0]["brand_new_layout"] = {}  # whatever v2 holds, the message is about the version
    with pytest.raises(ManifestError, match="schema_version 2 .*upgrade snexport"):
        mf.validate_manifest(data)


def test_open_objects_accept_fields_from_later_writers():
    data = sample_manifest()
    data["engines"][0]["pack_id"] = "p0"
    data["devices"]["orin-nano-22222222"]["tensorrt"] = "10.3"
    mf.validate_manifest(data)


# -- merging measurements --------------------------------------------------------------------------------------


def test_merge_replaces_one_device_and_keeps_the_others():
    data = sample_manifest()
    before = copy.deepcopy(data)
    key = "x86-cpu-xeon-11111111"
    info = {"profile": "x86-cpu", "fingerprint": {"cpu": {"model": "Xeon"}}, "settings": {"threads": 1}}
    merged = mf.merge_measurements(data, key, info, {"s:0>b:2": measurement(3.0, 7.0, pareto=False)}, ["s:0>b:2"])

    assert data == before  # input untouched
    s, stitch = merged["engines"]
    # "s" was measured on this device before but not now: not profiled there any more; the Orin numbers stay.
    assert key not in s["measurements"]
    assert s["measurements"]["orin-nano-22222222"] == before["engines"][0]["measurements"]["orin-nano-22222222"]
    assert stitch["measurements"][key]["latency_ms"]["p90"] == 3.0
    assert stitch["measurements"][key]["pareto"] is True  # from pareto_ids, not from the record
    assert merged["devices"][key]["settings"] == {"threads": 1}
    assert merged["devices"][key]["measured_at"]  # filled in
    assert merged["devices"]["orin-nano-22222222"] == before["devices"]["orin-nano-22222222"]
    mf.validate_manifest(merged)


def test_merge_adds_a_new_device():
    data = sample_manifest()
    info = {"profile": "jetson-orin-agx", "fingerprint": {"board": "AGX"}, "settings": {},
            "measured_at": "2026-11-25T00:00:00+00:00"}
    merged = mf.merge_measurements(data, "agx-1", info, {"s": measurement(0.3, 3.0)}, [])
    assert set(merged["devices"]) == {"x86-cpu-xeon-11111111", "orin-nano-22222222", "agx-1"}
    assert set(merged["engines"][0]["measurements"]) == {"x86-cpu-xeon-11111111", "orin-nano-22222222", "agx-1"}
    assert merged["engines"][0]["measurements"]["agx-1"]["pareto"] is False
    assert mf.latest_device(merged) == "agx-1"


def test_merge_refuses_unknown_stitches_and_bad_records():
    data, info = sample_manifest(), {"profile": "p", "fingerprint": {}, "settings": {}}
    with pytest.raises(ManifestError, match="not in the manifest: nope"):
        mf.merge_measurements(data, "k", info, {"nope": measurement(1, 1)}, [])
    with pytest.raises(ManifestError, match="pareto ids without a measurement: s"):
        mf.merge_measurements(data, "k", info, {}, ["s"])
    broken = measurement(1, 1)
    del broken["memory"]
    with pytest.raises(ManifestError, match=r"engines\[0\]\.measurements\.k\.memory: required field is missing"):
        mf.merge_measurements(data, "k", info, {"s": broken}, [])


# -- device keys -----------------------------------------------------------------------------------------------


def test_device_key_is_stable_across_volatile_state_and_changes_with_identity():
    from snexport.device.profiling import device_fingerprint

    fp = device_fingerprint()
    key = mf.device_key(fp, "x86-cpu")
    assert key.startswith("x86-cpu-") and len(key) <= 24 + 32 + 10 and key == key.lower()
    warmer = copy.deepcopy(fp)
    warmer["hostname"] = "another-unit"
    warmer["thermal_c"] = {"cpu-thermal": 71.0}
    warmer["cpu"]["cur_freq_khz"] = 1234
    warmer["versions"]["numpy"] = "9.9"
    assert mf.device_key(warmer, "x86-cpu") == key
    other_runtime = copy.deepcopy(fp)
    other_runtime["versions"]["onnxruntime"] = "0.1"
    other_cpu = copy.deepcopy(fp)
    other_cpu["cpu"]["usable_cores"] = 99
    keys = {key, mf.device_key(other_runtime, "x86-cpu"), mf.device_key(other_cpu, "x86-cpu"),
            mf.device_key(fp, "jetson-orin-nano")}
    assert len(keys) == 4


def test_device_key_reads_the_model_from_flat_or_nested_fingerprints():
    assert mf.device_key({"profile": "orin", "gpu": {"name": "Orin (nvgpu)"}}).startswith("orin-orin-nvgpu-")
    assert mf.device_key({"cpu": "Cortex-A78AE"}).startswith("device-cortex-a78ae-")


# -- the validator -------------------------------------------------------------------------------------------


def _mutations(node, path=()):
    """Every single-point corruption of a document: retyped values, dropped keys, extra keys, out-of-range."""
    wrong = {str: [123, ""], bool: ["yes", 1], int: ["7", -1, 1.5, True], float: ["7", -1.0, False],
             type(None): [{}, "null"], dict: [[], "x"], list: [{}, "x"]}
    for replacement in wrong[type(node)]:
        yield path, ("set", replacement)
    if isinstance(node, dict):
        yield path, ("add", "zz_extra")
        for key, child in node.items():
            yield path, ("drop", key)
            yield from _mutations(child, path + (key,))
    if isinstance(node, list):
        yield path, ("append", copy.deepcopy(node[0]) if node else 1)
        if node:
            yield path, ("clear", None)
        for i, child in enumerate(node):
            yield from _mutations(child, path + (i,))


def _apply(doc, path, op):
    doc = copy.deepcopy(doc)
    if not path and op[0] == "set":
        return op[1]
    parent = doc
    for step in path[:-1] if op[0] == "set" else path:
        parent = parent[step]
    kind, arg = op
    if kind == "set":
        parent[path[-1]] = arg
    elif kind == "add":
        parent[arg] = 1
    elif kind == "drop":
        del parent[arg]
    elif kind == "append":
        parent.append(arg)
    elif kind == "clear":
        parent.clear()
    return doc


def _jsonschema_paths(errors):
    out = set()
    for err in errors:
        path = ""
        for step in err.absolute_path:
            path = mf._join(path, step)
        out.add(path or "(root)")
        out |= _jsonschema_paths(err.context)
    return out


def test_validator_agrees_with_jsonschema_on_every_single_point_corruption():
    schema = mf.load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    reference = jsonschema.Draft202012Validator(schema)
    ours = mf.SchemaValidator(schema)
    valid = sample_manifest()
    assert not ours.issues(valid) and reference.is_valid(valid)
    checked = rejected = 0
    for path, op in _mutations(valid):
        doc = _apply(valid, path, op)
        issues = ours.issues(doc)
        reference_errors = list(reference.iter_errors(doc))
        assert bool(issues) == bool(reference_errors), (path, op, issues, [e.message for e in reference_errors])
        if issues:
            # Every field we name is one jsonschema names, or lies inside one (we descend into anyOf branches).
            theirs = _jsonschema_paths(reference_errors)
            for issue in issues:
                assert any(issue.path == p or p == "(root)" or issue.path.startswith(p + ".")
                           or issue.path.startswith(p + "[") for p in theirs), (issue, theirs)
            rejected += 1
        checked += 1
    assert checked > 300 and rejected > 200  # the walk really covered the document


def test_validator_refuses_keywords_it_does_not_implement():
    with pytest.raises(ValueError, match="patternProperties"):
        mf.SchemaValidator({"type": "object", "patternProperties": {"^x": {"type": "string"}}})
    with pytest.raises(ValueError, match="uniqueItems"):
        mf.SchemaValidator({"$defs": {"a": {"type": "array", "uniqueItems": True}}})


def test_json_equality_rules_match_jsonschema():
    schema = {"enum": [1, "unknown", [0, 1]]}
    reference = jsonschema.Draft202012Validator(schema)
    for value in [1, 1.0, True, "unknown", [0, 1], [False, True], [0.0, 1.0], 2]:
        assert (not mf.SchemaValidator(schema).issues(value)) == reference.is_valid(value), value


# -- packaging and imports -------------------------------------------------------------------------------------


def test_schema_ships_inside_the_package():
    from importlib import resources

    assert resources.files("snexport.device").joinpath("manifest.schema.json").is_file()
    assert mf.load_schema()["$schema"].endswith("2020-12/schema")


def test_manifest_and_selector_import_only_the_standard_library():
    code = (
        "import sys, snexport.device.manifest, snexport.device.selector\n"
        "heavy = {'torch', 'numpy', 'onnxruntime', 'jsonschema', 'timm', 'onnx', 'tensorrt'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.strip() == "[]"
