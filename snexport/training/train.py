"""Joint fine-tuning of the SN-Net: one sampled configuration per step (snnet-spec.md, "Training").

Runs as a plain process or under torchrun (DDP; gloo on CPU, nccl on GPU). Each epoch ends with a checkpoint, so
`--resume` after a kill loses at most the running epoch and continues bit-exactly.

The checkpoint (``train/state.safetensors``) is one file, so one atomic rename commits it: the weights, the
optimizer's moments and the torch RNG as tensors, and epoch, scheduler, Python RNG and the run's log as JSON in its
metadata. No pickle: a build directory comes from other machines, and reading it must not run code. Everything
else is derived from the checkpoint and written after it (``snnet.safetensors``, plan.json's ``trained_epochs``,
``log.jsonl``, ``state.json``): a kill between those writes is repaired by the next `--resume`. A `--restart`
trains from the least-squares init in memory and touches nothing on disk until its first epoch is committed, so
a restart killed early leaves the trained weights (which the engines and manifest describe) in place.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from snexport import buildfiles as files
from snexport.buildfiles import parse_json, require_writable
from snexport.errors import BuildDirError, SettingsError
from snexport.families.schedule import cosine_with_warmup


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3  # stitching layers; spec's ImageNet recipe is 1e-4 at batch 1024 (scale for your batch)
    anchor_lr_scale: float = 0.1  # anchors learn 10x slower than stitching layers (spec: works as well)
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    min_lr: float = 1e-6
    # "uniform" (v1), "flops" (v2 resource-constrained sampling) or "auto": "flops" for SN-Netv2 (two-way) plans,
    # "uniform" otherwise, as in the official code bases.
    sampling: str = "auto"
    group_gap_gflops: float = 1.0  # v2 grouping gap; the demo family is tiny, so all of it is one group
    # v2 flops_sampling_k: P(group i) ∝ i/k + 1/G over groups in ascending FLOPs (linear, favours heavier groups;
    # large k approaches uniform). None: uniform over groups (official default).
    flops_sampling_k: Optional[float] = None
    distill: str = ""  # "" (off), "largest" (the largest anchor before fine-tuning), or an anchor/timm name
    distill_alpha: float = 0.5  # hard distillation weight (DeiT)
    label_smoothing: float = 0.1
    seed: int = 0
    data: str = ""  # "" / "digits" for the bundled set, or an ImageFolder root

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "TrainSettings":
        """Refuse bad settings before any state is touched (a --restart must not run on a typo)."""
        problems = []
        if self.sampling not in SAMPLING_MODES:
            problems.append(f"--sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.sampling!r}")
        if self.flops_sampling_k is not None and not self.flops_sampling_k > 0:
            problems.append(f"--flops-sampling-k must be > 0, got {self.flops_sampling_k}")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append("--epochs and --batch-size must be >= 1")
        if self.lr <= 0 or self.anchor_lr_scale < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            problems.append("--lr must be > 0; --anchor-lr-scale, --weight-decay and --warmup-epochs >= 0")
        if not 0 <= self.distill_alpha <= 1:
            problems.append("distill_alpha must be within [0, 1]")
        if problems:
            raise SettingsError("; ".join(problems))
        return self


SAMPLING_MODES = ("auto", "uniform", "flops")


def sampling_mode(settings: TrainSettings, plan) -> str:
    """The sampler a run uses: "auto" is SN-Netv2's FLOPs-grouped sampling for two-way plans, else uniform."""
    if settings.sampling != "auto":
        return settings.sampling
    return "flops" if plan.settings.two_way else "uniform"


def group_weights(groups: int, k: Optional[float]) -> list[float]:
    """SN-Netv2's group probabilities: ∝ i/k + 1/G for group i (ascending FLOPs); uniform when k is None."""
    if k is None:
        return [1.0 / groups] * groups
    raw = [i / k + 1.0 / groups for i in range(groups)]
    total = sum(raw)
    return [w / total for w in raw]


def flops_groups(configs: list, gap_gflops: float) -> list[list]:
    """SN-Netv2 grouping: sort by FLOPs, open a new group when a config is > gap above the group's first member."""
    groups: list[list] = []
    for c in sorted(configs, key=lambda s: s.gflops):
        if groups and c.gflops - groups[-1][0].gflops <= gap_gflops:
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups


class ConfigSampler:
    """Picks the configuration for each step; every process samples its own (seeded by rank)."""

    def __init__(self, configs: list, mode: str, gap_gflops: float, seed: int, flops_k: Optional[float] = None):
        if mode not in ("uniform", "flops"):
            raise SettingsError(f"--sampling must be 'uniform' or 'flops', got {mode!r}")
        self.configs = list(configs)
        self.groups = flops_groups(self.configs, gap_gflops) if mode == "flops" else [self.configs]
        # None: uniform over groups via rng.choice (the draws of runs before flops_sampling_k stay the same).
        self.weights = None if flops_k is None or mode != "flops" else group_weights(len(self.groups), flops_k)
        self.rng = random.Random(seed)

    def __call__(self):
        if self.weights is None:
            return self.rng.choice(self.rng.choice(self.groups))
        group = self.rng.choices(self.groups, weights=self.weights)[0]
        return self.rng.choice(group)


def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint file

STATE_FORMAT = 1
_META_KEY = "snexport.train_state"  # safetensors metadata entry holding the JSON part
_RESTART = "run `snexport train {root} --restart` to train again from the least-squares init"


def checkpoint_epochs(build) -> Optional[int]:
    """Epochs the checkpoint has finished (None: no checkpoint). Reads the file's header only.

    A checkpoint of an older snexport (``train/state.pt``, pickled) is refused here, never opened: unpickling a
    file from another machine can run any code.
    """
    legacy = build.path(files.TRAIN_STATE_LEGACY)
    if legacy.is_file():
        raise BuildDirError(f"{legacy} is a checkpoint of an older snexport in a format (pickle) that can run code "
                            f"when read, so it is not read; {_RESTART.format(root=build.root)} (the trained weights "
                            "stay until the first new epoch ends)")
    path = build.path(files.TRAIN_STATE)
    if not path.is_file():
        return None
    return _read_meta(path, build.root)["epoch"]


def _read_meta(path: Path, root) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            text = (fh.metadata() or {}).get(_META_KEY)
        meta = parse_json(text) if text is not None else None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged header
        raise _corrupt(path, root, type(exc).__name__) from None
    epoch = meta.get("epoch") if isinstance(meta, dict) else None
    if type(epoch) is not int or not 0 < epoch < 10**6 or meta.get("format") != STATE_FORMAT:
        raise _corrupt(path, root, "no readable epoch")
    return meta


def _corrupt(path: Path, root, why: str) -> BuildDirError:
    return BuildDirError(f"{path} is not a usable training checkpoint ({why}); {_RESTART.format(root=root)}, or "
                         "copy the build directory again")


def _save_checkpoint(path: Path, net, optimizer, scheduler, sampler, device, meta: dict) -> None:
    """Write the whole training state as one file (atomically: it appears complete or not at all)."""
    import torch
    from safetensors.torch import save_file

    from snexport.hashing import atomic_path

    tensors = {f"weights.{k}": v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict] = {}
    for index, per_param in opt["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                opt_scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = sampler.rng.getstate()
    meta = dict(meta, format=STATE_FORMAT, scheduler=scheduler.state_dict(), sampler_rng=[version, list(internal), gauss],
                optimizer={"param_groups": opt["param_groups"], "scalars": opt_scalars})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})


def _load_checkpoint(path: Path, root, net, optimizer, scheduler, sampler, device) -> dict:
    """Restore weights, optimizer, scheduler and both RNGs from the checkpoint; returns its JSON part.

    Everything is checked against the freshly built objects before it is handed to torch: the file may come from
    anywhere, and a wrong type or shape must be a one-line error, not a crash epochs later.
    """
    import torch
    from safetensors.torch import load_file

    meta = _read_meta(path, root)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types
        raise _corrupt(path, root, type(exc).__name__) from None
    try:
        weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
        net.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(_optimizer_state(meta, tensors, optimizer))
        fresh = scheduler.state_dict()
        if not _same_form(fresh, meta["scheduler"]):
            raise ValueError("scheduler state does not match this schedule")
        scheduler.load_state_dict(meta["scheduler"])
        version, internal, gauss = meta["sampler_rng"]
        sampler.rng.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        if not isinstance(meta.get("log"), list):
            raise ValueError("no log")
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise _corrupt(path, root, f"{type(exc).__name__}: {first}") from None
    return meta


def _optimizer_state(meta: dict, tensors: dict, optimizer) -> dict:
    """The optimizer's state_dict from the checkpoint, shaped exactly like this optimizer's (else ValueError)."""
    saved = meta["optimizer"]
    fresh_groups = optimizer.state_dict()["param_groups"]
    if not _same_form(fresh_groups, saved["param_groups"]) or any(
            f["params"] != s["params"] for f, s in zip(fresh_groups, saved["param_groups"])):
        raise ValueError("optimizer parameter groups do not match this SN-Net")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        index, key = name[len("optimizer."):].split(".", 1)
        i = int(index)
        if not 0 <= i < len(params) or value.shape != (() if key == "step" else params[i].shape):
            raise ValueError(f"optimizer tensor {name} does not fit parameter {index}")
        state.setdefault(i, {})[key] = value
    for index, scalars in saved["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    # AdamW reads exactly these per parameter once it has any state; anything else would fail mid-epoch.
    if any(set(per_param) != _ADAMW_STATE for per_param in state.values()):
        raise ValueError("optimizer state is not AdamW's (step, exp_avg, exp_avg_sq)")
    return {"state": state, "param_groups": saved["param_groups"]}


_ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}


def _same_form(fresh: Any, saved: Any) -> bool:
    """Does JSON ``saved`` have the structure and value types of ``fresh`` (tuples come back as lists)?"""
    if isinstance(fresh, bool) or fresh is None:
        return isinstance(saved, bool) or saved is None
    if isinstance(fresh, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(fresh, str):
        return isinstance(saved, str)
    if isinstance(fresh, (list, tuple)):
        return (isinstance(saved, list) and len(saved) == len(fresh)
                and all(_same_form(f, s) for f, s in zip(fresh, saved)))
    if isinstance(fresh, dict):
        return (isinstance(saved, dict) and set(saved) == set(fresh)
                and all(_same_form(fresh[k], saved[k]) for k in fresh))
    return False


def _load_weights_file(net, path: Path, root) -> None:
    """Load an SN-Net weights file (the least-squares init) into ``net`` in place, checking its plan."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            plan_hash = (fh.metadata() or {}).get("plan_hash")
        if plan_hash != net.plan.hash:
            raise ValueError(f"it belongs to plan {plan_hash}, not {net.plan.hash}")
        net.load_state_dict(load_file(str(path)), strict=True)
    except Exception as exc:  # noqa: BLE001 - safetensors' and torch's error types for a damaged or foreign file
        raise BuildDirError(f"cannot restart: {path} (the pre-training weights) is unusable ({type(exc).__name__}); "
                            f"re-run `snexport stitch --out {root} --force`") from None


def _publish(build, net, meta: dict, settings) -> None:
    """Everything derived from a committed checkpoint: the SN-Net weights later stages read, the epoch count in
    plan.json, log.jsonl and the readable state.json. Redone by `--resume` if a kill interrupted it."""
    from snexport.hashing import atomic_write_json, atomic_write_text

    epoch = meta["epoch"]
    build.save_snnet(net, trained_epochs=epoch)
    build.update_info(trained_epochs=epoch, train_settings=settings.to_dict())
    atomic_write_text(build.path(files.TRAIN_LOG), "".join(json.dumps(row) + "\n" for row in meta["log"]))
    atomic_write_json(build.path(files.TRAIN_STATE_META), {
        "epoch": epoch, "epochs_total": meta["epochs_total"], "log": meta["log"], "settings": meta["settings"],
        "note": f"summary of {files.TRAIN_STATE} (which holds the whole state); not read when resuming"})


def _published(build, net, epoch: int) -> bool:
    """Do snnet.safetensors and plan.json already show the checkpoint's weights and epoch?"""
    import torch

    if build.info().get("trained_epochs") != epoch:
        return False
    # Building an SN-Net initialises its stitching layers from torch's RNG, which the checkpoint has just
    # restored: the check must not draw from it, or the resumed run would no longer be bit-exact.
    with torch.random.fork_rng(devices=[]):
        try:
            on_disk = build.load_snnet().state_dict()
        except BuildDirError:
            return False
    current = net.state_dict()
    return on_disk.keys() == current.keys() and all(torch.equal(on_disk[k], current[k].cpu()) for k in current)


# ---------------------------------------------------------------------------------------------------------------
# Training


def train_build(build, settings: TrainSettings, resume: bool = False, restart: bool = False, show_progress: bool = True,
                stop_after_epochs: Optional[int] = None, log=print) -> dict:
    """Fine-tune the SN-Net of `build` (a BuildDir). Returns a summary dict (rank 0's view).

    `stop_after_epochs` ends the run early after that many epochs of this invocation (the schedule still spans
    `settings.epochs`): tests use it to simulate an interrupted run that is later resumed.
    """
    import copy

    import torch
    import torch.distributed as dist

    from snexport.data import open_data
    from snexport.progress import progress_task

    settings.check()
    rank, world, local_rank = _dist_info()
    distributed = world > 1
    device = torch.device("cpu")
    if distributed:
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    elif torch.cuda.is_available():
        device = torch.device("cuda")

    plan = build.load_plan()
    state_path = build.path(files.TRAIN_STATE)
    init_path = build.path(files.TRAIN_INIT)
    if rank == 0:
        from snexport.hashing import remove_stale_temps

        # Every epoch ends with writes here: refuse a read-only or full directory now, not after the first epoch.
        require_writable(build.root, "snexport train")
        if build.train_dir.is_dir():
            require_writable(build.train_dir, "snexport train")
        # A SIGKILL between writing a temp file and renaming it leaves the temp behind; the file itself is intact.
        for final in (state_path, build.path(files.TRAIN_STATE_META), build.path(files.TRAIN_LOG), build.snnet_path,
                      build.plan_path, init_path):
            remove_stale_temps(final)
    # --restart discards the checkpoint (whatever its format or state) without reading it.
    done = None if restart else checkpoint_epochs(build)
    if done is not None and not resume:
        raise BuildDirError(f"{build.root} already has {done} trained epoch(s); pass --resume to continue, or "
                            "--restart to train again from the least-squares init")
    trained_before = state_path.is_file() or build.path(files.TRAIN_STATE_LEGACY).is_file()
    if restart and trained_before and not init_path.is_file():
        raise BuildDirError(f"cannot restart: {init_path} (the pre-training weights) is missing; re-run `snexport stitch`")
    # Everything that can fail on bad input (data, teacher) is opened before any state is read or written.
    spec0 = plan.anchors[0]
    data = open_data(settings.data or build.info().get("data") or None, spec0.input_shape, spec0.num_classes,
                     batch_size=settings.batch_size, distributed=distributed)
    teacher_source = None
    if settings.distill and settings.distill != "largest":
        from snexport.families.registry import load_anchor

        teacher_source = load_anchor(settings.distill)

    net = build.load_snnet()
    if restart and trained_before:
        # From the least-squares init, in memory only: the trained weights on disk (which the engines and manifest
        # describe), the checkpoint and the log stay until the first epoch of the new run is committed.
        _load_weights_file(net, init_path, build.root)
        if rank == 0:
            log(f"restarting from the least-squares init; the current training stays in {build.root} until the "
                "first new epoch ends")
    net = net.to(device)
    if rank == 0 and not init_path.is_file():
        from snexport.hashing import atomic_path

        build.train_dir.mkdir(parents=True, exist_ok=True)
        import shutil

        with atomic_path(init_path) as tmp:  # the weights before any training: what --restart goes back to
            shutil.copyfile(build.snnet_path, tmp)

    teacher = None
    if settings.distill:
        teacher = copy.deepcopy(net.anchors[-1]) if settings.distill == "largest" else teacher_source
        teacher = teacher.to(device).eval().requires_grad_(False)

    # Frozen parameters (the least-squares weight of SN-Netv2 LoRA stitching layers) stay out of the optimizer:
    # AdamW's weight decay would otherwise still move them.
    anchor_params = [p for p in net.anchors.parameters() if p.requires_grad]
    layer_params = [p for p in net.stitch_layers.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": layer_params, "lr": settings.lr},
         {"params": anchor_params, "lr": settings.lr * settings.anchor_lr_scale}],
        weight_decay=settings.weight_decay,
    )
    steps_per_epoch = len(data.train)
    total = settings.epochs * steps_per_epoch
    scheduler = cosine_with_warmup(optimizer, total, int(settings.warmup_epochs * steps_per_epoch),
                                   settings.min_lr / settings.lr)
    sampler = ConfigSampler(plan.stitches, sampling_mode(settings, plan), settings.group_gap_gflops,
                            settings.seed + 1000 * rank, settings.flops_sampling_k)
    start_epoch, run_log = 0, []
    if done is not None:
        meta = _load_checkpoint(state_path, build.root, net, optimizer, scheduler, sampler, device)
        start_epoch, run_log = meta["epoch"], list(meta["log"])
        if rank == 0:
            if not _published(build, net, start_epoch):  # a kill landed between the checkpoint and its copies
                _publish(build, net, meta, settings)
            log(f"resuming after epoch {start_epoch} of {settings.epochs}")
    else:
        torch.manual_seed(settings.seed + rank)

    model = net
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Each step uses a different path, so parameters off that path get no gradient on this rank.
        model = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None,
                                        find_unused_parameters=True)

    history = []
    epochs_run = 0
    started = time.perf_counter()
    with progress_task("fine-tuning SN-Net", (settings.epochs - start_epoch) * steps_per_epoch,
                       show_progress and rank == 0) as advance:
        for epoch in range(start_epoch, settings.epochs):
            if data.train_sampler is not None:
                data.train_sampler.set_epoch(epoch)
            net.train()
            loss_sum, n = 0.0, 0
            for x, y in data.train:
                x, y = x.to(device), y.to(device)
                config = sampler()
                out = model(x, config.id)
                loss = torch.nn.functional.cross_entropy(out, y, label_smoothing=settings.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        hard = teacher(x).argmax(dim=1)
                    loss = (1 - settings.distill_alpha) * loss + settings.distill_alpha * torch.nn.functional.cross_entropy(out, hard)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(y)
                n += len(y)
                advance()
            epochs_run += 1
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(n, 1), "lr": scheduler.get_last_lr()[0]})
            run_log.append(history[-1])
            if rank == 0:
                # The checkpoint first (the commit point), then what is derived from it; a kill in between is
                # repaired by --resume. A legacy pickled state is dropped only once the new one exists.
                meta = {"epoch": epoch + 1, "epochs_total": settings.epochs, "settings": settings.to_dict(),
                        "plan_hash": plan.hash, "log": run_log}
                _save_checkpoint(state_path, net, optimizer, scheduler, sampler, device, meta)
                build.path(files.TRAIN_STATE_LEGACY).unlink(missing_ok=True)
                _publish(build, net, meta, settings)
            if distributed:
                dist.barrier()
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                break
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return {"epochs_done": start_epoch + epochs_run, "epochs_total": settings.epochs, "history": history,
            "seconds": round(time.perf_counter() - started, 1), "world_size": world,
            "steps_per_epoch": steps_per_epoch}
