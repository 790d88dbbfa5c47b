"""Analytic FLOPs in the SN-Net paper's convention (fvcore-style multiply-adds).

Counted: multiply-adds of linear, matmul and conv layers, plus 5 per LayerNorm element. Not counted: softmax,
GELU, bias and residual adds (snnet-spec.md, "Evaluation"). With this convention DeiT-Ti/S/B come out at
1.258/4.608/17.583 GFLOPs, the figures the paper reports. Standard library only.
"""

from __future__ import annotations

LAYERNORM_FLOPS_PER_ELEMENT = 5


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> int:
    """One pre-norm ViT block: two LayerNorms, qkv, attention matmuls, projection, MLP."""
    n, c = tokens, width
    hidden = int(c * mlp_ratio)
    norms = 2 * LAYERNORM_FLOPS_PER_ELEMENT * n * c
    qkv = 3 * n * c * c
    attention = 2 * n * n * c  # q @ k^T and attn @ v
    proj = n * c * c
    mlp = 2 * n * c * hidden
    return norms + qkv + attention + proj + mlp


def patch_embed_flops(num_patches: int, width: int, patch_size: int, in_chans: int) -> int:
    return num_patches * width * in_chans * patch_size * patch_size


def head_flops(tokens: int, width: int, num_classes: int) -> int:
    """Final LayerNorm over all tokens, classifier on the pooled token only."""
    return LAYERNORM_FLOPS_PER_ELEMENT * tokens * width + width * num_classes


def stitching_layer_flops(tokens: int, width_front: int, width_back: int) -> int:
    return tokens * width_front * width_back


def stitching_layer_params(width_front: int, width_back: int) -> int:
    return width_front * width_back + width_back  # weight + bias


def to_gflops(flops: int) -> float:
    return flops / 1e9
