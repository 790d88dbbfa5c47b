"""The Swin family (timm ``SwinTransformer``: swin_{tiny,small,base}_patch4_window7_224, ...), stitched stage by stage.

Pieces, in the order a route runs them:
- stem = ``patch_embed`` (4x4 conv + LayerNorm) → a (B, H, W, C) map (timm >= 0.9 keeps Swin features NHWC);
- units = the blocks of ``layers[0..3]``. timm >= 0.9 puts the PatchMerging that halves the resolution at the
  *start* of stage s (``layers[s].downsample``; the official Swin puts it at the end of stage s-1). It is folded
  into unit 0 of stage s, so a route that stops after block j of stage s has run that stage's PatchMerging, and a
  route that resumes at block k >= 1 of stage s (always so: the stage-wise rules keep j < k) never runs the back
  anchor's. That is the official route (front: stages < s, blocks 0..j of s | stitch | back: blocks k.. of s,
  later stages with their PatchMerging, norm, head), checked to the unit against the official FLOPs;
- head = final LayerNorm + average pool + classifier.
Stitched stages: all but the last (official: stages 0-2 of 4). Widths 96·2^s (T, S) and 128·2^s (B).

FLOPs (``flops.count_flops``, fvcore's rules): patch-embed conv, every LayerNorm at 5/element (incl. PatchMerging's
over 4C), every Linear (qkv, proj, MLP, PatchMerging's 4C→2C reduction, head) as rows·C_in·C_out, and window
attention as its two matmuls, q·kᵀ and attn·v: 2·N·C multiply-adds per token for N tokens per window (49 at
window 7), counted over the windows timm actually forms (padded windows included). The relative-position bias
add, the shift mask add, softmax, GELU, the rolls of the shifted windows and the final mean are free. Swin-T/S/B:
4,509,194,496 / 8,768,534,784 / 15,467,826,176 = the paper's 4.51/8.77/15.47 GFLOPs, exactly fvcore's totals.

Params: every parameter a route runs is counted once (front stem and units, stitching layer weight and bias, back
units and head), so a plan's params equal the exported module's. The official v1 ``get_model_size`` leaves out
the front's PatchMerging layers of stages before the cut (74,496 params too few at stage 1, 370,944 at stage 2
for T→S); we do not copy that undercount.
"""

from __future__ import annotations

from typing import Any

from snexport.errors import IncompatibleAnchorsError
from snexport.records import AnchorSpec

name = "swin"
KIND = "Swin Transformer (timm SwinTransformer)"

ALIASES: dict[str, str] = {
    "swin_ti": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}


def aliases() -> dict[str, str]:
    return dict(ALIASES)


def claims(model: Any) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return type(model) is SwinTransformer


def check(model: Any, name: str) -> None:
    if not claims(model):
        raise IncompatibleAnchorsError(f"{name} is a {type(model).__name__}, not a timm SwinTransformer")
    if model.global_pool != "avg":
        raise IncompatibleAnchorsError(f"{name} cannot be stitched: unsupported global_pool={model.global_pool!r} "
                                       "(the head must average-pool the last stage)")
    if len(model.layers) < 2:
        raise IncompatibleAnchorsError(f"{name} has one stage; stage-wise stitching needs at least two")


def window_attention_flops(module: Any, inputs: tuple, output: Any) -> int:
    """q·kᵀ and attn·v of one WindowAttention call on (windows·B, N, C): N·N·C multiply-adds each."""
    windows, tokens, _ = inputs[0].shape
    dim = module.qkv.out_features // 3  # all heads together
    return 2 * windows * tokens * tokens * dim


def _flop_rules() -> dict:
    from timm.models.swin_transformer import WindowAttention

    return {WindowAttention: window_attention_flops}


def describe(name: str, timm_name: str, create_kwargs: dict, model: Any) -> AnchorSpec:
    from snexport.families.staged import describe_staged

    pieces = units(model)
    stage_of = [s for s, layer in enumerate(model.layers) for _ in layer.blocks]
    img = model.patch_embed.img_size
    in_chans = int(model.patch_embed.proj.in_channels)
    # The layout is whatever this timm produces: (B, H, W, C) in timm >= 0.9, (B, H·W, C) before.
    import torch

    probe = model.patch_embed(torch.empty(1, in_chans, int(img[0]), int(img[1]), device=_device(model)))
    layout = "nhwc" if probe.ndim == 4 else "tokens"
    num_stages = len(model.layers)
    blk0 = model.layers[0].blocks[0]
    return describe_staged(
        family=name_of_family(), name=name, timm_name=timm_name, create_kwargs=create_kwargs, model=model,
        stem=stem(model), units=pieces, unit_stage=tuple(stage_of), head=head(model),
        layouts=(layout,) * num_stages, stitch_stages=tuple(range(num_stages - 1)),
        input_shape=(in_chans, int(img[0]), int(img[1])),
        num_heads=int(blk0.attn.num_heads), mlp_ratio=blk0.mlp.fc1.out_features / blk0.mlp.fc1.in_features,
        extra_rules=_flop_rules(),
    )


def _device(model: Any):
    return next(model.parameters()).device


def name_of_family() -> str:
    return name


# ------------------------------------------------------------------------------------------ nn.Modules


def stem(model: Any):
    return model.patch_embed


def units(model: Any) -> list:
    """Every block in order; a stage's PatchMerging is folded into that stage's first block."""
    from torch import nn

    out = []
    for layer in model.layers:
        blocks = list(layer.blocks)
        if not isinstance(layer.downsample, nn.Identity):
            blocks[0] = nn.Sequential(layer.downsample, blocks[0])
        out.extend(blocks)
    return out


def head(model: Any):
    from torch import nn

    return nn.Sequential(model.norm, model.head)


def after_load(model: Any) -> None:
    """Recompute the buffers no checkpoint holds (relative-position index, shifted-window masks)."""
    from snexport.families.staged import restore_meta_buffers

    restore_meta_buffers(model)


def convert_checkpoint(state_dict: dict, model: Any) -> dict:
    """Official Swin checkpoints (PatchMerging at the end of a stage, ``head.weight``) -> timm's layout."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state_dict, model)
