"""Hostile build directories and device profiles (issue 8): what travels between machines is untrusted input.

Each test reproduces one finding of the issue: a profile or build file that crashed a reader with a traceback, a
command that failed only after long work on a read-only directory, an export that kept going on a full disk, a
Ctrl-C that printed nothing. The manifest/selector findings are in test_manifest.py and test_selector.py, the
training-state ones in test_train.py, the fuzz in test_fuzz.py.

The read-only and full-disk tests use a real read-only bind mount and a real small tmpfs in a private mount
namespace (root), or permission bits (other users); they skip, saying why, where neither is possible.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snexport import buildfiles as files
from snexport.buildfiles import BuildFiles, parse_json, read_json, read_jsonl
from snexport.errors import BuildDirError, ProfileError

REPO = Path(__file__).resolve().parent.parent
DEMO = ["demo_s", "demo_m", "demo_l"]
CLI = [sys.executable, "-m", "snexport.cli.app"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")


@pytest.fixture(scope="module")
def arch_build(tmp_path_factory):
    """A random-init demo build (plan + SN-Net, nothing else): stitching only, no training."""
    from snexport.stitching.stage import stitch_stage

    build, _ = stitch_stage(tmp_path_factory.mktemp("hostile") / "build", DEMO, random_init=True, show_progress=False)
    return build


def _copy(build, dst: Path):
    from snexport.stitching.store import BuildDir

    shutil.copytree(build.root, dst)
    return BuildDir(dst)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    """The command failed with exactly one 'error:' line containing ``needle`` and no traceback."""
    assert proc.returncode != 0, proc.stdout[-1000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# JSON limits shared by every reader


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper"),
    ("[" * 100_000, "nested deeper"),  # unbalanced: json.loads would recurse just as deep before failing
    ('{"size_bytes": 1' + "0" * 309 + "}", "out of range"),  # float() of it overflows in every consumer
    ('{"gflops": 1e999}', "out of range"),  # parses as inf
])
def test_json_limits_are_checked_before_parsing(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_json(text)


def test_json_limits_keep_strings_and_ordinary_documents():
    doc = {"name": "[[[[{{{{", "nested": [[[{"a": [1, 2.5, None, True]}]]], "big": 2**62, "neg": -(2**62)}
    assert parse_json(json.dumps(doc)) == doc
    assert math.isnan(parse_json("NaN"))  # Python writes NaN in build files; only the manifest refuses it
    with pytest.raises(ValueError, match="non-JSON"):
        parse_json("NaN", allow_nan=False)


def test_corrupt_build_files_are_one_line_errors(tmp_path):
    cases = {"deep.json": "[" * 50_000 + "]" * 50_000, "huge.json": "[1" + "0" * 400 + "]", "bad.json": b"\xff\xfe{",
             "dir.json": None}
    for name, content in cases.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(BuildDirError, match="re-run it") as info:
            read_json(path, "a test file", "re-run it")
        assert "\n" not in str(info.value)


def test_jsonl_lines_a_reader_cannot_use_are_skipped_not_fatal(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n' + "[" * 100_000 + "\n" + '{"b": 1' + "0" * 400 + "}\n" + '{"c": 3}\n{"cut')
    assert list(read_jsonl(path)) == [{"a": 1}, {"c": 3}]


# ---------------------------------------------------------------------------------------------------------------
# Device profiles


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "box.toml"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


BASE_PROFILE = (REPO / "profiles" / "x86-cpu.toml").read_text()


def test_non_utf8_profile_is_a_profile_error(tmp_path):
    from snexport.device.profiles import load_profile

    with pytest.raises(ProfileError, match="not UTF-8"):
        load_profile(_profile(tmp_path, b"\xff\xfe" + BASE_PROFILE.encode()))


@pytest.mark.parametrize("key, value", [
    ("min_duration_s", "nan"), ("max_duration_s", "nan"), ("max_duration_s", "inf"), ("min_duration_s", "-inf"),
    ("iterations", "1" + "0" * 40), ("warmup", "-1"),
])
def test_profile_durations_and_counts_must_be_finite_and_sane(tmp_path, key, value):
    from snexport.device.profiles import load_profile

    lines = [f"{key} = {value}" if line.split("=")[0].strip() == key else line for line in BASE_PROFILE.splitlines()]
    if not any(line.startswith(f"{key} =") for line in lines):
        lines = [line + (f"\n{key} = {value}" if line.strip() == "[measurement]" else "") for line in lines]
    with pytest.raises(ProfileError, match=key):
        load_profile(_profile(tmp_path, "\n".join(lines)))


def test_deeply_nested_profile_is_a_profile_error(tmp_path):
    from snexport.device.profiles import load_profile

    with pytest.raises(ProfileError):
        load_profile(_profile(tmp_path, BASE_PROFILE + "\nx = " + "[" * 5000 + "]" * 5000 + "\n"))


def test_profile_threads_beyond_this_machine_are_refused_before_a_runner(tmp_path):
    from snexport.device.profiles import load_profile

    profile = load_profile(_profile(tmp_path, BASE_PROFILE.replace("threads = 4", "threads = 1000")
                                    if "threads = 4" in BASE_PROFILE else "threads = 1000\n" + BASE_PROFILE))
    if 1000 <= 4 * (os.cpu_count() or 1):
        pytest.skip("this machine has 250+ cores: 1000 threads are within 4 per core")
    with pytest.raises(ProfileError, match="cores"):
        profile.runner_options()
    with pytest.raises(ProfileError, match="threads"):
        load_profile(_profile(tmp_path, "threads = 5000\n" + BASE_PROFILE.replace("threads =", "# threads =")))


def test_profile_path_the_file_system_cannot_take_is_a_profile_error():
    from snexport.device.profiles import load_profile

    with pytest.raises(ProfileError):
        load_profile("x" * 300 + ".toml")
    with pytest.raises(ProfileError):
        load_profile("bad\x00name.toml")


# ---------------------------------------------------------------------------------------------------------------
# Build-directory files read by select, export and bench


def _profile_row(stitch_id: str, p50: float) -> dict:
    lat = {f"{k}_ms": p50 for k in ("mean", "std", "min", "p50", "p90", "p99", "max")}
    return {"stitch_id": stitch_id, "device_key": "dev", "stats": {
        "latency": dict(lat, iterations=10, throughput_per_s=1.0),
        "memory": {"rss_load_delta_bytes": 1e6}, "load": {"cold_load_ms": 1.0}}}


def test_nan_or_malformed_profile_records_are_refused_by_select(arch_build, tmp_path):
    from snexport.selection.select import select_stage

    build = _copy(arch_build, tmp_path / "b")
    ids = [s.id for s in build.load_plan().stitches]
    good = [_profile_row(sid, 1.0 + i) for i, sid in enumerate(ids)]
    build.profile_path.write_text("".join(json.dumps(r) + "\n" for r in good))
    assert select_stage(build, by="latency", stitches="all")["considered"] == len(ids)

    for damage, needle in [(lambda r: r["stats"]["latency"].update(p50_ms=float("nan")), "non-finite"),
                           (lambda r: r["stats"]["latency"].update(p50_ms=-3.0), "negative"),
                           (lambda r: r["stats"].pop("load"), "malformed"),
                           (lambda r: r["stats"]["latency"].update(p50_ms="fast"), "malformed")]:
        rows = json.loads(json.dumps(good))
        damage(rows[2])
        build.profile_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(BuildDirError, match=needle):
            select_stage(build, by="latency", stitches="all")


def test_hostile_candidates_exports_and_deploy_files_are_build_dir_errors(arch_build, tmp_path):
    from snexport.device import deployset
    from snexport.export.stage import _read_exports
    from snexport.selection.select import read_candidates

    build = _copy(arch_build, tmp_path / "b")
    for doc in ({"candidates": [1, 2]}, {"candidates": [{"id": ["x"]}]}, {"candidates": "demo_s"}, []):
        build.candidates_path.write_text(json.dumps(doc))
        with pytest.raises(BuildDirError, match="candidates"):
            read_candidates(build)
    art = {"stitch_id": "demo_s", "file": "engines/demo_s.onnx", "format": "onnx", "precision": "fp32",
           "size_bytes": 1, "sha256": "0" * 64, "input_name": "x", "input_shape": [1, 1, 8, 8],
           "input_dtype": "float32", "output_name": "y", "output_shape": [1, 10]}
    for bad in ([dict(art, file=7)], [dict(art, input_shape="1,1,8,8")], [dict(art, size_bytes="1")], ["demo_s"],
                [{k: v for k, v in art.items() if k != "sha256"}], {"artifacts": []}):
        build.exports_path.write_text(json.dumps(bad))
        with pytest.raises(BuildDirError, match="corrupt"):
            deployset.read_exports(build)
        with pytest.raises(BuildDirError):
            _read_exports(build.exports_path)  # the export stage's own reader
    for bad in ({"weights_hash": 5, "artifacts": []}, {"weights_hash": "", "artifacts": [["a", "b"]]},
                {"weights_hash": "", "artifacts": [{"stitch_id": [], "precision": "fp32", "sha256": "x"}]}):
        build.deploy_path.write_text(json.dumps(bad))
        with pytest.raises(BuildDirError, match="corrupt"):
            deployset.deploy_set(build)


def test_exported_files_outside_the_build_directory_are_never_used(arch_build, tmp_path):
    from snexport.device import deployset
    from snexport.hashing import sha256_file
    from snexport.records import Artifact

    build = _copy(arch_build, tmp_path / "b")
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(b"not from this build")
    (build.engines_dir).mkdir(exist_ok=True)
    os.symlink(outside, build.engines_dir / "linked.onnx")
    inside = build.engines_dir / "real.onnx"
    inside.write_bytes(b"shipped with the build")
    common = dict(stitch_id="demo_s", format="onnx", precision="fp32", input_name="x", input_shape=(1,),
                  input_dtype="float32", output_name="y", output_shape=(1,))
    arts = [Artifact(file=str(outside), size_bytes=1, sha256=sha256_file(outside), **common),  # absolute
            Artifact(file="../elsewhere.onnx", size_bytes=1, sha256=sha256_file(outside), **common),
            Artifact(file="engines/linked.onnx", size_bytes=1, sha256=sha256_file(outside), **common),
            Artifact(file="engines/" + "n" * 300 + ".onnx", size_bytes=1, sha256="0" * 64, **common),
            Artifact(file="engines/real.onnx", size_bytes=1, sha256=sha256_file(inside), **common)]
    assert [a.file for a in deployset.verified(build, arts)] == ["engines/real.onnx"]


def test_malformed_evaluation_lines_count_as_not_evaluated(arch_build, tmp_path):
    build = _copy(arch_build, tmp_path / "b")
    good = {"stitch_id": "demo_s", "top1": 80.0, "gflops": 0.1, "params": 10, "samples": 5, "dataset": "d",
            "weights_hash": build.weights_hash()}
    bad = [dict(good, stitch_id="demo_m", top1="high"), dict(good, stitch_id="demo_l", top1=float("nan")),
           dict(good, stitch_id="demo_l", top1=250.0), dict(good, stitch_id="demo_l", gflops=[1])]
    build.eval_path.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]))
    assert list(build.read_eval()) == ["demo_s"]


def test_pack_index_that_is_not_an_object_is_no_pack(arch_build, tmp_path):
    from snexport.device import deployset
    from snexport.device.pack import read_pack_index

    build = _copy(arch_build, tmp_path / "b")
    index = build.path(files.PACK_DIR) / files.PACK_INDEX
    index.parent.mkdir(parents=True)
    for text in ("[1, 2]", "[" * 100_000, '{"artifacts": 5}', '{"artifacts": ["x"]}', "\xff"):
        index.write_text(text, errors="surrogateescape")
        doc = read_pack_index(build.root)
        assert doc is None or isinstance(doc, dict)
        assert deployset.packed_artifacts(build, files.PACK_DIR) == []


def test_edited_plan_without_its_hash_is_refused(arch_build, tmp_path):
    build = _copy(arch_build, tmp_path / "b")
    doc = json.loads(build.plan_path.read_text())
    doc.pop("hash")
    doc["stitches"][0]["gflops"] = "lots"
    build.plan_path.write_text(json.dumps(doc))
    with pytest.raises(BuildDirError, match="not a valid plan"):
        build.load_plan()
    doc["stitches"][0]["gflops"] = 1.0
    build.plan_path.write_text(json.dumps(doc))
    with pytest.raises(BuildDirError, match="edited"):
        build.load_plan()


# ---------------------------------------------------------------------------------------------------------------
# One line instead of a traceback: read-only directory, --out on a file


_MOUNT_PROBE: dict = {}


def _private_mounts_work(tmp_path: Path) -> str:
    """'' when this process may mount in a private namespace (root with CAP_SYS_ADMIN), else why not."""
    if "why" not in _MOUNT_PROBE:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            _MOUNT_PROBE["why"] = "needs root and unshare(1) for a private mount namespace"
        else:
            probe = tmp_path / "mount-probe"
            probe.mkdir()
            proc = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh",
                                   str(probe)], capture_output=True, text=True)
            _MOUNT_PROBE["why"] = "" if proc.returncode == 0 else f"cannot mount here ({proc.stderr.strip()[:100]})"
    return _MOUNT_PROBE["why"]


def _run_read_only(directory: Path, commands: list[list[str]], tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Run snexport commands while ``directory`` is read-only: a read-only bind mount in a private mount namespace
    (root ignores permission bits), or the write bits removed for other users."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [directory, *directory.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            return [subprocess.run(CLI + c, capture_output=True, text=True, env=ENV, timeout=600) for c in commands]
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
    why = _private_mounts_work(tmp_path)
    if why:
        pytest.skip(why)
    results = []
    for i, command in enumerate(commands):
        out, err = tmp_path / f"out{i}", tmp_path / f"err{i}"
        script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 99; shift 3; '
                  'out="$1"; err="$2"; shift 2; "$@" > "$out" 2> "$err"')
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(directory), "-", "-", str(out),
                               str(err), *CLI, *command], env=ENV, timeout=600)
        assert proc.returncode != 99, "read-only bind mount failed"
        results.append(subprocess.CompletedProcess(command, proc.returncode, out.read_text(), err.read_text()))
    return results


@pytest.mark.slow
def test_read_only_build_directory_is_refused_up_front_in_one_line(arch_build, tmp_path):
    build = _copy(arch_build, tmp_path / "b")
    before = {p: p.read_bytes() for p in build.root.rglob("*") if p.is_file()}
    root = str(build.root)
    results = _run_read_only(build.root, [["select", root], ["export", root, "--stitches", "demo_s"],
                                          ["train", root, "--restart", "--epochs", "1"]], tmp_path)
    for proc in results:
        line = _one_line_error(proc, root)
        assert "read-only" in line or "not writable" in line, line
        assert "re-run" in line
    assert {p: p.read_bytes() for p in build.root.rglob("*") if p.is_file()} == before


def test_stitch_out_pointing_at_a_file_is_one_line_before_loading_anchors(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    proc = subprocess.run(CLI + ["stitch", "--out", str(target), "--random-init"], capture_output=True, text=True,
                          env=ENV, timeout=600)
    _one_line_error(proc, "is a file")
    assert "loading anchors" not in proc.stderr  # refused before the slow part, not after it
    assert target.read_text() == "mine"
    from snexport.buildfiles import require_writable

    with pytest.raises(BuildDirError, match="is a file"):  # a file further up the path
        require_writable(target / "sub" / "build", "snexport stitch")


# ---------------------------------------------------------------------------------------------------------------
# A full disk during `export --stitches all`


@pytest.mark.slow
def test_full_disk_stops_the_export_at_the_first_stitch_and_keeps_what_was_exported(arch_build, tmp_path):
    from snexport.hashing import sha256_file

    why = _private_mounts_work(tmp_path)
    if why:
        pytest.skip(f"a real full disk needs a small tmpfs: {why}")
    build = _copy(arch_build, tmp_path / "b")
    used = sum(p.stat().st_size for p in build.root.rglob("*") if p.is_file())
    # Room for the build and about two small stitches: the export runs into ENOSPC a few stitches in.
    size = used + 2_500_000
    mnt, keep = tmp_path / "disk", tmp_path / "kept"
    mnt.mkdir()
    keep.mkdir()
    # In a private mount namespace: mount the small tmpfs, copy the build onto it, export, copy the result out.
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; cp -a "$3" "$2/b"; mnt="$2"; kept="$4"; '
              'shift 4; "$@" > "$kept/stdout" 2> "$kept/stderr"; echo $? > "$kept/rc"; cp -a "$mnt/b" "$kept/b"')
    command = CLI + ["export", str(mnt / "b"), "--stitches", "all", "--no-pack", "--simplifier", "none"]
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(size), str(mnt), str(build.root),
                           str(keep), *command], env=ENV, timeout=1200)
    assert proc.returncode != 99, "tmpfs mount failed"
    result = subprocess.CompletedProcess(command, int((keep / "rc").read_text()), (keep / "stdout").read_text(),
                                         (keep / "stderr").read_text())
    line = _one_line_error(result, "full disk")
    assert "re-run" in line
    kept = BuildFiles(keep / "b")
    exported = json.loads(kept.exports_path.read_text()) if kept.exports_path.is_file() else []
    for art in exported:  # everything listed is whole and matches its hash
        assert sha256_file(kept.root / art["file"]) == art["sha256"]
    assert not list(kept.engines_dir.glob(".*.tmp")), "temp files of the failed stitch were left behind"
    # It stopped at the failing stitch: no stitch after it was started (each writes its reference logits first).
    logits = list((kept.root / files.REFERENCE_DIR).glob("*.logits.npy"))
    assert len(logits) <= len(exported) + 1 < len(build.load_plan().stitches)


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C


def _interrupt_when(cmd: list[str], ready, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``cmd``, send SIGINT (what Ctrl-C sends) once ``ready()`` holds, and collect its output."""
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored: restore the
    # default in the child, as an interactive terminal would have it, so the test holds wherever pytest runs.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        out, err = proc.communicate()
        pytest.skip(f"the command ended (exit {proc.returncode}) before it could be interrupted: {err[-300:]}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_ctrl_c_in_train_says_what_was_kept_and_how_to_resume(arch_build, tmp_path):
    build = _copy(arch_build, tmp_path / "b")
    state = build.path(files.TRAIN_STATE)
    proc = _interrupt_when(CLI + ["train", str(build.root), "--epochs", "50", "--batch-size", "64"], state.is_file)
    assert proc.returncode == 130
    lines = [line for line in proc.stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "finished epoch(s) are kept" in lines[0] and f"snexport train {build.root} --resume" in lines[0]


@pytest.mark.slow
def test_ctrl_c_in_export_says_the_exported_files_are_kept(arch_build, tmp_path):
    build = _copy(arch_build, tmp_path / "b")
    proc = _interrupt_when(CLI + ["export", str(build.root), "--stitches", "all", "--no-pack", "--simplifier", "none"],
                           build.exports_path.is_file)
    assert proc.returncode == 130
    lines = [line for line in proc.stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"re-run `snexport export {build.root}`" in lines[0]
    json.loads(build.exports_path.read_text())  # what it had exported is recorded, whole


def test_every_long_command_handles_ctrl_c():
    """Typer swallows KeyboardInterrupt silently, so each long command must say its own line (see on_interrupt)."""
    from snexport.cli import cmd_bench, cmd_build, cmd_evaluate, cmd_export, cmd_stitch, cmd_train

    for module, name in [(cmd_bench, "bench_cmd"), (cmd_build, "build_cmd"), (cmd_evaluate, "evaluate_cmd"),
                         (cmd_export, "export_cmd"), (cmd_stitch, "stitch_cmd")]:
        assert hasattr(getattr(module, name), "__wrapped__"), f"{name} is not @interruptible"
    assert "on_interrupt(" in Path(cmd_train.__file__).read_text()


def test_interruptible_prints_its_line_and_exits_130(capsys):
    import typer

    from snexport.cli.common import interruptible

    @interruptible(lambda build_dir, **_: f"kept {build_dir}; re-run")
    def command(build_dir: str):
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as info:
        command(build_dir="B")
    assert info.value.exit_code == 130
    assert "interrupted: kept B; re-run" in capsys.readouterr().err


def test_a_file_the_runtime_cannot_open_is_one_line_for_every_caller(tmp_path):
    """open_runner is how bench, validation and device builds open engines: ONNX Runtime's raw InvalidProtobuf
    for a non-model file (say, one a build directory links or ships under an engine's name) becomes one line."""
    from snexport.device.runtime import open_runner

    bad = tmp_path / "engine.onnx"
    bad.write_bytes(b"these are not the weights you are looking for\n" * 10)
    with pytest.raises(BuildDirError, match=r"ONNX Runtime cannot open .*engine\.onnx \(InvalidProtobuf") as info:
        open_runner(bad, threads=1)
    assert "\n" not in str(info.value)
