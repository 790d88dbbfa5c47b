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

from snexport.stitching.layers import assign_mean_solution, least_squares_solution, make_stitching_layer, pinv_with_bias
from snexport.families.registry import family_of
from snexport.stitching.plan import StitchPlan


class StitchedNet(nn.Module):
    """One configuration as a plain module: stem → front units → stitching layer → back units → head.

    An anchor is the degenerate case with no stitching layer and no back blocks.
    """

    def __init__(self, embed: nn.Module, front_blocks: Iterable[nn.Module], stitch: Optional[nn.Module],
                 back_blocks: Iterable[nn.Module], head: nn.Module, stitch_id: str = ""):
        super().__init__()
        self.embed = embed
        self.front_blocks = nn.Sequential(*front_blocks)
        self.stitch = stitch if stitch is not None else nn.Identity()
        self.back_blocks = nn.Sequential(*back_blocks)
        self.head = head
        self.stitch_id = stitch_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.front_blocks(x)
        x = self.stitch(x)
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
        stage_of = {(s.front, s.back, s.layer): layer_stage(plan, s) for s in plan.stitch_only}
        for front, back, layer in plan.layer_keys:
            fa, ba = plan.anchor(front), plan.anchor(back)
            st = stage_of[(front, back, layer)]
            # Width and layout are those of the stage the layer sits in (Swin-T→S stage 2: 384→384 on (B,H,W,C);
            # ResNet-18→50 layer2: Conv2d 128→512 on NCHW).
            self.stitch_layers[self._key(front, back, layer)] = make_stitching_layer(
                fa.stage_widths[st], ba.stage_widths[st], fa.stage_layout[st], ba.stage_layout[st])
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
        fspec, bspec = self.plan.anchor(s.front), self.plan.anchor(s.back)
        front = self.anchors[self._index[s.front]]
        back = self.anchors[self._index[s.back]]
        ffam, bfam = family_of(fspec), family_of(bspec)
        if s.is_anchor:
            return StitchedNet(ffam.stem(front), ffam.units(front), None, [], ffam.head(front), s.id)
        return StitchedNet(
            ffam.stem(front),
            ffam.units(front)[: s.cut + 1],
            self.stitch_layers[self._key(s.front, s.back, s.layer)],
            bfam.units(back)[s.resume:],
            bfam.head(back),
            s.id,
        )

    @property
    def config_ids(self) -> list[str]:
        return [s.id for s in self.plan.stitches]

    def forward(self, x: torch.Tensor, stitch_id: str) -> torch.Tensor:
        if stitch_id not in self._routes:
            self.plan.get(stitch_id)  # raises UnknownStitchError with the valid ids
        return self._routes[stitch_id](x)

    def materialize(self, stitch_id: str) -> StitchedNet:
        """A standalone copy of one configuration, in eval mode, sharing nothing with the SN-Net."""
        if stitch_id not in self._routes:
            self.plan.get(stitch_id)
        return copy.deepcopy(self._routes[stitch_id]).eval()

    # ----------------------------------------------------------------------------- least-squares init

    @torch.no_grad()
    def init_stitching_layers(self, images: torch.Tensor, batch_size: int = 32,
                              progress: Optional[Callable[[int, int], None]] = None) -> dict:
        """Least-squares init of every stitching layer from calibration images (spec: ~100 images).

        X = front output of unit j, Y = back output of unit k-1 (k = 0: the back anchor's embedding output),
        flattened over images and tokens or pixels (channels last). Anchors run in eval mode. Only the features
        some stitch uses are kept (100 Swin-B images hold GBs of features otherwise). Returns timing facts.
        """
        started = time.perf_counter()
        was_training = self.training
        self.eval()
        stitches = [s for s in self.plan.stitches if not s.is_anchor]
        # Per anchor, the positions needed: 0 = embedding output, b+1 = output of unit b.
        needed: list[set[int]] = [set() for _ in self.plan.anchors]
        for s in stitches:
            needed[self._index[s.front]].add(s.cut + 1)
            needed[self._index[s.back]].add(s.resume)
        acts: list[dict[int, torch.Tensor]] = []
        for spec, model, wanted in zip(self.plan.anchors, self.anchors, needed):
            family = family_of(spec)
            stem, units = family.stem(model), family.units(model)
            last = max(wanted, default=0)
            chunks: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
            for start in range(0, images.shape[0], batch_size):
                x = stem(images[start:start + batch_size])
                if 0 in chunks:
                    chunks[0].append(x)
                for b, unit in enumerate(units[:last]):
                    x = unit(x)
                    if b + 1 in chunks:
                        chunks[b + 1].append(x)
            acts.append({i: torch.cat(c) for i, c in chunks.items()})
        collect_s = time.perf_counter() - started

        solve_started = time.perf_counter()
        solutions: dict[str, list] = {}
        pinv_cache: dict[tuple[int, int], torch.Tensor] = {}
        for n, s in enumerate(stitches):
            fi, bi = self._index[s.front], self._index[s.back]
            stage = layer_stage(self.plan, s)
            fspec, bspec = self.plan.anchors[fi], self.plan.anchors[bi]
            if (fi, s.cut) not in pinv_cache:
                pinv_cache[(fi, s.cut)] = pinv_with_bias(acts[fi][s.cut + 1], fspec.stage_layout[stage])
            y = acts[bi][s.resume]  # output of back unit resume-1 (index 0: embedding)
            solutions.setdefault(self._key(s.front, s.back, s.layer), []).append(
                least_squares_solution(pinv_cache[(fi, s.cut)], y, bspec.stage_layout[stage])
            )
            if progress:
                progress(n + 1, len(stitches))
        for key, sols in solutions.items():
            assign_mean_solution(self.stitch_layers[key], sols)
        self.train(was_training)
        return {
            "calibration_images": int(images.shape[0]),
            "collect_seconds": round(collect_s, 3),
            "solve_seconds": round(time.perf_counter() - solve_started, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "layers": len(solutions),
        }
