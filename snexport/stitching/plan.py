"""Which stitches exist: the enumeration rules of snnet-spec.md, over architecture facts only.

Two rule sets, as in the official code:
- plain ViTs (one stage of equal blocks, SN-Net v1 DeiT): sliding windows over equal depths (all ordered pairs in
  a window, one shared layer per window), nearest interpolation with one layer per pair over unequal depths;
- anchors with stages (Swin, ResNet, ResNet→Swin; official ``stitching_swin`` / ``stitching_resnet_swin``): stitch
  only within a stage, between the same stage of two neighbouring anchors, in the stages both families stitch
  (``AnchorSpec.stitch_stages``) where the feature maps have the same size. Equal stage depths: the sliding-window
  pairs with j < k only (window 2, stride 1: (m, m+1), m = 0..d-2, a layer each). Unequal depths: back block i maps
  to front block floor(i·d_f/d_b) and (map, i) is emitted when map < i; the n-th emitted pair uses layer
  floor(n·d_f/d_b) -- the official code zips the pair list with the mapping list, so e.g. Swin-T→S stage 2 pair
  (1, 3) shares layer 0 with (0, 1) and (0, 2). Counts: Swin-T/S/B 41, ResNet-18/50 10, ResNet-18→Swin-T 8.
Stitching-layer indices are numbered per anchor pair over all its stages, in order of first use.

Standard library only, so `snexport plan` answers without torch and without weights. The SN-Net, the export and
the manifest all take stitch ids and routes from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Optional

from snexport.families import flops
from snexport.errors import IncompatibleAnchorsError, SettingsError, UnknownStitchError
from snexport.records import AnchorSpec, Stitch


@dataclass(frozen=True)
class PlanSettings:
    window: int = 2  # k_win: sliding-window size for equal-depth anchor pairs
    stride: int = 1  # s: sliding-window stride
    nearest: bool = True  # stitch only anchors adjacent in size (Ti→S, S→B; not Ti→B)
    two_way: bool = False  # also Slow-to-Fast stitches (SN-Netv2's two-way stitching)

    def to_dict(self) -> dict:
        return {"window": self.window, "stride": self.stride, "nearest": self.nearest, "two_way": self.two_way}

    @classmethod
    def from_dict(cls, data: dict) -> "PlanSettings":
        return cls(**{k: data[k] for k in ("window", "stride", "nearest", "two_way") if k in data})


def paired_pairs(depth: int, window: int = 2, stride: int = 1) -> list[tuple[int, int, int]]:
    """(cut j, resume k, layer) for two anchors of equal depth, by sliding windows.

    Every window emits the ordered pairs inside it that no earlier window emitted; all of them share one
    stitching layer, and the layer counter advances only when a window emitted something. Depth 12 with the
    defaults gives 34 pairs on 11 layers (spec).
    """
    if window < 1 or stride < 1:
        raise SettingsError(f"--window and --stride must be >= 1 (got window={window}, stride={stride})")
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int, int]] = []
    layer = 0
    for start in range(0, depth, stride):
        ids = range(start, min(start + window, depth))
        new = [(j, k) for j in ids for k in ids if (j, k) not in seen]
        if not new:
            continue
        for j, k in new:
            seen.add((j, k))
            out.append((j, k, layer))
        layer += 1
    return out


def unpaired_pairs(depth_front: int, depth_back: int) -> list[tuple[int, int, int]]:
    """(cut j, resume k, layer) for anchors of different depth, by nearest interpolation.

    Each back block i maps to front block floor(i * d_front / d_back); (mapped, i) is emitted when the mapped
    front id is smaller than i. Works for any two depths. Every pair gets its own stitching layer.
    """
    out = []
    for i in range(depth_back):
        j = (i * depth_front) // depth_back
        if j < i:
            out.append((j, i, len(out)))
    return out


def stage_paired_pairs(depth: int, window: int = 2, stride: int = 1) -> list[tuple[int, int, int]]:
    """(j, k, layer) within one stage of equal depth: the sliding-window pairs with j < k (hierarchical rule).

    With the official window 2, stride 1: (m, m + 1) for m = 0..depth-2, each with its own layer.
    """
    return [(j, k, layer) for j, k, layer in paired_pairs(depth, window, stride) if j < k]


def stage_unpaired_pairs(depth_front: int, depth_back: int) -> list[tuple[int, int, int]]:
    """(j, k, layer) within one stage of unequal depths, with the official hierarchical layer sharing.

    The pairs are those of ``unpaired_pairs``; the n-th pair uses layer floor(n·d_front/d_back). 2→6 blocks
    (ResNet-18→50 layer3): (0,1) (0,2) (1,3) (1,4) (1,5) on layers 0 0 0 1 1.
    """
    pairs = unpaired_pairs(depth_front, depth_back)
    return [(j, k, (n * depth_front) // depth_back) for n, (j, k, _) in enumerate(pairs)]


def is_staged(anchor: AnchorSpec) -> bool:
    """True for anchors with stages (Swin, ResNet): stitched stage by stage; False for a plain ViT."""
    return len(anchor.stage_widths) > 1


def _stages_of(anchor: AnchorSpec) -> tuple:
    return tuple(anchor.stitch_stages) or tuple(range(len(anchor.stage_widths)))


def stitched_stages(front: AnchorSpec, back: AnchorSpec) -> list[int]:
    """Stages stitched between two staged anchors: both families stitch them and the feature maps match in size.

    Raises IncompatibleAnchorsError, naming the stage sizes, when there is none.
    """
    common = sorted(set(_stages_of(front)) & set(_stages_of(back)))
    ok = [s for s in common if s < len(front.stage_rows) and s < len(back.stage_rows)
          and front.stage_rows[s] == back.stage_rows[s] and s in front.unit_stage and s in back.unit_stage]
    if not ok:
        raise IncompatibleAnchorsError(
            f"cannot stitch {front.name} and {back.name}: no stage both stitch has the same feature-map size "
            f"({front.name}: stages {list(_stages_of(front))} with {list(front.stage_rows)} pixels, {back.name}: "
            f"stages {list(_stages_of(back))} with {list(back.stage_rows)}); use anchors at the same input size"
        )
    for s in ok:
        if front.stage_layout[s] == "tokens" and back.stage_layout[s] != "tokens":
            raise IncompatibleAnchorsError(
                f"cannot stitch {front.name} into {back.name}: a token sequence (stage {s}) has no spatial shape to "
                f"feed a {back.stage_layout[s]} feature map; order the anchors the other way or choose other anchors"
            )
    return ok


def check_stitchable(anchors: list[AnchorSpec]) -> None:
    """Refuse anchors that cannot be stitched, naming the first mismatch."""
    if len(anchors) < 2:
        raise IncompatibleAnchorsError(
            f"need at least two anchors to stitch, got {len(anchors)} ({', '.join(a.name for a in anchors)}); "
            "pass e.g. --anchors deit_s,deit_b"
        )
    names = [a.name for a in anchors]
    if len(set(names)) != len(names):
        raise IncompatibleAnchorsError(f"anchors must be distinct, got {', '.join(names)}")
    ref = anchors[0]
    staged = [a for a in anchors if is_staged(a)]
    if staged:
        plain = [a for a in anchors if not is_staged(a)]
        if plain:
            raise IncompatibleAnchorsError(
                f"cannot stitch {plain[0].name} (a plain ViT: one token sequence) with {staged[0].name} (a "
                f"{staged[0].family} with stages); choose anchors that all have stages or all are plain ViTs"
            )
        for a in anchors[1:]:
            for attr, what in (("img_size", "image size"), ("in_chans", "input channels"),
                               ("num_classes", "number of classes")):
                if getattr(a, attr) != getattr(ref, attr):
                    raise IncompatibleAnchorsError(
                        f"cannot stitch {ref.name} and {a.name}: {what} differs "
                        f"({getattr(ref, attr)} vs {getattr(a, attr)}); choose anchors with equal {what}"
                    )
        return
    for a in anchors[1:]:
        for attr, what in (
            ("patch_size", "patch size"),
            ("img_size", "image size"),
            ("in_chans", "input channels"),
            ("num_prefix_tokens", "prefix (cls/register) token count"),
            ("num_tokens", "token count"),
            ("num_classes", "number of classes"),
        ):
            if getattr(a, attr) != getattr(ref, attr):
                raise IncompatibleAnchorsError(
                    f"cannot stitch {ref.name} and {a.name}: {what} differs "
                    f"({getattr(ref, attr)} vs {getattr(a, attr)}); choose anchors of one family with equal {what}"
                )


def order_by_size(anchors: Iterable[AnchorSpec]) -> list[AnchorSpec]:
    return sorted(anchors, key=lambda a: (a.gflops, a.width, a.depth, a.name))


def _pairs_for(front: AnchorSpec, back: AnchorSpec, settings: PlanSettings) -> list[tuple[int, int, int, int]]:
    """(stage, cut, resume, layer within its stage) for one anchor pair; cut/resume are flat unit indices."""
    if not is_staged(front):
        if front.depth == back.depth:
            return [(0, j, k, layer) for j, k, layer in paired_pairs(front.depth, settings.window, settings.stride)]
        return [(0, j, k, layer) for j, k, layer in unpaired_pairs(front.depth, back.depth)]
    out = []
    for stage in stitched_stages(front, back):
        f0, b0 = front.unit_stage.index(stage), back.unit_stage.index(stage)
        df, db = front.unit_stage.count(stage), back.unit_stage.count(stage)
        pairs = (stage_paired_pairs(df, settings.window, settings.stride) if df == db
                 else stage_unpaired_pairs(df, db))
        out.extend((stage, f0 + j, b0 + k, layer) for j, k, layer in pairs)
    return out


def stitch_id(front: str, cut: int, back: str, resume: int) -> str:
    return f"{front}:{cut}>{back}:{resume}"


def path_cost(front: AnchorSpec, back: AnchorSpec, cut: Optional[int], resume: Optional[int]) -> tuple[int, int, int]:
    """(flops, params, units) of a route; cut/resume None means the anchor `front` on its own.

    Family-agnostic: stem + the units run + stitching layer + head, from the costs the family adapter recorded in
    each AnchorSpec (paper convention, snexport.families.flops). The front's embedding is counted whole
    (cls/position tokens included).
    """
    if cut is None:
        return front.stem_flops + sum(front.unit_flops) + front.head_flops, front.params, front.depth
    stage = front.unit_stage[cut]
    f = front.stem_flops + sum(front.unit_flops[: cut + 1])
    f += flops.stitching_layer_flops(front.stage_rows[stage], front.stage_widths[stage], back.stage_widths[stage])
    f += sum(back.unit_flops[resume:]) + back.head_flops
    p = front.embed_params + sum(front.unit_params[: cut + 1])
    p += flops.stitching_layer_params(front.stage_widths[stage], back.stage_widths[stage])
    p += sum(back.unit_params[resume:]) + back.head_params
    return f, p, (cut + 1) + (back.depth - resume)


@dataclass(frozen=True)
class StitchPlan:
    anchors: tuple  # AnchorSpec, ordered small → large
    settings: PlanSettings
    stitches: tuple  # Stitch, anchors first (as configurations of their own), then stitches
    num_layers: int  # stitching layers over all anchor pairs
    layer_keys: tuple = field(default=())  # (front, back, layer) per stitching layer, in creation order

    @property
    def configurations(self) -> tuple:
        return self.stitches

    @property
    def stitch_only(self) -> list[Stitch]:
        return [s for s in self.stitches if not s.is_anchor]

    def get(self, stitch_id: str) -> Stitch:
        for s in self.stitches:
            if s.id == stitch_id:
                return s
        raise UnknownStitchError.for_id(stitch_id, [s.id for s in self.stitches])

    def anchor(self, name: str) -> AnchorSpec:
        for a in self.anchors:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "anchors": [a.to_dict() for a in self.anchors],
            "settings": self.settings.to_dict(),
            "stitches": [s.to_dict() for s in self.stitches],
            "num_layers": self.num_layers,
            "layer_keys": [list(k) for k in self.layer_keys],
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "StitchPlan":
        return cls(
            anchors=tuple(AnchorSpec.from_dict(a) for a in data["anchors"]),
            settings=PlanSettings.from_dict(data["settings"]),
            stitches=tuple(Stitch.from_dict(s) for s in data["stitches"]),
            num_layers=int(data["num_layers"]),
            layer_keys=tuple(tuple(k) for k in data.get("layer_keys", [])),
        )

    @property
    def hash(self) -> str:
        """Identity of the plan: what the SN-Net weights belong to. Covers architecture and routes."""
        ident = {
            "anchors": [
                {"name": a.name, "timm_name": a.timm_name, "create_kwargs": a.create_kwargs, "width": a.width,
                 "depth": a.depth, "tokens": a.num_tokens}
                for a in self.anchors
            ],
            "settings": self.settings.to_dict(),
            "stitches": [[s.id, s.layer] for s in self.stitches],
        }
        blob = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def plan_stitches(anchors: Iterable[AnchorSpec], settings: PlanSettings = PlanSettings()) -> StitchPlan:
    """The front door: order anchors by size, check they can be stitched, enumerate every configuration."""
    ordered = order_by_size(anchors)
    check_stitchable(ordered)
    if settings.nearest:
        pairs = [(ordered[i], ordered[i + 1]) for i in range(len(ordered) - 1)]
    else:
        pairs = [(ordered[i], ordered[j]) for i in range(len(ordered)) for j in range(i + 1, len(ordered))]
    if settings.two_way:
        pairs = pairs + [(b, a) for a, b in pairs]

    configs: list[Stitch] = []
    for a in ordered:
        f, p, blocks = path_cost(a, a, None, None)
        configs.append(Stitch(a.name, a.name, a.name, None, None, None, blocks, round(flops.to_gflops(f), 6), p))
    layer_keys: list[tuple[str, str, int]] = []
    for front, back in pairs:
        numbering: dict[tuple[int, int], int] = {}  # (stage, layer within the stage) -> layer of the pair
        for stage, j, k, local in _pairs_for(front, back, settings):
            if (stage, local) not in numbering:
                numbering[(stage, local)] = len(numbering)
                layer_keys.append((front.name, back.name, numbering[(stage, local)]))
            layer = numbering[(stage, local)]
            f, p, blocks = path_cost(front, back, j, k)
            sid = stitch_id(front.name, j, back.name, k)
            configs.append(Stitch(sid, front.name, back.name, j, k, layer, blocks, round(flops.to_gflops(f), 6), p,
                                  stage=stage))
    return StitchPlan(tuple(ordered), settings, tuple(configs), len(layer_keys), tuple(layer_keys))
