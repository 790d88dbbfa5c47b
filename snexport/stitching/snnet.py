"""The SN-Net: anchors plus stitching layers, routed per configuration, and `materialize` for export.

Anchors stay timm modules (so fine-tuned anchors save with timm's parameter names); every configuration is a
`StitchedNet` route over shared submodules: the family adapter's stem, units and head (snexport.families.base). `materialize(id)` deep-copies one route into a
standalone module with one fixed path: no "current stitch" state exists anywhere, so nothing leaks into export
(the official SN-Net switches through mutable state).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from snexport.stitching.layers import (LeastSquaresFit, assign_mean_solution, feature_rows, make_stitching_layer,
                                       merge_low_rank)
from snexport.families.registry import family_of
from snexport.stitching.plan import StitchPlan


class StitchedNet(nn.Module):
    """One configuration as a plain module: stem → front units → stitching layer → [middle] → back units → head.

    An anchor is the degenerate case with no stitching layer and no back blocks. A route of several hops (an
    SN-Netv2 round trip, a v1 Ti→S→B route) runs each inner hop's units (``middle[i]``) and then the next
    stitching layer (``stitches[i]``); both are empty for a one-layer stitch. Every stitching layer sits under a
    module name starting with "stitch", which is how the int8 export finds and keeps them in float.
    """

    def __init__(self, embed: nn.Module, front_blocks: Iterable[nn.Module], stitch: Optional[nn.Module],
                 back_blocks: Iterable[nn.Module], head: nn.Module, stitch_id: str = "",
                 middle: Iterable[tuple[Iterable[nn.Module], nn.Module]] = (),
                 piece_keys: Optional[Iterable[str]] = None):
        super().__init__()
        # What each of ``pieces()`` is, the same string for the same submodule in every route of one SN-Net
        # ("deit_b#unit4", "layer#a0_a1_l3"): the export stage exports each piece once and composes routes of them.
        self.piece_keys = list(piece_keys) if piece_keys is not None else None
        self.embed = embed
        self.front_blocks = nn.Sequential(*front_blocks)
        self.stitch = stitch if stitch is not None else nn.Identity()
        middle = list(middle)
        self.middle = nn.ModuleList(nn.Sequential(*units) for units, _ in middle)
        self.stitches = nn.ModuleList(layer for _, layer in middle)
        self.back_blocks = nn.Sequential(*back_blocks)
        self.head = head
        self.stitch_id = stitch_id

    def pieces(self) -> list[tuple[str, Optional[str], nn.Module]]:
        """The route as a chain in forward order, ``forward`` being their composition: (attribute path, piece
        key or None, module). Identity layers (an anchor's absent stitch) are left out."""
        chain = [("embed", self.embed)]
        chain += [(f"front_blocks.{i}", m) for i, m in enumerate(self.front_blocks)]
        chain.append(("stitch", self.stitch))
        for h, (units, layer) in enumerate(zip(self.middle, self.stitches)):
            chain += [(f"middle.{h}.{i}", m) for i, m in enumerate(units)]
            chain.append((f"stitches.{h}", layer))
        chain += [(f"back_blocks.{i}", m) for i, m in enumerate(self.back_blocks)]
        chain.append(("head", self.head))
        if self.piece_keys is not None and len(self.piece_keys) != len(chain) - isinstance(self.stitch, nn.Identity):
            raise ValueError(f"{self.stitch_id}: {len(self.piece_keys)} piece keys for {len(chain)} pieces")
        keys = iter(self.piece_keys or ())
        return [(path, next(keys, None), m) for path, m in chain
                if not (path == "stitch" and isinstance(m, nn.Identity))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.front_blocks(x)
        x = self.stitch(x)
        for units, layer in zip(self.middle, self.stitches):
            x = layer(units(x))
        x = self.back_blocks(x)
        return self.head(x)


def layer_stage(plan: StitchPlan, stitch) -> int:
    """The stage a stitch cuts (plans written before stages were recorded: from the front unit's stage)."""
    if stitch.stage is not None:
        return stitch.stage
    spec = plan.anchor(stitch.front)
    return spec.unit_stage[stitch.cut] if spec.unit_stage else 0


def layer_key(front_index: int, back_index: int, layer: int) -> str:
    # ModuleDict keys cannot contain '.', and timm names may (pretrained tags): use anchor positions.
    return f"a{front_index}_a{back_index}_l{layer}"


class SNNet(nn.Module):
    """Anchors (ordered small → large, as in the plan) and the stitching layers the plan calls for."""

    def __init__(self, plan: StitchPlan, anchors: list[nn.Module]):
        super().__init__()
        if len(anchors) != len(plan.anchors):
            raise ValueError(f"plan has {len(plan.anchors)} anchors, got {len(anchors)} modules")
        self.plan = plan
        self.anchors = nn.ModuleList(anchors)
        self._index = {a.name: i for i, a in enumerate(plan.anchors)}
        self.stitch_layers = nn.ModuleDict()
        stage_of = {(j.front, j.back, j.layer): j.stage for j in plan.ls_targets()}
        for front, back, layer in plan.layer_keys:
            fa, ba = plan.anchor(front), plan.anchor(back)
            st = stage_of[(front, back, layer)]
            # Width and layout are those of the stage the layer sits in (Swin-T→S stage 2: 384→384 on (B,H,W,C);
            # ResNet-18→50 layer2: Conv2d 128→512 on NCHW). lora_rank > 0: SN-Netv2's low-rank variant.
            self.stitch_layers[self._key(front, back, layer)] = make_stitching_layer(
                fa.stage_widths[st], ba.stage_widths[st], fa.stage_layout[st], ba.stage_layout[st],
                lora_rank=plan.settings.lora_rank)
        self._rebuild_routes()

    def _rebuild_routes(self) -> None:
        # Routes share this module's parameters; kept in a plain dict so they are not registered twice. Rebuilt
        # whenever parameters may have been replaced (load_state_dict(assign=True)), since the embedding holds
        # the cls/pos Parameter objects themselves.
        self._routes: dict[str, StitchedNet] = {s.id: self._route(s.id) for s in self.plan.stitches}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for spec, model in zip(self.plan.anchors, self.anchors):
            after_load = getattr(family_of(spec), "after_load", None)
            if after_load is not None:  # buffers no weights file holds (Swin's window masks) are recomputed
                after_load(model)
        self._rebuild_routes()
        return result

    def train(self, mode: bool = True):
        """Train mode, except the BatchNorm statistics of families that keep them during fine-tuning (resnet.py)."""
        super().train(mode)
        if mode:
            for spec, model in zip(self.plan.anchors, self.anchors):
                if getattr(family_of(spec), "FREEZE_NORM_STATS", False):
                    for m in model.modules():
                        if isinstance(m, nn.modules.batchnorm._BatchNorm):
                            m.eval()
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._rebuild_routes()
        return out

    def _key(self, front: str, back: str, layer: int) -> str:
        return layer_key(self._index[front], self._index[back], layer)

    def _route(self, stitch_id: str) -> StitchedNet:
        s = self.plan.get(stitch_id)
        if s.is_anchor:
            model, fam = self.anchors[self._index[s.front]], family_of(self.plan.anchor(s.front))
            units = fam.units(model)
            keys = [f"{s.front}#stem", *(f"{s.front}#unit{k}" for k in range(len(units))), f"{s.front}#head"]
            return StitchedNet(fam.stem(model), units, None, [], fam.head(model), s.id, piece_keys=keys)
        hops = s.route
        pieces = []  # per hop: its units; between hops: the stitching layer
        unit_keys = []
        for i, (name, first, last) in enumerate(hops):
            model = self.anchors[self._index[name]]
            units = family_of(self.plan.anchor(name)).units(model)
            end = len(units) if last is None else last + 1
            pieces.append(units[first:end])
            unit_keys.append([f"{name}#unit{k}" for k in range(first, end)])
        junctions = self.plan.junctions(s)
        layers = [self.stitch_layers[self._key(j.front, j.back, j.layer)] for j in junctions]
        layer_keys = [f"layer#{self._key(j.front, j.back, j.layer)}" for j in junctions]
        middle = list(zip(pieces[1:-1], layers[1:]))  # inner hop's units, then the layer leaving it
        first_name, last_name = hops[0][0], hops[-1][0]
        first_model, last_model = self.anchors[self._index[first_name]], self.anchors[self._index[last_name]]
        last_family = family_of(self.plan.anchor(last_name))
        # SN-Net v1 DeiT ends stitched routes without the final norm (plan setting final_norm = False).
        head = (last_family.head(last_model) if self.plan.settings.final_norm
                else last_family.head(last_model, final_norm=False))
        keys = [f"{first_name}#stem", *unit_keys[0], layer_keys[0]]
        for hop_units, layer in zip(unit_keys[1:-1], layer_keys[1:]):
            keys += [*hop_units, layer]
        keys += [*unit_keys[-1], f"{last_name}#head" + ("" if self.plan.settings.final_norm else "-without-norm")]
        return StitchedNet(family_of(self.plan.anchor(first_name)).stem(first_model), pieces[0], layers[0],
                           pieces[-1], head, s.id, middle=middle, piece_keys=keys)

    @property
    def config_ids(self) -> list[str]:
        return [s.id for s in self.plan.stitches]

    def forward(self, x: torch.Tensor, stitch_id: str) -> torch.Tensor:
        if stitch_id not in self._routes:
            self.plan.get(stitch_id)  # raises UnknownStitchError with the valid ids
        return self._routes[stitch_id](x)

    def materialize(self, stitch_id: str) -> StitchedNet:
        """A standalone copy of one configuration, in eval mode, sharing nothing with the SN-Net.

        Low-rank (SN-Netv2 LoRA) stitching layers come out merged into plain ones (W_LS + update): an exported
        stitch has the ops and parameters of a plain stitch.
        """
        if stitch_id not in self._routes:
            self.plan.get(stitch_id)
        return merge_low_rank(copy.deepcopy(self._routes[stitch_id])).eval()

    # ----------------------------------------------------------------------------- least-squares init

    @torch.no_grad()
    def init_stitching_layers(self, images: torch.Tensor, batch_size: int = 32,
                              progress: Optional[Callable[[int, int], None]] = None) -> dict:
        """Least-squares init of every stitching layer from calibration images (spec: ~100 images).

        X = front output of unit j, Y = back output of unit k-1 (k = 0: the back anchor's embedding output),
        flattened over images and tokens or pixels (channels last); the layer gets pinv([X, 1])·Y, and a layer
        serving several (j, k) the mean of their solutions. Anchors run in eval mode, once per batch each, up to
        the last unit a target needs; each front position sums its normal equations batch by batch
        (``LeastSquaresFit``: one Gram matrix for all its targets, float64), so no feature map outlives its batch.
        Targets sharing a front position and a layer are summed before the solve: the solution is linear in Y, so
        the mean of their solutions is the solution of their sum over their count (v1 windows: 34 targets of
        DeiT-S→B become 22 products). Returns timing facts.
        """
        started = time.perf_counter()
        was_training = self.training
        self.eval()
        # One entry per distinct (front, cut, back, resume, layer) the routes run (plan.ls_targets): multi-hop
        # routes reuse one-hop positions, so SN-Netv2 solves each layer once, v1 averages a window's pairs.
        targets = self.plan.ls_targets()
        positions = self._ls_positions(targets)
        # Per anchor, the positions needed: 0 = embedding output, b+1 = output of unit b.
        needed: list[set[int]] = [set() for _ in self.plan.anchors]
        for (fi, cut), position in positions.items():
            needed[fi].add(cut + 1)
            for group in position["groups"]:
                needed[group["back"]].update(group["resumes"])
        pieces = [(family_of(spec).stem(model), family_of(spec).units(model))
                  for spec, model in zip(self.plan.anchors, self.anchors)]
        # How many groups read each back feature map: its float64 rows are made once per batch, dropped after the
        # last use (a DeiT-S→B batch reads 13 maps for 34 targets).
        uses: dict[tuple, int] = {}
        for position in positions.values():
            for group in position["groups"]:
                for resume in group["resumes"]:
                    key = (group["back"], resume, group["layout"])
                    uses[key] = uses.get(key, 0) + 1
        forward_s = 0.0
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size]
            forward_started = time.perf_counter()
            features = [self._ls_features(stem, units, batch, wanted) for (stem, units), wanted in zip(pieces, needed)]
            forward_s += time.perf_counter() - forward_started
            left, rows64 = dict(uses), {}
            for (fi, cut), position in positions.items():
                ys = []
                for group in position["groups"]:
                    y = None
                    for resume in group["resumes"]:  # summed in float64: float32 features add exactly
                        key = (group["back"], resume, group["layout"])
                        if key not in rows64:
                            rows64[key] = feature_rows(features[group["back"]][resume], key[2]).to(torch.float64)
                        rows = rows64[key]
                        left[key] -= 1
                        if not left[key]:
                            del rows64[key]
                        y = rows if y is None else y + rows  # (never in place: ``rows`` may serve another group)
                    ys.append(y)
                position["fit"].add(feature_rows(features[fi][cut + 1], position["layout"]), ys)
            del features, rows64

        sums: dict[str, list] = {}  # layer key -> [weight sum, bias sum, targets]
        methods: dict[str, int] = {}
        done = 0
        for position in positions.values():
            solutions, method = position["fit"].solve()
            methods[method] = methods.get(method, 0) + 1
            for group, (w, b) in zip(position["groups"], solutions):
                acc = sums.setdefault(group["key"], [0.0, 0.0, 0])
                acc[0], acc[1], acc[2] = acc[0] + w, acc[1] + b, acc[2] + len(group["resumes"])
                for _ in group["resumes"]:  # one call per target: callers advance a bar by one per call
                    done += 1
                    if progress:
                        progress(done, len(targets))
        for key, (w, b, count) in sums.items():
            assign_mean_solution(self.stitch_layers[key], [(w / count, b / count)])
        self.train(was_training)
        total_s = time.perf_counter() - started
        return {
            "calibration_images": int(images.shape[0]),
            "collect_seconds": round(forward_s, 3),  # the anchors' stems and units
            "solve_seconds": round(total_s - forward_s, 3),  # normal equations (summed per batch) and their solves
            "total_seconds": round(total_s, 3),
            "layers": len(sums),
            "targets": len(targets),
            "front_positions": len(positions),
            "solved_by": dict(sorted(methods.items())),  # LeastSquaresFit.solve: pinv / cholesky / eigh
        }

    def _ls_positions(self, targets) -> dict[tuple[int, int], dict]:
        """Front position (anchor index, cut) -> its layout, its ``LeastSquaresFit`` and its target groups: per
        (back anchor, layer), the resumes whose features are summed into one target."""
        positions: dict[tuple[int, int], dict] = {}
        for t in targets:
            fi, bi = self._index[t.front], self._index[t.back]
            fspec, bspec = self.plan.anchors[fi], self.plan.anchors[bi]
            position = positions.setdefault((fi, t.cut), {"layout": fspec.stage_layout[t.stage],
                                                          "width": fspec.stage_widths[t.stage], "groups": {}})
            key = self._key(t.front, t.back, t.layer)
            group = position["groups"].setdefault(key, {"key": key, "back": bi, "resumes": [],
                                                        "layout": bspec.stage_layout[t.stage],
                                                        "width": bspec.stage_widths[t.stage]})
            group["resumes"].append(t.resume)
        for position in positions.values():
            position["groups"] = list(position["groups"].values())
            position["fit"] = LeastSquaresFit(position["width"], [g["width"] for g in position["groups"]])
        return positions

    @staticmethod
    def _ls_features(stem: nn.Module, units: list, batch: torch.Tensor, wanted: set[int]) -> dict[int, torch.Tensor]:
        """One batch through an anchor up to the last wanted position: {0: stem output, b+1: unit b's output}."""
        out: dict[int, torch.Tensor] = {}
        if not wanted:
            return out
        x = stem(batch)
        if 0 in wanted:
            out[0] = x
        for b, unit in enumerate(units[:max(wanted)]):
            x = unit(x)
            if b + 1 in wanted:
                out[b + 1] = x
        return out
