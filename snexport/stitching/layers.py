"""The stitching layer and its least-squares initialisation (snnet-spec.md, "Stitching layer").

A stitching layer maps the front anchor's features at the cut to the back anchor's width at the same position,
one pixel or token at a time: a 1x1 map with bias, no norm, no activation. Its module follows the layouts:
- tokens → tokens (ViT, Swin (B, H, W, C) maps): ``nn.Linear(C_front, C_back)`` on the last dimension;
- NCHW → NCHW (CNN → CNN, official ResNet-18→50): ``nn.Conv2d(C_front, C_back, 1)``;
- NCHW → tokens or (B, H, W, C) (CNN → Swin, official ResNet-18→Swin-T): ``ChannelsLastLinear``, which moves the
  channels last at the same H×W (and flattens to (B, H·W, C) for a token sequence), then applies the linear map.
  The official code applies the 1x1 conv first and flattens after; both compute the same, with the same FLOPs.
It starts from the least-squares map between the two anchors' features on a small calibration set (100 images
by default), rows = images × pixels (or tokens), solved with the Moore-Penrose pseudo-inverse, so stitches work
before any training.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelsLastLinear(nn.Linear):
    """A linear stitching layer between feature layouts: (B, C, H, W) or (B, H, W, C) in, the back's layout out.

    Subclasses nn.Linear so its parameters are ``weight`` (C_back, C_front) and ``bias``, like every other layer.
    """

    def __init__(self, width_front: int, width_back: int, layout_front: str, layout_back: str):
        super().__init__(width_front, width_back, bias=True)
        self.layout_front = layout_front
        self.layout_back = layout_back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout_front == "nchw":
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = super().forward(x)
        if self.layout_back == "tokens":
            return x.flatten(1, 2)
        if self.layout_back == "nchw":
            return x.permute(0, 3, 1, 2)
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.layout_front}->{self.layout_back}"


def make_stitching_layer(width_front: int, width_back: int, layout_front: str = "tokens",
                         layout_back: str = "tokens") -> nn.Module:
    """The stitching layer between two feature layouts ("tokens", "nhwc" or "nchw"; see the module docstring)."""
    if layout_front == "tokens" and layout_back != "tokens":
        raise ValueError(f"a token sequence has no spatial shape to feed a {layout_back} feature map")
    if layout_front == layout_back == "nchw":
        return nn.Conv2d(width_front, width_back, kernel_size=1, bias=True)
    if layout_front == layout_back:
        return nn.Linear(width_front, width_back, bias=True)
    return ChannelsLastLinear(width_front, width_back, layout_front, layout_back)


def feature_rows(x: torch.Tensor, layout: str = "tokens") -> torch.Tensor:
    """Features as (images × pixels or tokens, C), channels last, in the same pixel order for every layout."""
    if layout == "nchw":
        x = x.permute(0, 2, 3, 1)
    return x.reshape(-1, x.shape[-1])


def pinv_with_bias(x: torch.Tensor, layout: str = "tokens") -> torch.Tensor:
    """pinv([X, 1]) for X as (rows, C): computed once per front cut and reused for every target.

    Solved in float64, with the cutoff of the official code's float32 ``torch.linalg.pinv``: singular values below
    max(rows, C+1)·eps(float32)·σ_max are dropped. Without it, near-dead channels (ReLU features of a CNN stage)
    get weights in the hundreds, which fit the calibration set no better and lose the stitch in FP16.
    """
    x64 = feature_rows(x, layout).to(torch.float64)
    ones = torch.ones(x64.shape[0], 1, dtype=torch.float64)
    a = torch.cat([x64, ones], dim=1)
    return torch.linalg.pinv(a, rtol=max(a.shape) * torch.finfo(torch.float32).eps)


def least_squares_solution(x_pinv: torch.Tensor, y: torch.Tensor,
                           layout: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min ||[X, 1] M - Y|| given pinv([X, 1]); returns (weight (C_b, C_f), bias (C_b,))."""
    y64 = feature_rows(y, layout).to(torch.float64)
    m = x_pinv @ y64  # (C_f + 1, C_b)
    return m[:-1].T.contiguous(), m[-1].contiguous()


@torch.no_grad()
def assign_mean_solution(layer: nn.Module, solutions: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A layer shared by several (j, k) pairs gets the mean of their solutions (weights and biases).

    A 1x1 convolution takes the (C_b, C_f) weight as (C_b, C_f, 1, 1).
    """
    weight = torch.stack([w for w, _ in solutions]).mean(0)
    bias = torch.stack([b for _, b in solutions]).mean(0)
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
    layer.bias.copy_(bias.to(layer.bias.dtype))
