"""What OpenVINO's engines of one pack share, measured (issue 13): RSS split into private and mapped-file pages.

    uv run python benchmarks/openvino_memory.py --build BUILD          # BUILD holds engines/pack (snexport export --pack)
    uv run python benchmarks/openvino_memory.py --build BUILD --engines deit_s,deit_b

`snexport bench` records each engine's RSS growth (load + first run, one engine alone) and the selector sizes a
preload set from those (``Selector.memory_cost_mb``): every engine's own growth minus the bytes of the shared weights
file it references, plus that file once. That is right only if the runtime keeps the file's pages mapped and
resident (shared) and the rest of its growth is its own. This script checks it for OpenVINO, next to ONNX Runtime
running the same portable pack the way the selector does (the weights file mapped once, sessions given views):

- ``alone``: one fresh process per (runtime, engine): the runtime is warmed with a one-node model first (its plugin
  and thread pools are not the engine's), then the engine is opened and run once; RSS, anonymous RSS
  (``RssAnon``), file-backed RSS (``RssFile``) and the resident bytes of the weights file's mappings
  (``/proc/self/smaps``) before and after — the figure bench stores;
- ``together``: one fresh process per runtime loading every engine in turn, the same figures after each, and PSS;
- the selector's prediction for the set from the ``alone`` figures, next to what ``together`` measured.

Writes ``--results/openvino_memory-<name>.json`` with the machine, versions and load average. Memory only: nothing
here is timed, so a shared machine changes little (page-cache pressure aside; the load average is stored).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
RUNTIMES = ("openvino", "onnxruntime")


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _file_resident(path: str) -> int:
    """Resident bytes of every mapping of ``path`` in this process (a file mapped twice counts twice, like RSS)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
            inside = len(head) >= 6 and head[5] == path
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def _pss() -> Optional[int]:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _snapshot(weights: str) -> dict:
    return dict(_status(), weights_file_resident=_file_resident(weights), Pss=_pss())


def _warm(runtime: str, threads: int) -> None:
    """The runtime's once-per-process setup (plugin, thread pools) on a one-node model: not any engine's cost."""
    import tempfile

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from snexport.device.runtime import open_runner

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "warm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        with open_runner(path, backend=runtime, threads=threads) as runner:
            runner.run(np.zeros(1, np.float32))


def _open(runtime: str, root: Path, engine: dict, threads: int, maps: dict):
    """The engine as the selector opens it (``default_runner_factory``): OpenVINO maps the weights file itself;
    ONNX Runtime gets views of one mapping per file (prepacking off)."""
    from snexport.device.runtime.onnxruntime_runner import WeightsFileMap
    from snexport.device.selector import default_runner_factory

    def weights_map(path):
        return maps.setdefault(Path(path).resolve(), WeightsFileMap(Path(path).resolve()))

    entry = {"file": engine["file"], "weights_file": engine["weights_file"], "format": "onnx"}
    return default_runner_factory(entry, root, weights_map=weights_map, backend=runtime, threads=threads)


def worker(spec: dict) -> dict:
    import gc

    import numpy as np

    root, weights = Path(spec["root"]), str((Path(spec["root"]) / spec["weights_file"]).resolve())
    _warm(spec["runtime"], spec["threads"])
    gc.collect()
    steps = [{"after": "warm runtime", **_snapshot(weights)}]
    runners, maps = [], {}
    for engine in spec["engines"]:
        runner = _open(spec["runtime"], root, engine, spec["threads"], maps)
        runner.run(np.random.default_rng(0).standard_normal(engine["input_shape"]).astype(np.float32))
        runners.append(runner)
        steps.append({"after": engine["id"], **_snapshot(weights)})
    for runner in runners:
        runner.close()
    return {"steps": steps}


def _run_worker(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"worker failed ({spec['runtime']}, {[e['id'] for e in spec['engines']]}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile", "weights_file_resident")}


def pack_engines(build: Path, wanted: Optional[Sequence[str]]) -> list[dict]:
    """The pack's engines: file, weights file, the weights bytes each references, input shape."""
    import onnx

    engines = []
    for path in sorted((build / "engines" / "pack").glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        used, weights = 0, None
        for t in model.graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            if "location" in ext:
                used += int(ext.get("length", 0))
                weights = ext["location"]
        dims = model.graph.input[0].type.tensor_type.shape.dim
        sid = path.stem.replace("+", ">").replace(".", ":") if "+" in path.stem else path.stem
        engines.append({"id": sid, "file": str(path.relative_to(build)),
                        "weights_file": str((path.parent / weights).relative_to(build)), "used_bytes": used,
                        "input_shape": [d.dim_value for d in dims]})
    if wanted:
        engines = [e for e in engines if e["id"] in wanted]
    if not engines:
        raise SystemExit(f"no packed engines in {build / 'engines' / 'pack'}; run `snexport export --pack` first")
    return sorted(engines, key=lambda e: e["used_bytes"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", type=Path, help="build directory with engines/pack")
    p.add_argument("--engines", default=None, help="comma-separated engine ids (default: every packed one)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default=None, help="results name (default: the build directory's name)")
    p.add_argument("--results", type=Path, default=HERE / "results" / "openvino")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
        return 0
    if args.build is None:
        p.error("--build is required")
    from snexport.device.profiling import device_fingerprint
    from snexport.device.runtime.onnxruntime_runner import default_threads

    build = args.build.resolve()
    engines = pack_engines(build, [e.strip() for e in (args.engines or "").split(",") if e.strip()])
    weights_file = engines[0]["weights_file"]
    size = (build / weights_file).stat().st_size
    threads = args.threads or default_threads()
    load_before = os.getloadavg()
    doc = {"benchmark": "openvino_memory", "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/openvino_memory.py " + " ".join(argv or sys.argv[1:]),
           "build": str(build), "weights_file": weights_file, "weights_file_bytes": size, "threads": threads,
           "machine": device_fingerprint(),
           "versions": {d: _version(d) for d in ("openvino", "onnxruntime", "numpy")},
           "engines": engines, "runtimes": {}}
    mb = 1e6
    for runtime in RUNTIMES:
        spec = {"root": str(build), "weights_file": weights_file, "threads": threads, "runtime": runtime}
        alone = {}
        for e in engines:
            steps = _run_worker(dict(spec, engines=[e]))["steps"]
            alone[e["id"]] = _delta(steps[0], steps[1])
        together = _run_worker(dict(spec, engines=engines))["steps"]
        # The selector's rule (memory_cost_mb) on the alone figures: each engine's growth minus the weights bytes
        # it references, plus the shared file once (at most the sum of the parts).
        predicted = sum(max(0, alone[e["id"]]["VmRSS"] - e["used_bytes"]) for e in engines) + min(
            size, sum(e["used_bytes"] for e in engines))
        measured = _delta(together[0], together[-1])
        doc["runtimes"][runtime] = {"alone": alone, "together": together, "together_delta": measured,
                                    "selector_prediction_bytes": predicted,
                                    "sum_of_alone_bytes": sum(a["VmRSS"] for a in alone.values())}
        print(f"\n{runtime}: weights file {size / mb:.1f} MB, engines reference "
              f"{sum(e['used_bytes'] for e in engines) / mb:.1f} MB of it")
        print(f"{'engine':24}{'weights MB':>11}{'RSS +MB':>9}{'anon +MB':>10}{'file +MB':>10}{'of pack MB':>11}")
        for e in engines:
            a = alone[e["id"]]
            print(f"{e['id']:24}{e['used_bytes'] / mb:>11.1f}{a['VmRSS'] / mb:>9.1f}{a['RssAnon'] / mb:>10.1f}"
                  f"{a['RssFile'] / mb:>10.1f}{a['weights_file_resident'] / mb:>11.1f}")
        print(f"{'all together':24}{'':>11}{measured['VmRSS'] / mb:>9.1f}{measured['RssAnon'] / mb:>10.1f}"
              f"{measured['RssFile'] / mb:>10.1f}{measured['weights_file_resident'] / mb:>11.1f}")
        print(f"sum of alone {doc['runtimes'][runtime]['sum_of_alone_bytes'] / mb:.1f} MB; selector prediction "
              f"{predicted / mb:.1f} MB; measured together {measured['VmRSS'] / mb:.1f} MB")
    doc["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print(f"\nload average before {load_before}, after {doc['load_average']['after']} (machine shared: memory only)")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"openvino_memory-{args.name or build.name}.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"results: {out}")
    return 0


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
