"""The build directory's files: every name is defined here and nowhere else.

    plan.json            the stitch plan + how the build was made (weight sources, data, LS-init facts)
    snnet.safetensors    the SN-Net (anchors + stitching layers), tagged with the plan hash
    train/               training checkpoint (state.safetensors + state.json), pre-training weights, log.jsonl
    eval.jsonl           one line per evaluated configuration
    candidates.json      the Pareto candidates chosen by `snexport select`
    engines/             one ONNX file per exported stitch (+ reference/, pack/, pack-ort/, TensorRT engines)
    exports.json         every exported file with its validation figures
    deploy.json          which of them the last export chose (what bench profiles and the manifest lists)
    engines.json         TensorRT engines built on the device from those ONNX files
    profile.jsonl        one line per measured engine per device
    manifest.json        what the device needs: engines, accuracy, measurements, hashes
    report/              human-facing plot and summary

Standard library only: both halves use it. The device half (bench, selector) reads a build directory or a bundle
through ``BuildFiles``; the host half adds the plan and SN-Net weights on top (``snexport.stitching.store``).
The anchors are stored with the stitching layers even before fine-tuning, so any later stage can run on another
machine without re-resolving weights (a design choice: a few hundred MB for DeiT-S/B, self-contained builds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

from snexport.errors import BuildDirError
from snexport.hashing import atomic_write_json, atomic_write_text, sha256_file
from snexport.records import EvalResult

PLAN = "plan.json"
SNNET = "snnet.safetensors"
TRAIN_DIR = "train"
TRAIN_STATE = "train/state.safetensors"  # optimizer tensors (safetensors: no pickle, nothing executes on load)
TRAIN_STATE_META = "train/state.json"  # epoch, scheduler, RNG states as plain JSON
TRAIN_STATE_LEGACY = "train/state.pt"  # pickled state of snexport <= 0.1 (refused, never unpickled)
TRAIN_INIT = "train/init.safetensors"  # the least-squares init, kept for `train --restart`
TRAIN_LOG = "train/log.jsonl"
EVAL = "eval.jsonl"
CANDIDATES = "candidates.json"
ENGINES_DIR = "engines"
REFERENCE_DIR = "engines/reference"  # inputs + FP32 PyTorch logits, to validate engines built on the device
PACK_DIR = "engines/pack"  # portable shared-weight pack (host)
ORT_PACK_DIR = "engines/pack-ort"  # ONNX Runtime-optimized pack (device)
SEGMENTS_DIR = "engines/segments"  # experimental TensorRT segment engines
PACK_INDEX = "pack.json"  # inside a pack directory
EXPORTS = "exports.json"
DEPLOY = "deploy.json"
TRT_ENGINES = "engines.json"
PROFILE = "profile.jsonl"
MANIFEST = "manifest.json"
REPORT_DIR = "report"
DEVICE_PROFILE = "device-profile.toml"  # a bundle's copy of the profile it was made for


def read_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of a .jsonl file, in order; lines a kill cut short (or anything not an object) are skipped.

    Every appender writes one short line at a time, so at most the last line can be incomplete; skipping it just
    redoes that one record.
    """
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            yield row


def append_jsonl(path: Path, row: dict) -> None:
    """Append one line; a previous line cut short by a kill (no newline) is not glued onto this one."""
    needs_newline = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, 2)
            needs_newline = fh.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(("\n" if needs_newline else "") + json.dumps(row) + "\n")
        fh.flush()


def read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file that a stage wrote; BuildDirError (one line, with ``fix``) when it is corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildDirError(f"{path} is missing; {fix}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BuildDirError(f"{path} ({what}) is corrupt ({type(exc).__name__}); {fix}") from None


class BuildFiles:
    """Paths and plain-JSON records of one build directory (or a device bundle, which holds a subset)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, rel: str) -> Path:
        return self.root / rel

    plan_path = property(lambda self: self.root / PLAN)
    snnet_path = property(lambda self: self.root / SNNET)
    train_dir = property(lambda self: self.root / TRAIN_DIR)
    eval_path = property(lambda self: self.root / EVAL)
    engines_dir = property(lambda self: self.root / ENGINES_DIR)
    exports_path = property(lambda self: self.root / EXPORTS)
    deploy_path = property(lambda self: self.root / DEPLOY)
    trt_engines_path = property(lambda self: self.root / TRT_ENGINES)
    candidates_path = property(lambda self: self.root / CANDIDATES)
    profile_path = property(lambda self: self.root / PROFILE)
    manifest_path = property(lambda self: self.root / MANIFEST)
    report_dir = property(lambda self: self.root / REPORT_DIR)

    @property
    def is_bundle(self) -> bool:
        """A device bundle: engines and manifest without the plan and SN-Net weights (`snexport bundle`)."""
        return not self.plan_path.is_file() and self.manifest_path.is_file()

    def require(self) -> "BuildFiles":
        if not self.root.is_dir():
            raise BuildDirError(f"build directory {self.root} does not exist; create one with `snexport stitch --out "
                                f"{self.root}` or `snexport build --out {self.root}`")
        if not self.plan_path.is_file():
            raise BuildDirError(f"{self.root} has no plan.json, so it is not a build directory; create it with "
                                f"`snexport stitch --out {self.root}`")
        return self

    def require_deployable(self) -> "BuildFiles":
        """A build directory or a bundle: what the device half works on."""
        if not self.root.is_dir():
            raise BuildDirError(f"{self.root} does not exist; pass a build directory or a bundle made by "
                                "`snexport bundle`")
        if not (self.plan_path.is_file() or self.manifest_path.is_file()):
            raise BuildDirError(f"{self.root} is neither a build directory (plan.json) nor a bundle (manifest.json); "
                                "pass the directory `snexport build` or `snexport bundle` wrote")
        return self

    # plan.json as plain JSON (the host reads it as a StitchPlan: snexport.stitching.store)
    def plan_doc(self) -> dict:
        self.require()
        doc = read_json(self.plan_path, "the plan", "re-create the build with `snexport stitch`")
        if not isinstance(doc, dict):
            raise BuildDirError(f"{self.plan_path} is not a plan; re-create the build with `snexport stitch`")
        return doc

    def info(self) -> dict:
        if not self.plan_path.is_file():
            return {}
        build = self.plan_doc().get("build", {})
        return build if isinstance(build, dict) else {}

    def update_info(self, **changes) -> None:
        doc = self.plan_doc()
        doc["build"] = dict(doc.get("build", {}), **changes)
        atomic_write_json(self.plan_path, doc)

    @property
    def accuracy_known(self) -> bool:
        """Accuracy means something unless some anchor is random and nothing was trained since."""
        info = self.info()
        return not info.get("random_init", False) or info.get("trained_epochs", 0) > 0

    def weights_hash(self) -> str:
        return sha256_file(self.snnet_path)[:16] if self.snnet_path.is_file() else ""

    # evaluation results
    def read_eval(self, weights_hash: Optional[str] = None) -> dict[str, EvalResult]:
        """Latest result per configuration for the current weights (stale lines are ignored, not deleted)."""
        weights_hash = weights_hash if weights_hash is not None else self.weights_hash()
        out: dict[str, EvalResult] = {}
        for row in read_jsonl(self.eval_path):
            try:
                rec = EvalResult.from_dict(row)
            except (TypeError, ValueError):
                continue
            if rec.weights_hash == weights_hash:
                out[rec.stitch_id] = rec
        return out

    def append_eval(self, rec: EvalResult) -> None:
        append_jsonl(self.eval_path, rec.to_dict())

    def write_text(self, rel: str, text: str) -> Path:
        path = self.root / rel
        atomic_write_text(path, text)
        return path
