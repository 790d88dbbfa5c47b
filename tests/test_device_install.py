"""The device half installed by itself: a wheel, `pip install "<wheel>[ort]"` into a fresh venv, and the device
commands and the selector run there on a build made by the host half (this test process).

What it checks is what a device gets: the venv stays under 300 MB and holds none of the host toolchain, no
subprocess ever imports a host package (sys.modules, checked at exit), `snexport bench` works on a build and on a
bundle, `snexport select --latency-ms` and the selector's choose/switch/run work on the portable pack and on the
device-optimized pack, and a host-only command says in one line which extra to install. The venv is made once per
session; only an unreachable package index skips it (with the installer's reason).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIMIT_MB = 300
FORBIDDEN = ("torch", "torchvision", "timm", "onnx", "onnxsim", "onnxslim", "onnxscript", "scikit-learn", "sklearn",
             "matplotlib", "safetensors", "jsonschema")
FORBIDDEN_MODULES = {"torch", "torchvision", "timm", "onnx", "onnxsim", "onnxslim", "onnxscript", "sklearn",
                     "matplotlib", "safetensors", "jsonschema"}
# What pip and uv print when the package index cannot be reached (the one reason to skip).
_OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
            "ConnectTimeoutError", "Max retries exceeded", "ProxyError", "dns error", "Could not connect",
            "Failed to fetch", "connection refused", "Connection refused")

QUICK_PROFILE = """
description = "x86 CPU, short measurements for the device-install test"
backend = "onnxruntime"
precision = "fp32"
threads = 1
memory_budget_mb = 512

[measurement]
warmup = 2
iterations = 10
min_duration_s = 0.02
max_duration_s = 1.0
percentiles = [50, 90, 99]
"""

# Runs a snexport command in the device venv and reports, at exit, which forbidden modules were imported.
CLI = """
import atexit, json, sys
FORBIDDEN = %r
atexit.register(lambda: sys.stderr.write(
    "FORBIDDEN-MODULES " + json.dumps(sorted({m.split('.')[0] for m in sys.modules} & FORBIDDEN)) + "\\n"))
sys.argv = ["snexport"] + sys.argv[1:]
from snexport.cli.app import main
main()
""" % (FORBIDDEN_MODULES,)

# The selector an app embeds: load (preload), choose, switch, run, on two manifests (portable pack, optimized pack).
EMBED = """
import json, sys, warnings
import numpy as np
import snexport
from snexport.device.selector import Selector, SelectorWarning

FORBIDDEN = %r
result = {"snexport": snexport.__file__}
for label, manifest in (("portable", sys.argv[1]), ("optimized", sys.argv[2])):
    with Selector(manifest, mode="preload", runner_options={"threads": 1}) as sel:
        engines = sel.engines
        x = np.random.default_rng(0).standard_normal(engines[0].input_shape).astype(np.float32)
        best = sel.choose()  # no budget: the best-ranked engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SelectorWarning)
            fastest = sel.choose(latency_ms=1e-9)  # nothing fits: the fastest, with a warning
        outputs = {}
        for info in engines:
            sel.switch(info)
            outputs[info.stitch_id] = sel.run(x).tolist()
        sel.switch(best)
        result[label] = {"files": sorted(str(e.file) for e in engines), "best": best.stitch_id,
                         "fastest": fastest.stitch_id, "active": sel.active.stitch_id, "loaded": sel.loaded(),
                         "outputs": outputs}
result["forbidden_modules"] = sorted({m.split(".")[0] for m in sys.modules} & FORBIDDEN)
print(json.dumps(result))
""" % (FORBIDDEN_MODULES,)


def _run(cmd, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def _skip_if_offline(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode == 0:
        return
    text = proc.stdout + proc.stderr
    if any(marker.lower() in text.lower() for marker in _OFFLINE):
        pytest.skip(f"{what}: the package index is unreachable ({text.strip().splitlines()[-1][:200]})")
    pytest.fail(f"{what} failed:\n{text[-3000:]}")


def _dir_mb(path: Path) -> float:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total / 1e6


@pytest.fixture(scope="session")
def device_env(tmp_path_factory):
    """A wheel of this checkout, installed with the `ort` extra into a fresh venv of the base interpreter."""
    work = tmp_path_factory.mktemp("device-install")
    uv = shutil.which("uv")
    wheels = work / "wheels"
    if uv:
        proc = _run([uv, "build", "--wheel", "--out-dir", wheels, REPO], cwd=work)
    else:
        proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels, REPO], cwd=work)
    _skip_if_offline(proc, "building the wheel")
    wheel = next(wheels.glob("snexport-*.whl"))

    venv = work / "venv"
    base = getattr(sys, "_base_executable", None) or sys.executable  # not this test venv's interpreter
    proc = _run([base, "-m", "venv", venv], cwd=work)
    assert proc.returncode == 0, proc.stderr
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    if uv:  # uv resolves in seconds; --compile-bytecode leaves the same .pyc files pip would
        proc = _run([uv, "pip", "install", "--python", python, "--compile-bytecode", f"{wheel}[ort]"], cwd=work)
        installer = f"uv pip ({uv})"
    else:
        proc = _run([python, "-m", "pip", "install", "--disable-pip-version-check", f"{wheel}[ort]"], cwd=work)
        installer = "pip"
    _skip_if_offline(proc, f"installing {wheel.name}[ort]")
    listed = _run([python, "-c", "import importlib.metadata as m, json; print(json.dumps(sorted("
                   "(d.metadata['Name'], d.version) for d in m.distributions())))"], cwd=work)
    assert listed.returncode == 0, listed.stderr
    packages = [tuple(p) for p in json.loads(listed.stdout)]
    size = _dir_mb(venv)
    print(f"\ndevice install ({installer}, {wheel.name}[ort], {Path(base).name}): venv {size:.1f} MB, "
          f"{len(packages)} packages: " + ", ".join(f"{n}=={v}" for n, v in packages))
    return {"work": work, "python": python, "size_mb": size, "packages": packages, "wheel": wheel}


@pytest.fixture(scope="module")
def host_build(demo_build, tmp_path_factory):
    """The host half's output: the demo build exported (3 stitches, portable pack) with the manifest for a quick
    ONNX Runtime profile; and a bundle of it."""
    from snexport.device.bundle import write_bundle
    from snexport.device.profiles import load_profile
    from snexport.export.deploy import export_stage
    from snexport.stitching.store import BuildDir

    work = tmp_path_factory.mktemp("host")
    profile_path = work / "quick-device.toml"
    profile_path.write_text(QUICK_PROFILE)
    build = BuildDir(work / "build")
    shutil.copytree(demo_build.root, build.root)
    stitch = next(s.id for s in build.load_plan().stitches if not s.is_anchor)
    profile = load_profile(profile_path)
    export_stage(build, f"demo_s,demo_l,{stitch}", exporter="torchscript", simplifier="none", pack=True,
                 profile=profile, show_progress=False)
    bundle = write_bundle(build.root, work / "bundle", profile, tar=True, show_progress=False)
    return {"build": build, "bundle": bundle, "profile": profile_path, "work": work}


def _cli(env, *args, cwd) -> subprocess.CompletedProcess:
    proc = _run([env["python"], "-c", CLI, *args], cwd=cwd)
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("FORBIDDEN-MODULES ")), None)
    assert line is not None, proc.stderr[-2000:]
    assert json.loads(line.split(" ", 1)[1]) == [], f"`snexport {' '.join(map(str, args))}` imported {line}"
    return proc


def test_device_install_is_small_and_holds_no_host_package(device_env):
    names = {n.lower().replace("_", "-") for n, _ in device_env["packages"]}
    assert {"snexport", "onnxruntime", "numpy", "typer", "rich"} <= names
    assert not names & set(FORBIDDEN), f"host packages in the device install: {sorted(names & set(FORBIDDEN))}"
    assert device_env["size_mb"] <= LIMIT_MB, f"device venv is {device_env['size_mb']:.1f} MB > {LIMIT_MB} MB"

    work = device_env["work"]
    proc = _cli(device_env, "--help", cwd=work)
    assert proc.returncode == 0 and "bench" in proc.stdout and "bundle" in proc.stdout, proc.stderr
    # A host-only command says which extra to install, in one line, without a traceback.
    proc = _cli(device_env, "stitch", "--out", work / "nope", cwd=work)
    message = [ln for ln in proc.stderr.splitlines() if not ln.startswith("FORBIDDEN-MODULES")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(message) == 1 and "pip install 'snexport[build]'" in message[0], proc.stderr


def test_bench_bundle_merge_and_selector_in_the_device_install(device_env, host_build, tmp_path):
    env, build, bundle = device_env, host_build["build"], host_build["bundle"]
    # The device gets the tarball: no plan, no SN-Net weights, the portable pack and the profile.
    shutil.unpack_archive(str(bundle["tarball"]), tmp_path)
    device_bundle = tmp_path / bundle["bundle"].name
    names = {p.relative_to(device_bundle).as_posix() for p in device_bundle.rglob("*") if p.is_file()}
    assert {"manifest.json", "deploy.json", "exports.json", "device-profile.toml"} <= names
    assert not {"plan.json", "snnet.safetensors"} & names and not any(n.startswith("train/") for n in names)
    assert all(n.startswith("engines/pack/") for n in names if n.endswith(".onnx"))

    # 1. bench on a build made by the host half (a copy of the whole directory) ...
    device_build = tmp_path / "build"
    shutil.copytree(build.root, device_build)
    proc = _cli(env, "bench", device_build, "--target", host_build["profile"], "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout)["measurements"]) == 3
    # ... and on the bundle, with the profile it carries.
    proc = _cli(env, "bench", device_bundle, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout)
    assert measured["device_key"].startswith("quick-device-") and len(measured["measurements"]) == 3

    # 2. the selector's pick from the CLI, on both
    for where in (device_bundle, device_build):
        proc = _cli(env, "select", where, "--latency-ms", "1000", "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["stitch_id"] in measured["measurements"]
    proc = _cli(env, "select", device_bundle, cwd=tmp_path)  # no budget: the host's job, said in one line
    assert proc.returncode == 1 and "--latency-ms" in proc.stderr and "Traceback" not in proc.stderr

    # 3. measurements back home: the host manifest (portable pack files) gets the device's numbers
    home = tmp_path / "home"
    shutil.copytree(build.root, home)
    proc = _cli(env, "merge", device_bundle, home, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["engines"] == {measured["device_key"]: sorted(measured["measurements"])}

    # 4. the embedded selector on the portable pack (host manifest after merge) and the device-optimized pack
    proc = _run([env["python"], "-c", EMBED, home / "manifest.json", device_bundle / "manifest.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["forbidden_modules"] == []
    assert result["snexport"].startswith(str(env["work"]))  # the installed wheel, not this checkout
    portable, optimized = result["portable"], result["optimized"]
    assert all("/engines/pack/" in f for f in portable["files"])
    assert all("/engines/pack-ort/" in f for f in optimized["files"])
    assert portable["best"] == optimized["best"] and portable["active"] == portable["best"]
    assert sorted(portable["outputs"]) == sorted(optimized["outputs"])  # the same candidates on both packs
    for side in (portable, optimized):
        assert sorted(side["loaded"]) == sorted(side["outputs"])  # preload: every candidate resident
    import numpy as np

    for stitch_id, out in portable["outputs"].items():
        np.testing.assert_allclose(np.asarray(out), np.asarray(optimized["outputs"][stitch_id]), rtol=1e-4, atol=1e-5)


# -- the bundle and merge on the host (no device venv needed) ------------------------------------------------


def test_bundle_refuses_an_altered_file_and_never_overwrites(host_build, tmp_path):
    from snexport.device.bundle import write_bundle
    from snexport.device.profiles import load_profile
    from snexport.errors import BuildDirError, ProfileError

    profile = load_profile(host_build["profile"])
    with pytest.raises(BuildDirError, match="already exists"):
        write_bundle(host_build["build"].root, host_build["bundle"]["bundle"], profile, show_progress=False)
    with pytest.raises(ProfileError, match="SN-Net weights"):
        write_bundle(host_build["build"].root, tmp_path / "t", dataclasses.replace(profile, backend="torch"),
                     show_progress=False)
    build = tmp_path / "build"
    shutil.copytree(host_build["build"].root, build)
    weights = next((build / "engines" / "pack").glob("weights-*.bin"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(BuildDirError, match="does not match its recorded sha256"):
        write_bundle(build, tmp_path / "out", profile, show_progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_tensorrt_bundle_ships_the_onnx_and_reference_logits(host_build, tmp_path):
    """A TensorRT device builds its engines from the FP32 ONNX and validates them against the shipped logits."""
    from snexport.buildfiles import BuildFiles
    from snexport.device import deployset
    from snexport.device.bundle import bundle_profile, write_bundle
    from snexport.device.manifest import read_manifest
    from snexport.device.profiles import load_profile
    from snexport.device.tensorrt_build import read_reference

    result = write_bundle(host_build["build"].root, tmp_path / "trt", load_profile("cuda-gpu"), show_progress=False)
    bundle = BuildFiles(result["bundle"])
    assert bundle.is_bundle and bundle_profile(bundle).name == "cuda-gpu"
    manifest = read_manifest(bundle.manifest_path)
    assert {e["file"] for e in manifest["engines"]} == {a.file for a in deployset.current_exports(bundle)}
    assert not (bundle.root / "engines" / "pack").exists()
    for art in deployset.current_exports(bundle):  # every file present with its recorded hash
        inputs, logits = read_reference(bundle, art)
        assert len(inputs) == len(logits) > 0


def test_merge_refuses_a_bundle_of_another_export_or_without_measurements(host_build, tmp_path):
    from snexport.device.bundle import merge_bundle
    from snexport.device.manifest import read_manifest, write_manifest
    from snexport.errors import BuildDirError

    home = tmp_path / "home"
    shutil.copytree(host_build["build"].root, home)
    with pytest.raises(BuildDirError, match="no measurements yet"):
        merge_bundle(host_build["bundle"]["bundle"], home)
    doc = read_manifest(home / "manifest.json")
    doc["build"]["weights_hash"] = "0" * 16
    write_manifest(home / "manifest.json", doc)
    with pytest.raises(BuildDirError, match="another export"):
        merge_bundle(host_build["bundle"]["bundle"], home)


def test_a_host_command_without_the_host_toolchain_names_the_extra(tmp_path):
    """The one-line hint also without a device venv: torch made unimportable in this checkout's interpreter."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['snexport', 'stitch', '--out', %r]\n"
            "from snexport.cli.app import main\nmain()" % str(tmp_path / "b"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: this command needs torch, which is not installed here (it comes with the host toolchain); "
        "pip install 'snexport[build]'"]
