"""The host's view of a build directory: the plan and the SN-Net weights on top of ``BuildFiles``.

``BuildFiles`` (standard library, both halves) owns the file names; this adds what needs the stitching stage:
``plan.json`` as a StitchPlan and ``snnet.safetensors`` as a live SN-Net.
"""

from __future__ import annotations

from snexport.buildfiles import BuildFiles, record_from_json
from snexport.errors import BuildDirError
from snexport.hashing import atomic_write_json
from snexport.records import AnchorSpec, Stitch
from snexport.stitching.plan import StitchPlan


class BuildDir(BuildFiles):
    def load_plan(self) -> StitchPlan:
        doc = self.plan_doc()
        try:
            # Field types first: plan.json may come from another machine, and a string where a number belongs
            # would otherwise surface as a TypeError stages later.
            for key, record in (("anchors", AnchorSpec), ("stitches", Stitch)):
                for item in doc.get(key) or ():
                    record_from_json(record, item)
            plan = StitchPlan.from_dict(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BuildDirError(f"{self.plan_path} is not a valid plan ({exc}); re-create it with `snexport stitch`") from None
        if doc.get("hash") != plan.hash:  # every plan snexport writes carries its hash
            raise BuildDirError(f"{self.plan_path} was edited (hash {doc.get('hash')} != {plan.hash}); re-create it with "
                                "`snexport stitch`")
        return plan

    def save_plan(self, plan: StitchPlan, info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.plan_path, dict(plan.to_dict(), build=info))

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

        from snexport.families.registry import build_module
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
        net = SNNet(plan, [build_module(spec, device="meta") for spec in plan.anchors])
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
