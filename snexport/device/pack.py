"""Engine packs: every stitch's ONNX points into one shared weights file that holds each distinct tensor once.

Why: N standalone stitch files store (and a device loads) the anchors' blocks N times; SN-Net itself keeps one
copy of each anchor (issue 5). A pack keeps one copy on disk, and the selector maps that file once and hands
the same buffers to every ONNX Runtime session (``OnnxRuntimeRunner(shared_initializers=...)``), so preloading
all Pareto stitches costs about one copy of the distinct weights.

Layout, in ``<build>/engines/pack/``::

    <stem>.onnx                 one per stitch: the standalone graph, every float initializer of at least
                                ``min_bytes`` moved to external data (location/offset/length) in the weights file
    weights-<precision>-<sha16>.bin   the distinct tensors, once each (one file per precision)
    pack.json                   what was packed from what, the settings, and per-file facts (for resuming)

- Identity is content: the exporter names a block's weight differently in every file (``val_17``,
  ``onnx::MatMul_589``), but SN-Net routes reuse the anchors' modules, so a block's weights come out as the same
  bytes in every file that runs it, also after onnxsim's constant folding (measured: the distinct bytes of all
  packed files equal the distinct bytes of the SN-Net parameters they use; see docs/packs.md). Tensors are keyed
  by sha256 of their raw bytes; two initializers with equal bytes share storage even if their dtype or shape
  differ, since each ONNX file keeps its own dtype and dims and the file is only bytes.
- Alignment: a tensor of at least ``align`` bytes (default 64 KiB) starts at a multiple of ``align``: 64 KiB is
  the mapping granularity of Windows and of arm64 kernels built with 64 KiB pages, and a multiple of every
  common page size, so the same file maps page-exactly everywhere (ONNX Runtime maps external data itself when
  it loads a file alone). Smaller tensors (biases, norms, the stitching layers of the small demo models) are
  packed together after the large ones at 64-byte (cache line, AVX-512) alignment: page-aligning them would only
  add padding, since nothing maps less than a page. ViT weight matrices are multiples of 64 KiB already
  (DeiT-B qkv: 768x2304x4 B = 108 x 64 KiB), so the padding is small; it is measured and reported.
- Only floating-point tensors are moved out: integer initializers are shape constants that the graph optimizer
  must read anyway, and tensors under ``min_bytes`` cost more in alignment and bookkeeping than they share.
- The weights file name carries its own sha256 prefix, so a packed ONNX can only ever resolve to the bytes it
  was packed against: a re-pack writes a new file and never changes the layout under an existing ONNX. Files
  are committed weights first, then each ONNX (temp + rename), then ``pack.json``; a killed run leaves only
  complete files, and stale ones are removed by the next run.
- Every packed ONNX is a standalone valid model: ONNX Runtime loads it alone (it reads its tensors from the
  weights file), and on the host ``onnx.checker`` passes too (the host stage adds that check). Validation runs
  each one that way *and* through shared initializers mapped from the weights file (what the selector does) and
  compares both with the standalone file's outputs.
- No ``onnx`` package: files are read and rewritten with ``snexport.device.onnxproto`` (standard library), so a
  device with only ONNX Runtime can repack. Only location/offset/length and ORT's own ``prepacked*`` entries are
  written as external-data keys (ORT refuses any other key but ``checksum``).

Two kinds, one format: ``pack_stitches`` (host) makes the *portable* pack above — the exported graphs unchanged,
runnable anywhere; the selector hands the mapped weights to sessions with ONNX Runtime's prepacking off, which
costs GEMM speed on CPU. ``optimize_pack`` (device) makes ``<build>/engines/pack-ort/``: ONNX Runtime's optimized
graphs for this CPU with their *prepacked* weights serialized and deduplicated into the same kind of file, which
ORT maps itself in every session: prepacked speed at about one copy of the weights, tied to that ORT version
and CPU (docs/packs.md has the measurements behind this split).

``snexport.export.pack.pack_stitches`` (host) and ``optimize_pack`` (here, device) are the stage functions (build
directory + export artifacts in, packed artifacts out); ``write_pack`` does the packing on plain files;
``tensor_layout`` and ``verify_weights_file`` read a pack back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from snexport import buildfiles
from snexport.device import onnxproto
from snexport.errors import ExportValidationError, SnexportError, WeightsError
from snexport.hashing import TMP_SUFFIX, atomic_write_json, commit, sha256_file, sha256_json, temp_path_for
from snexport.records import Artifact

log = logging.getLogger("snexport.export")

PACK_DIR = buildfiles.PACK_DIR  # relative to the build directory
ORT_PACK_DIR = buildfiles.ORT_PACK_DIR  # optimize_pack: tied to one ONNX Runtime version and CPU
INDEX_FILE = buildfiles.PACK_INDEX
PACK_VERSION = 2  # bump when the same inputs and settings would give a different pack
DEFAULT_ALIGN = 64 * 1024
SMALL_ALIGN = 64
DEFAULT_MIN_BYTES = 64
_WEIGHTS_PREFIX = "weights"
_CHUNK = 16 << 20

# TensorProto element types moved to the weights file: float32, float16, float64 (bfloat16 stays inline: numpy
# has no bfloat16, so the selector could not hand it to ONNX Runtime as a view).
_FLOAT_TYPES = frozenset({1, 10, 11})


class PackError(SnexportError):
    """A pack that cannot be built or does not match what it was built from."""


@dataclasses.dataclass
class _Placement:
    length: int
    big: bool
    offset: int = -1  # final offset in the weights file (small tensors get theirs once the large ones are in)


@dataclasses.dataclass
class PackedFile:
    """One packed ONNX (in memory until committed) and what it uses of the weights file."""

    source: Path
    name: str  # file name in the pack directory
    model: Any  # onnxproto.Model (graph only) with external-data entries; offsets filled in by write_pack
    refs: list  # (initializer index, content key, prepacked blobs) for every externalised initializer
    used_keys: set  # distinct content keys a loaded session keeps using (for a weight that ONNX Runtime has a
    # serialized prepacked blob of, the blob: ORT releases the original after checking the blob against it)
    externalized_bytes: int  # sum of its externalised initializers (counting repeats within the file)
    inline_bytes: int  # initializer bytes left inside the ONNX

    def used_bytes(self, placements: dict) -> int:
        return sum(placements[k].length for k in self.used_keys)


@dataclasses.dataclass
class PackLayout:
    """Result of ``write_pack``: the committed weights file and the packed files, with the layout facts."""

    weights_path: Path
    weights_sha256: str
    weights_size: int
    files: list  # PackedFile, in input order
    placements: dict  # content key -> _Placement
    distinct_bytes: int  # sum of distinct tensors' lengths (no padding)
    total_bytes: int  # what the same tensors take summed over the standalone files
    padding_bytes: int
    align: int

    @property
    def dedup_ratio(self) -> float:
        return self.total_bytes / self.distinct_bytes if self.distinct_bytes else 1.0

    def summary(self) -> dict:
        shared = sum(1 for k in self.placements if sum(k in f.used_keys for f in self.files) > 1)
        return {
            "weights_file": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "weights_size_bytes": self.weights_size,
            "distinct_tensors": len(self.placements),
            "tensors_in_several_files": shared,
            "distinct_bytes": self.distinct_bytes,
            "standalone_tensor_bytes": self.total_bytes,
            "padding_bytes": self.padding_bytes,
            "dedup_ratio": round(self.dedup_ratio, 4),
            "align": self.align,
            "small_align": SMALL_ALIGN,
        }


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _read_onnx(path: Path):
    """An ONNX file as an ``onnxproto.Model``; a file that is no ONNX model is a PackError naming it."""
    try:
        return onnxproto.read_model(path)
    except onnxproto.OnnxFormatError as exc:
        raise PackError(f"{path} is not a readable ONNX model ({exc}); re-run `snexport export`") from None


def _tensor_bytes(tensor) -> Any:
    """The tensor's little-endian raw bytes, whichever field the exporter stored them in (a zero-copy view of
    raw_data where it is there)."""
    try:
        return tensor.data_bytes()
    except onnxproto.OnnxFormatError as exc:
        raise PackError(f"cannot read initializer '{tensor.name}': {exc}") from None


def _inline_size(tensor) -> int:
    """Bytes an initializer that stays in the ONNX takes (STRING tensors have no element layout: their encoding)."""
    try:
        return len(tensor.data_bytes())
    except onnxproto.OnnxFormatError:
        return len(tensor.msg.to_bytes())


# Where a moved tensor points until the weights file has its final (content-hashed) name.
_PENDING = "pending.bin"


def _external_ranges(tensor, base: Path) -> tuple[Path, int, int, list]:
    """(file, offset, length, prepacked) of a tensor already stored as external data.

    ``prepacked`` lists ONNX Runtime's serialized prepacked blobs of that weight (``session.save_external_prepacked_
    constant_initializers``), as (entry key, kernel key, [(offset, length, checksum), ...]); the entry format is
    ``kernel_key|offset;length;checksum[|...]`` under keys starting with ``prepacked`` (ORT's
    tensor_external_data_info.cc).
    """
    info = tensor.external_data
    if not info.get("location"):
        raise PackError(f"initializer '{tensor.name}' keeps external data without a location; re-export the file")
    path = base / info["location"]
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else path.stat().st_size - offset
    except (ValueError, OSError) as exc:
        raise PackError(f"cannot locate the external data of '{tensor.name}' ({exc}); re-export the file") from None
    prepacked = []
    for key, value in info.items():
        if not key.startswith("prepacked"):
            continue
        kernel_key, *blobs = value.split("|")
        parts = [tuple(b.split(";")) for b in blobs]
        if not kernel_key or not parts or any(len(p) != 3 for p in parts):
            raise PackError(f"cannot read ONNX Runtime's prepacked entry {key}={value!r} of '{tensor.name}'")
        prepacked.append((key, kernel_key, [(int(o), int(n), c) for o, n, c in parts]))
    return path, offset, length, prepacked


def _read_range(files: dict, path: Path, offset: int, length: int) -> bytes:
    if path not in files:
        files[path] = open(path, "rb")  # noqa: SIM115 - closed by write_pack
    fh = files[path]
    fh.seek(offset)
    data = fh.read(length)
    if len(data) != length:
        raise PackError(f"{path} ends before {offset}+{length}: truncated external data")
    return data


def write_pack(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    align: int = DEFAULT_ALIGN,
    min_bytes: int = DEFAULT_MIN_BYTES,
    weights_prefix: str = _WEIGHTS_PREFIX,
    names: Optional[Sequence[str]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> PackLayout:
    """Write the shared weights file for ``sources`` (ONNX files) into ``out_dir``.

    Returns the layout with the packed models *in memory* (``files[i].model``), already pointing at the committed
    weights file: the caller validates and commits them (``commit_packed``), so an ONNX never reaches its final
    name before it was checked. ``names`` are the packed files' names (default: the sources' names); ``progress``
    is called with each source's name after it was read.

    Embedded float initializers of at least ``min_bytes`` are moved out; initializers a source already keeps in
    external data are moved whatever their type (their old file is not part of the pack), together with ONNX
    Runtime's serialized prepacked blobs, each blob deduplicated like a tensor (``optimize_pack``).

    One pass over the sources: each chunk is hashed as it is read; large chunks are streamed to the weights file
    at their aligned offsets, small ones kept in memory and appended at the end; the packed models are kept
    without their weights (graphs only: kilobytes), and the offsets filled in at the end.
    """
    if align < SMALL_ALIGN or align & (align - 1):
        raise PackError(f"align must be a power of two >= {SMALL_ALIGN}, got {align}")
    if min_bytes < 0:
        raise PackError(f"min_bytes must be >= 0, got {min_bytes}")
    sources = [Path(s) for s in sources]
    names = list(names) if names is not None else [s.name for s in sources]
    if len(names) != len(sources) or len(set(names)) != len(names):
        raise PackError(f"packed file names must be unique, one per source; got {names}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    placements: dict[bytes, _Placement] = {}
    small: dict[bytes, bytes] = {}  # key -> bytes of chunks below `align`, written after the large ones
    files: list[PackedFile] = []
    total = 0
    digest = hashlib.sha256()
    tmp = temp_path_for(out_dir / f"{weights_prefix}.bin")
    readers: dict = {}
    try:
        with open(tmp, "wb") as fh:
            position = 0

            def write(data) -> None:
                nonlocal position
                fh.write(data)
                digest.update(data)
                position += len(data)

            def place(data) -> bytes:
                key = hashlib.sha256(data).digest()
                if key not in placements:
                    big = len(data) >= align
                    placements[key] = _Placement(len(data), big)
                    if big:
                        write(b"\0" * (_round_up(position, align) - position))
                        placements[key].offset = position
                        write(data)
                    else:
                        small[key] = bytes(data)
                return key

            for source, name in zip(sources, names):
                model = _read_onnx(source)
                refs, used, ext_bytes, inline = [], set(), 0, 0
                for index, tensor in enumerate(model.graph.initializers):
                    prepacked: list = []
                    if tensor.data_location == onnxproto.DATA_LOCATION_EXTERNAL:
                        path, offset, length, entries = _external_ranges(tensor, source.parent)
                        data = _read_range(readers, path, offset, length)
                        for entry_key, kernel_key, blobs in entries:
                            keys = [(place(_read_range(readers, path, o, n)), c) for o, n, c in blobs]
                            prepacked.append((entry_key, kernel_key, keys))
                    elif tensor.data_type not in _FLOAT_TYPES:
                        inline += _inline_size(tensor)
                        continue
                    else:
                        data = _tensor_bytes(tensor)
                        if len(data) < max(min_bytes, 1):
                            inline += len(data)
                            continue
                    key = place(data)
                    refs.append((index, key, prepacked))
                    if prepacked:
                        used.update(k for _, _, keys in prepacked for k, _ in keys)
                    else:
                        used.add(key)
                    ext_bytes += len(data) + sum(placements[k].length for _, _, keys in prepacked for k, _ in keys)
                    tensor.set_external_data(_PENDING, 0, len(data))  # drops the bytes; the real place is set below
                # Keep the graph only: parsing its weightless bytes anew lets the source's buffer (all its
                # embedded weights) go now rather than when the whole pack is written.
                model = onnxproto.parse_model(model.to_bytes())
                total += ext_bytes
                files.append(PackedFile(source, name, model, refs, used, ext_bytes, inline))
                if progress is not None:
                    progress(source.name)
            # Small chunks after the large ones, in first-use order.
            for key, data in small.items():
                write(b"\0" * (_round_up(position, SMALL_ALIGN) - position))
                placements[key].offset = position
                write(data)
            fh.flush()
            os.fsync(fh.fileno())
        weights_sha = digest.hexdigest()
        weights_name = f"{weights_prefix}-{weights_sha[:16]}.bin"
        final = out_dir / weights_name
        if final.is_file() and final.stat().st_size == position and sha256_file(final) == weights_sha:
            tmp.unlink()  # an identical pack is already there (re-run): keep the file a running selector maps
        else:
            commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for reader in readers.values():
            reader.close()

    for packed in files:
        initializers = packed.model.graph.initializers
        for index, key, prepacked in packed.refs:
            # ORT's prepacked entries: "kernel_key|offset;length;checksum|..." (tensor_external_data_info.cc).
            extra = [(entry_key, kernel_key + "|" + "|".join(f"{placements[k].offset};{placements[k].length};{c}"
                                                               for k, c in keys))
                     for entry_key, kernel_key, keys in prepacked]
            initializers[index].set_external_data(weights_name, placements[key].offset, placements[key].length, extra)
    distinct = sum(p.length for p in placements.values())
    return PackLayout(final, weights_sha, position, files, placements, distinct, total, position - distinct, align)


def commit_packed(packed: PackedFile, out_dir: str | os.PathLike,
                  check: Optional[Callable[[Path], Any]] = None) -> tuple[Path, Any]:
    """Serialize one packed model next to its weights file, run ``check(temp_path)``, then rename it into place.

    The temp file sits in the same directory as the final one, so its external-data location resolves the same.
    Before ``check``, every external tensor must lie inside a file of ``out_dir`` (what ``onnx.checker`` checks of
    external data, done here without it). Returns the final path and whatever ``check`` returned.
    """
    out_dir = Path(out_dir)
    final = out_dir / packed.name
    tmp = temp_path_for(final)
    try:
        with open(tmp, "wb") as fh:
            for chunk in packed.model.msg.chunks():
                fh.write(chunk)
        _check_external_data(tmp)
        result = check(tmp) if check is not None else None
        commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final, result


def _check_external_data(path: Path) -> None:
    """Every external tensor of ``path`` names a plain file next to it and lies within that file's bytes."""
    sizes: dict = {}
    for name, info in onnxproto.initializer_infos(path).items():
        if info["data_location"] != onnxproto.DATA_LOCATION_EXTERNAL:
            continue
        location = info["location"] or ""
        if not location or Path(location).name != location:
            raise PackError(f"{path.name}: initializer '{name}' points at {location!r}, not a file in the pack "
                            "directory; this is a bug in the packer")
        if location not in sizes:
            target = path.parent / location
            sizes[location] = target.stat().st_size if target.is_file() else -1
        end = (info["offset"] or 0) + (info["length"] or 0)
        if sizes[location] < end:
            raise PackError(f"{path.name}: initializer '{name}' lies past the end of {location} ({end} bytes "
                            f"needed, {max(sizes[location], 0)} there); re-run the pack")


# -------------------------------------------------------------------------------------------------------------
# Reading a pack back


def tensor_layout(onnx_path: str | os.PathLike) -> dict[str, dict]:
    """External initializers of one packed ONNX: name -> {location (resolved), offset, length, dtype, shape}."""
    from snexport.device.runtime.onnxruntime_runner import external_initializers

    return external_initializers(onnx_path)


def verify_weights_file(path: str | os.PathLike, sha256: str, size: Optional[int] = None) -> None:
    """Refuse a weights file that is missing, truncated or altered (WeightsError saying which)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} is missing; copy the whole pack directory or re-run the pack "
                           "(`snexport export --pack`)")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise WeightsError(f"weights file {path} is {actual} bytes, expected {size}: truncated or from another "
                           "build; re-run the pack")
    if sha256_file(path) != sha256:
        raise WeightsError(f"weights file {path} does not match its sha256 (altered or from another build); "
                           "re-run the pack")


# -------------------------------------------------------------------------------------------------------------
# The stage: build directory + export artifacts -> packed artifacts


def optimize_pack(
    build_dir: str | os.PathLike,
    artifacts: Sequence[Artifact],
    *,
    align: int = DEFAULT_ALIGN,
    min_bytes: int = DEFAULT_MIN_BYTES,
    validate: bool = True,
    num_inputs: int = 2,
    seed: int = 0,
    progress: Optional[Callable[..., None]] = None,
    pack_dir: str = ORT_PACK_DIR,
) -> list[Artifact]:
    """Device step for ONNX Runtime on CPU: a pack whose prepacked weights are shared too (docs/packs.md).

    ORT's CPU kernels re-lay MatMul/Gemm weights out once per session ("prepacking") into private memory, so
    the portable pack either gives up prepacking (slower GEMMs) or gets a private copy per session back. Here
    ORT itself optimizes each stitch on this machine and serializes its prepacked weights into external data
    (``session.save_external_prepacked_constant_initializers``); the graphs, original weights and prepacked
    blobs are then deduplicated by content into one weights file (a block's blobs are identical in every
    stitch that runs it). ORT memory-maps that file when a session loads, uses the blobs without prepacking
    again, and never touches the original MatMul weights, so every session shares the same pages: prepacked
    speed at about one copy of the distinct weights. Selector: load these files plainly (no shared
    initializers, prepacking on); ``default_runner_factory`` does.

    The result is tied to this ONNX Runtime version and CPU instruction set (recorded in each file's metadata
    and checked before loading, ``runtime.onnxruntime_runner.check_ort_pack``): run it on the device, like a
    TensorRT build. The inputs may be the standalone artifacts or those of a portable pack (ship the smaller
    pack to the device, optimize there). Arguments, returned artifacts and resuming are as for
    ``pack_stitches``; validation compares each file, loaded alone, with its source at the FP32 gates (fused
    kernels reorder float sums).
    """
    import json

    import onnxruntime as ort

    from snexport.device.runtime.onnxruntime_runner import ORT_PACK_METADATA, ort_pack_identity

    identity = ort_pack_identity()
    settings = {"kind": "onnxruntime-prepacked", "align": int(align), "min_bytes": int(min_bytes),
                "validate": bool(validate), "num_inputs": int(num_inputs), "seed": int(seed), "device": identity}

    def sources(group, precision, workdir):
        out = []
        for art in group:
            optimized = workdir / Path(art.file).name
            options = ort.SessionOptions()
            options.log_severity_level = 3  # ORT warns that an optimized model is hardware specific: that is the point
            options.intra_op_num_threads = 1  # prepacked layouts do not depend on threads; keep the build light
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(optimized)
            for key, value in (
                ("session.optimized_model_external_initializers_file_name", optimized.stem + ".bin"),
                ("session.optimized_model_external_initializers_min_size_in_bytes", str(max(min_bytes, 1))),
                ("session.save_external_prepacked_constant_initializers", "1"),
            ):
                options.add_session_config_entry(key, value)
            ort.InferenceSession(str(Path(build_dir) / art.file), options, providers=["CPUExecutionProvider"])
            model = _read_onnx(optimized)
            model.set_metadata(ORT_PACK_METADATA, json.dumps(identity, sort_keys=True))
            model.save(optimized)
            out.append(optimized)
        return out

    def check(art, tmp, weights):
        return _compare_alone(Path(build_dir) / art.file, tmp, num_inputs, seed, art.input_shape,
                              expected=exported_outputs(build_dir, art, num_inputs))

    return _pack_stage(build_dir, artifacts, pack_dir, settings, sources, check if validate else None,
                       weights_prefix=f"{_WEIGHTS_PREFIX}-ort", align=align, min_bytes=min_bytes, progress=progress)


def _pack_stage(build_dir, artifacts, pack_dir: str, settings: dict, make_sources, check, *, weights_prefix: str,
                align: int, min_bytes: int, progress, verified: bool = False) -> list[Artifact]:
    """The common stage: check inputs, resume, write one pack per precision, validate, commit, index, clean up.

    ``verified``: the caller hashed every input file against its record in this run (the export stage, right
    before packing), so only their sizes are checked here: hashing them again was 13 s of a DeiT-S/B build."""
    import shutil
    import tempfile

    build_dir = Path(build_dir)
    out_dir = build_dir / pack_dir
    artifacts = list(artifacts)
    if not artifacts:
        raise PackError("nothing to pack: pass the ONNX artifacts of `export_stitches`")
    not_onnx = [f"{a.stitch_id} ({a.format})" for a in artifacts if a.format != "onnx"]
    if not_onnx:
        raise PackError(f"only ONNX artifacts can be packed, got {', '.join(not_onnx)}; TensorRT engines share "
                        "weights through snexport.experimental.tensorrt_segments instead")
    keys = [(a.stitch_id, a.precision) for a in artifacts]
    if len(set(keys)) != len(keys):
        raise PackError("each (stitch, precision) may appear once in a pack")
    weights_checked: set = set()
    for a in artifacts:
        path = build_dir / a.file
        if not path.is_file() or path.stat().st_size != a.size_bytes or (
                not verified and sha256_file(path) != a.sha256):
            raise PackError(f"{path} is missing or differs from its export record; re-run `snexport export` first")
        # A packed source (e.g. the portable pack shipped to a device for optimize_pack): its one weights file is
        # hashed once, not once per engine that points into it.
        if a.weights_file and (a.weights_file, a.weights_sha256) not in weights_checked:
            verify_weights_file(build_dir / a.weights_file, a.weights_sha256, a.weights_size_bytes)
            weights_checked.add((a.weights_file, a.weights_sha256))

    settings = dict(settings, pack_version=PACK_VERSION, small_align=SMALL_ALIGN,
                    sources=sorted([a.stitch_id, a.precision, a.sha256, a.weights_sha256] for a in artifacts))
    settings_hash = sha256_json(settings)
    stored = _stored_pack(build_dir, out_dir, settings_hash)
    if stored is not None:
        by_key = {(a.stitch_id, a.precision): a for a in stored}
        for a in artifacts:
            _tick(progress, a.stitch_id, "up to date")
        return [by_key[k] for k in keys]

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".*{TMP_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)

    results: dict[tuple, Artifact] = {}
    summaries: dict[str, dict] = {}
    failures: list[str] = []
    pack_version = {k: v for k, v in settings.items() if k not in ("sources", "validate", "num_inputs", "seed")}
    for precision in sorted({a.precision for a in artifacts}):
        # Anchors first: their files hold every block, so the weights file lists each anchor's blocks in order
        # and a stitch's bytes lie in two runs of the file (front anchor's prefix, back anchor's suffix).
        group = sorted((a for a in artifacts if a.precision == precision), key=lambda a: ">" in a.stitch_id)
        workdir = Path(tempfile.mkdtemp(prefix=".work.", suffix=TMP_SUFFIX, dir=out_dir))
        try:
            layout = write_pack(make_sources(group, precision, workdir), out_dir, align=align, min_bytes=min_bytes,
                                weights_prefix=f"{weights_prefix}-{precision}",
                                names=[Path(a.file).name for a in group])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        summaries[precision] = layout.summary()
        weights_rel = _rel(build_dir, layout.weights_path)
        for art, packed in zip(group, layout.files):
            def run_check(tmp, art=art):
                return check(art, tmp, layout.weights_path) if check is not None else None
            try:
                final, figures = commit_packed(packed, out_dir, run_check)
            except ExportValidationError as exc:
                failures.append(f"{art.stitch_id} ({precision}): {'; '.join(exc.failures)}")
                _tick(progress, art.stitch_id, "failed")
                continue
            used = packed.used_bytes(layout.placements)
            pack_facts = {"weights_used_bytes": used, "externalized_bytes": packed.externalized_bytes,
                          "inline_bytes": packed.inline_bytes, "tensors": len(packed.refs)}
            if figures:
                pack_facts.update(figures)
            results[(art.stitch_id, precision)] = dataclasses.replace(
                art,
                file=_rel(build_dir, final),
                size_bytes=final.stat().st_size,
                sha256=sha256_file(final),
                weights_file=weights_rel,
                weights_sha256=layout.weights_sha256,
                weights_size_bytes=layout.weights_size,
                weights_used_bytes=used,
                source_sha256=art.sha256,
                versions=dict(art.versions, pack=pack_version),
                validation=dict(art.validation, pack=pack_facts),
            )
            _tick(progress, art.stitch_id, "packed")
    if failures:
        raise ExportValidationError("engine pack", failures)

    packed_arts = [results[k] for k in keys]
    atomic_write_json(out_dir / INDEX_FILE, {
        "pack_version": PACK_VERSION,
        "settings_hash": settings_hash,
        "settings": settings,
        "weights": summaries,
        "artifacts": [a.to_dict() for a in packed_arts],
    })
    _remove_unreferenced(out_dir, packed_arts, build_dir)
    return packed_arts


def read_pack_index(build_dir: str | os.PathLike, pack_dir: str = PACK_DIR) -> Optional[dict]:
    """``pack.json`` of a build (settings, per-precision weights summary incl. dedup ratio, artifacts), or None."""
    path = Path(build_dir) / pack_dir / INDEX_FILE
    if not path.is_file():
        return None
    try:  # untrusted like every file of a build: size and nesting limits, and a corrupt index is no index
        doc = buildfiles.parse_json(buildfiles.read_limited(path, buildfiles.MAX_JSON_BYTES))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _stored_pack(build_dir: Path, out_dir: Path, settings_hash: str) -> Optional[list[Artifact]]:
    doc = read_pack_index(build_dir, _rel(build_dir, out_dir))
    if not doc or doc.get("settings_hash") != settings_hash:
        return None
    try:
        arts = [Artifact.from_dict(d) for d in doc["artifacts"]]
    except (KeyError, TypeError, ValueError):
        return None
    hashes: dict[Path, str] = {}
    for a in arts:
        for rel, digest in ((a.file, a.sha256), (a.weights_file, a.weights_sha256)):
            path = build_dir / rel
            if not path.is_file():
                return None
            if path not in hashes:
                hashes[path] = sha256_file(path)
            if hashes[path] != digest:
                return None
    return arts


def _remove_unreferenced(out_dir: Path, arts: Sequence[Artifact], build_dir: Path) -> None:
    keep = {(build_dir / a.file).resolve() for a in arts} | {(build_dir / a.weights_file).resolve() for a in arts}
    for path in list(out_dir.glob("*.onnx")) + list(out_dir.glob(f"{_WEIGHTS_PREFIX}-*.bin")):
        if path.resolve() not in keep:
            log.info("removing %s, no longer part of the pack", path.name)
            path.unlink(missing_ok=True)


def _rel(build_dir: Path, path: Path) -> str:
    return Path(os.path.relpath(path, build_dir)).as_posix()


def _tick(progress, stitch_id: str, status: str) -> None:
    if progress is not None:
        progress(1, description=f"pack {stitch_id}: {status}")


def exported_outputs(build_dir: str | os.PathLike, art: Artifact, num_inputs: int) -> Optional[tuple]:
    """(inputs, logits): the first ``num_inputs`` reference inputs and the exported file's own ONNX Runtime outputs
    on them, recorded by the export (``reference["onnx_logits"]``); None where the export did not record them (an
    older build, a precision it does not record them for) or a file is missing or altered."""
    import numpy as np

    ref = art.reference or {}
    arrays = []
    for key in ("inputs", "onnx_logits"):
        path = Path(build_dir) / ref.get(key, "")
        if not ref.get(key) or not path.is_file() or sha256_file(path) != ref.get(f"{key}_sha256"):
            return None
        arrays.append(np.load(path, allow_pickle=False)[:max(int(num_inputs), 1)])
    return arrays[0], arrays[1]


def _compare_alone(standalone: Path, packed: Path, num_inputs: int, seed: int, input_shape: Sequence,
                   expected: Optional[tuple] = None) -> dict:
    """An ONNX Runtime-optimized packed file, loaded alone (prepacking on), against its source file's outputs:
    ``expected`` (inputs, logits) as the export recorded them, else the source run here on seeded inputs."""
    import numpy as np

    from snexport.device.validate import compare_logits, run_onnx

    if expected is not None:
        inputs, reference = expected
    else:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in tuple(input_shape)[1:])
        inputs = np.random.default_rng(seed).standard_normal((max(int(num_inputs), 1), *shape)).astype(np.float32)
        reference = run_onnx(standalone, inputs)
    actual = run_onnx(packed, inputs)
    figs, fails = compare_logits(reference, actual)
    if fails:
        raise ExportValidationError(packed.name, [f"optimized packed file: {f}" for f in fails])
    return {"alone": {"max_abs": figs["max_abs"], "cosine": figs["cosine"],
                      "bitwise_equal": bool(np.array_equal(reference, actual))}, "samples": len(inputs),
            "compared_with": "exported outputs" if expected is not None else "source file run here"}


def _compare(standalone: Path, packed: Path, weights: Path, num_inputs: int, seed: int,
             expected: Optional[tuple] = None) -> dict:
    """Run the packed file both ways a device may (ORT alone; shared mapped initializers) against the standalone:
    its outputs as the export recorded them (``expected``: inputs, logits; ``exported_outputs``), else the
    standalone file run here on seeded inputs (a third session per file: 30 s of a 36-engine DeiT-S/B build).

    Same graph, same bytes, same runtime: the outputs are expected to be bitwise equal; the FP32 gates of
    ``validate.compare_logits`` are the failure criterion so a future ORT that picks a different kernel for
    external tensors is not flagged as a packing bug, and the exact difference is recorded.
    """
    import numpy as np

    from snexport.device.validate import compare_logits, run_onnx
    from snexport.device.runtime.onnxruntime_runner import OnnxRuntimeRunner, WeightsFileMap

    mapped = WeightsFileMap(weights)
    shared = OnnxRuntimeRunner(packed, disable_prepacking=True, shared_initializers=mapped.initializers(packed))
    try:
        shared.load()
        batch = shared.input_shape[0] if isinstance(shared.input_shape[0], int) and shared.input_shape[0] > 0 else 1
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in shared.input_shape[1:])
        if expected is not None:
            inputs = expected[0]
        else:
            inputs = np.random.default_rng(seed).standard_normal((max(int(num_inputs), 1), *shape)).astype(np.float32)
        padded = np.concatenate([inputs, np.zeros((-len(inputs) % batch, *shape), np.float32)])
        via_map = np.concatenate([shared.run(padded[i:i + batch]) for i in range(0, len(padded), batch)])
        via_map = via_map[:len(inputs)].astype(np.float32)
    finally:
        shared.close()
        mapped.close()
    reference = expected[1] if expected is not None else run_onnx(standalone, inputs)
    alone = run_onnx(packed, inputs)  # ORT resolves the external data itself

    figures, failures = {}, []
    for label, actual in (("alone", alone), ("shared", via_map)):
        figs, fails = compare_logits(reference, actual)
        figures[label] = {"max_abs": figs.get("max_abs"), "cosine": figs.get("cosine"),
                          "bitwise_equal": bool(np.array_equal(reference, actual))}
        failures += [f"packed file loaded {label}: {f}" for f in fails]
    if failures:
        raise ExportValidationError(packed.name, failures)
    figures["samples"] = len(inputs)
    figures["compared_with"] = "exported outputs" if expected is not None else "standalone file run here"
    return figures
