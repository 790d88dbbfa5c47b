"""Joint fine-tuning: sampling, checkpoints, resume after interruption, DDP under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from snexport.stitching.store import BuildDir
from snexport.errors import BuildDirError
from snexport.training.train import ConfigSampler, TrainSettings, flops_groups, train_build

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
    with pytest.raises(BuildDirError, match="--resume"):
        train_build(twin, settings, show_progress=False, log=lambda *_: None)
    resumed = train_build(twin, settings, resume=True, show_progress=False, log=lambda *_: None)
    assert resumed["epochs_done"] == 2 and len(resumed["history"]) == 1

    a, b = fresh_build.load_snnet().state_dict(), twin.load_snnet().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = BuildDir(tmp_path / "b").train_dir / "init.safetensors"
    assert init.is_file()


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


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_loses_at_most_the_running_epoch(fresh_build):
    """A real kill (SIGKILL, no clean-up) while epochs are being written; --resume finishes the schedule."""
    import signal
    import time

    cmd = [sys.executable, "-m", "snexport.cli.app", "train", str(fresh_build.root), "--epochs", "40",
           "--batch-size", "256"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    state = fresh_build.train_dir / "state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("training finished before it could be killed")
    done_at_kill = torch.load(state, weights_only=False)["epoch"]
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
    assert (fresh_build.train_dir / "state.pt").is_file()
