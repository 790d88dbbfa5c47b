"""Names to families: aliases, timm names and the bundled demo family, each resolved to its family adapter.

Real anchors come from timm by name with weights from timm's usual sources (Hugging Face hub cache) or a local
file; the bundled demo families (``demo``: three tiny ViTs, ``demo_cnn``: three tiny ResNets) are trained on
scikit-learn's digits, built through the same timm code path. Adding a family = one adapter module (see
``base.py``) + one entry in ``FAMILIES``.
torch and timm are imported inside functions so that ``snexport --help`` and plans of recorded models stay light.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from snexport.errors import IncompatibleAnchorsError, UnknownModelError
from snexport.families import demo, resnet, swin, vit
from snexport.families.weights import parse_weights_option  # noqa: F401  (re-exported for the CLI)
from snexport.records import AnchorSpec

# Every family adapter, tried in order when a model has to be claimed by its class.
FAMILIES: dict[str, ModuleType] = {vit.name: vit, swin.name: swin, resnet.name: resnet}

FAMILY_SHORTCUTS = {"demo": demo.DEMO_FAMILY, "demo_cnn": demo.DEMO_CNN_FAMILY,
                    "deit": ("deit_ti", "deit_s", "deit_b"), "deit3": ("deit3_s", "deit3_b", "deit3_l"),
                    "swin": ("swin_ti", "swin_s", "swin_b"), "resnet": ("resnet18", "resnet50")}


def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for family in FAMILIES.values():
        out.update(family.aliases())
    return out


def is_demo_family(names) -> bool:
    """True when every anchor is a bundled demo anchor (digits data, demo training recipe)."""
    return demo.is_demo_family(names)


def split_anchor_names(text: str | None) -> list[str]:
    """'deit_s,deit_b' -> ['deit_s', 'deit_b']; 'demo' (or nothing) -> the demo family."""
    if not text:
        return list(demo.DEMO_FAMILY)
    names: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        names.extend(FAMILY_SHORTCUTS.get(part, (part,)))
    return names


def resolve_name(name: str) -> tuple[str, dict]:
    """User name -> (timm name, extra create_model kwargs). Raises UnknownModelError with suggestions."""
    if name in demo.DEMO_KWARGS:
        return demo.timm_name(name), dict(demo.DEMO_KWARGS[name])
    aliases = _aliases()
    if name in aliases:
        return aliases[name], {}
    import timm

    base = name.split(".", 1)[0]  # timm names may carry a pretrained tag: vit_base_patch16_224.augreg_in21k
    if timm.is_model(base):
        return name, {}
    raise UnknownModelError.for_name(name, list(aliases) + list(demo.DEMO_KWARGS) + list(FAMILY_SHORTCUTS)
                                     + timm.list_models("*vit*") + timm.list_models("deit*")
                                     + timm.list_models("swin*") + timm.list_models("resnet*"))


def create_model(timm_name: str, kwargs: dict, pretrained: bool = False):
    import timm

    return timm.create_model(timm_name, pretrained=pretrained, **kwargs)


def claim(model: Any, name: str) -> ModuleType:
    """The family adapter that routes ``model``; refuses models no family can stitch."""
    for family in FAMILIES.values():
        if family.claims(model):
            family.check(model, name)
            return family
    kinds = " or ".join(f.KIND for f in FAMILIES.values())
    raise IncompatibleAnchorsError(
        f"{name} is a {type(model).__name__}, not a {kinds}; SN-Net stitching routes only these (distilled "
        "DeiTs, attention-pooled and other models cannot be stitched)"
    )


def family_of(spec: AnchorSpec) -> ModuleType:
    try:
        return FAMILIES[spec.family]
    except KeyError:
        raise IncompatibleAnchorsError(f"{spec.name} belongs to family '{spec.family}', which this snexport does "
                                       f"not know (families: {', '.join(FAMILIES)}); upgrade snexport") from None


@lru_cache(maxsize=64)
def _describe_cached(name: str) -> AnchorSpec:
    timm_name, kwargs = resolve_name(name)
    return describe_model(name, timm_name, kwargs)


def describe_model(name: str, timm_name: str, create_kwargs: dict) -> AnchorSpec:
    """Architecture facts of ``timm.create_model(timm_name, **create_kwargs)``, listed under ``name``.

    For architectures no name resolves to (tests' tiny Swins and ResNets, custom widths): the resulting spec
    builds, plans, trains and exports like any other, since every later stage rebuilds modules from the spec.
    """
    import torch

    # The meta device builds the module graph without allocating weights: plans for DeiT-B/ViT-L cost nothing.
    with torch.device("meta"):
        model = create_model(timm_name, create_kwargs)
    return claim(model, name).describe(name, timm_name, create_kwargs, model)


def describe_anchor(name: str, recorded: bool = True) -> AnchorSpec:
    """Architecture facts of one anchor: recorded ones for a known name (``known.json``: no torch or timm import,
    so ``snexport plan`` answers at once), else from a weightless (meta-device) build. ``recorded=False`` always
    builds (what the records are made from and tested against)."""
    spec = recorded_spec(name) if recorded else None
    return spec if spec is not None else _describe_cached(name)


# ---------------------------------------------------------------- recorded architecture facts of known names
# ``python -m snexport.families.record`` writes them from the meta-device path; tests/test_plan_fast.py checks
# that every record equals a fresh meta-device description. Records made for another AnchorSpec (a field added
# or removed since) are ignored as a whole: the meta device answers until they are regenerated.
KNOWN_FILE = Path(__file__).with_name("known.json")


def spec_to_record(spec: AnchorSpec) -> dict:
    """An AnchorSpec as JSON types; ``create_kwargs`` as a Python literal, since its tuples must stay tuples."""
    return dict(spec.to_dict(), create_kwargs=repr(spec.create_kwargs))


def spec_from_record(record: dict) -> AnchorSpec:
    return AnchorSpec.from_dict(dict(record, create_kwargs=ast.literal_eval(record["create_kwargs"])))


def record_fields() -> list[str]:
    return sorted(f.name for f in dataclasses.fields(AnchorSpec))


@lru_cache(maxsize=1)
def _records() -> dict[str, dict]:
    try:
        data = json.loads(KNOWN_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no records (or a damaged file): every name goes through the meta device
    if not isinstance(data, dict) or data.get("fields") != record_fields() or not isinstance(data.get("specs"), dict):
        return {}
    return data["specs"]


def recorded_names() -> list[str]:
    return sorted(_records())


@lru_cache(maxsize=128)
def recorded_spec(name: str) -> Optional[AnchorSpec]:
    """The recorded facts of ``name`` (alias, timm name or demo name), None when it has none."""
    record = _records().get(name)
    return spec_from_record(record) if record is not None else None


def describe_anchors(names: list[str]) -> list[AnchorSpec]:
    return [describe_anchor(n) for n in names]


def build_module(spec: AnchorSpec, device: Optional[str] = None):
    """The anchor's architecture as a module (weights uninitialised on the meta device when ``device='meta'``)."""
    import torch

    with torch.device(device or "cpu"):
        model = create_model(spec.timm_name, spec.create_kwargs)
    family_of(spec).check(model, spec.name)
    return model


def load_anchor(name: str, weights: Optional[Path] = None, random_init: bool = False, seed: int = 0):
    """Build one anchor in eval mode, with weights.

    Order: an explicit local file; else the demo cache (demo family) or timm's pretrained sources (hub cache);
    random weights only when asked for explicitly (architecture-only work: plans, latency, memory).
    """
    import torch

    from snexport.errors import WeightsError
    from snexport.families.weights import go_offline_if_hub_unreachable, load_state_into, read_state_dict

    spec = describe_anchor(name)
    family = family_of(spec)
    convert = getattr(family, "convert_checkpoint", None)
    if random_init:
        torch.manual_seed(seed)
        return build_module(spec).eval()
    if weights is not None:
        model = build_module(spec)
        load_state_into(model, read_state_dict(Path(weights)), name, str(weights), convert)
        return model.eval()
    if name in demo.DEMO_KWARGS:
        path = demo.demo_weights_path(name)
        model = build_module(spec)
        load_state_into(model, read_state_dict(path), name, f"demo cache {path}", convert)
        return model.eval()
    go_offline_if_hub_unreachable()
    try:
        model = create_model(spec.timm_name, spec.create_kwargs, pretrained=True)
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"no pretrained weights for {name} ({spec.timm_name}): not in the timm/Hugging Face cache and not "
            f"downloadable here ({first}); pass --weights {name}=PATH (.safetensors or .pth), or --random-init "
            "for architecture-only work"
        ) from None
    return model.eval()
