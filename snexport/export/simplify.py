"""ONNX graph simplification (constant folding, shape-op cleanup) with a choice of tool.

onnxsim has native wheels and checks its own result; onnxslim is pure Python (NVIDIA ModelOpt uses it) and is the
choice where onnxsim has no wheel, e.g. on a Jetson. "none" copies the model unchanged. Either way the caller must
validate the result against PyTorch again: simplifiers constant-fold and can change dtypes.

Weights stay out of the tool (``simplify_model``): every initializer of at least ``STRIP_BYTES`` becomes a graph
input of the same name, type and shape for the tool's run and an initializer again afterwards. What a simplifier
does for an exported stitch is shape arithmetic (Shape/Gather/Concat chains feeding Reshape), and that never reads a
weight; what it would do with them is copy hundreds of MB through protobuf, its C++ side and ONNX Runtime several
times (onnxsim: 5 of the 5.4 s it spent on an 18-GFLOP DeiT-S/B stitch, against 0.3 s stripped). The exporters
already fold expressions of weights alone (TorchScript's constant folding, dynamo's optimizer). One fusion is lost:
onnxoptimizer's MatMul+Add into Gemm needs the weight as an initializer, so MatMul+Add stays as exported; ONNX
Runtime fuses it itself at load and the logits came out bit-identical, at equal latency.
"""

from __future__ import annotations

import os
from importlib import metadata as _metadata

from snexport.errors import ExportValidationError, SnexportError
from snexport.hashing import atomic_path

SIMPLIFIERS = ("onnxsim", "onnxslim", "none")
STRIP_BYTES = 4096  # initializers this large stay out of the simplifier (biases of tiny models go in; harmless)


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
    out = simplify_model(onnx.load(str(path_in)), simplifier, label=os.path.basename(os.fspath(path_in)))
    with atomic_path(path_out) as tmp:
        onnx.save(out, str(tmp))
    return name


def simplify_model(model, simplifier: str = "onnxsim", label: str = "model"):
    """The simplified ``ModelProto`` of ``model`` (whose large initializers it takes over: don't use ``model``
    afterwards). Weights never pass through the tool (module doc); metadata comes out as it went in."""
    simplifier_version(simplifier)  # a clear error when unknown or not installed
    meta = [(p.key, p.value) for p in model.metadata_props]
    if simplifier == "none":
        return model
    weights = _strip_weights(model)
    try:
        out = _run_tool(model, simplifier, label)
    except BaseException:
        _restore_weights(model, weights)  # the caller's model is whole again when the tool failed
        raise
    _restore_weights(out, weights)
    _restore_metadata(out, meta)
    return out


def _run_tool(model, simplifier: str, label: str):
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
        return out
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
    return out


def _strip_weights(model) -> dict:
    """Move every large initializer out of ``model`` (no copy) and declare it as a graph input instead."""
    from onnx import helper

    g = model.graph
    listed = {i.name for i in g.input}  # an initializer that is also an input (old IR) is an overridable default
    big = {t.name: t for t in g.initializer if len(t.raw_data) >= STRIP_BYTES and t.name not in listed}
    if not big:
        return {}
    small = [t for t in g.initializer if t.name not in big]
    del g.initializer[:]
    g.initializer.extend(small)
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big.values())
    return big


def _restore_weights(model, weights: dict) -> None:
    """Turn the stripped inputs of ``model`` back into initializers; inputs the tool dropped (unused) stay gone."""
    if not weights:
        return
    g = model.graph
    present = [i.name for i in g.input if i.name in weights]
    if not present:
        return
    inputs = [i for i in g.input if i.name not in weights]
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(weights[name] for name in present)


def _restore_metadata(model, meta: list[tuple[str, str]]) -> None:
    # Exactly the input's metadata, in its order: onnxslim may drop entries, and onnxsim 0.8 adds a dozen
    # "onnxsim.*" keys (lists of removed nodes, kilobytes long) that would bloat every stitch and make the metadata
    # depend on the tool. The simplifier's name and version are recorded in the Artifact instead.
    del model.metadata_props[:]
    for key, value in meta:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
