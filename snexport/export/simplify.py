"""ONNX graph simplification (constant folding, shape-op cleanup) with a choice of tool.

onnxsim has native wheels and checks its own result; onnxslim is pure Python (NVIDIA ModelOpt uses it) and is the
choice where onnxsim has no wheel, e.g. on a Jetson. "none" copies the model unchanged. Either way the caller must
validate the result against PyTorch again: simplifiers constant-fold and can change dtypes.
"""

from __future__ import annotations

import os
from importlib import metadata as _metadata

from snexport.errors import ExportValidationError, SnexportError
from snexport.hashing import atomic_path

SIMPLIFIERS = ("onnxsim", "onnxslim", "none")


def simplifier_version(simplifier: str) -> str:
    """``"onnxsim 0.8.1"`` style name and version of an installed simplifier (``"none"`` for none)."""
    if simplifier == "none":
        return "none"
    if simplifier not in SIMPLIFIERS:
        raise SnexportError(f"unknown simplifier '{simplifier}'; choose one of {', '.join(SIMPLIFIERS)}")
    try:
        return f"{simplifier} {_metadata.version(simplifier).lstrip('v')}"
    except _metadata.PackageNotFoundError:
        alt = [s for s in SIMPLIFIERS if s not in (simplifier, "none")]
        raise SnexportError(f"simplifier '{simplifier}' is not installed; install it or use --simplifier {alt[0]} / none")


def simplify(path_in: str | os.PathLike, path_out: str | os.PathLike, simplifier: str = "onnxsim") -> str:
    """Simplify ``path_in`` into ``path_out`` (may be the same path; written atomically); returns name + version.

    ``metadata_props`` come out exactly as they went in (both tools rebuild the ModelProto; see _restore_metadata).
    """
    import onnx

    name = simplifier_version(simplifier)
    model = onnx.load(str(path_in))
    meta = [(p.key, p.value) for p in model.metadata_props]
    label = os.path.basename(os.fspath(path_in))

    if simplifier == "onnxsim":
        import onnxsim

        try:
            out, ok = onnxsim.simplify(model)
        except Exception as exc:  # noqa: BLE001 - onnxsim raises plain RuntimeErrors from C++
            raise SnexportError(
                f"onnxsim failed on {label}: {type(exc).__name__}: {str(exc).strip()[:300]}; "
                "retry with --simplifier onnxslim or none"
            ) from exc
        if not ok:
            # onnxsim runs both models on random inputs; a False here means its output disagrees with its input.
            raise ExportValidationError(label, ["onnxsim's own check failed: the simplified model's outputs differ "
                                                "from the exported model's; retry with --simplifier onnxslim or none"])
    elif simplifier == "onnxslim":
        import onnxslim

        try:
            out = onnxslim.slim(model)
        except Exception as exc:  # noqa: BLE001
            raise SnexportError(
                f"onnxslim failed on {label}: {type(exc).__name__}: {str(exc).strip()[:300]}; "
                "retry with --simplifier onnxsim or none"
            ) from exc
        if out is None:
            raise SnexportError(f"onnxslim returned no model for {label}; retry with --simplifier onnxsim or none")
    else:
        out = model

    _restore_metadata(out, meta)
    with atomic_path(path_out) as tmp:
        onnx.save(out, str(tmp))
    return name


def _restore_metadata(model, meta: list[tuple[str, str]]) -> None:
    # Exactly the input's metadata, in its order: onnxslim may drop entries, and onnxsim 0.8 adds a dozen
    # "onnxsim.*" keys (lists of removed nodes, kilobytes long) that would bloat every stitch and make the metadata
    # depend on the tool. The simplifier's name and version are recorded in the Artifact instead.
    del model.metadata_props[:]
    for key, value in meta:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
