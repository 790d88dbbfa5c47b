"""The stitch stage: plan, load anchors, least-squares init, save plan.json + snnet.safetensors (`snexport stitch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from snexport import buildfiles as files
from snexport.buildfiles import require_writable
from snexport.stitching.store import BuildDir
from snexport.hashing import sha256_file
from snexport.stitching.plan import PlanSettings, plan_stitches

DEFAULT_CALIB_IMAGES = 100  # spec: ~100 calibration images, a few hundred at most


def calibration_images(data: Optional[str], input_shape: tuple, num_classes: int, count: int, seed: int = 0):
    """First `count` training images of the dataset, or seeded Gaussian noise when there is no dataset.

    Noise only arises for architecture-only builds (random-init anchors without --data), where accuracy is
    unknown anyway and the layers merely need a well-conditioned linear map.
    """
    import torch

    if data is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((count,) + tuple(input_shape), generator=gen), "gaussian noise"
    from snexport.data import open_data

    splits = open_data(data, input_shape, num_classes, batch_size=count)
    images = []
    for x, _ in splits.train:
        images.append(x)
        if sum(len(i) for i in images) >= count:
            break
    return torch.cat(images)[:count], splits.name.replace(":val", ":train")


def stitch_stage(out: str | Path, anchor_names: list[str], weights: dict[str, Path] | None = None,
                 random_init: bool = False, settings: PlanSettings = PlanSettings(),
                 calib_images: int = DEFAULT_CALIB_IMAGES, data: Optional[str] = None,
                 show_progress: bool = True, force: bool = False) -> tuple[BuildDir, dict]:
    """Plan, load anchors, least-squares-init the stitching layers, save plan.json + snnet.safetensors.

    Skips the work when the directory already holds the same plan made from the same inputs.
    """
    from snexport.families.registry import describe_anchors, is_demo_family, load_anchor
    from snexport.errors import BuildDirError, WeightsError
    from snexport.progress import progress_task
    from snexport.stitching.snnet import SNNet

    weights = dict(weights or {})
    unknown = set(weights) - set(anchor_names)
    if unknown:
        raise WeightsError(f"--weights names {', '.join(sorted(unknown))}, which is not among the anchors "
                           f"({', '.join(anchor_names)})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BuildDirError(f"--out {out} is a file, not a directory; pass a new or existing build directory")
    require_writable(out, "snexport stitch")  # checked before the anchors load, not after
    plan = plan_stitches(describe_anchors(anchor_names), settings)
    uses_demo = is_demo_family(a.name for a in plan.anchors)
    if data is None and uses_demo:
        data = "digits"
    sources = {}
    for a in plan.anchors:
        if random_init:
            sources[a.name] = "random-init"
        elif a.name in weights:
            path = Path(weights[a.name]).resolve()
            # The content, not just the path: new weights saved over the same file must rebuild.
            digest = sha256_file(path)[:16] if path.is_file() else "missing"
            sources[a.name] = f"file:{path}:{digest}"
        elif is_demo_family([a.name]):
            from snexport.families.demo import demo_key

            sources[a.name] = f"demo:{demo_key(a.name)}"
        else:
            sources[a.name] = f"timm:{a.timm_name}"
    inputs = {"weights": sources, "calib_images": calib_images, "data": data, "random_init": random_init}

    build = BuildDir(out)
    if build.plan_path.is_file() and build.snnet_path.is_file() and not force:
        try:
            old_plan, old_info = build.load_plan(), build.info()
        except BuildDirError:
            old_plan, old_info = None, {}
        if (old_plan is not None and old_plan.hash == plan.hash and old_info.get("inputs") == inputs
                and build.snnet_plan_hash() == plan.hash):
            return build, dict(old_info, skipped=True)
        if old_plan is not None:
            raise BuildDirError(
                f"{build.root} already holds a different build (plan {old_plan.hash}, anchors "
                f"{', '.join(a.name for a in old_plan.anchors)}); choose another --out or pass --force to replace it"
            )

    anchors = []
    with progress_task("loading anchors", len(plan.anchors), show_progress) as advance:
        for a in plan.anchors:
            anchors.append(load_anchor(a.name, weights=weights.get(a.name), random_init=random_init))
            advance()
    net = SNNet(plan, anchors).eval()
    spec0 = plan.anchors[0]
    images, calib_source = calibration_images(data, spec0.input_shape, spec0.num_classes, calib_images)
    with progress_task("least-squares init of stitching layers", len(plan.ls_targets()), show_progress) as advance:
        ls = net.init_stitching_layers(images, progress=lambda done, total: advance())
    ls["source"] = calib_source
    info = {"inputs": inputs, "random_init": random_init, "data": data, "ls_init": ls, "trained_epochs": 0}
    save_build(build, plan, net, info)
    return build, info


def save_build(build: BuildDir, plan, net, info: dict) -> None:
    """Write a fresh SN-Net (plan + weights) into ``build``, dropping what belonged to its old weights."""
    # The old train state and selection belong to the old weights: drop them so later stages start afresh.
    stale_files = (files.TRAIN_STATE, files.TRAIN_STATE_META, files.TRAIN_STATE_LEGACY, files.TRAIN_INIT,
                   files.CANDIDATES, files.DEPLOY)
    for stale in map(build.path, stale_files):
        if stale.exists():
            stale.unlink()
    build.root.mkdir(parents=True, exist_ok=True)
    # Plan first: if a kill lands between the two writes, the weights' plan hash no longer matches and the next
    # run redoes this stage instead of trusting stale weights.
    build.save_plan(plan, info)
    build.save_snnet(net, trained_epochs=0)


def prepare_build_dir(out: str | Path, plan, force: bool) -> BuildDir:
    """The build directory for a new SN-Net of ``plan``: refuses a file, an unwritable place, or a different
    build (unless ``force``) before anything is written."""
    from snexport.errors import BuildDirError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BuildDirError(f"--out {out} is a file, not a directory; pass a new or existing build directory")
    require_writable(out, "snexport stitch")
    build = BuildDir(out)
    if build.plan_path.is_file() and not force:
        try:
            old_plan = build.load_plan()
        except BuildDirError:
            old_plan = None
        if old_plan is not None:
            raise BuildDirError(f"{build.root} already holds a build (plan {old_plan.hash}, anchors "
                                f"{', '.join(a.name for a in old_plan.anchors)}); choose another --out or pass "
                                "--force to replace it")
    return build
