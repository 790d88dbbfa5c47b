"""The learning-rate schedule shared by the demo anchors' pre-training (stage 0) and SN-Net fine-tuning (stage 2).

It lives in stage 0 because anchors are trained first; the training stage imports it from here.
"""

from __future__ import annotations

import math


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """Linear warm-up then cosine decay to min_ratio of the base learning rate, stepped per batch."""
    import torch

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
