"""The ViT stem and head as standalone nn.Modules over a timm VisionTransformer's own submodules (static size)."""

from __future__ import annotations

import torch
from torch import nn


class ViTEmbedding(nn.Module):
    """Patch embedding + cls/register tokens + position embedding of a timm VisionTransformer (static size)."""

    def __init__(self, vit):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.no_embed_class = bool(vit.no_embed_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is not None and self.no_embed_class:
            x = x + self.pos_embed  # DeiT-III style: position embedding only on patch tokens
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if self.pos_embed is not None and not self.no_embed_class:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)


class ViTHead(nn.Module):
    """Final norm, pooling (cls token or mean of patch tokens), fc_norm and classifier.

    ``final_norm=False`` leaves the final norm out: how SN-Net v1's DeiT code ends a stitched route (its
    ``forward_head`` pools and classifies without ``norm``), needed to reproduce its checkpoints.
    """

    def __init__(self, vit, final_norm: bool = True):
        super().__init__()
        self.norm = vit.norm if final_norm else nn.Identity()
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = vit.head
        self.global_pool = vit.global_pool
        self.num_prefix_tokens = int(vit.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            x = x[:, 0]
        return self.head(self.head_drop(self.fc_norm(x)))
