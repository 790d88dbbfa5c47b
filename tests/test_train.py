"""Joint fine-tuning: sampling, checkpoints, resume after interruption, DDP under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from snexport import buildfiles as files
from snexport.stitching.store import BuildDir
from snexport.errors import BuildDirError
from snexport.training.train import ConfigSampler, TrainSettings, checkpoint_epochs, flops_groups, train_build

DEMO = ["demo_s", "demo_m", "demo_l"]
FAST = dict(batch_size=256, lr=2e-3)  # 6 steps per epoch on the digits train split


@pytest.fixture
def fresh_build(tmp_path):
    from snexport.stitching.stage import stitch_stage

    build, _ = stitch_stage(tmp_path / "b", DEMO, random_init=True, show_progress=False)
    return build


def test_flops_groups_follow_the_gap_rule():
    cfg = [SimpleNamespace(id=str(g), gflops=g) for g in (0.5, 1.2, 1.6, 2.5, 4.6, 5.0, 17.5)]
    groups = [[c.gflops for c in g] for g in flops_groups(cfg, 1.0)]
    assert groups == [[0.5, 1.2], [1.6, 2.5], [4.6, 5.0], [17.5]]


def test_flops_sampling_does_not_starve_isolated_configs():
    cfg = [SimpleNamespace(id=f"s{i}", gflops=1.0 + 0.01 * i) for i in range(50)] + [SimpleNamespace(id="big", gflops=10)]
    uniform = ConfigSampler(cfg, "uniform", 1.0, seed=0)
    grouped = ConfigSampler(cfg, "flops", 1.0, seed=0)
    n = 2000
    assert sum(uniform().id == "big" for _ in range(n)) < n * 0.05
    assert sum(grouped().id == "big" for _ in range(n)) > n * 0.4


def test_interrupted_training_resumes_to_the_same_weights(fresh_build, tmp_path):
    import shutil

    twin = BuildDir(tmp_path / "twin")
    shutil.copytree(fresh_build.root, twin.root)
    settings = TrainSettings(epochs=2, **FAST)

    straight = train_build(fresh_build, settings, show_progress=False, log=lambda *_: None)
    assert straight["epochs_done"] == 2

    first = train_build(twin, settings, show_progress=False, stop_after_epochs=1, log=lambda *_: None)
    assert first["epochs_done"] == 1 and twin.info()["trained_epochs"] == 1
    # What a kill right after the checkpoint's rename leaves: the checkpoint is epoch 1, everything derived from
    # it (the weights later stages read, plan.json's count, the log) is still as before the epoch. --resume
    # must repair them and still continue bit-exactly.
    shutil.copyfile(twin.path(files.TRAIN_INIT), twin.snnet_path)
    twin.update_info(trained_epochs=0)
    twin.path(files.TRAIN_LOG).unlink()
    with pytest.raises(BuildDirError, match="--resume"):
        train_build(twin, settings, show_progress=False, log=lambda *_: None)
    resumed = train_build(twin, settings, resume=True, show_progress=False, log=lambda *_: None)
    assert resumed["epochs_done"] == 2 and len(resumed["history"]) == 1

    a, b = fresh_build.load_snnet().state_dict(), twin.load_snnet().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = BuildDir(tmp_path / "b").train_dir / "init.safetensors"
    assert init.is_file()
    assert twin.path(files.TRAIN_LOG).read_text() == fresh_build.path(files.TRAIN_LOG).read_text()


def test_training_changes_weights_and_improves_loss(fresh_build):
    before = {k: v.clone() for k, v in fresh_build.load_snnet().state_dict().items()}
    summary = train_build(fresh_build, TrainSettings(epochs=3, **FAST), show_progress=False, log=lambda *_: None)
    after = fresh_build.load_snnet().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "stitch_layers" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("anchors."))
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    assert fresh_build.accuracy_known  # trained from random init: accuracy is now meaningful


def test_restart_goes_back_to_the_least_squares_init(fresh_build, tmp_path):
    import shutil

    reference = BuildDir(tmp_path / "ref")
    shutil.copytree(fresh_build.root, reference.root)
    one = TrainSettings(epochs=1, **FAST)
    quiet = dict(show_progress=False, log=lambda *_: None)
    train_build(reference, one, **quiet)
    train_build(fresh_build, TrainSettings(epochs=2, **FAST), **quiet)
    train_build(fresh_build, one, restart=True, **quiet)  # from the LS init again, one epoch
    assert fresh_build.info()["trained_epochs"] == 1
    a, b = reference.load_snnet().state_dict(), fresh_build.load_snnet().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(fresh_build):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "snexport.cli.app", "train", str(fresh_build.root), "--epochs", "1", "--batch-size", "128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 2 process(es)" in proc.stdout
    assert fresh_build.info()["trained_epochs"] == 1
    fresh_build.load_snnet()  # rank 0 wrote a loadable checkpoint


def test_bad_settings_are_refused_before_restart_touches_anything(fresh_build):
    from snexport.errors import SettingsError

    train_build(fresh_build, TrainSettings(epochs=1, **FAST), show_progress=False, log=lambda *_: None)
    trained = fresh_build.snnet_path.read_bytes()
    with pytest.raises(SettingsError, match="--sampling"):
        train_build(fresh_build, TrainSettings(epochs=1, sampling="foo", **FAST), restart=True, show_progress=False)
    assert fresh_build.snnet_path.read_bytes() == trained and fresh_build.info()["trained_epochs"] == 1


def test_distillation_from_the_largest_anchor_changes_the_objective(fresh_build, tmp_path):
    import shutil

    twin = BuildDir(tmp_path / "twin")
    shutil.copytree(fresh_build.root, twin.root)
    quiet = dict(show_progress=False, log=lambda *_: None)
    plain = train_build(fresh_build, TrainSettings(epochs=1, **FAST), **quiet)
    distilled = train_build(twin, TrainSettings(epochs=1, distill="largest", **FAST), **quiet)
    # Same seeds, data order and sampled configurations: only the teacher's term can make the losses differ.
    assert distilled["history"][0]["loss"] != pytest.approx(plain["history"][0]["loss"], rel=1e-6)


@pytest.mark.long
def test_sigkill_mid_training_then_resume_loses_at_most_the_running_epoch(fresh_build):
    """A real kill (SIGKILL, no clean-up) while epochs are being written; --resume finishes the schedule."""
    import signal
    import time

    cmd = [sys.executable, "-m", "snexport.cli.app", "train", str(fresh_build.root), "--epochs", "40",
           "--batch-size", "256"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    state = fresh_build.path(files.TRAIN_STATE)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("training finished before it could be killed")
    done_at_kill = checkpoint_epochs(fresh_build)
    assert 1 <= done_at_kill < 40
    fresh_build.load_snnet()  # the weights on disk are whole, not half-written
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch" in resumed.stdout and "trained epochs 40/40" in resumed.stdout
    assert fresh_build.info()["trained_epochs"] == 40
    assert not list(fresh_build.train_dir.glob(".*.tmp"))  # no temp file mistaken for a checkpoint


def test_failed_restart_keeps_the_trained_weights(fresh_build, tmp_path):
    from snexport.errors import DataError

    train_build(fresh_build, TrainSettings(epochs=1, **FAST), show_progress=False, log=lambda *_: None)
    trained = fresh_build.snnet_path.read_bytes()
    with pytest.raises(DataError):
        train_build(fresh_build, TrainSettings(epochs=1, data=str(tmp_path / "missing"), **FAST), restart=True,
                    show_progress=False)
    assert fresh_build.snnet_path.read_bytes() == trained and fresh_build.info()["trained_epochs"] == 1
    assert checkpoint_epochs(fresh_build) == 1


# -- training state from another machine (issue 8) --------------------------------------------------------------

QUIET = dict(show_progress=False, log=lambda *_: None)


class _Payload:
    """Pickles to 'open(marker, "w")': unpickling it creates the marker file (any code could run instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_state_from_another_machine_is_never_unpickled(fresh_build, tmp_path):
    marker = tmp_path / "pwned"
    legacy = fresh_build.path(files.TRAIN_STATE_LEGACY)
    legacy.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": _Payload(marker)}, legacy)  # a state.pt as an attacker would ship it
    payload = legacy.read_bytes()
    import shutil

    shutil.copyfile(fresh_build.snnet_path, fresh_build.path(files.TRAIN_INIT))  # as snexport <= 0.1 left it
    for resume in (False, True):  # the old code unpickled it on both paths (also just to count the epochs)
        with pytest.raises(BuildDirError, match=r"pickle.*--restart") as info:
            train_build(fresh_build, TrainSettings(epochs=1, **FAST), resume=resume, **QUIET)
        assert "\n" not in str(info.value)
    with pytest.raises(BuildDirError, match="--restart"):
        checkpoint_epochs(fresh_build)
    assert not marker.exists()
    # --restart replaces it without reading it: the new checkpoint is written and the pickle is gone.
    train_build(fresh_build, TrainSettings(epochs=1, **FAST), restart=True, **QUIET)
    assert not marker.exists() and not legacy.exists() and checkpoint_epochs(fresh_build) == 1
    (tmp_path / "copy.pt").write_bytes(payload)
    torch.load(tmp_path / "copy.pt", weights_only=False)  # the payload is real: this is what the old code ran
    assert marker.exists()


def test_checkpoint_is_safetensors_with_plain_json_and_no_pickle(fresh_build):
    import json

    from safetensors import safe_open

    train_build(fresh_build, TrainSettings(epochs=1, **FAST), **QUIET)
    state = fresh_build.path(files.TRAIN_STATE)
    raw = state.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert "rng.torch" in header and any(k.startswith("optimizer.") for k in header)
    assert b"\x80\x04" not in raw[:2] and not (fresh_build.train_dir / "state.pt").exists()
    with safe_open(str(state), framework="pt") as fh:
        meta = json.loads(fh.metadata()["snexport.train_state"])
    assert meta["epoch"] == 1 and len(meta["sampler_rng"][1]) == 625 and meta["log"][0]["epoch"] == 1
    summary = json.loads(fresh_build.path(files.TRAIN_STATE_META).read_text())
    assert summary["epoch"] == 1


def _rewrite_checkpoint(build, edit_meta=None, edit_tensors=None):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = build.path(files.TRAIN_STATE)
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata())
    tensors = load_file(str(path))
    meta = json.loads(metadata["snexport.train_state"])
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    metadata["snexport.train_state"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=metadata)


def test_tampered_checkpoint_is_refused_in_one_line(fresh_build):
    import json

    settings = TrainSettings(epochs=3, **FAST)
    train_build(fresh_build, settings, stop_after_epochs=1, **QUIET)
    original = fresh_build.path(files.TRAIN_STATE).read_bytes()
    weights = fresh_build.snnet_path.read_bytes()
    tamperings = [
        # torch's scheduler.load_state_dict would set any key as an attribute, e.g. replace its optimizer
        (lambda m: m["scheduler"].update(optimizer="not an optimizer"), None, "scheduler"),
        (lambda m: m["optimizer"]["param_groups"][0].update(lr="fast"), None, "parameter groups"),
        (lambda m: m.update(sampler_rng=[3, [1, 2, 3], None]), None, "ValueError"),
        (lambda m: m.update(epoch="1"), None, "no readable epoch"),
        (lambda m: m["optimizer"].update(scalars=[1]), None, "AttributeError"),
        (None, lambda t: t.update({k: t[k][:1] for k in t if k.endswith(".exp_avg")}), "does not fit"),
        (None, lambda t: t.pop(next(k for k in t if k.startswith("weights."))), "RuntimeError"),
        (None, lambda t: t.update({"rng.torch": torch.zeros(3, dtype=torch.uint8)}), "RuntimeError"),
    ]
    for edit_meta, edit_tensors, needle in tamperings:
        fresh_build.path(files.TRAIN_STATE).write_bytes(original)
        _rewrite_checkpoint(fresh_build, edit_meta, edit_tensors)
        with pytest.raises(BuildDirError, match=needle) as info:
            train_build(fresh_build, settings, resume=True, **QUIET)
        assert "--restart" in str(info.value) and "\n" not in str(info.value)
        assert fresh_build.snnet_path.read_bytes() == weights  # refused before anything was written
    from safetensors.torch import load_file, save_file

    state = fresh_build.path(files.TRAIN_STATE)
    state.write_bytes(original)
    save_file(load_file(str(state)), str(state), metadata={"snexport.train_state": "[1, 2]"})  # JSON, no object
    with pytest.raises(BuildDirError, match="not a usable training checkpoint"):
        checkpoint_epochs(fresh_build)
    state.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"__metadata__":')  # a header cut short
    with pytest.raises(BuildDirError, match="not a usable training checkpoint"):
        checkpoint_epochs(fresh_build)
    assert json.loads(fresh_build.path(files.TRAIN_STATE_META).read_text())["epoch"] == 1


def test_restart_starts_a_new_log(fresh_build):
    import json

    train_build(fresh_build, TrainSettings(epochs=2, **FAST), **QUIET)
    train_build(fresh_build, TrainSettings(epochs=1, **FAST), restart=True, **QUIET)
    rows = [json.loads(line) for line in fresh_build.path(files.TRAIN_LOG).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # the old code kept appending: 1, 2, 1


@pytest.mark.slow
def test_restart_killed_before_its_first_epoch_keeps_the_trained_build(fresh_build):
    """A real SIGKILL during `train --restart` before its first checkpoint: the trained weights (which engines and
    the manifest describe), the checkpoint, the log and plan.json are exactly as before."""
    import signal
    import threading
    import time

    train_build(fresh_build, TrainSettings(epochs=1, **FAST), **QUIET)
    watched = [fresh_build.snnet_path, fresh_build.plan_path, fresh_build.path(files.TRAIN_STATE),
               fresh_build.path(files.TRAIN_LOG), fresh_build.path(files.TRAIN_STATE_META)]
    before = {p: p.read_bytes() for p in watched}
    # Batch size 1: the first epoch has ~1400 steps, long enough to be killed inside it.
    cmd = [sys.executable, "-m", "snexport.cli.app", "train", str(fresh_build.root), "--restart", "--epochs", "1",
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    said: list = []
    reader = threading.Thread(target=lambda: said.extend(proc.stdout), daemon=True)
    reader.start()
    # Kill once the restart is under way: it says so (or, as snexport <= 0.1 did, it has replaced the weights).
    deadline = time.monotonic() + 300
    while (not any("restarting from the least-squares init" in line for line in said)
           and fresh_build.snnet_path.read_bytes() == before[fresh_build.snnet_path]
           and proc.poll() is None and time.monotonic() < deadline):
        time.sleep(0.02)
    time.sleep(1.0)  # well inside the epoch: the training loop is running
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the restart finished its epoch before it could be killed")
    assert {p: p.read_bytes() for p in watched} == before
    assert checkpoint_epochs(fresh_build) == 1 and fresh_build.info()["trained_epochs"] == 1
