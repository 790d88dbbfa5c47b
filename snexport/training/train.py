"""Joint fine-tuning of the SN-Net: one sampled configuration per step (snnet-spec.md, "Training").

Runs as a plain process or under torchrun (DDP; gloo on CPU, nccl on GPU). Each epoch ends with a checkpoint
(SN-Net weights + optimizer/scheduler/RNG state), so `--resume` after a kill loses at most the running epoch.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

from snexport import buildfiles as files
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
    sampling: str = "uniform"  # "uniform" (v1) or "flops" (v2 resource-constrained sampling)
    group_gap_gflops: float = 1.0  # v2 grouping gap; the demo family is tiny, so all of it is one group
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
        if self.sampling not in ("uniform", "flops"):
            problems.append(f"--sampling must be 'uniform' or 'flops', got {self.sampling!r}")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append("--epochs and --batch-size must be >= 1")
        if self.lr <= 0 or self.anchor_lr_scale < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            problems.append("--lr must be > 0; --anchor-lr-scale, --weight-decay and --warmup-epochs >= 0")
        if not 0 <= self.distill_alpha <= 1:
            problems.append("distill_alpha must be within [0, 1]")
        if problems:
            raise SettingsError("; ".join(problems))
        return self


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

    def __init__(self, configs: list, mode: str, gap_gflops: float, seed: int):
        if mode not in ("uniform", "flops"):
            raise SettingsError(f"--sampling must be 'uniform' or 'flops', got {mode!r}")
        self.configs = list(configs)
        self.groups = flops_groups(self.configs, gap_gflops) if mode == "flops" else [self.configs]
        self.rng = random.Random(seed)

    def __call__(self):
        return self.rng.choice(self.rng.choice(self.groups))


def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


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
    from snexport.hashing import atomic_path
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
    state_path = build.path(files.TRAIN_STATE_LEGACY)
    if rank == 0:
        from snexport.hashing import remove_stale_temps

        # A SIGKILL between writing a checkpoint's temp file and renaming it leaves the temp behind; the
        # checkpoint itself is the previous one, intact.
        for final in (state_path, build.snnet_path, build.plan_path, build.path(files.TRAIN_INIT)):
            remove_stale_temps(final)
    start_epoch = 0
    if state_path.is_file() and not (resume or restart):
        done = torch.load(state_path, map_location="cpu", weights_only=False)["epoch"]
        raise BuildDirError(f"{build.root} already has {done} trained epoch(s); pass --resume to continue, or "
                            "--restart to train again from the least-squares init")
    # Everything that can fail on bad input (data, teacher) is opened before a --restart discards anything.
    spec0 = plan.anchors[0]
    data = open_data(settings.data or build.info().get("data") or None, spec0.input_shape, spec0.num_classes,
                     batch_size=settings.batch_size, distributed=distributed)
    teacher_source = None
    if settings.distill and settings.distill != "largest":
        from snexport.families.registry import load_anchor

        teacher_source = load_anchor(settings.distill)

    if restart and state_path.is_file():
        init = build.path(files.TRAIN_INIT)
        if not init.is_file():
            raise BuildDirError(f"cannot restart: {init} (the pre-training weights) is missing; re-run `snexport stitch`")
        import shutil

        if rank == 0:
            with atomic_path(build.snnet_path) as tmp:
                shutil.copyfile(init, tmp)
            build.update_info(trained_epochs=0)  # the weights on disk are the LS init again
            state_path.unlink()
        if distributed:
            dist.barrier()
    net = build.load_snnet().to(device)
    if rank == 0 and not state_path.is_file() and not (build.path(files.TRAIN_INIT)).is_file():
        build.train_dir.mkdir(parents=True, exist_ok=True)
        import shutil

        with atomic_path(build.path(files.TRAIN_INIT)) as tmp:
            shutil.copyfile(build.snnet_path, tmp)

    teacher = None
    if settings.distill:
        teacher = copy.deepcopy(net.anchors[-1]) if settings.distill == "largest" else teacher_source
        teacher = teacher.to(device).eval().requires_grad_(False)

    anchor_params = [p for p in net.anchors.parameters()]
    layer_params = [p for p in net.stitch_layers.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": layer_params, "lr": settings.lr},
         {"params": anchor_params, "lr": settings.lr * settings.anchor_lr_scale}],
        weight_decay=settings.weight_decay,
    )
    steps_per_epoch = len(data.train)
    total = settings.epochs * steps_per_epoch
    scheduler = cosine_with_warmup(optimizer, total, int(settings.warmup_epochs * steps_per_epoch),
                                   settings.min_lr / settings.lr)
    sampler = ConfigSampler(plan.stitches, settings.sampling, settings.group_gap_gflops, settings.seed + 1000 * rank)
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.rng.setstate(state["sampler_rng"][rank] if rank < len(state["sampler_rng"]) else state["sampler_rng"][0])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"])
        if rank == 0:
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
            if rank == 0:
                # Weights first, then the state that says the epoch is done: a kill between the two re-runs the
                # epoch from the previous state, it never skips one.
                build.save_snnet(net, trained_epochs=epoch + 1)
                rng_states = [sampler.rng.getstate()]
                with atomic_path(state_path) as tmp:
                    torch.save({"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "sampler_rng": rng_states,
                                "torch_rng": torch.get_rng_state(), "settings": settings.to_dict()}, tmp)
                build.update_info(trained_epochs=epoch + 1, train_settings=settings.to_dict())
                with open(build.path(files.TRAIN_LOG), "a") as fh:
                    import json

                    fh.write(json.dumps(history[-1]) + "\n")
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
