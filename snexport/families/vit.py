"""The plain ViT family (timm ``VisionTransformer``: DeiT, DeiT-III, ViT), one token sequence through equal blocks.

Units are the transformer blocks (one stage, stitchable everywhere, the sliding-window enumeration of the spec).
Stem = patch embedding + cls/register tokens + position embedding; head = final norm + pooling + fc_norm + fc.
FLOPs follow the paper's convention (``flops.py``): for N tokens, width C, MLP ratio r, one block is
10·N·C (two LayerNorms) + 3·N·C² (qkv) + 2·N²·C (attention matmuls) + N·C² (proj) + 2·r·N·C² (MLP).
Importing this module loads no torch; the nn.Modules are built inside functions.
"""

from __future__ import annotations

from typing import Any

from snexport.errors import IncompatibleAnchorsError
from snexport.families import flops
from snexport.records import AnchorSpec

name = "vit"
KIND = "plain ViT (timm VisionTransformer)"  # what the refusal message says this family takes

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


def aliases() -> dict[str, str]:
    return dict(ALIASES)


def claims(model: Any) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return type(model) is VisionTransformer


def check(model: Any, name: str) -> None:
    """Refuse what the stitching code cannot route: anything but timm's plain VisionTransformer."""
    if not claims(model):
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


# ------------------------------------------------------------------------------------------------- costs


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> int:
    """One pre-norm ViT block: two LayerNorms, qkv, attention matmuls, projection, MLP."""
    n, c = tokens, width
    hidden = int(c * mlp_ratio)
    norms = 2 * flops.LAYERNORM_FLOPS_PER_ELEMENT * n * c
    qkv = 3 * n * c * c
    attention = 2 * n * n * c  # q @ k^T and attn @ v
    proj = n * c * c
    mlp = 2 * n * c * hidden
    return norms + qkv + attention + proj + mlp


def patch_embed_flops(num_patches: int, width: int, patch_size: int, in_chans: int) -> int:
    return num_patches * width * in_chans * patch_size * patch_size


def head_flops(tokens: int, width: int, num_classes: int) -> int:
    """Final LayerNorm over all tokens, classifier on the pooled token only."""
    return flops.LAYERNORM_FLOPS_PER_ELEMENT * tokens * width + width * num_classes


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(name: str, timm_name: str, create_kwargs: dict, model: Any) -> AnchorSpec:
    embed = _count(model.patch_embed) + sum(
        t.numel() for t in (model.cls_token, model.reg_token, model.pos_embed) if t is not None
    )
    block = _count(model.blocks[0])
    head = _count(model.norm) + _count(model.fc_norm) + _count(model.head)
    blk0 = model.blocks[0]
    width = int(model.embed_dim)
    mlp_ratio = blk0.mlp.fc1.out_features / width
    grid = model.patch_embed.grid_size
    img = model.patch_embed.img_size
    patch = int(model.patch_embed.patch_size[0])
    in_chans = int(model.patch_embed.proj.in_channels)
    num_classes = int(model.num_classes)
    prefix = int(model.num_prefix_tokens)
    tokens = prefix + grid[0] * grid[1]
    depth = len(model.blocks)
    stem_f = patch_embed_flops(tokens - prefix, width, patch, in_chans)
    unit_f = block_flops(tokens, width, mlp_ratio)
    head_f = head_flops(tokens, width, num_classes)
    return AnchorSpec(
        name=name,
        timm_name=timm_name,
        create_kwargs=create_kwargs,
        depth=depth,
        width=width,
        num_heads=int(blk0.attn.num_heads),
        mlp_ratio=mlp_ratio,
        patch_size=patch,
        img_size=(int(img[0]), int(img[1])),
        in_chans=in_chans,
        num_classes=num_classes,
        num_prefix_tokens=prefix,
        num_tokens=tokens,
        embed_params=embed,
        block_params=block,
        head_params=head,
        gflops=round(flops.to_gflops(stem_f + depth * unit_f + head_f), 6),
        params=_count(model),
        family=name_of_family(),
        stem_flops=stem_f,
        unit_flops=(unit_f,) * depth,
        unit_params=(block,) * depth,
        unit_stage=(0,) * depth,
        stage_widths=(width,),
        stage_rows=(tokens,),
        stage_layout=("tokens",),
        head_flops=head_f,
        stitch_stages=(0,),
    )


def name_of_family() -> str:
    return name


# ------------------------------------------------------------------------------------------ nn.Modules


def stem(model: Any):
    return _modules().ViTEmbedding(model)


def units(model: Any) -> list:
    return list(model.blocks)


def head(model: Any, final_norm: bool = True):
    """Final norm (unless ``final_norm`` is off: SN-Net v1 DeiT stitched routes), pooling, classifier."""
    return _modules().ViTHead(model, final_norm=final_norm)


def _modules():
    from snexport.families import vit_modules

    return vit_modules


def convert_checkpoint(state_dict: dict, model: Any) -> dict:
    """Original DeiT / JAX checkpoint layouts -> timm's (a no-op for timm-format files)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state_dict, model)
