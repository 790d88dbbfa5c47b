"""Fuzz what a build directory or bundle brings from another machine: the manifest, device profiles, the JSON files.

Everything in a build directory is untrusted input (it travels host -> device, colleague -> colleague). Each case
mutates one of three things, seeded, and runs what reads it:

  manifest    manifest.json  -> Selector(path) (preload or on_demand, maybe with candidates), choose() under a
                                hostile or sane budget, memory_cost_mb(), switch(); real tiny ONNX engines, real
                                ONNX Runtime. Some cases also replace an engine file by a link out of the directory
                                or by garbage whose sha256 the manifest then claims.
  profile     a device profile TOML (from profiles/x86-cpu.toml) -> load_profile(), runner_options()
  buildfiles  plan.json, eval.jsonl, profile.jsonl, candidates.json, exports.json, deploy.json, engines.json,
              pack.json -> the readers of select, export, bench and the deploy set (no export, no training)

Every outcome must be a success or a SnexportError subclass (the project's one-line errors); anything else is an
"untyped" failure (a traceback, i.e. a bug), and a case still running after --timeout seconds is a hang. Cases run
in a worker process that is killed and replaced when a case hangs.

    .venv/bin/python benchmarks/fuzz_manifest.py --cases 10000 --seed 0

prints the outcome counts (untyped exceptions by signature, hangs, typed errors by class, successes per target) with
the seed and the machine, and writes them to benchmarks/results/fuzz_manifest.json. tests/test_fuzz.py runs a few hundred cases of the same
harness in the suite.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("manifest", "profile", "buildfiles")
DEVICE = "x86-cpu-test-0000"
ENGINES = {"demo_s": 1, "demo_m": 2, "demo_l": 3}  # anchor stitch ids -> weight seed of their tiny engine

# ---------------------------------------------------------------------------------------------------------------
# The base build directory every case starts from


def tiny_engine(path: Path, seed: int) -> None:
    """A real ONNX model (Flatten -> MatMul -> Add: [1,1,8,8] -> [1,10]) that ONNX Runtime loads in milliseconds."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((10,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _sha(path: Path) -> str:
    from snexport.hashing import sha256_file

    return sha256_file(path)


def make_base(root: Path, plan_doc: dict) -> None:
    """Write the base build directory (engines + every JSON file the readers take) into ``root``."""
    from snexport import buildfiles as files

    (root / files.ENGINES_DIR).mkdir(parents=True, exist_ok=True)
    stitches = {s["id"]: s for s in plan_doc["stitches"]}
    arts, entries, evals, profile_rows = [], [], [], []
    for i, (sid, seed) in enumerate(ENGINES.items()):
        rel = f"{files.ENGINES_DIR}/{sid}.onnx"
        tiny_engine(root / rel, seed)
        sha, size = _sha(root / rel), (root / rel).stat().st_size
        arts.append({"stitch_id": sid, "file": rel, "format": "onnx", "precision": "fp32", "size_bytes": size,
                     "sha256": sha, "input_name": "input", "input_shape": [1, 1, 8, 8], "input_dtype": "float32",
                     "output_name": "logits", "output_shape": [1, 10], "opset": 17, "versions": {"settings_hash": "x"},
                     "validation": {"max_abs": 0.0}})
        lat = 1.0 + 2.0 * i
        entries.append({
            "stitch_id": sid,
            "route": {"front": sid, "back": sid, "cut": None, "resume": None, "layer": None, "blocks": 2 + i},
            "file": rel, "format": "onnx", "precision": "fp32", "sha256": sha, "size_bytes": size,
            "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"},
            "output": {"name": "logits", "shape": [1, 10]},
            "accuracy": {"top1": 70.0 + 5 * i, "source": {"dataset": "digits:val", "samples": 359}},
            "gflops": stitches[sid]["gflops"], "params": stitches[sid]["params"],
            "weights_file": None, "weights_sha256": None, "weights_size_bytes": None, "weights_used_bytes": None,
            "versions": {"onnx": "1"},
            "measurements": {DEVICE: {
                "latency_ms": {"mean": lat, "std": 0.1, "min": lat * 0.9, "p50": lat, "p90": lat * 1.1,
                               "p99": lat * 1.2, "max": lat * 1.5, "iterations": 100},
                "throughput_ips": 1000.0 / lat,
                "memory": {"rss_load_delta_mb": 2.0 + i, "rss_peak_mb": 200.0, "file_mb": size / 1e6,
                           "device_delta_mb": None},
                "load_ms": {"cold": 3.0, "switch_p50": 0.1, "switch_p99": 0.2}, "pareto": True}},
        })
        profile_rows.append({"schema": 1, "stitch_id": sid, "file": rel, "backend": "onnxruntime",
                             "device_key": DEVICE, "measured_at": "2026-01-01T00:00:00+00:00", "stats": {
                                 "latency": {"mean_ms": lat, "std_ms": 0.1, "min_ms": lat * 0.9, "p50_ms": lat,
                                             "p90_ms": lat * 1.1, "p99_ms": lat * 1.2, "max_ms": lat * 1.5,
                                             "iterations": 100, "throughput_per_s": 1000.0 / lat},
                                 "memory": {"rss_load_delta_bytes": 2_000_000, "rss_peak_during_runs_bytes": 9e7},
                                 "load": {"cold_load_ms": 3.0}, "file_size_bytes": size}})
    for s in plan_doc["stitches"]:
        evals.append({"stitch_id": s["id"], "top1": 60.0 + 30 * random.Random(s["id"]).random(),
                      "gflops": s["gflops"], "params": s["params"], "samples": 359, "dataset": "digits:val",
                      "weights_hash": ""})
    manifest = {
        "schema_version": 1,
        "build": {"anchors": [{"name": a["name"], "timm_name": a["timm_name"], "depth": a["depth"],
                               "width": a["width"], "gflops": a["gflops"], "params": a["params"]}
                              for a in plan_doc["anchors"]],
                  "plan": dict(plan_doc["settings"], hash=plan_doc.get("hash", "h")),
                  "snexport_version": "0.1.0", "created_at": "2026-01-01T00:00:00+00:00", "target_profile": "x86-cpu"},
        "devices": {DEVICE: {"profile": "x86-cpu", "fingerprint": {"cpu": "test"},
                             "settings": {"backend": "onnxruntime", "threads": 1},
                             "measured_at": "2026-01-01T00:00:00+00:00"}},
        "engines": entries,
    }
    docs = {
        files.PLAN: dict(plan_doc, build={"random_init": False, "trained_epochs": 0, "data": None}),
        files.MANIFEST: manifest,
        files.EXPORTS: arts,
        files.DEPLOY: {"weights_hash": "", "artifacts": [{"stitch_id": a["stitch_id"], "precision": "fp32",
                                                          "sha256": a["sha256"]} for a in arts]},
        files.TRT_ENGINES: [],
        files.CANDIDATES: {"by": "gflops", "mode": "pareto", "accuracy_known": True, "weights_hash": "",
                           "candidates": [{"id": sid, "top1": 70.0, "gflops": 1.0, "params": 1, "is_anchor": True}
                                          for sid in ENGINES], "considered": len(plan_doc["stitches"])},
        f"{files.PACK_DIR}/{files.PACK_INDEX}": {"pack_version": 1, "settings_hash": "x", "weights": {},
                                                 "artifacts": []},
    }
    for rel, doc in docs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(doc, indent=2))
    (root / files.EVAL).write_text("".join(json.dumps(r) + "\n" for r in evals))
    (root / files.PROFILE).write_text("".join(json.dumps(r) + "\n" for r in profile_rows))
    shutil.copyfile(REPO / "profiles" / "x86-cpu.toml", root / "profile.toml")


def demo_plan_doc() -> dict:
    from snexport.families.registry import describe_anchors
    from snexport.stitching.plan import plan_stitches

    plan = plan_stitches(describe_anchors(list(ENGINES)))
    return dict(plan.to_dict(), hash=plan.hash)


# ---------------------------------------------------------------------------------------------------------------
# Mutations (parent side; seeded)

_DEEP = object()  # placeholders expanded when rendering (values json.dumps cannot express or should not build)
HOSTILE = [None, True, False, 0, -1, 1, 4, 5000, 2**31, 2**63, 10**309, -10**309, 1e308, -1e308, 0.5, 1e-300,
           float("nan"), float("inf"), "", "four", "x" * 300, "../outside.onnx", "/etc/hostname", "a/" * 40 + "b",
           "engines/" + "n" * 300 + ".onnx", "engines/\u0000.onnx", "engines\\demo_s.onnx", "\u00e9\ud800", [], {},
           [1, 2], [[]], {"a": 1}, {"threads": 5000}, _DEEP]
# Keys whose values reach numbers, paths or runtimes: mutated more often than a uniform pick would.
HOT_KEYS = ("threads", "file", "weights_file", "weights_size_bytes", "weights_used_bytes", "rss_load_delta_mb",
            "device_delta_mb", "p90", "p50", "gflops", "params", "size_bytes", "sha256", "top1", "measured_at",
            "schema_version", "settings", "backend", "candidates", "id", "stats", "latency", "p50_ms", "weights_hash",
            "artifacts", "stitch_id", "input_shape", "stitches", "anchors", "memory", "load_ms", "cold_load_ms")


def _paths(node: Any, prefix: tuple = ()) -> list:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _hostile_value(rng: random.Random) -> Any:
    value = rng.choice(HOSTILE)
    if value is _DEEP:
        depth = rng.choice([40, 70, 3000, 100_000])
        return ("[" * depth + "]" * depth) if rng.random() < 0.5 else {"__raw__": "[" * depth + "1" + "]" * depth}
    return copy.deepcopy(value)


def mutate_json(doc: Any, rng: random.Random, count: int) -> Any:
    """Replace, delete or add values at random paths (biased toward HOT_KEYS); the result may not be JSON-valid."""
    doc = copy.deepcopy(doc)
    for _ in range(count):
        paths = _paths(doc)
        hot = [p for p in paths if p and p[-1] in HOT_KEYS]
        path = rng.choice(hot) if hot and rng.random() < 0.6 else rng.choice(paths)
        if not path:
            doc = _hostile_value(rng)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key, op = path[-1], rng.random()
        if op < 0.65:
            parent[key] = _hostile_value(rng)
        elif op < 0.8:
            del parent[key]
        elif op < 0.9 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = parent[key] * rng.choice([-1, 0, 1e300, 10**300, 1e-300])
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "__proto__", key + "x"])] = _hostile_value(rng)
        else:
            parent.append(_hostile_value(rng))
    return doc


def perturb_json(doc: Any, rng: random.Random, count: int) -> Any:
    """Benign edits that keep the document valid most of the time (numbers scaled, booleans flipped), so the
    success paths (choose, switch, costs over changed numbers) are fuzzed too, not just the refusals."""
    doc = copy.deepcopy(doc)
    leaves = [p for p in _paths(doc) if p and isinstance(_get(doc, p), (int, float))]
    for path in rng.sample(leaves, min(count, len(leaves))):
        parent = _get(doc, path[:-1])
        value = parent[path[-1]]
        if isinstance(value, bool):
            parent[path[-1]] = not value
        elif isinstance(value, int):
            parent[path[-1]] = max(1, int(value * rng.uniform(0.5, 2.0)))
        else:
            parent[path[-1]] = value * rng.uniform(0.5, 2.0)
    return doc


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def render_json(doc: Any) -> bytes:
    text = json.dumps(doc, indent=1, default=str)
    # {"__raw__": "..."} stands for text that is not a JSON string (deep nesting built as text, not as objects).
    while '{"__raw__": "' in text:
        start = text.index('{"__raw__": "')
        end = text.index('"}', start)
        text = text[:start] + text[start + len('{"__raw__": "'):end] + text[end + 2:]
    return text.encode("utf-8", "surrogatepass")


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    """Byte-level damage: truncation, flipped bytes, non-UTF-8, a huge literal or a deep nest spliced in."""
    op = rng.randrange(6)
    if op == 0 and data:
        return data[:rng.randrange(len(data))]
    if op == 1 and data:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op == 2:
        return b"\xff\xfe" + data
    pos = rng.randrange(len(data) + 1)
    splice = [b"1" + b"0" * 400, b"1e999", b"NaN", b"-Infinity", b"[" * 50_000, b"{\"a\":" * 5_000][rng.randrange(6)]
    return data[:pos] + splice + data[pos:]


def mutate_toml(text: str, rng: random.Random) -> bytes:
    lines = text.splitlines()
    values = ["nan", "inf", "-inf", "-1", "0", "5000", "1" + "0" * 40, '"four"', "true", "[]", "[" * 3000 + "]" * 3000,
              "{ a = 1 }", "1e400", "0.0", "-0.5", '"\\u0000"', "2026-01-01"]
    keys = ["threads", "warmup", "iterations", "min_duration_s", "max_duration_s", "percentiles", "rounds",
            "ci_level", "memory_budget_mb", "workspace_mb", "backend", "precision", "record", "unknown_key"]
    benign = ["1", "2", "4", "10", "0.5", "3.0", "100", "[50.0, 99.0]", '"fp16"', '"onnxruntime"']
    for _ in range(rng.randint(1, 3)):
        assignments = [i for i, line in enumerate(lines) if "=" in line and not line.lstrip().startswith("#")]
        if assignments and rng.random() < 0.7:
            i = rng.choice(assignments)
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {rng.choice(benign if rng.random() < 0.4 else values)}"
        else:
            table = rng.choice(["", "[measurement]", "[hardware]"])
            lines.append(f"{table}\n{rng.choice(keys)} = {rng.choice(values)}")
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    return mutate_text(data, rng) if rng.random() < 0.2 else data


def _budget(rng: random.Random) -> Any:
    return rng.choice([None, None, 0.5, 2.0, 4.0, 100.0, 0, -1, float("nan"), float("inf"), True, "5", 10**309, [],
                       1e308])


def make_case(index: int, seed: int, base: Path, target: Optional[str] = None) -> dict:
    """Case ``index`` of campaign ``seed``: which files change (new bytes, or a link) and which calls to make."""
    from snexport import buildfiles as files

    rng = random.Random(f"{seed}:{index}")
    target = target or TARGETS[index % len(TARGETS)]
    case: dict = {"index": index, "target": target, "files": {}, "links": {}, "ops": []}
    if target == "manifest":
        doc = json.loads((base / files.MANIFEST).read_text())
        kind = rng.random()
        if kind < 0.12:
            case["files"][files.MANIFEST] = mutate_text((base / files.MANIFEST).read_bytes(), rng)
        else:
            if kind < 0.2:  # an engine file swapped for something else; the manifest may claim its hash
                victim = rng.randrange(len(doc["engines"]))
                rel = doc["engines"][victim]["file"]
                choice = rng.random()
                if choice < 0.35:
                    case["links"][rel] = "/etc/hostname"
                elif choice < 0.6:
                    case["links"][rel] = os.path.basename(doc["engines"][(victim + 1) % 3]["file"])
                else:
                    garbage = bytes(rng.randrange(256) for _ in range(rng.choice([0, 7, 300])))
                    case["files"][rel] = garbage
                    if choice < 0.85:
                        import hashlib

                        doc["engines"][victim]["sha256"] = hashlib.sha256(garbage).hexdigest()
                        doc["engines"][victim]["size_bytes"] = len(garbage)
            if kind >= 0.5:
                doc = mutate_json(doc, rng, rng.randint(1, 3))
            elif kind >= 0.15:
                doc = perturb_json(doc, rng, rng.randint(1, 6))
            case["files"][files.MANIFEST] = render_json(doc)
        ids = list(ENGINES) + ["nope", ""]
        case["ops"] = [
            {"op": "selector", "mode": rng.choice(["preload", "on_demand"]),
             "candidates": rng.choice([None, None, None, [], [rng.choice(ids)], list(ENGINES), "demo_s"])},
            {"op": "choose", "latency_ms": _budget(rng), "memory_mb": _budget(rng), "strict": rng.random() < 0.3},
            {"op": "memory_cost_mb", "ids": rng.sample(ids, rng.randint(0, 3))},
            {"op": "switch", "id": rng.choice(ids)},
            {"op": "set_budget", "latency_ms": _budget(rng)},
        ]
    elif target == "profile":
        case["files"]["profile.toml"] = mutate_toml((base / "profile.toml").read_text(), rng)
        case["ops"] = [{"op": "profile"}]
    else:
        names = [files.PLAN, files.EVAL, files.PROFILE, files.CANDIDATES, files.EXPORTS, files.DEPLOY,
                 files.TRT_ENGINES, f"{files.PACK_DIR}/{files.PACK_INDEX}"]
        for name in rng.sample(names, rng.choice([1, 1, 1, 2])):
            raw = (base / name).read_bytes()
            if name.endswith(".jsonl"):
                rows = [json.loads(line) for line in raw.decode().splitlines()]
                if rng.random() < 0.15:
                    case["files"][name] = mutate_text(raw, rng)
                else:
                    for _ in range(rng.randint(1, 3)):
                        i = rng.randrange(len(rows))
                        rows[i] = mutate_json(rows[i], rng, 1)
                    case["files"][name] = b"".join(render_json(r).replace(b"\n", b" ") + b"\n" for r in rows)
            elif rng.random() < 0.15:
                case["files"][name] = mutate_text(raw, rng)
            elif rng.random() < 0.3:
                case["files"][name] = render_json(perturb_json(json.loads(raw), rng, rng.randint(1, 6)))
            else:
                case["files"][name] = render_json(mutate_json(json.loads(raw), rng, rng.randint(1, 3)))
        case["ops"] = [{"op": "buildfiles"}]
    return case


def materialize(case: dict, base: Path, work: Path) -> None:
    """The case's directory: the base (engines hard-linked, not copied) with the case's files and links."""
    if work.exists():
        shutil.rmtree(work)
    for src in base.rglob("*"):
        dst = work / src.relative_to(base)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst) if src.suffix == ".onnx" else shutil.copyfile(src, dst)
    for rel, data in case["files"].items():
        (work / rel).unlink(missing_ok=True)
        (work / rel).write_bytes(data)
    for rel, target in case["links"].items():
        (work / rel).unlink(missing_ok=True)
        os.symlink(target, work / rel)


# ---------------------------------------------------------------------------------------------------------------
# Worker side: run one case, report its outcome


def _manifest_steps(work: Path, ops: list) -> list:
    """Selector(path), then each call on it as a step of its own (skipped when the constructor refused)."""
    import numpy as np

    from snexport.device.selector import Selector

    made: list = []
    first = ops[0]

    def construct():
        made.append(Selector(work, mode=first["mode"], cache_size=1, candidates=first["candidates"]))

    def call(op):
        sel = made[0]
        if op["op"] == "choose":
            sel.choose(op["latency_ms"], op["memory_mb"], strict=op["strict"])
        elif op["op"] == "memory_cost_mb":
            sel.memory_cost_mb(op["ids"])
        elif op["op"] == "switch":
            sel.switch(op["id"])
            sel.run(np.zeros(sel.active.input_shape, dtype=np.float32))
        elif op["op"] == "set_budget":
            sel.set_budget(latency_ms=op["latency_ms"])

    steps = [("Selector", construct)]
    steps += [(op["op"], lambda op=op: call(op) if made else SKIPPED) for op in ops[1:]]
    steps.append(("close", lambda: made[0].close() if made else SKIPPED))
    return steps


SKIPPED = "skipped"  # a call that could not be made because the Selector was refused


def _run_profile_case(work: Path) -> None:
    from snexport.device.profiles import load_profile

    profile = load_profile(str(work / "profile.toml"))
    profile.runner_options()
    if hasattr(profile.measurement, "round_settings"):
        profile.measurement.round_settings()


def _buildfile_steps(work: Path) -> list:
    """The readers of select, export, bench and the deploy set, each a step run on its own."""
    from snexport.device import deployset
    from snexport.device.bench import host_facts
    from snexport.device.pack import read_pack_index
    from snexport.device.profiles import load_profile
    from snexport.export.stage import _read_exports
    from snexport.selection.select import latest_profile, read_candidates, select_stage
    from snexport.stitching.store import BuildDir

    build = BuildDir(work)
    profile = load_profile("x86-cpu")
    return [
        ("plan", lambda: build.load_plan()),
        ("eval", lambda: build.read_eval()),
        ("profile.jsonl", lambda: latest_profile(build)),
        ("select-latency", lambda: select_stage(build, by="latency", stitches="pareto")),
        ("select-gflops", lambda: select_stage(build, by="gflops", stitches="all")),
        ("candidates", lambda: read_candidates(build)),
        ("exports", lambda: deployset.read_exports(build)),
        ("export-reader", lambda: _read_exports(build.exports_path)),
        ("deploy", lambda: deployset.deploy_set(build)),
        ("current", lambda: deployset.current_exports(build)),
        ("deployable", lambda: deployset.deployable(build, profile)),
        ("engines.json", lambda: deployset.trt_engines(build)),
        ("pack", lambda: (read_pack_index(work), deployset.packed_artifacts(build, "engines/pack"))),
        ("manifest-facts", lambda: host_facts(build)),
    ]


def run_case(work: Path, case: dict) -> dict:
    """Outcome of one case: ok, typed (a SnexportError subclass) or untyped (anything else, with its signature)."""
    from snexport.errors import SnexportError

    def classify(fn) -> dict:
        try:
            if fn() == SKIPPED:
                return {"outcome": SKIPPED}
        except SnexportError as exc:
            return {"outcome": "typed", "error": type(exc).__name__, "one_line": "\n" not in str(exc)}
        except Exception as exc:  # noqa: BLE001 - counting these is the point
            frames = traceback.extract_tb(exc.__traceback__)
            where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)
                          if "snexport" in f.filename), f"{Path(frames[-1].filename).name}:{frames[-1].lineno}")
            return {"outcome": "untyped", "error": f"{type(exc).__name__} at {where}",
                    "message": str(exc)[:200]}
        return {"outcome": "ok"}

    if case["target"] == "profile":
        return classify(lambda: _run_profile_case(work))
    steps = _manifest_steps(work, case["ops"]) if case["target"] == "manifest" else _buildfile_steps(work)
    results = [dict(classify(fn), step=name) for name, fn in steps]
    worst = next((r for r in results if r["outcome"] == "untyped"), None) or next(
        (r for r in results if r["outcome"] == "typed"), {"outcome": "ok"})
    return dict(worst, steps=results)


def worker_main() -> None:
    """Read cases (one JSON line each) from stdin, answer each with one JSON line on stdout."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the answers
    for line in sys.stdin:
        case = json.loads(line)
        result = run_case(Path(case["work"]), case)
        out.write(json.dumps(dict(result, index=case["index"])) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------------------------------
# Parent side: run a campaign with per-case timeouts


class Worker:
    """A worker process; a case that does not answer within the timeout is a hang, and the worker is replaced."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)

    def run(self, case: dict, timeout: float) -> Optional[dict]:
        """The case's outcome, or None when it did not finish within ``timeout`` seconds (a hang)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            line = ""
        else:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                self.stop()
                return None
            line = self.proc.stdout.readline()
        if not line:  # the worker process died on the case (a crash in native code, an os._exit)
            self.stop()
            return {"outcome": "untyped", "error": f"worker process died (exit {self.proc.returncode})", "message": ""}
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


def run_campaign(base: Path, cases: int, seed: int, timeout: float, targets=TARGETS, progress=None,
                 first: int = 0) -> dict:
    """Run ``cases`` cases; returns the counts (and the failing cases, to reproduce them)."""
    counts = {t: collections.Counter() for t in targets}
    typed = {t: collections.Counter() for t in targets}
    untyped: collections.Counter = collections.Counter()
    steps: dict = collections.defaultdict(collections.Counter)  # "target/step" -> outcomes of that call alone
    failures = []
    not_one_line = 0
    worker = Worker()
    scratch = Path(tempfile.mkdtemp(prefix="snexport-fuzz-"))
    try:
        for n in range(first, first + cases):
            case = make_case(n, seed, base, targets[n % len(targets)])
            work = scratch / "case"
            materialize(case, base, work)
            result = worker.run({k: case[k] for k in ("index", "target", "ops")} | {"work": str(work)}, timeout)
            target = case["target"]
            if result is None:
                counts[target]["hang"] += 1
                failures.append({"index": n, "target": target, "outcome": "hang"})
            else:
                counts[target][result["outcome"]] += 1
                for step in result.get("steps", ()):
                    steps[f"{target}/{step['step']}"][step["outcome"]] += 1
                if result["outcome"] == "typed":
                    typed[target][result["error"]] += 1
                    not_one_line += not result.get("one_line", True)
                elif result["outcome"] == "untyped":
                    untyped[f"{target}: {result['error']}"] += 1
                    failures.append({"index": n, "target": target, "outcome": "untyped", "error": result["error"],
                                     "message": result.get("message", "")})
            if progress:
                progress(n - first + 1, cases)
    finally:
        worker.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return {"counts": {t: dict(c) for t, c in counts.items()}, "typed_errors": {t: dict(c) for t, c in typed.items()},
            "untyped": dict(untyped), "failures": failures, "typed_not_one_line": not_one_line,
            "steps": {k: dict(v) for k, v in sorted(steps.items())}}


def machine() -> dict:
    import onnxruntime

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "load_average_at_start": load}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "fuzz_manifest.json",
                        help="where to write the results (default: benchmarks/results/fuzz_manifest.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="snexport-fuzz-base-"))
    try:
        make_base(base, demo_plan_doc())
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.perf_counter() - last[0] > 30 or done == total:
                last[0] = time.perf_counter()
                print(f"  {done}/{total} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

        info = machine()
        result = run_campaign(base, args.cases, args.seed, args.timeout, progress=progress)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result.update(seed=args.seed, cases=args.cases, timeout_s=args.timeout, machine=info,
                  seconds=round(time.perf_counter() - started, 1),
                  command=f"python benchmarks/fuzz_manifest.py --cases {args.cases} --seed {args.seed} "
                          f"--timeout {args.timeout:g}")
    print(f"fuzz: {args.cases} cases, seed {args.seed}, per-case timeout {args.timeout:g} s, "
          f"{result['seconds']} s wall")
    print(f"machine: {info['platform']}, {info['cpus']} CPUs, Python {info['python']}, onnxruntime "
          f"{info['onnxruntime']}, load average at start {info['load_average_at_start']}")
    total = collections.Counter()
    for target, c in result["counts"].items():
        total.update(c)
        print(f"  {target:<11} ok {c.get('ok', 0):>5}  typed {c.get('typed', 0):>5}  untyped {c.get('untyped', 0):>3}  "
              f"hang {c.get('hang', 0):>3}   typed by class: {dict(sorted(result['typed_errors'][target].items()))}")
    print(f"  {'all':<11} ok {total['ok']:>5}  typed {total['typed']:>5}  untyped {total['untyped']:>3}  "
          f"hang {total['hang']:>3}")
    print(f"typed errors whose message is not one line: {result['typed_not_one_line']}")
    print("per call (a case runs several; a refused Selector() skips the calls after it):")
    for step, c in result["steps"].items():
        print(f"  {step:<28} " + "  ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for signature, n in sorted(result["untyped"].items(), key=lambda kv: -kv[1]):
        print(f"  UNTYPED x{n}: {signature}")
    for f in result["failures"][:20]:
        print(f"  case {f['index']} ({f['target']}): {f['outcome']} {f.get('error', '')} {f.get('message', '')[:120]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if total["untyped"] == 0 and total["hang"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
