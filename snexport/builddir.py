"""The build directory: every stage reads its inputs from here and writes its result here.

    plan.json          the stitch plan + how the build was made (weight sources, data, LS-init facts)
    snnet.safetensors  the SN-Net (anchors + stitching layers), tagged with the plan hash
    train/             training checkpoints (state.pt) and log
    eval.jsonl         one line per evaluated configuration
    engines/, exports.json, profile.jsonl, manifest.json, report/   (later stages)

The anchors are stored with the stitching layers even before fine-tuning, so any later stage can run on another
machine without re-resolving weights (a design choice: a few hundred MB for DeiT-S/B, self-contained builds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from snexport.errors import BuildDirError
from snexport.hashing import atomic_write_json, atomic_write_text, sha256_file
from snexport.records import EvalResult
from snexport.stitching.plan import StitchPlan


class BuildDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    # paths
    plan_path = property(lambda self: self.root / "plan.json")
    snnet_path = property(lambda self: self.root / "snnet.safetensors")
    train_dir = property(lambda self: self.root / "train")
    eval_path = property(lambda self: self.root / "eval.jsonl")
    engines_dir = property(lambda self: self.root / "engines")
    exports_path = property(lambda self: self.root / "exports.json")
    candidates_path = property(lambda self: self.root / "candidates.json")
    profile_path = property(lambda self: self.root / "profile.jsonl")
    manifest_path = property(lambda self: self.root / "manifest.json")
    report_dir = property(lambda self: self.root / "report")

    def require(self) -> "BuildDir":
        if not self.root.is_dir():
            raise BuildDirError(f"build directory {self.root} does not exist; create one with `snexport stitch --out "
                                f"{self.root}` or `snexport build --out {self.root}`")
        if not self.plan_path.is_file():
            raise BuildDirError(f"{self.root} has no plan.json, so it is not a build directory; create it with "
                                f"`snexport stitch --out {self.root}`")
        return self

    # plan
    def _plan_doc(self) -> dict:
        self.require()
        try:
            return json.loads(self.plan_path.read_text())
        except json.JSONDecodeError as exc:
            raise BuildDirError(f"{self.plan_path} is corrupt ({exc.msg} at line {exc.lineno}); re-create the build "
                                "with `snexport stitch`") from None

    def load_plan(self) -> StitchPlan:
        doc = self._plan_doc()
        try:
            plan = StitchPlan.from_dict(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise BuildDirError(f"{self.plan_path} is not a valid plan ({exc}); re-create it with `snexport stitch`") from None
        if doc.get("hash") and doc["hash"] != plan.hash:
            raise BuildDirError(f"{self.plan_path} was edited (hash {doc['hash']} != {plan.hash}); re-create it with "
                                "`snexport stitch`")
        return plan

    def info(self) -> dict:
        return self._plan_doc().get("build", {})

    def save_plan(self, plan: StitchPlan, info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.plan_path, dict(plan.to_dict(), build=info))

    def update_info(self, **changes) -> None:
        doc = self._plan_doc()
        doc["build"] = dict(doc.get("build", {}), **changes)
        atomic_write_json(self.plan_path, doc)

    @property
    def accuracy_known(self) -> bool:
        """Accuracy means something unless some anchor is random and nothing was trained since."""
        info = self.info()
        return not info.get("random_init", False) or info.get("trained_epochs", 0) > 0

    # SN-Net weights
    def save_snnet(self, net, **meta) -> None:
        from safetensors.torch import save_file

        from snexport.hashing import atomic_path

        tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        metadata = {"plan_hash": net.plan.hash, **{k: str(v) for k, v in meta.items()}}
        with atomic_path(self.snnet_path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load_snnet(self, device: str = "cpu"):
        """Rebuild the SN-Net from the plan (no weight downloads) and load the stored weights."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from snexport.anchors import _create, check_plain_vit
        from snexport.stitching.snnet import SNNet

        plan = self.load_plan()
        if not self.snnet_path.is_file():
            raise BuildDirError(f"{self.root} has no snnet.safetensors; run `snexport stitch --out {self.root}` again")
        try:
            with safe_open(str(self.snnet_path), framework="pt") as fh:
                meta = fh.metadata() or {}
            state = load_file(str(self.snnet_path), device=device)
        except Exception as exc:
            raise BuildDirError(f"{self.snnet_path} is unreadable ({type(exc).__name__}); it may be truncated: re-run "
                                "`snexport stitch` (or `snexport train --resume` if training was interrupted)") from None
        if meta.get("plan_hash") != plan.hash:
            raise BuildDirError(
                f"{self.snnet_path} belongs to another plan (hash {meta.get('plan_hash')}, this plan is {plan.hash}); "
                "re-run `snexport stitch` for this plan or use the build directory it came from"
            )
        anchors = []
        for spec in plan.anchors:
            import torch

            with torch.device("meta"):
                m = _create(spec.timm_name, spec.create_kwargs)
            check_plain_vit(m, spec.name)
            anchors.append(m)
        net = SNNet(plan, anchors)
        net.load_state_dict(state, strict=True, assign=True)
        return net.eval()

    def snnet_plan_hash(self) -> str:
        """The plan hash stored in snnet.safetensors' metadata ('' if missing or unreadable)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.snnet_path), framework="pt") as fh:
                return (fh.metadata() or {}).get("plan_hash", "")
        except Exception:
            return ""

    def weights_hash(self) -> str:
        return sha256_file(self.snnet_path)[:16] if self.snnet_path.is_file() else ""

    # evaluation results
    def read_eval(self, weights_hash: Optional[str] = None) -> dict[str, EvalResult]:
        """Latest result per configuration for the current weights (stale lines are ignored, not deleted)."""
        weights_hash = weights_hash if weights_hash is not None else self.weights_hash()
        out: dict[str, EvalResult] = {}
        if not self.eval_path.is_file():
            return out
        for line in self.eval_path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = EvalResult.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut short by a kill: that configuration is simply evaluated again
            if rec.weights_hash == weights_hash:
                out[rec.stitch_id] = rec
        return out

    def append_eval(self, rec: EvalResult) -> None:
        # One short line per append: a kill can cut at most the line being written, which read_eval skips.
        # A cut line has no newline; start a fresh line so the next record is not glued onto it.
        needs_newline = False
        if self.eval_path.is_file() and self.eval_path.stat().st_size:
            with open(self.eval_path, "rb") as fh:
                fh.seek(-1, 2)
                needs_newline = fh.read(1) != b"\n"
        with open(self.eval_path, "a") as fh:
            fh.write(("\n" if needs_newline else "") + json.dumps(rec.to_dict()) + "\n")
            fh.flush()

    def write_text(self, rel: str, text: str) -> Path:
        path = self.root / rel
        atomic_write_text(path, text)
        return path
