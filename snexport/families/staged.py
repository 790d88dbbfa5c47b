"""What families with stages (Swin, ResNet) share: describing an anchor by walking its pieces on the meta device.

A staged anchor is ``stem → units → head`` like a ViT, but its units belong to stages of different width and
resolution. The adapter hands over its pieces; this walks them once with a meta-device input (shapes only) and
records, per unit, the FLOPs (``flops.count_flops``: fvcore's rules) and params, and per stage the width, the
rows (H·W pixels or tokens) and the layout of a unit's output, which the stitching layer and its least-squares
init need. Standard library only at import.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from snexport.families import flops
from snexport.records import AnchorSpec


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def feature_geometry(shape: tuple, layout: str) -> tuple[int, int]:
    """(width, rows per image) of a feature map of ``shape`` stored in ``layout``."""
    if layout == "nchw":
        return int(shape[1]), int(shape[2] * shape[3])
    if layout == "nhwc":
        return int(shape[3]), int(shape[1] * shape[2])
    if layout == "tokens":
        return int(shape[2]), int(shape[1])
    raise ValueError(f"unknown feature layout {layout!r}")


def describe_staged(
    *,
    family: str,
    name: str,
    timm_name: str,
    create_kwargs: dict,
    model: Any,
    stem: Any,
    units: list,
    unit_stage: tuple,
    head: Any,
    layouts: tuple,
    stitch_stages: tuple,
    input_shape: tuple,
    num_heads: int = 0,
    mlp_ratio: float = 0.0,
    extra_rules: Optional[Mapping[type, Callable]] = None,
) -> AnchorSpec:
    """AnchorSpec of a staged anchor from its pieces (``model`` may live on the meta device)."""
    import torch

    device = next(model.parameters()).device
    x = torch.empty((1, *input_shape), device=device)
    stem_f, x = flops.count_flops(stem, x, extra_rules)
    _, stem_rows = feature_geometry(tuple(x.shape), layouts[0])
    stem_stride = round((input_shape[1] * input_shape[2] / stem_rows) ** 0.5)
    unit_f, unit_p = [], []
    widths: dict[int, int] = {}
    rows: dict[int, int] = {}
    for unit, stage in zip(units, unit_stage):
        f, x = flops.count_flops(unit, x, extra_rules)
        unit_f.append(int(f))
        unit_p.append(_count(unit))
        w, r = feature_geometry(tuple(x.shape), layouts[stage])
        if widths.setdefault(stage, w) != w or rows.setdefault(stage, r) != r:
            raise ValueError(f"{name}: units of stage {stage} disagree on their output shape")
    head_f, out = flops.count_flops(head, x, extra_rules)
    num_stages = max(unit_stage) + 1
    total = int(stem_f) + sum(unit_f) + int(head_f)
    embed, head_p = _count(stem), _count(head)
    return AnchorSpec(
        name=name,
        timm_name=timm_name,
        create_kwargs=create_kwargs,
        depth=len(units),
        width=widths[num_stages - 1],  # the final stage's width (what reaches the head)
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        patch_size=int(stem_stride),  # input pixels per stage-0 feature pixel (the stem's total stride)
        img_size=(int(input_shape[1]), int(input_shape[2])),
        in_chans=int(input_shape[0]),
        num_classes=int(out.shape[-1]),
        num_prefix_tokens=0,
        num_tokens=rows[0],  # rows of a stage-0 unit's output
        embed_params=embed,
        block_params=0,  # blocks differ between stages: see unit_params
        head_params=head_p,
        gflops=round(flops.to_gflops(total), 6),
        params=_count(model),
        family=family,
        stem_flops=int(stem_f),
        unit_flops=tuple(unit_f),
        unit_params=tuple(unit_p),
        unit_stage=tuple(unit_stage),
        stage_widths=tuple(widths[s] for s in range(num_stages)),
        stage_rows=tuple(rows[s] for s in range(num_stages)),
        stage_layout=tuple(layouts),
        head_flops=int(head_f),
        stitch_stages=tuple(stitch_stages),
    )


def restore_meta_buffers(model: Any) -> None:
    """Recompute non-persistent buffers left on the meta device after ``load_state_dict(assign=True)``.

    Weights come from the state dict, but buffers that are not saved (Swin's relative-position index and shifted-
    window masks) stay meta tensors; timm modules know how to recompute theirs (``init_non_persistent_buffers``).
    """
    import torch

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    if device is None:
        return
    for module in model.modules():
        stale = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.device.type == "meta"]
        if not stale:
            continue
        for n in stale:
            buf = getattr(module, n)
            persistent = n not in module._non_persistent_buffers_set
            module.register_buffer(n, torch.empty(buf.shape, dtype=buf.dtype, device=device), persistent=persistent)
        init = getattr(module, "init_non_persistent_buffers", None)
        if init is None:
            raise RuntimeError(f"{type(module).__name__} has buffers {stale} that no weights file holds and no "
                               "init_non_persistent_buffers() to recompute")
        init()
