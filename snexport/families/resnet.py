"""The ResNet family (timm ``ResNet``: resnet18/34/50/101 and their variants), stitched stage by stage.

Pieces: stem = conv1 + bn1 + act + maxpool (stride 4); units = the residual blocks of layer1..layer4 (stage s =
``layer{s+1}``); the stride-2 first block of a stage carries its own downsample shortcut, so nothing needs
folding: a route that stops after block j of stage s ran it, a route that resumes at block k >= 1 never runs the
back anchor's; head = global average pool + classifier. Features are NCHW. Stitched stages: the middle two
(official: layer2 and layer3; stitching layers ``Conv2d(C_front, C_back, 1)`` with bias).

FLOPs (``flops.count_flops``, fvcore's rules, eval mode): every convolution as Cout·(Cin/groups)·kh·kw per output
pixel (3x3, 1x1, the 7x7 stem and the downsample shortcuts; no bias), BatchNorm at 2 per element (the running
statistics make it one scale and one shift; fvcore counts 5 in train mode, the papers report eval), the global
average pool at 1 per input element, the classifier as C·classes; ReLU, max pooling and residual adds are free.
ResNet-18/50: 1,819,065,856 / 4,111,512,576 = the paper's 1.82/4.11 GFLOPs, exactly fvcore's totals.
Params: every parameter on the route, once.
"""

from __future__ import annotations

from typing import Any

from snexport.errors import IncompatibleAnchorsError
from snexport.records import AnchorSpec

name = "resnet"
KIND = "ResNet (timm ResNet)"

ALIASES: dict[str, str] = {n: n for n in ("resnet18", "resnet34", "resnet50", "resnet101")}
# SN-Net fine-tuning keeps BatchNorm's running statistics as the anchor learned them (scale and shift still train).
# In train mode every block's statistics average over all the routes that pass it (a back anchor's block sees the
# stitched features of every front), so each route is evaluated with statistics of none. Measured on demo_cnn
# (digits, 10 epochs): frozen statistics keep the anchors at 83.0/91.1/97.5% (train mode: 78.8/91.4/95.5%) and
# lift the stitches from 21-35% / 51-84% to 35-48% / 62-87% (S→M / M→L). The official code trains them.
FREEZE_NORM_STATS = True
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def aliases() -> dict[str, str]:
    return dict(ALIASES)


def claims(model: Any) -> bool:
    from timm.models.resnet import ResNet

    return type(model) is ResNet


def check(model: Any, name: str) -> None:
    if not claims(model):
        raise IncompatibleAnchorsError(f"{name} is a {type(model).__name__}, not a timm ResNet")
    if not model.global_pool.pool_type:
        raise IncompatibleAnchorsError(f"{name} cannot be stitched: it has no global pooling before its classifier")


def describe(name: str, timm_name: str, create_kwargs: dict, model: Any) -> AnchorSpec:
    from snexport.families.staged import describe_staged

    stage_of = [s for s, stage in enumerate(STAGE_NAMES) for _ in getattr(model, stage)]
    # timm's ResNet takes any input size; the one it is meant for is its pretrained config's (224² for ImageNet;
    # the demo family sets 32² through ``pretrained_cfg_overlay``).
    in_chans = int(next(m for m in model.modules() if hasattr(m, "in_channels")).in_channels)
    size = tuple(model.pretrained_cfg.get("input_size", (in_chans, 224, 224)))[-2:]
    return describe_staged(
        family=name_of_family(), name=name, timm_name=timm_name, create_kwargs=create_kwargs, model=model,
        stem=stem(model), units=units(model), unit_stage=tuple(stage_of), head=head(model),
        layouts=("nchw",) * len(STAGE_NAMES), stitch_stages=tuple(range(1, len(STAGE_NAMES) - 1)),
        input_shape=(in_chans, int(size[0]), int(size[1])),
    )


def name_of_family() -> str:
    return name


# ------------------------------------------------------------------------------------------ nn.Modules


def stem(model: Any):
    from torch import nn

    return nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)


def units(model: Any) -> list:
    return [block for stage in STAGE_NAMES for block in getattr(model, stage)]


def head(model: Any):
    from torch import nn

    # timm's forward_head: pool, dropout at drop_rate (train only), classifier.
    return nn.Sequential(model.global_pool, nn.Dropout(float(model.drop_rate)), model.fc)
