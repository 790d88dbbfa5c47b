"""Evaluation under torchrun: configurations split among ranks, the single process's records, resume after a kill.

"The same eval.jsonl" means the same records: one valid line per configuration, and the set of records (every
field: top-1, samples, FLOPs, params, dataset, weights hash) equal to a single process's. Line order is not part
of it: the ranks finish configurations in another order than one process does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from snexport.evaluation.evaluate import rounds


def test_rounds_give_each_configuration_to_exactly_one_rank_most_expensive_first():
    todo = [SimpleNamespace(id=f"c{i}", gflops=g) for i, g in enumerate([0.5, 3.0, 1.0, 3.0, 2.0])]
    got = rounds(todo, 2)
    assert [[c.id for c in r] for r in got] == [["c1", "c3"], ["c4", "c2"], ["c0"]]  # ties broken by id
    assert rounds(todo, 1) == [[c] for c in sorted(todo, key=lambda c: (-c.gflops, c.id))]
    assert rounds(todo, 8) == [sorted(todo, key=lambda c: (-c.gflops, c.id))]  # more ranks than work: some idle
    assert rounds([], 2) == []


def test_threads_are_shared_among_the_ranks_on_a_machine(monkeypatch):
    from snexport.data.distributed import threads_per_rank

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads_per_rank() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 4))
    assert threads_per_rank() == 1


def _records(path) -> list[dict]:
    from snexport.buildfiles import read_jsonl

    return list(read_jsonl(path))


def _by_id(rows: list[dict]) -> dict[str, dict]:
    ids = [r["stitch_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"a configuration was evaluated twice: {sorted(ids)}"
    return {r["stitch_id"]: r for r in rows}


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The torchrun worker with RANK=rank (workers are the launcher's children, in sessions of their own)."""
    try:
        children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    except OSError:
        return None
    for pid in map(int, children):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc (Linux)")
def test_torchrun_two_ranks_match_one_process_and_resume_after_rank0_is_killed(demo_build, tmp_path):
    """A real torchrun (gloo, 2 ranks on the CPU): SIGKILL the writing rank mid-run, run again, compare records.

    Two launches, not three: the killed run and the resumed run together evaluate every configuration under
    torchrun, so the final file checks both "same records as one process" and "a resumed run redoes only what is
    missing" (each configuration appears once). Nearly all of its time is interpreters importing torch and timm
    (3 per launch: torchrun and 2 ranks); the evaluation itself takes seconds.
    """
    import torch

    from snexport.evaluation.evaluate import evaluate_build
    from snexport.stitching.store import BuildDir

    def copy_of(name: str) -> BuildDir:
        build = BuildDir(tmp_path / name)
        shutil.copytree(demo_build.root, build.root)
        build.eval_path.unlink(missing_ok=True)  # other tests may have evaluated the shared fixture already
        return build

    # The single-process reference, with each rank's thread count (1 of this machine's cores each when 2 ranks
    # share 2 cores), so that the float work is the same kernel-for-kernel.
    reference_build, build = copy_of("single"), copy_of("torchrun")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
    try:
        reference = _by_id([r.to_dict() for r in evaluate_build(reference_build, show_progress=False)])
    finally:
        torch.set_num_threads(threads)
    assert len(reference) == 35

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # gloo on the CPU even where a GPU exists
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        # Without bytecode caching each of the 6 interpreters recompiles ~50 MB of torch/timm source (about 8 s of
        # CPU each); keep their bytecode under .pytest_cache instead. Nothing the test checks depends on it.
        env["PYTHONPYCACHEPREFIX"] = str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "pycache")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "snexport.cli.app", "evaluate", str(build.root), "--json"]

    # 1. Kill rank 0 (the only writer) with SIGKILL once it has appended its first round.
    log = tmp_path / "first.log"  # a file, not a pipe nobody reads while the test polls
    with open(log, "wb") as fh:
        first = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    killed = False
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if build.eval_path.is_file() and build.eval_path.stat().st_size:
            rank0, rank1 = _worker_pid(first.pid, 0), _worker_pid(first.pid, 1)
            if rank0 is not None and rank1 is not None:
                os.kill(rank0, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    try:
        first.wait(timeout=120)  # rank 1's pending exchange fails at once; torchrun gives up
    except subprocess.TimeoutExpired:
        first.kill()
        pytest.fail("torchrun did not end after its rank 0 was killed (a rank hangs in a collective)")
    if killed:
        assert not _running(rank1)  # the surviving rank did not linger once its peer was gone
    done_at_kill = _by_id(_records(build.eval_path))
    killed_midway = killed and first.returncode != 0 and 0 < len(done_at_kill) < len(reference)
    if killed:
        assert first.returncode != 0, "torchrun reported success although a rank was killed"
    else:
        assert first.returncode == 0, log.read_text(errors="replace")[-3000:]
    kept_bytes = build.eval_path.read_bytes()

    # 2. Run again: only what is missing is evaluated, rank 0 appends it, both runs' records equal one process's.
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    final = _by_id(_records(build.eval_path))  # also: nothing evaluated twice, the killed run's records included
    assert final == reference
    assert build.eval_path.read_bytes().startswith(kept_bytes)  # appended to, never rewritten
    printed = _by_id(json.loads(second.stdout))  # rank 0 alone printed (one JSON document), every configuration
    assert printed == reference
    assert {k: final[k] for k in done_at_kill} == done_at_kill  # kept, not redone
    if not killed_midway:
        pytest.skip("the first run finished before rank 0 could be killed; records checked, resume not exercised")
