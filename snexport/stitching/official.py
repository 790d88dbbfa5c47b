"""Official SN-Net checkpoints (`snexport stitch --from-official PATH`): an SN-Net v1 DeiT or SN-Netv2 (DeiT /
DeiT-III) classification checkpoint, in the official code's state-dict layout, as a build directory.

What the official layouts hold (facts from the official code, /work/notes/snnet-official.md §3.7, §4):
- ``{'model': state_dict, ...}`` or the bare state dict; ``anchors.{i}.*`` with timm-0.6 ViT keys, anchors ordered
  from small to large. DeiT-III (``vit_models``) blocks carry LayerScale as ``gamma_1``/``gamma_2`` and a position
  embedding without the cls slot (1, 196, C); timm names those ``ls1.gamma``/``ls2.gamma``.
- v1 DeiT: ``stitch_layers.P.L.transform.{weight (C_back, C_front), bias}``: P = the anchor pair's position in
  ``combinations(range(n), 2)`` (without (0, 2) when nearest), L = the sliding-window layer (window 2, stride 1):
  L = max(0, max(j, k) - 1) for the stitch front[..j] -> back[k..]. Stitched routes skip the back's final norm.
- v2: ``stitch_layers.0.{i}.transform.*`` leave the small anchor (S→L layer i), ``stitch_layers.1.{m}.transform.*``
  leave the large one (L→S layer m), each optionally with ``lora_A (r, C_in)``/``lora_B (C_out, r)`` saved unmerged.
  ``stitch_layers.0.{d_s-1}`` (S run whole, then L's head) is built officially but never used; it is skipped here.
  Stitched routes apply the last anchor's final norm.
The plan picked: v1 → window 2, stride 1, nearest as the pairs present say, final norm off, the paper's params
count; v2 → two-way, LoRA rank from ``lora_A``. Anchors are recognised by width, depth and LayerScale.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from snexport.errors import WeightsError
from snexport.stitching.plan import PlanSettings, StitchPlan, plan_stitches

# (LayerScale present, width) -> anchor name; each candidate is checked against its description (depth, tokens).
_ANCHORS_BY_SHAPE = {
    (False, 192): "deit_ti", (False, 384): "deit_s", (False, 768): "deit_b",
    (True, 384): "deit3_s", (True, 768): "deit3_b", (True, 1024): "deit3_l",
    (False, 16): "demo_s", (False, 32): "demo_m", (False, 64): "demo_l",  # the bundled demo family (tests)
}
_LAYER_KEY = re.compile(r"^stitch_layers\.(\d+)\.(\d+)\.transform\.(weight|bias|lora_A|lora_B)$")


def read_official_state(path: Path) -> dict:
    """The checkpoint's model state dict (``{'model': ...}`` wrapper or bare), tensors only."""
    import argparse

    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--from-official {path}: no such file; pass the official .pth checkpoint")
    try:
        # weights_only: no arbitrary pickles; the official trainer also stores its argparse Namespace.
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"--from-official {path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); pass the official .pth file") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("stitch_layers.") for k in state):
        raise WeightsError(f"--from-official {path} holds no SN-Net state dict (no 'model' with anchors.* and "
                           "stitch_layers.* keys); pass an official SN-Net v1 DeiT or SN-Netv2 checkpoint")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _anchor_states(state: dict) -> list[dict]:
    by_index: dict[int, dict] = {}
    for key, value in state.items():
        m = re.match(r"^anchors\.(\d+)\.(.+)$", key)
        if m:
            by_index.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if sorted(by_index) != list(range(len(by_index))) or len(by_index) < 2:
        raise WeightsError(f"official checkpoint: expected anchors.0.*, anchors.1.*, ...; found anchor indices "
                           f"{sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


def _layer_states(state: dict) -> dict[tuple[int, int], dict]:
    layers: dict[tuple[int, int], dict] = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(key)
        if m:
            layers.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = value
    return layers


def recognise_anchor(sd: dict, index: int) -> str:
    """The anchor name of one official anchor state dict (by width, depth and LayerScale), checked."""
    from snexport.families.registry import describe_anchor

    if "patch_embed.proj.weight" not in sd or "head.weight" not in sd:
        raise WeightsError(f"official checkpoint: anchors.{index} is not a ViT (no patch_embed.proj / head)")
    width = int(sd["patch_embed.proj.weight"].shape[0])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    layer_scale = any(k.endswith(".gamma_1") for k in sd)
    name = _ANCHORS_BY_SHAPE.get((layer_scale, width))
    kind = "DeiT-III" if layer_scale else "DeiT"
    if name is None:
        raise WeightsError(f"official checkpoint: anchors.{index} ({kind}, width {width}, {depth} blocks) is not a "
                           f"known anchor ({', '.join(sorted(set(_ANCHORS_BY_SHAPE.values())))})")
    spec = describe_anchor(name)
    classes = int(sd["head.weight"].shape[0])
    if (spec.depth, spec.width, spec.num_classes) != (depth, width, classes):
        raise WeightsError(f"official checkpoint: anchors.{index} has {depth} blocks, width {width}, {classes} "
                           f"classes; {name} has {spec.depth}, {spec.width}, {spec.num_classes}")
    return name


def anchor_state_for_timm(sd: dict) -> dict:
    """Official anchor keys -> timm's: DeiT-III's ``gamma_1``/``gamma_2`` are ``ls1.gamma``/``ls2.gamma``."""
    out = {}
    for key, value in sd.items():
        key = re.sub(r"\.gamma_1$", ".ls1.gamma", key)
        key = re.sub(r"\.gamma_2$", ".ls2.gamma", key)
        out[key] = value
    return out


def official_plan(state: dict) -> tuple[StitchPlan, list[str], str]:
    """(plan, anchor names in official order, "SN-Net" or "SN-Netv2") of an official state dict."""
    from snexport.families.registry import describe_anchors

    anchors = _anchor_states(state)
    names = [recognise_anchor(sd, i) for i, sd in enumerate(anchors)]
    layers = _layer_states(state)
    widths = [int(sd["patch_embed.proj.weight"].shape[0]) for sd in anchors]
    # v2 has layers leaving the large anchor (stitch_layers.1 maps C_l -> C_s); v1 only maps small -> large.
    two_way = len(anchors) == 2 and any(p == 1 and tuple(t["weight"].shape) == (widths[0], widths[1])
                                        for (p, _), t in layers.items() if "weight" in t)
    if two_way:
        ranks = {int(t["lora_A"].shape[0]) for t in layers.values() if "lora_A" in t}
        if len(ranks) > 1:
            raise WeightsError(f"official checkpoint: stitching layers of different LoRA ranks {sorted(ranks)}")
        settings = PlanSettings(two_way=True, lora_rank=ranks.pop() if ranks else 0)
        method = "SN-Netv2"
    else:
        pairs = sorted({p for p, _ in layers})
        nearest = len(pairs) == len(anchors) - 1
        if any("lora_A" in t for t in layers.values()):
            raise WeightsError("official checkpoint: LoRA factors on an SN-Net v1 layout; not an official layout")
        # v1 DeiT: window 2, stride 1; stitched routes skip the final norm; the paper's params count.
        settings = PlanSettings(nearest=nearest, final_norm=False, params="paper")
        method = "SN-Net"
    plan = plan_stitches(describe_anchors(names), settings)
    if [a.name for a in plan.anchors] != names:
        raise WeightsError(f"official checkpoint: anchors {names} are not ordered from small to large as the "
                           "official code orders them")
    return plan, names, method


def official_layer_keys(plan: StitchPlan) -> dict[tuple[str, str, int], tuple[int, int]]:
    """Our stitching layer (front, back, layer) -> the official (P, L) holding its weights."""
    names = [a.name for a in plan.anchors]
    index = {n: i for i, n in enumerate(names)}
    out: dict[tuple[str, str, int], tuple[int, int]] = {}
    if plan.settings.two_way:
        small = names[0]
        for front, back, layer in plan.layer_keys:
            out[(front, back, layer)] = (0 if front == small else 1, layer)
        return out
    import itertools

    combos = list(itertools.combinations(range(len(names)), 2))
    if plan.settings.nearest:
        combos = [c for c in combos if c[1] == c[0] + 1]
    position = {c: p for p, c in enumerate(combos)}
    for s in plan.stitch_only:
        if s.is_multi_hop:
            continue  # three-anchor routes reuse the one-hop layers
        key = (s.front, s.back, s.layer)
        official = (position[(index[s.front], index[s.back])], max(0, max(s.cut, s.resume) - 1))
        if out.setdefault(key, official) != official:
            raise WeightsError(f"official checkpoint: layer {key} would need two official layers "
                               f"({out[key]}, {official}); only window 2, stride 1 plans have the official layout")
    return out


def load_official(path: Path):
    """(SNNet with the checkpoint's weights, in eval mode, method)."""
    import torch

    from snexport.families.registry import build_module
    from snexport.stitching.snnet import SNNet

    state = read_official_state(path)
    plan, names, method = official_plan(state)
    anchors = []
    for i, (spec, sd) in enumerate(zip(plan.anchors, _anchor_states(state))):
        model = build_module(spec)
        result = model.load_state_dict(anchor_state_for_timm(sd), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(f"official checkpoint: anchors.{i} does not fit {spec.name}: missing "
                               f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
        anchors.append(model.eval())
    net = SNNet(plan, anchors)
    layers = _layer_states(state)
    with torch.no_grad():
        for (front, back, layer), (p, l) in official_layer_keys(plan).items():
            tensors = layers.get((p, l))
            if tensors is None:
                raise WeightsError(f"official checkpoint: stitch_layers.{p}.{l} is missing ({front}->{back} layer "
                                   f"{layer})")
            module = net.stitch_layers[net._key(front, back, layer)]
            for name, value in tensors.items():
                target = getattr(module, name, None)
                if target is None or tuple(target.shape) != tuple(value.shape):
                    raise WeightsError(f"official checkpoint: stitch_layers.{p}.{l}.transform.{name} "
                                       f"{tuple(value.shape)} does not fit {front}->{back} layer {layer}")
                target.copy_(value)
    return net.eval(), method


def official_stage(out: str | Path, path: Path, data: Optional[str] = None, force: bool = False):
    """`snexport stitch --from-official`: a build directory holding the official checkpoint's SN-Net."""
    from snexport.hashing import sha256_file
    from snexport.stitching.stage import prepare_build_dir, save_build

    path = Path(path).resolve()
    net, method = load_official(path)
    plan = net.plan
    build = prepare_build_dir(out, plan, force)
    inputs = {"official": f"file:{path}:{sha256_file(path)[:16]}", "data": data}
    info = {"inputs": inputs, "random_init": False, "data": data, "trained_epochs": 0,
            "ls_init": {"layers": plan.num_layers, "calibration_images": 0, "source": f"official {method} checkpoint",
                        "total_seconds": 0.0, "collect_seconds": 0.0, "solve_seconds": 0.0}}
    save_build(build, plan, net, info)
    return build, {"configurations": len(plan.stitches), "method": method, "anchors": [a.name for a in plan.anchors],
                   "final_norm": plan.settings.final_norm, "layers": plan.num_layers}
