"""The portable shared-weight pack (host): every exported stitch's ONNX pointing into one weights file.

The format, the writer and the device's ONNX Runtime-optimized variant live in ``snexport.device.pack`` (the device
repacks there); this is the host stage that packs the validated exports right after ``snexport export``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from snexport.device.pack import (DEFAULT_ALIGN, DEFAULT_MIN_BYTES, PACK_DIR, _WEIGHTS_PREFIX, _compare,
                                  _pack_stage, exported_outputs)
from snexport.errors import ExportValidationError
from snexport.records import Artifact


def pack_stitches(
    build_dir: str | os.PathLike,
    artifacts: Sequence[Artifact],
    *,
    align: int = DEFAULT_ALIGN,
    min_bytes: int = DEFAULT_MIN_BYTES,
    validate: bool = True,
    num_inputs: int = 2,
    seed: int = 0,
    progress: Optional[Callable[..., None]] = None,
    pack_dir: str = PACK_DIR,
    verified: bool = False,
) -> list[Artifact]:
    """Pack already exported and validated ONNX artifacts into ``<build>/<pack_dir>``; return packed artifacts.

    One weights file per precision (an FP16 pack never drags FP32 bytes into a device's memory). Each returned
    Artifact is the source's record with ``file``, ``size_bytes`` and ``sha256`` of the packed ONNX,
    ``weights_file``/``weights_sha256``/``weights_size_bytes`` of the shared file, ``weights_used_bytes`` (the
    distinct bytes of it this engine references), ``source_sha256`` = the standalone file it was packed from,
    ``versions["pack"]`` the pack settings and ``validation["pack"]`` the comparison with the standalone file.

    Portable: the packed files hold the exported graphs unchanged, so a pack made on the host runs on any device.
    Resuming: when ``pack.json`` records the same sources (by sha256) and settings and every file still has its
    recorded hash, the stored artifacts are returned without work. ``progress(1, description=...)`` is called
    once per artifact. Raises ExportValidationError if a packed file disagrees with its standalone file.
    ``verified``: the caller hashed the standalone files against these records in this run (``export_stage``).
    """
    settings = {"kind": "portable", "align": int(align), "min_bytes": int(min_bytes), "validate": bool(validate),
                "num_inputs": int(num_inputs), "seed": int(seed)}

    def sources(group, precision, workdir):
        return [Path(build_dir) / a.file for a in group]

    def check(art, tmp, weights):
        import onnx

        # The host has the onnx package: its checker (by path, so external data too) on top of the device's checks.
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            raise ExportValidationError(tmp.name, [f"onnx.checker: {str(exc).splitlines()[0]}"]) from None
        if not validate:
            return None
        return _compare(Path(build_dir) / art.file, tmp, weights, num_inputs, seed,
                        expected=exported_outputs(build_dir, art, num_inputs))

    return _pack_stage(build_dir, artifacts, pack_dir, settings, sources, check,
                       weights_prefix=_WEIGHTS_PREFIX, align=align, min_bytes=min_bytes, progress=progress,
                       verified=verified)
