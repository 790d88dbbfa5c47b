"""The stitching layer and its least-squares initialisation (snnet-spec.md, "Stitching layer").

A stitching layer is a Linear(C_front, C_back) with bias applied to every token (the paper's 1x1 conv); no norm,
no activation. It starts from the least-squares map between the two anchors' activations on a small calibration
set, solved with the Moore-Penrose pseudo-inverse, so stitches work before any training.
"""

from __future__ import annotations

import torch
from torch import nn


def make_stitching_layer(width_front: int, width_back: int) -> nn.Linear:
    return nn.Linear(width_front, width_back, bias=True)


def pinv_with_bias(x: torch.Tensor) -> torch.Tensor:
    """pinv([X, 1]) for X of shape (rows, C): computed once per front block and reused for every target."""
    x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    ones = torch.ones(x64.shape[0], 1, dtype=torch.float64)
    return torch.linalg.pinv(torch.cat([x64, ones], dim=1))


def least_squares_solution(x_pinv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min ||[X, 1] M - Y|| given pinv([X, 1]); returns (weight (C_b, C_f), bias (C_b,))."""
    y64 = y.reshape(-1, y.shape[-1]).to(torch.float64)
    m = x_pinv @ y64  # (C_f + 1, C_b)
    return m[:-1].T.contiguous(), m[-1].contiguous()


@torch.no_grad()
def assign_mean_solution(layer: nn.Linear, solutions: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A layer shared by several (j, k) pairs gets the mean of their solutions (weights and biases)."""
    weight = torch.stack([w for w, _ in solutions]).mean(0)
    bias = torch.stack([b for _, b in solutions]).mean(0)
    layer.weight.copy_(weight.to(layer.weight.dtype))
    layer.bias.copy_(bias.to(layer.bias.dtype))
