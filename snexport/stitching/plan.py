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

Routes with more than one stitching layer (plain ViTs only), as a list of hops (anchor, first unit, last unit):
- SN-Net v1 without nearest stitching (official ``stitching_deit``): every three anchors a < b < c (by size) also
  give a→b→c routes: each a→b pair (j, k) continued by each b→c pair (m, e) with m >= k, reusing the two pairs'
  layers. DeiT-Ti/S/B at window 2, stride 1: 3 + 3·34 + 627 = 732 configurations.
- SN-Netv2 two-way stitching (``two_way``, official ``get_stitch_configs_bidirection``), per anchor pair with d_s
  blocks in the shallower S and d_l = r·d_s in L: S→L (i, (i+1)·r) on layer i for i < d_s - 1 (i = d_s - 1 would
  be S with L's head: built by the official code, never used); L→S (r·m + r - 1, m + 1) on layer m; L→S→L and
  S→L→S round trips made of one L→S and one S→L route whose middle hop is not empty, on those routes' layers.
  2 + 11 + 11 + 55 + 55 = 134 for DeiT-S/B (12/12) and DeiT3-S/L, B/L (12/24). Every layer has exactly one
  one-hop route, so its least-squares target is that route's (v2's one solve per layer).
Stitch ids: a route with one stitching layer keeps ``front:cut>back:resume``; longer routes spell every hop,
``anchor:first-last`` joined by ``>`` (``deit3_l:0-7>deit3_s:4-6>deit3_l:14-23``).

Conventions recorded in the settings (and so in the plan and its hash): ``final_norm`` (the last anchor's final
norm on stitched routes: on in SN-Netv2 and the hierarchical v1 code, off in v1 DeiT) and ``params`` (which count
``Stitch.params`` holds: "module", every parameter the exported module holds, or "paper", the official v1 count,
which leaves out the front's cls/position tokens and counts the back's final norm even when it is skipped). Both
counts are recorded on every stitch of a plain-ViT plan.

Standard library only, so `snexport plan` answers without torch and without weights. The SN-Net, the export and
the manifest all take stitch ids and routes from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional

from snexport.families import flops
from snexport.errors import IncompatibleAnchorsError, SettingsError, UnknownStitchError
from snexport.records import AnchorSpec, Stitch


PARAMS_CONVENTIONS = ("module", "paper")


@dataclass(frozen=True)
class PlanSettings:
    window: int = 2  # k_win: sliding-window size for equal-depth anchor pairs (SN-Net v1)
    stride: int = 1  # s: sliding-window stride (SN-Net v1)
    nearest: bool = True  # stitch only anchors adjacent in size (Ti→S, S→B; not Ti→B, nor Ti→S→B)
    two_way: bool = False  # SN-Netv2: both directions and round trips (the official bidirectional set)
    final_norm: bool = True  # the last anchor's final norm on stitched routes (v2); False = SN-Net v1 DeiT
    params: str = "module"  # what Stitch.params counts: "module" (the exported module) or "paper" (official v1)
    lora_rank: int = 0  # > 0: stitching layers = frozen least-squares weight + trained rank-r update (SN-Netv2)

    # Settings added after plans were first written: left out of the hash while at their defaults, so plans
    # written before them keep their hash (and their build directories stay valid).
    _LATER = {"final_norm": True, "params": "module", "lora_rank": 0}

    def to_dict(self) -> dict:
        return {"window": self.window, "stride": self.stride, "nearest": self.nearest, "two_way": self.two_way,
                "final_norm": self.final_norm, "params": self.params, "lora_rank": self.lora_rank}

    def hash_dict(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self._LATER or v != self._LATER[k]}

    @classmethod
    def from_dict(cls, data: dict) -> "PlanSettings":
        names = ("window", "stride", "nearest", "two_way", "final_norm", "params", "lora_rank")
        return cls(**{k: data[k] for k in names if k in data})

    @property
    def method(self) -> str:
        return "SN-Netv2" if self.two_way else "SN-Net"

    def check(self) -> "PlanSettings":
        """Refuse settings no rule set accepts, with what to do instead."""
        if self.window < 1 or self.stride < 1:
            raise SettingsError(f"--window and --stride must be >= 1 (got window={self.window}, stride={self.stride})")
        if self.params not in PARAMS_CONVENTIONS:
            raise SettingsError(f"params convention must be one of {', '.join(PARAMS_CONVENTIONS)}, got {self.params!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise SettingsError(f"--stitch-lora-rank must be a whole number >= 0, got {self.lora_rank!r}")
        if self.two_way and (self.window, self.stride) != (2, 1):
            raise SettingsError("--window/--stride set the SN-Net v1 sliding windows; SN-Netv2 two-way stitching "
                                "(--two-way) has its own fixed set: drop --window/--stride or --two-way")
        return self


@dataclass(frozen=True)
class Junction:
    """One stitching layer on a route: front[..cut] -> layer -> back[resume..] (flat unit indices)."""

    front: str
    cut: int
    back: str
    resume: int
    layer: int  # index within the (front, back) pair
    stage: int  # the stage both sides are in (0 for a plain ViT)


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


def route_id(hops) -> str:
    """The readable id of a route: one stitching layer keeps ``front:cut>back:resume`` (the SN-Net v1 ids);
    longer routes spell every hop as ``anchor:first-last``."""
    if len(hops) == 2:
        (front, _, cut), (back, resume, _) = hops
        return stitch_id(front, cut, back, resume)
    return ">".join(f"{a}:{first}-{last}" for a, first, last in hops)


def path_cost(front: AnchorSpec, back: AnchorSpec, cut: Optional[int], resume: Optional[int]) -> tuple[int, int, int]:
    """(flops, params, units) of a route; cut/resume None means the anchor `front` on its own.

    Family-agnostic: stem + the units run + stitching layer + head, from the costs the family adapter recorded in
    each AnchorSpec (paper convention, snexport.families.flops). The front's embedding is counted whole
    (cls/position tokens included); the back's final norm is applied.
    """
    if cut is None:
        return front.stem_flops + sum(front.unit_flops) + front.head_flops, front.params, front.depth
    cost = route_cost({front.name: front, back.name: back},
                      ((front.name, 0, cut), (back.name, resume, back.depth - 1)), final_norm=True)
    return cost["flops"], cost["params_module"], cost["units"]


def final_norm_cost(spec: AnchorSpec) -> tuple[int, int]:
    """(flops, params) of a plain ViT's final LayerNorm over all tokens (what a v1 DeiT route leaves out)."""
    return flops.LAYERNORM_FLOPS_PER_ELEMENT * spec.num_tokens * spec.width, 2 * spec.width


def patch_embed_params(spec: AnchorSpec) -> Optional[int]:
    """A plain ViT's patch-embedding params without cls/register tokens and position embedding (the official
    SN-Net v1 count of a front); None when the embedding is not a biased patch convolution plus those tokens."""
    conv = spec.width * spec.in_chans * spec.patch_size * spec.patch_size + spec.width
    tokens = spec.num_prefix_tokens * spec.width
    patches = spec.num_tokens - spec.num_prefix_tokens
    for positions in (spec.num_tokens, patches):  # position embedding with or without the prefix slots (DeiT-III)
        if spec.embed_params == conv + tokens + positions * spec.width:
            return conv
    return None


def route_cost(specs: dict, hops, final_norm: bool = True) -> dict:
    """Costs of a route of hops (anchor, first unit, last unit) joined by stitching layers, from AnchorSpecs.

    flops: stem of the first anchor + every unit run + a stitching layer per junction (rows·C_in·C_out at the
    front's stage) + the last anchor's head, without its final norm when ``final_norm`` is off (v1 DeiT).
    params_module: every parameter of the exported module. params_paper (plain ViTs; else None): the official
    v1 count -- the front's patch embedding without cls/position tokens, and the back's norm counted even when
    the route skips it.
    """
    first, last = specs[hops[0][0]], specs[hops[-1][0]]
    f = first.stem_flops + last.head_flops
    p = first.embed_params + last.head_params
    layer_params = 0
    units = 0
    for i, (name, lo, hi) in enumerate(hops):
        spec = specs[name]
        f += sum(spec.unit_flops[lo:hi + 1])
        p += sum(spec.unit_params[lo:hi + 1])
        units += hi - lo + 1
        if i + 1 < len(hops):
            nxt = specs[hops[i + 1][0]]
            stage = spec.unit_stage[hi]
            f += flops.stitching_layer_flops(spec.stage_rows[stage], spec.stage_widths[stage], nxt.stage_widths[stage])
            layer_params += flops.stitching_layer_params(spec.stage_widths[stage], nxt.stage_widths[stage])
    p += layer_params
    paper = None
    if not is_staged(first) and not is_staged(last):
        embed = patch_embed_params(first)
        if embed is not None:
            paper = p - first.embed_params + embed
    if not final_norm:
        norm_f, norm_p = final_norm_cost(last)
        f -= norm_f
        p -= norm_p
    return {"flops": f, "params_module": p, "params_paper": paper, "units": units}


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

    @cached_property
    def _by_id(self) -> dict:
        return {s.id: s for s in self.stitches}

    def get(self, stitch_id: str) -> Stitch:
        found = self._by_id.get(stitch_id)
        if found is None:
            raise UnknownStitchError.for_id(stitch_id, [s.id for s in self.stitches])
        return found

    def anchor(self, name: str) -> AnchorSpec:
        for a in self.anchors:
            if a.name == name:
                return a
        raise KeyError(name)

    def junctions(self, stitch: Stitch) -> list[Junction]:
        """The stitching layers a configuration runs through, in order (none for an anchor)."""
        if stitch.is_anchor:
            return []
        if not stitch.hops:  # a plan written before routes had hops: one junction
            spec = self.anchor(stitch.front)
            stage = stitch.stage if stitch.stage is not None else (spec.unit_stage[stitch.cut] if spec.unit_stage else 0)
            return [Junction(stitch.front, stitch.cut, stitch.back, stitch.resume, stitch.layer, stage)]
        hops, out = stitch.route, []
        for (a, _, cut), (b, resume, _), layer in zip(hops, hops[1:], stitch.junction_layers):
            spec = self.anchor(a)
            out.append(Junction(a, cut, b, resume, layer, spec.unit_stage[cut] if spec.unit_stage else 0))
        return out

    def ls_targets(self) -> list[Junction]:
        """Every distinct (front, cut, back, resume, layer) some configuration runs, in order of first use: what
        the least-squares init fits (X = front unit ``cut`` output, Y = back unit ``resume``-1 output; a layer
        serving several positions gets the mean of their solutions). Round trips and three-anchor routes run the
        positions of one-hop routes, so they add nothing: SN-Netv2 gets its one solve per layer."""
        seen: dict[Junction, None] = {}
        for s in self.stitches:
            for j in self.junctions(s):
                seen.setdefault(j, None)
        return list(seen)

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
        stitches = []
        for item in data["stitches"]:
            s = Stitch.from_dict(item)
            # JSON lists back to tuples, so a loaded plan equals the one that was written.
            stitches.append(dataclasses.replace(s, hops=tuple(tuple(h) for h in s.hops), layers=tuple(s.layers)))
        return cls(
            anchors=tuple(AnchorSpec.from_dict(a) for a in data["anchors"]),
            settings=PlanSettings.from_dict(data["settings"]),
            stitches=tuple(stitches),
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
            "settings": self.settings.hash_dict(),
            # A multi-hop route's id spells its hops; its layers (one per junction) join the hash.
            "stitches": [[s.id, list(s.layers)] if s.is_multi_hop else [s.id, s.layer] for s in self.stitches],
        }
        blob = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- enumeration


@dataclass(frozen=True)
class _Route:
    hops: tuple  # ((anchor, first, last), ...)
    layers: tuple  # per junction, index within its (front, back) pair
    stage: int


class _LayerBook:
    """Stitching layers in creation order: (front, back, index within the pair)."""

    def __init__(self):
        self.keys: list[tuple[str, str, int]] = []
        self._numbering: dict[tuple[str, str], dict] = {}

    def number(self, front: str, back: str, local) -> int:
        """The pair's layer for ``local`` (any key), numbered in order of first use."""
        numbering = self._numbering.setdefault((front, back), {})
        if local not in numbering:
            numbering[local] = len(numbering)
            self.keys.append((front, back, numbering[local]))
        return numbering[local]


def _v1_pair_routes(front: AnchorSpec, back: AnchorSpec, settings: PlanSettings, book: _LayerBook) -> list[_Route]:
    out = []
    for stage, j, k, local in _pairs_for(front, back, settings):
        layer = book.number(front.name, back.name, (stage, local))
        out.append(_Route(((front.name, 0, j), (back.name, k, back.depth - 1)), (layer,), stage))
    return out


def _v1_routes(ordered: list[AnchorSpec], settings: PlanSettings) -> tuple[list[_Route], list]:
    """SN-Net v1: one-hop routes per anchor pair (nearest or all), plus a→b→c routes without nearest (plain ViTs)."""
    book = _LayerBook()
    if settings.nearest:
        pairs = [(ordered[i], ordered[i + 1]) for i in range(len(ordered) - 1)]
    else:
        pairs = list(itertools.combinations(ordered, 2))
    by_pair = {(f.name, b.name): _v1_pair_routes(f, b, settings, book) for f, b in pairs}
    routes = [r for f, b in pairs for r in by_pair[(f.name, b.name)]]
    if not settings.nearest and not any(is_staged(a) for a in ordered):
        for a, b, c in itertools.combinations(ordered, 3):
            for first in by_pair[(a.name, b.name)]:
                (_, _, j), (_, k, _) = first.hops
                for second in by_pair[(b.name, c.name)]:
                    (_, _, m), (_, e, _) = second.hops
                    if m >= k:  # the middle hop b[k..m] is not empty
                        routes.append(_Route(((a.name, 0, j), (b.name, k, m), (c.name, e, c.depth - 1)),
                                             (first.layers[0], second.layers[0]), 0))
    return routes, book.keys


def v2_pair_routes(small: AnchorSpec, large: AnchorSpec, book: Optional[_LayerBook] = None) -> dict[str, list]:
    """SN-Netv2's bidirectional set for one pair, as {"sl", "ls", "lsl", "sls": [_Route]} (official order)."""
    book = book or _LayerBook()
    ds, dl = small.depth, large.depth
    if dl % ds:
        raise IncompatibleAnchorsError(
            f"SN-Netv2 two-way stitching needs the deeper anchor's depth to be a multiple of the shallower one's "
            f"(12/12, 12/24); {small.name} has {ds} blocks and {large.name} {dl}: drop --two-way for these anchors"
        )
    r = dl // ds
    S, L = small.name, large.name
    # Layers in the official module order: stitch_layers[0] (leaving S) first, then stitch_layers[1] (leaving L).
    sl_layers = [book.number(S, L, i) for i in range(ds - 1)]
    ls_layers = [book.number(L, S, m) for m in range(ds - 1)]
    sl = [(i, (i + 1) * r, sl_layers[i]) for i in range(ds - 1)]  # (S cut, L resume, layer)
    ls = [(r * m + r - 1, m + 1, ls_layers[m]) for m in range(ds - 1)]  # (L cut, S resume, layer)
    out = {
        "sl": [_Route(((S, 0, c), (L, e, dl - 1)), (lay,), 0) for c, e, lay in sl],
        "ls": [_Route(((L, 0, c), (S, e, ds - 1)), (lay,), 0) for c, e, lay in ls],
        "lsl": [_Route(((L, 0, i), (S, m, c), (L, e, dl - 1)), (l1, l2), 0)
                for i, m, l1 in ls for c, e, l2 in sl if c >= m],
        "sls": [_Route(((S, 0, c), (L, e, i), (S, m, ds - 1)), (l1, l2), 0)
                for c, e, l1 in sl for i, m, l2 in ls if i >= e],
    }
    return out


def _v2_routes(ordered: list[AnchorSpec], settings: PlanSettings) -> tuple[list[_Route], list]:
    """SN-Netv2 two-way stitching over each stitched pair (nearest: neighbours in size; else every pair)."""
    staged = [a for a in ordered if is_staged(a)]
    if staged:
        raise IncompatibleAnchorsError(
            f"SN-Netv2 two-way stitching (--two-way) is defined for plain ViTs (DeiT, DeiT-III); {staged[0].name} is "
            f"a {staged[0].family} with stages, stitched one way stage by stage (SN-Net v1): drop --two-way"
        )
    book = _LayerBook()
    pairs = ([(ordered[i], ordered[i + 1]) for i in range(len(ordered) - 1)] if settings.nearest
             else list(itertools.combinations(ordered, 2)))
    routes: list[_Route] = []
    for a, b in pairs:
        small, large = (a, b) if a.depth <= b.depth else (b, a)  # the official code sorts by depth
        sets = v2_pair_routes(small, large, book)
        routes += sets["sl"] + sets["ls"] + sets["lsl"] + sets["sls"]
    return routes, book.keys


def _check_conventions(ordered: list[AnchorSpec], settings: PlanSettings) -> None:
    staged = [a for a in ordered if is_staged(a)]
    if staged and not settings.final_norm:
        raise SettingsError(f"skipping the final norm on stitched routes is SN-Net v1 DeiT's convention; "
                            f"{staged[0].name} ({staged[0].family}) always runs its head whole: drop --no-final-norm")
    if staged and settings.params == "paper":
        raise SettingsError(f"the paper's params convention is SN-Net v1 DeiT's; for {staged[0].name} "
                            f"({staged[0].family}) use the module count (the default)")


def plan_stitches(anchors: Iterable[AnchorSpec], settings: PlanSettings = PlanSettings()) -> StitchPlan:
    """The front door: order anchors by size, check they can be stitched, enumerate every configuration."""
    settings.check()
    ordered = order_by_size(anchors)
    check_stitchable(ordered)
    _check_conventions(ordered, settings)
    routes, layer_keys = (_v2_routes if settings.two_way else _v1_routes)(ordered, settings)
    specs = {a.name: a for a in ordered}

    configs: list[Stitch] = []
    for a in ordered:
        f, p, blocks = path_cost(a, a, None, None)
        paper = p if not is_staged(a) else None
        configs.append(Stitch(a.name, a.name, a.name, None, None, None, blocks, round(flops.to_gflops(f), 6), p,
                              hops=((a.name, 0, a.depth - 1),), layers=(), params_module=p, params_paper=paper))
    for r in routes:
        cost = route_cost(specs, r.hops, settings.final_norm)
        params = cost["params_paper"] if settings.params == "paper" else cost["params_module"]
        (front, _, cut), (back, resume, _) = r.hops[0], r.hops[-1]
        configs.append(Stitch(route_id(r.hops), front, back, cut, resume, r.layers[0], cost["units"],
                              round(flops.to_gflops(cost["flops"]), 6), params, stage=r.stage, hops=r.hops,
                              layers=r.layers, params_module=cost["params_module"], params_paper=cost["params_paper"]))
    ids = [c.id for c in configs]
    if len(set(ids)) != len(ids):  # a rule set emitting one route twice is a bug, not an input problem
        raise AssertionError("duplicate stitch ids in a plan")
    return StitchPlan(tuple(ordered), settings, tuple(configs), len(layer_keys), tuple(layer_keys))
