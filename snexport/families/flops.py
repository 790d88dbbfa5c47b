"""The FLOPs convention of the SN-Net papers (fvcore-style multiply-adds), shared by every family adapter.

Counted: multiply-adds of linear, matmul and conv layers, plus 5 per LayerNorm element. Not counted: softmax,
GELU, bias and residual adds (snnet-spec.md, "Evaluation"). Each family module applies these rules to its own
layers (``vit.py``: DeiT-Ti/S/B come out at 1.258/4.608/17.583 GFLOPs, the figures the paper reports).
Standard library only.
"""

from __future__ import annotations

LAYERNORM_FLOPS_PER_ELEMENT = 5


def linear_flops(rows: int, width_in: int, width_out: int) -> int:
    """A linear layer (or 1x1 convolution) applied to ``rows`` tokens or pixels: one multiply-add per weight."""
    return rows * width_in * width_out


def stitching_layer_flops(rows: int, width_front: int, width_back: int) -> int:
    return linear_flops(rows, width_front, width_back)


def stitching_layer_params(width_front: int, width_back: int) -> int:
    return width_front * width_back + width_back  # weight + bias


def to_gflops(flops: int) -> float:
    return flops / 1e9
