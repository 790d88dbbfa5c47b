"""The FLOPs convention of the SN-Net papers (fvcore 0.1.5 multiply-adds), shared by every family adapter.

The papers report ``fvcore.nn.FlopCountAnalysis(model, 1x3x224x224).total()`` in eval mode, i.e. one "FLOP" per
multiply-add. Its rules, per op, and so ours:
- convolution: one per weight per output pixel, Cout·(Cin/groups)·kh·kw·H_out·W_out; the bias is not counted;
- linear (and a 1x1 convolution): rows·C_in·C_out, bias not counted; matmul: prod(A)·B.shape[-1];
- LayerNorm: 5 per element (4 without affine); BatchNorm in eval: 2 per element (1 without affine) -- fvcore counts
  5 in train mode, but the published numbers come from eval;
- adaptive average pooling 2-D (ResNet's global pool): 1 per *input* element;
- not counted: softmax, GELU/ReLU, max pooling, ``mean`` (timm >= 0.9 Swin's NHWC pooling), residual/bias adds,
  multiplies (LayerScale, q·scale), pad/roll/reshape, and ``scaled_dot_product_attention``.
The last rule is a trap: timm >= 0.9 runs ViT attention through fused SDPA, which fvcore skips, so fvcore on a
stock timm DeiT-S says 4.251 GFLOPs. The papers measured explicit ``q @ kᵀ`` and ``attn @ v`` matmuls (4.608);
``vit.py`` counts them analytically (2·N²·C per block) and window attention below counts them too, whatever
attention kernel timm picks.

Plain ViTs are priced by closed formulas (``vit.py``: DeiT-Ti/S/B 1.258/4.608/17.583 GFLOPs). Families with stages
(``swin.py``, ``resnet.py``) are priced by ``count_flops``: one forward of a meta-device module (shapes only, no
arithmetic, no weights) with a hook per layer applying the rules above. That reproduces fvcore to the unit on
Swin-T/S/B (4,509,194,496 / 8,768,534,784 / 15,467,826,176) and ResNet-18/50 (1,819,065,856 / 4,111,512,576)
and works for any block layout, stride or padding a timm variant uses. Standard library only at import.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

LAYERNORM_FLOPS_PER_ELEMENT = 5
BATCHNORM_EVAL_FLOPS_PER_ELEMENT = 2  # fvcore: x·scale + shift with the running statistics folded in


def linear_flops(rows: int, width_in: int, width_out: int) -> int:
    """A linear layer (or 1x1 convolution) applied to ``rows`` tokens or pixels: one multiply-add per weight."""
    return rows * width_in * width_out


def stitching_layer_flops(rows: int, width_front: int, width_back: int) -> int:
    """Linear on tokens, 1x1 conv on pixels, or NCHW→tokens (a reshape, free, then linear): all rows·C_f·C_b."""
    return linear_flops(rows, width_front, width_back)


def stitching_layer_params(width_front: int, width_back: int) -> int:
    return width_front * width_back + width_back  # weight + bias


def to_gflops(flops: int) -> float:
    return flops / 1e9


# ------------------------------------------------------------------------------ counting a module's forward


def layer_flops(module: Any, inputs: tuple, output: Any) -> int:
    """FLOPs of one layer's own arithmetic in the fvcore convention (0 for layers fvcore does not count)."""
    from torch import nn

    x = inputs[0] if inputs else None
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return x.numel() * module.out_features  # = rows · C_in · C_out whatever the leading dims
    if isinstance(module, nn.LayerNorm):
        return (LAYERNORM_FLOPS_PER_ELEMENT if module.elementwise_affine else 4) * x.numel()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (BATCHNORM_EVAL_FLOPS_PER_ELEMENT if module.affine else 1) * x.numel()
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return x.numel()
    return 0


def count_flops(module: Any, x: Any, extra_rules: Optional[Mapping[type, Callable]] = None) -> tuple[int, Any]:
    """(FLOPs for a batch of ``x``, output) of ``module`` in eval mode, counted layer by layer.

    ``extra_rules`` maps a module class to ``rule(module, inputs, output) -> flops`` for arithmetic that happens
    in functional code inside it (Swin's window attention matmuls); the layers inside such a module are still
    counted by their own rules. Run it on the meta device: only shapes flow, so pricing Swin-B costs nothing.
    """
    import torch

    rules = dict(extra_rules or {})
    total = [0]

    def hook(m, inputs, output):
        rule = next((r for cls, r in rules.items() if isinstance(m, cls)), None)
        total[0] += rule(m, inputs, output) if rule is not None else layer_flops(m, inputs, output)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return total[0], out
