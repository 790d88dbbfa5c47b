"""What a family adapter provides to the rest of snexport (the seam new families plug into).

The stitching code sees an anchor as ``stem → units[0] … units[n-1] → head``: a flat list of *units* (a ViT
block; for families with stages, one block with any stage transition folded into the stage's first block), each
tagged with its stage. A stitch cuts the front anchor after unit ``cut`` and resumes the back anchor at unit
``resume`` of the same stage. The adapter states, per stage, the width and the feature layout at a unit's output
("tokens": (B, rows, C); "nhwc": (B, H, W, C); "nchw": (B, C, H, W); rows = H·W), so the stitching layer and its
least-squares init know their shapes, which stages its family stitches (``AnchorSpec.stitch_stages``), and it
prices every piece in the paper's FLOPs convention (``AnchorSpec`` carries the numbers, so plans need no torch).
Families with stages describe themselves through ``staged.describe_staged`` (a meta-device walk that counts
FLOPs layer by layer, ``flops.count_flops``).

Optional members, read with getattr:
- ``convert_checkpoint(state_dict, model) -> state_dict``: foreign checkpoint layouts to timm's;
- ``after_load(model)``: after weights are assigned into a meta-device build, recompute what no checkpoint holds
  (Swin's window masks and relative-position indices);
- ``FREEZE_NORM_STATS = True``: SN-Net fine-tuning keeps BatchNorm running statistics (ResNet; see resnet.py).
"""

from __future__ import annotations

from typing import Any, Protocol

from snexport.records import AnchorSpec


class Family(Protocol):
    name: str  # "vit", ...

    def aliases(self) -> dict[str, str]:
        """Short names -> timm names that this family owns."""

    def claims(self, model: Any) -> bool:
        """True when this adapter can route ``model`` (a timm module, possibly on the meta device)."""

    def check(self, model: Any, name: str) -> None:
        """Raise IncompatibleAnchorsError naming what cannot be stitched (unsupported pooling, ...)."""

    def describe(self, name: str, timm_name: str, create_kwargs: dict, model: Any) -> AnchorSpec:
        """Architecture facts and costs of ``model`` (weights are not read; meta-device modules are fine)."""

    def stem(self, model: Any) -> Any:
        """nn.Module: image → input of unit 0."""

    def units(self, model: Any) -> list:
        """The units, in order (nn.Modules that share no parameters with each other)."""

    def head(self, model: Any) -> Any:
        """nn.Module: output of the last unit → logits."""
