"""Which stitches exist: the enumeration rules of snnet-spec.md, over architecture facts only.

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


def check_stitchable(anchors: list[AnchorSpec]) -> None:
    """Refuse anchors that cannot share one token sequence, naming the first mismatch."""
    if len(anchors) < 2:
        raise IncompatibleAnchorsError(
            f"need at least two anchors to stitch, got {len(anchors)} ({', '.join(a.name for a in anchors)}); "
            "pass e.g. --anchors deit_s,deit_b"
        )
    names = [a.name for a in anchors]
    if len(set(names)) != len(names):
        raise IncompatibleAnchorsError(f"anchors must be distinct, got {', '.join(names)}")
    ref = anchors[0]
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


def _pairs_for(front: AnchorSpec, back: AnchorSpec, settings: PlanSettings) -> list[tuple[int, int, int]]:
    if front.depth == back.depth:
        return paired_pairs(front.depth, settings.window, settings.stride)
    return unpaired_pairs(front.depth, back.depth)


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
        pair_layers: set[int] = set()
        for j, k, layer in _pairs_for(front, back, settings):
            f, p, blocks = path_cost(front, back, j, k)
            sid = stitch_id(front.name, j, back.name, k)
            configs.append(Stitch(sid, front.name, back.name, j, k, layer, blocks, round(flops.to_gflops(f), 6), p))
            if layer not in pair_layers:
                pair_layers.add(layer)
                layer_keys.append((front.name, back.name, layer))
    return StitchPlan(tuple(ordered), settings, tuple(configs), len(layer_keys), tuple(layer_keys))
