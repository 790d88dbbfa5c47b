"""Frozen records passed between stages and stored in the build directory.

Standard library only: the plan and manifest code, and tools that only read a build directory, must not pull in
torch. Every record round-trips through ``to_dict``/``from_dict`` (plain JSON types).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for f in dataclasses.fields(cls):
            # JSON has no tuples; restore them where the field declares one.
            if f.name in kwargs and isinstance(kwargs[f.name], list) and "tuple" in str(f.type):
                kwargs[f.name] = tuple(kwargs[f.name])
        return cls(**kwargs)


@dataclass(frozen=True)
class AnchorSpec(_Record):
    """Architecture of one anchor, read from a meta-device build of the timm model (no weights)."""

    name: str  # what the user typed (alias or timm name); used in stitch ids
    timm_name: str  # name passed to timm.create_model
    create_kwargs: dict  # extra timm.create_model kwargs (the demo family sets widths, image size, ...)
    depth: int
    width: int  # embed_dim
    num_heads: int
    mlp_ratio: float
    patch_size: int
    img_size: tuple  # (H, W)
    in_chans: int
    num_classes: int
    num_prefix_tokens: int  # cls (+ register) tokens in front of the patch tokens
    num_tokens: int  # prefix + patches: the sequence length every block sees
    embed_params: int  # patch embedding + cls/reg tokens + position embedding
    block_params: int  # one transformer block (all blocks of a plain ViT are equal)
    head_params: int  # final norm + fc_norm + classifier
    gflops: float  # whole anchor, paper convention (see flops.py)
    params: int  # whole anchor
    pretrained_tag: str = ""  # timm pretrained tag / weight source note, informational
    # Family-agnostic view for the stitching code (snexport.families.base): stem -> units -> head, costs in the
    # paper's FLOPs convention, so plans and their costs need no torch.
    family: str = "vit"
    stem_flops: int = 0
    unit_flops: tuple = ()  # per unit (a ViT block; a block of a stage, with its stage transition folded in)
    unit_params: tuple = ()
    unit_stage: tuple = ()  # stage index of each unit
    stage_widths: tuple = ()  # channels at a unit's output, per stage
    stage_rows: tuple = ()  # tokens (or H*W pixels) per image at a unit's output, per stage
    # Per stage: "tokens" (B, rows, C), "nhwc" (B, H, W, C: timm >= 0.9 Swin) or "nchw" (B, C, H, W: CNNs)
    stage_layout: tuple = ()
    head_flops: int = 0
    # Stages stitched within (the official SN-Net choice per family: Swin 0-2, ResNet 1-2); () = every stage.
    # A single-stage family (plain ViT) is stitched by the sliding-window rule, a staged one stage by stage.
    stitch_stages: tuple = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.img_size[0], self.img_size[1])


@dataclass(frozen=True)
class Stitch(_Record):
    """One configuration of the SN-Net: an anchor on its own, front[0..cut] -> layer -> back[resume..], or a
    route of several hops joined by stitching layers (``hops``/``layers``)."""

    id: str  # stable and readable: "deit_s:3>deit_b:4", or the anchor name for an anchor
    front: str  # anchor name
    back: str  # anchor name (== front for an anchor)
    cut: Optional[int]  # j: last front unit run (inclusive, flat index); None for an anchor
    resume: Optional[int]  # k: first back unit run (flat index); None for an anchor
    layer: Optional[int]  # stitching-layer index within its (front, back) pair; None for an anchor
    blocks: int  # units (transformer / residual blocks) on the path
    gflops: float
    params: int
    # Stage the stitch cuts (0 for a plain ViT), None for an anchor. cut/resume are flat unit indices over all
    # stages (AnchorSpec.unit_stage says which stage a unit belongs to); both lie in this stage.
    stage: Optional[int] = None
    # The whole route as hops (anchor, first unit, last unit), joined by stitching layers: layers[i] (index within
    # the (hops[i] anchor, hops[i+1] anchor) pair) sits between hop i and hop i+1. Plans since SN-Netv2 support
    # fill both for every stitch; () in older plans, where the route is front[0..cut] -> layer -> back[resume..].
    # A route of three or more hops (SN-Netv2 round trips, v1 Ti→S→B) keeps front/cut (its first hop) and
    # back/resume (its last hop), and layer = layers[0]; the hops are what runs.
    hops: tuple = ()
    layers: tuple = ()
    # Both parameter conventions (``params`` holds the one the plan's settings name): every parameter the
    # exported module holds ("module"), and the official SN-Net count ("paper": the front's patch embedding
    # without cls/position tokens, the back's final norm counted even where the route skips it). None: not
    # recorded (older plans; families without a published convention).
    params_module: Optional[int] = None
    params_paper: Optional[int] = None

    @property
    def is_anchor(self) -> bool:
        return self.cut is None

    @property
    def route(self) -> tuple:
        """((anchor, first unit, last unit), ...) of the path; for a plan without hops, from front/cut/back/resume
        (the back's last unit is unknown to a Stitch there: None, meaning "to the end")."""
        if self.hops:
            return tuple((str(a), int(f), int(l)) for a, f, l in self.hops)
        if self.is_anchor:
            return ((self.front, 0, None),)
        return ((self.front, 0, self.cut), (self.back, self.resume, None))

    @property
    def junction_layers(self) -> tuple:
        """Stitching-layer index per junction (one per hop boundary)."""
        if self.layers:
            return tuple(int(x) for x in self.layers)
        return () if self.is_anchor else (self.layer,)

    @property
    def is_multi_hop(self) -> bool:
        """Three or more hops: a round trip (SN-Netv2) or a three-anchor route (SN-Net v1 without nearest)."""
        return len(self.hops) > 2


@dataclass(frozen=True)
class EvalResult(_Record):
    stitch_id: str
    top1: Optional[float]  # percent; None when accuracy is unknown (random-init anchors)
    gflops: float
    params: int
    samples: int  # images evaluated (0 when top1 is None)
    dataset: str  # e.g. "digits:val" or an ImageFolder path
    weights_hash: str  # hash of the SN-Net weights that were evaluated; stale lines are redone
    # "fp32": the PyTorch model (the evaluate stage). Otherwise the top-1 of that precision's exported file, measured
    # with ONNX Runtime at export time (int8: snexport.export.int8), identified by the file's sha256.
    precision: str = "fp32"
    engine_sha256: str = ""


@dataclass(frozen=True)
class Artifact(_Record):
    """One exported, validated file of one stitch (an ONNX model or a TensorRT engine)."""

    stitch_id: str
    file: str  # relative to the build directory
    format: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "int8"
    size_bytes: int
    sha256: str
    input_name: str
    input_shape: tuple
    input_dtype: str
    output_name: str
    output_shape: tuple
    opset: Optional[int] = None
    exporter: str = ""  # e.g. "torch.onnx dynamo 2.15.0" or "torch.onnx torchscript 2.15.0"
    simplifier: str = ""  # e.g. "onnxsim 0.8.1" or "none"
    versions: dict = field(default_factory=dict)  # library versions that produced it (tensorrt, GPU name, ...)
    validation: dict = field(default_factory=dict)  # max_abs, rel_max_abs, cosine, top1_agreement, samples
    weights_file: str = ""  # shared external-data file (engine packs), relative to the build dir
    weights_sha256: str = ""
    source_sha256: str = ""  # the file this one was made from: the FP32 ONNX of an FP16 cast, the ONNX of a
    # TensorRT engine, the standalone ONNX of a packed one (snexport.export.pack)
    weights_size_bytes: Optional[int] = None  # size of weights_file (the manifest's weights_size_bytes)
    weights_used_bytes: Optional[int] = None  # distinct bytes of weights_file this engine references
    # FP32 PyTorch outputs shipped with the engine (inputs, logits: .npy files and their sha256), so an engine
    # built on the device is validated there without torch: {"inputs", "inputs_sha256", "logits", "logits_sha256"},
    # and for an FP32 file its own ONNX Runtime outputs on those inputs ("onnx_logits", "onnx_logits_sha256")
    reference: dict = field(default_factory=dict)
