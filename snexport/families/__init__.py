"""Stage 0, the anchor families: what a model of each family looks like to the stitching code.

``registry`` resolves names (aliases, timm names, the demo family) to a family adapter and is the front door:
``describe_anchor`` (architecture facts without weights), ``load_anchor`` (a model with weights). One module per
family (``vit``, ``swin``, ``resnet``; ``staged`` holds what the families with stages share) states its blocks,
stages, widths and feature shapes, how to run stem / blocks / head, and how to count FLOPs and params in the
paper's convention (``flops``). Standard library only at import; torch and timm load inside functions.
"""

from snexport.families.registry import (  # noqa: F401  (the stage's public API)
    describe_anchor,
    describe_anchors,
    describe_model,
    family_of,
    is_demo_family,
    load_anchor,
    parse_weights_option,
    resolve_name,
    split_anchor_names,
)
