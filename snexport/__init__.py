"""snexport: Stitchable Neural Networks from pretrained ViT families to a profiled set of deployable engines.

The public API is imported lazily (PEP 562) so `import snexport` and `snexport --help` stay free of torch/timm.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_anchor": "snexport.families.registry",
    "describe_anchor": "snexport.families.registry",
    "plan_stitches": "snexport.stitching.plan",
    "PlanSettings": "snexport.stitching.plan",
    "SNNet": "snexport.stitching.snnet",
    "BuildDir": "snexport.stitching.store",
    "SnexportError": "snexport.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'snexport' has no attribute {name!r}")
