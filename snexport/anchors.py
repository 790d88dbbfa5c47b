"""Resolve anchor names, describe their architecture without weights, and load them with weights.

Real families come from timm by name (aliases below) with weights from timm's usual sources (Hugging Face hub
cache) or a local file; the bundled demo family (``demo``) is three tiny ViTs trained on scikit-learn's digits,
built through the same timm code path. torch and timm are imported inside functions so that ``snexport --help``
stays light.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

from snexport.errors import IncompatibleAnchorsError, UnknownModelError, WeightsError
from snexport.records import AnchorSpec

# Short names for the families the SN-Net papers stitch, plus the rest of timm's plain ViTs of those families.
ALIASES: dict[str, str] = {
    "deit_ti": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
    "deit_b384": "deit_base_patch16_384",
    "deit3_s": "deit3_small_patch16_224",
    "deit3_m": "deit3_medium_patch16_224",
    "deit3_b": "deit3_base_patch16_224",
    "deit3_l": "deit3_large_patch16_224",
    "vit_ti": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
}

# The bundled demo family: tiny ViTs on 8x8 digits, patch 2 -> 16 patches + cls = 17 tokens, depth 6.
# Widths 16/32/64 give a real accuracy ladder with gaps to stitch across (measured on 2 cores, 20 epochs:
# ~72/82/90% val top-1 in ~5/7/15 s). Width 128 reached only ~92% at 3-6x the training time, so it was dropped.
DEMO_FAMILY = ("demo_s", "demo_m", "demo_l")
_DEMO_BASE = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=6, num_heads=2)
DEMO_KWARGS: dict[str, dict] = {
    "demo_s": dict(_DEMO_BASE, embed_dim=16),
    "demo_m": dict(_DEMO_BASE, embed_dim=32),
    "demo_l": dict(_DEMO_BASE, embed_dim=64),
}
DEMO_TIMM_NAME = "vit_tiny_patch16_224"  # only the architecture class; every size field is overridden

FAMILY_SHORTCUTS = {"demo": DEMO_FAMILY, "deit": ("deit_ti", "deit_s", "deit_b"), "deit3": ("deit3_s", "deit3_b", "deit3_l")}


def is_demo_family(names) -> bool:
    """True when every anchor is a bundled demo anchor (digits data, demo training recipe)."""
    names = list(names)
    return bool(names) and all(n in DEMO_KWARGS for n in names)


def split_anchor_names(text: str | None) -> list[str]:
    """'deit_s,deit_b' -> ['deit_s', 'deit_b']; 'demo' (or nothing) -> the demo family."""
    if not text:
        return list(DEMO_FAMILY)
    names: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        names.extend(FAMILY_SHORTCUTS.get(part, (part,)))
    return names


def resolve_name(name: str) -> tuple[str, dict]:
    """User name -> (timm name, extra create_model kwargs). Raises UnknownModelError with suggestions."""
    if name in DEMO_KWARGS:
        return DEMO_TIMM_NAME, dict(DEMO_KWARGS[name])
    if name in ALIASES:
        return ALIASES[name], {}
    import timm

    base = name.split(".", 1)[0]  # timm names may carry a pretrained tag: vit_base_patch16_224.augreg_in21k
    if timm.is_model(base):
        return name, {}
    raise UnknownModelError.for_name(name, list(ALIASES) + list(DEMO_KWARGS) + timm.list_models("*vit*") + timm.list_models("deit*"))


def _create(timm_name: str, kwargs: dict, pretrained: bool = False):
    import timm

    return timm.create_model(timm_name, pretrained=pretrained, **kwargs)


def check_plain_vit(model, name: str) -> None:
    """Refuse what the stitching code cannot route: anything but timm's plain VisionTransformer."""
    from timm.models.vision_transformer import VisionTransformer

    if type(model) is not VisionTransformer:
        raise IncompatibleAnchorsError(
            f"{name} is a {type(model).__name__}, not a plain ViT (timm VisionTransformer); "
            "SN-Net stitching needs one token sequence through identical blocks (distilled DeiTs, hierarchical "
            "and conv models cannot be stitched)"
        )
    problems = []
    if getattr(model, "attn_pool", None) is not None:
        problems.append("attention pooling head")
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic image size")
    if model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={model.global_pool!r}")
    if problems:
        raise IncompatibleAnchorsError(f"{name} cannot be stitched: unsupported {', '.join(problems)}")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@lru_cache(maxsize=64)
def _describe_cached(name: str) -> AnchorSpec:
    import torch

    from snexport import flops
    from snexport.stitching.plan import path_cost

    timm_name, kwargs = resolve_name(name)
    # The meta device builds the module graph without allocating weights: plans for DeiT-B/ViT-L cost nothing.
    with torch.device("meta"):
        model = _create(timm_name, kwargs)
    check_plain_vit(model, name)
    embed = _count(model.patch_embed) + sum(
        t.numel() for t in (model.cls_token, model.reg_token, model.pos_embed) if t is not None
    )
    block = _count(model.blocks[0])
    head = _count(model.norm) + _count(model.fc_norm) + _count(model.head)
    blk0 = model.blocks[0]
    hidden = blk0.mlp.fc1.out_features
    grid = model.patch_embed.grid_size
    img = model.patch_embed.img_size
    spec_wo_cost = dict(
        name=name,
        timm_name=timm_name,
        create_kwargs=kwargs,
        depth=len(model.blocks),
        width=model.embed_dim,
        num_heads=blk0.attn.num_heads,
        mlp_ratio=hidden / model.embed_dim,
        patch_size=int(model.patch_embed.patch_size[0]),
        img_size=(int(img[0]), int(img[1])),
        in_chans=int(model.patch_embed.proj.in_channels),
        num_classes=int(model.num_classes),
        num_prefix_tokens=int(model.num_prefix_tokens),
        num_tokens=int(model.num_prefix_tokens + grid[0] * grid[1]),
        embed_params=embed,
        block_params=block,
        head_params=head,
        gflops=0.0,
        params=_count(model),
    )
    draft = AnchorSpec(**spec_wo_cost)
    f, _, _ = path_cost(draft, draft, None, None)
    return AnchorSpec(**dict(spec_wo_cost, gflops=round(flops.to_gflops(f), 6)))


def describe_anchor(name: str) -> AnchorSpec:
    """Architecture facts of one anchor, from a weightless (meta-device) build."""
    return _describe_cached(name)


def describe_anchors(names: list[str]) -> list[AnchorSpec]:
    return [describe_anchor(n) for n in names]


# ---------------------------------------------------------------------------------------------- weights


def read_state_dict(path: Path) -> dict:
    """Read a .safetensors or .pth/.pt/.bin checkpoint; unwrap the usual {'model': ...} containers."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path given to --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            import torch

            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: the reader's own message is the useful part
        raise WeightsError(
            f"cannot read weights file {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it may be truncated or corrupt: download or export it again"
        ) from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"weights file {path} holds no state dict; expected tensors keyed by parameter name")
    return sd


def load_state_into(model, state_dict: dict, name: str, source: str) -> None:
    """Load strictly, but report every mismatch (missing, unexpected, wrong shape) in one line."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        # Converts original DeiT/JAX checkpoint layouts to timm's; a no-op for timm-format files.
        state_dict = checkpoint_filter_fn(state_dict, model)
    except Exception:
        pass
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of another shape (e.g. {wrong[0]})")
    if problems:
        raise WeightsError(f"weights from {source} do not fit {name}: {'; '.join(problems)}; "
                           "pass weights of this exact architecture")
    model.load_state_dict(state_dict, strict=True)


def load_anchor(
    name: str,
    weights: Optional[Path] = None,
    random_init: bool = False,
    seed: int = 0,
):
    """Build one anchor as a timm VisionTransformer in eval mode, with weights.

    Order: an explicit local file; else the demo cache (demo family) or timm's pretrained sources (hub cache);
    random weights only when asked for explicitly (architecture-only work: plans, latency, memory).
    """
    import torch

    spec = describe_anchor(name)
    if random_init:
        torch.manual_seed(seed)
        model = _create(spec.timm_name, spec.create_kwargs)
        check_plain_vit(model, name)
        return model.eval()
    if weights is not None:
        model = _create(spec.timm_name, spec.create_kwargs)
        load_state_into(model, read_state_dict(Path(weights)), name, str(weights))
        return model.eval()
    if name in DEMO_KWARGS:
        from snexport.demo import demo_weights_path

        path = demo_weights_path(name)
        model = _create(spec.timm_name, spec.create_kwargs)
        load_state_into(model, read_state_dict(path), name, f"demo cache {path}")
        return model.eval()
    _go_offline_if_hub_unreachable()
    try:
        model = _create(spec.timm_name, spec.create_kwargs, pretrained=True)
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"no pretrained weights for {name} ({spec.timm_name}): not in the timm/Hugging Face cache and not "
            f"downloadable here ({first}); pass --weights {name}=PATH (.safetensors or .pth), or --random-init "
            "for architecture-only work"
        ) from None
    return model.eval()


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _go_offline_if_hub_unreachable() -> None:
    """Without a network, use only the local hub cache: the hub client would otherwise retry for ~45 s."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on") and _hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at call time; the env var alone is read at import
    except ImportError:
        pass


def parse_weights_option(values: list[str] | None) -> dict[str, Path]:
    """['deit_s=a.safetensors', ...] -> {'deit_s': Path('a.safetensors')}."""
    out: dict[str, Path] = {}
    for item in values or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise WeightsError(f"--weights expects NAME=PATH (e.g. deit_s=deit_s.safetensors), got '{part}'")
            key, path = part.split("=", 1)
            out[key.strip()] = Path(path.strip()).expanduser()
    return out
