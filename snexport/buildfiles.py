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

import dataclasses
import errno
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from snexport.errors import BuildDirError, StorageError
from snexport.hashing import atomic_write_json, atomic_write_text, sha256_file
from snexport.records import EvalResult

PLAN = "plan.json"
SNNET = "snnet.safetensors"
TRAIN_DIR = "train"
# The training checkpoint is ONE file, so one rename commits it: weights, optimizer moments and the torch RNG as
# tensors, and (in its safetensors metadata) epoch, scheduler, Python RNG and the run's log as plain JSON.
# safetensors: no pickle, nothing executes on load.
TRAIN_STATE = "train/state.safetensors"
TRAIN_STATE_META = "train/state.json"  # readable summary of that checkpoint (epoch, log); never read to resume
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


# ---------------------------------------------------------------------------------------------------------------
# Reading JSON that came from another machine. Build directories and bundles travel (host -> device, colleague ->
# colleague), so every file in them is untrusted: limits are checked before json.loads can recurse or allocate, and
# numbers are kept where float() and the formatting code cannot overflow.

MAX_JSON_BYTES = 64 << 20  # a manifest of hundreds of engines and devices is a few MB
MAX_JSONL_BYTES = 256 << 20  # profile.jsonl / eval.jsonl grow with every bench and evaluation
MAX_JSON_DEPTH = 64  # our files nest < 10 levels; json.loads recurses once per level (RecursionError ~1000)
_MAX_INT_DIGITS = 19  # |n| < 2**63: sizes, counts and ids; a 10**309 would overflow every float() downstream
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIRS = re.compile(r"\[\]|\{\}")


class JsonLimitError(ValueError):
    """JSON that breaks a limit of ``parse_json`` (too big, too deep, a number out of range)."""


def parse_json(raw: bytes | str, *, allow_nan: bool = True, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted files: ValueError (a ``JsonLimitError`` for a broken limit) and nothing else.

    Nesting is measured before parsing (``json.loads`` would raise RecursionError, and every recursive consumer
    after it too); integers must fit in 64 bits and float literals must be finite (``1e999`` parses as inf);
    ``NaN``/``Infinity`` (not JSON, but Python writes them) only with ``allow_nan``.
    """
    if len(raw) > max_bytes:
        raise JsonLimitError(f"{len(raw)} bytes, over the {max_bytes >> 20} MiB limit")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    depth = _nesting_depth(raw, max_depth)
    if depth > max_depth:
        raise JsonLimitError(f"nested deeper than {max_depth} levels")
    return json.loads(raw, parse_int=_bounded_int, parse_float=_finite_float,
                      parse_constant=float if allow_nan else _no_constant)


def _nesting_depth(text: str, limit: int) -> int:
    """An upper bound of how deep [] and {} nest outside strings, counted up to ``limit + 1`` (C-speed passes).

    Each pass deletes the innermost empty pairs; a document nested n deep is empty after n passes. What is left
    when nothing more shrinks is unbalanced: each opener there could still be one more level for json.loads
    (which then reports the syntax error), so they count too.
    """
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    depth = 0
    while brackets and depth <= limit:
        shorter = _EMPTY_PAIRS.sub("", brackets)
        if len(shorter) == len(brackets):
            return depth + brackets.count("[") + brackets.count("{")
        brackets, depth = shorter, depth + 1
    return depth


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS or abs(int(text)) >= 2**63:
        raise JsonLimitError(f"integer {text[:20]}{'...' if len(text) > 20 else ''} is out of range (|n| < 2**63)")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise JsonLimitError(f"non-JSON number {name}")


def read_limited(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refusing more than ``max_bytes`` without reading them (OSError for unreadable files)."""
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JsonLimitError(f"over the {max_bytes >> 20} MiB limit")
    return data


def read_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of a .jsonl file, in order; lines a kill cut short (or anything not an object) are skipped.

    Every appender writes one short line at a time, so at most the last line can be incomplete; skipping it just
    redoes that one record. A file over ``MAX_JSONL_BYTES`` or unreadable is a BuildDirError.
    """
    if not path.is_file():
        return
    try:
        data = read_limited(path, MAX_JSONL_BYTES)
    except (OSError, JsonLimitError) as exc:
        raise BuildDirError(f"cannot read {path} ({_reason(exc)}); delete it and re-run the stage that wrote it") from None
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = parse_json(line)
        except ValueError:
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
        return parse_json(read_limited(path, MAX_JSON_BYTES))
    except FileNotFoundError:
        raise BuildDirError(f"{path} is missing; {fix}") from None
    except (OSError, ValueError) as exc:
        raise BuildDirError(f"{path} ({what}) is unreadable or corrupt ({_reason(exc)}); {fix}") from None


def _reason(exc: BaseException) -> str:
    """One line on why a file could not be read: the limit it broke, or the OS error without the path."""
    if isinstance(exc, JsonLimitError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _json_type_ok(value: Any, annotation: str) -> bool:
    """Does a JSON value fit a record field's annotation (the strings ``from __future__ import annotations``
    leaves: "str", "int", "float", "tuple", "dict", "Optional[int]", ...)? Unknown annotations accept anything."""
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        return value is None or _json_type_ok(value, annotation[len("Optional["):-1])
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "tuple":
        return isinstance(value, (list, tuple))
    if annotation == "dict":
        return isinstance(value, dict)
    return True


def record_from_json(cls, row: Any):
    """A record (``snexport.records``) from a JSON object read from disk; ValueError naming the first field
    whose type is wrong, so a tampered or corrupt file is refused here instead of crashing a later stage."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    for f in dataclasses.fields(cls):
        if f.name in row and not _json_type_ok(row[f.name], str(f.type)):
            raise ValueError(f"field '{f.name}' must be {f.type}, got {type(row[f.name]).__name__}")
    try:
        return cls.from_dict(row)
    except TypeError as exc:  # a required field is missing
        raise ValueError(str(exc)) from None


def require_writable(directory: Path, command: str) -> None:
    """Refuse, before any long work, a directory this process cannot write (read-only mount, permissions, full).

    Probes by creating and deleting a file: permission bits do not show a read-only mount, and root ignores them.
    A directory that does not exist yet is checked at its nearest existing parent (where it would be created).
    """
    target = Path(directory)
    probe_dir = target
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise BuildDirError(f"{probe_dir} is a file, not a directory; pass another path to `{command}`")
    try:
        fd, name = tempfile.mkstemp(prefix=".snexport-write-check.", suffix=".tmp", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise storage_error(exc, probe_dir, f"`{command}` needs to write there") from None


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the disk refused a write: nothing of ours is wrong


def storage_error(exc: OSError, where: Path, doing: str) -> StorageError:
    """The one-line error for a write the disk refused (read-only, full, no permission)."""
    what = {errno.EROFS: "is on a read-only file system", errno.ENOSPC: "is on a full disk",
            errno.EDQUOT: "is over its disk quota", errno.EACCES: "is not writable by this user",
            errno.EPERM: "is not writable by this user"}.get(exc.errno, f"cannot be written ({exc.strerror})")
    fix = ("free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
           else "copy the directory somewhere writable (or fix its permissions)")
    return StorageError(f"{where} {what}, and {doing}; {fix} and re-run the same command: finished work is kept")


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
    def read_eval(self, weights_hash: Optional[str] = None, precision: str = "fp32") -> dict[str, EvalResult]:
        """Latest result per configuration for the current weights (stale lines are ignored, not deleted); the
        PyTorch model's by default, else those measured on the exported files of ``precision`` (e.g. "int8")."""
        weights_hash = weights_hash if weights_hash is not None else self.weights_hash()
        out: dict[str, EvalResult] = {}
        for row in read_jsonl(self.eval_path):
            try:
                rec = record_from_json(EvalResult, row)
                if rec.top1 is not None and not 0 <= rec.top1 <= 100:
                    raise ValueError(f"top-1 {rec.top1}% is not a percentage")
            except ValueError as exc:
                # Like a line a kill cut short: that configuration counts as not evaluated and is redone.
                logging.getLogger("snexport").warning("%s: ignoring a malformed line (%s)", self.eval_path, exc)
                continue
            if rec.weights_hash == weights_hash and rec.precision == precision:
                out[rec.stitch_id] = rec
        return out

    def append_eval(self, rec: EvalResult) -> None:
        append_jsonl(self.eval_path, rec.to_dict())

    def write_text(self, rel: str, text: str) -> Path:
        path = self.root / rel
        atomic_write_text(path, text)
        return path
