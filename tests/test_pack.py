"""Engine packs (snexport.export.pack) on the real demo architecture: one weights file, shared by every stitch.

Tiny random-init anchors go through the real path (stitch stage → export stage → pack), so what is checked here is
what a device gets: file layout, standalone validity, the selector's shared mapping, refusal of a bad pack.
Nothing asserts on time; memory is asserted on bytes and buffer identity.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from snexport.errors import ExportValidationError, ManifestError, WeightsError
from snexport.device.pack import (
    DEFAULT_MIN_BYTES,
    SMALL_ALIGN,
    PackError,
    read_pack_index,
    tensor_layout,
    verify_weights_file,
    write_pack,
)
from snexport.export.pack import pack_stitches
from snexport.export.validate import run_onnx
from snexport.device.manifest import write_manifest
from snexport.device.runtime.onnxruntime_runner import OnnxRuntimeRunner, WeightsFileMap
from snexport.device.selector import Selector, SelectorWarning

DEMO = ["demo_s", "demo_m", "demo_l"]
ALIGN = 4096  # small enough that the demo's larger matrices (up to 64 KiB) are "large" and page-aligned
DEVICE = "test-cpu-pack"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A random-init demo build with anchors and five stitches exported (fast exporter) and packed."""
    from snexport.export.stage import export_stitches
    from snexport.stitching.stage import stitch_stage

    root = tmp_path_factory.mktemp("pack") / "b"
    bd, _ = stitch_stage(root, DEMO, random_init=True, show_progress=False, calib_images=16)
    plan, net = bd.load_plan(), bd.load_snnet()
    stitches = [s for s in plan.stitches if s.is_anchor]
    # Stitches of both anchor pairs, two of them through the same stitching layer (shared across stitches).
    by_layer: dict = {}
    for s in plan.stitches:
        if not s.is_anchor:
            by_layer.setdefault((s.front, s.back, s.layer), []).append(s)
    shared_layer = next(group for group in by_layer.values() if len(group) >= 2)
    other_pair = next(g[0] for k, g in by_layer.items() if k[:2] != (shared_layer[0].front, shared_layer[0].back))
    stitches += shared_layer[:2] + [other_pair]
    arts = export_stitches(root, stitches, net.materialize, plan.anchors[0].input_shape, exporter="torchscript",
                           formats=("onnx", "onnx-fp16"), num_random=2, weights_hash=bd.weights_hash())
    packed = pack_stitches(root, arts, align=ALIGN)
    return {"root": root, "plan": plan, "net": net, "standalone": arts, "packed": packed,
            "stitches": stitches, "shared_layer": [s.id for s in shared_layer[:2]]}


def fp32(arts):
    return [a for a in arts if a.precision == "fp32"]


def standalone_tensors(path: Path) -> dict[str, bytes]:
    """name -> raw bytes of every initializer a pack moves out (float, at least DEFAULT_MIN_BYTES)."""
    model = onnx.load(str(path))
    out = {}
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind == "f" and arr.nbytes >= DEFAULT_MIN_BYTES:
            out[t.name] = arr.tobytes()
    return out


# -- layout ---------------------------------------------------------------------------------------------------


def test_each_distinct_tensor_is_stored_once(build):
    root = build["root"]
    distinct: dict[bytes, int] = {}
    total = 0
    for art in fp32(build["standalone"]):
        for data in standalone_tensors(root / art.file).values():
            distinct[hashlib.sha256(data).digest()] = len(data)
            total += len(data)
    distinct_bytes = sum(distinct.values())
    weights = root / fp32(build["packed"])[0].weights_file
    size = weights.stat().st_size
    large = sum(1 for n in distinct.values() if n >= ALIGN)
    # File = the distinct tensors + alignment padding; padding is at most one alignment step per tensor.
    assert distinct_bytes <= size <= distinct_bytes + large * ALIGN + len(distinct) * SMALL_ALIGN
    assert total > 2 * distinct_bytes  # anchors' blocks really are repeated across the standalone files

    # Each stored range holds one distinct tensor: equal content <-> equal (offset, length), across all files.
    data = weights.read_bytes()
    where: dict[bytes, tuple] = {}
    for packed, art in zip(fp32(build["packed"]), fp32(build["standalone"])):
        originals = standalone_tensors(root / art.file)
        layout = tensor_layout(root / packed.file)
        assert set(layout) == set(originals)  # every weight moved out, nothing else
        for name, info in layout.items():
            stored = data[info["offset"]:info["offset"] + info["length"]]
            assert stored == originals[name]
            key = hashlib.sha256(stored).digest()
            assert where.setdefault(key, (info["offset"], info["length"])) == (info["offset"], info["length"])
    assert len(where) == len(distinct)

    summary = read_pack_index(root)["weights"]["fp32"]
    assert summary["distinct_bytes"] == distinct_bytes and summary["standalone_tensor_bytes"] == total
    assert summary["weights_size_bytes"] == size == summary["distinct_bytes"] + summary["padding_bytes"]


def test_dedup_reaches_the_snnet_parameters(build):
    """Every SN-Net parameter the packed stitches use is stored once: the exporter and onnxsim keep a shared
    block's weights byte-identical across files (transposed the same way in every file)."""
    net = build["net"]
    used = {}
    for s in build["stitches"]:
        for name, p in net.materialize(s.id).named_parameters():
            used[hashlib.sha256(p.detach().numpy().tobytes()).digest()] = p.numel() * 4
    params = sum(n for n in used.values() if n >= DEFAULT_MIN_BYTES)
    distinct = read_pack_index(build["root"])["weights"]["fp32"]["distinct_bytes"]
    # Equal up to parameters folded into one constant (e.g. cls token + its position embedding).
    assert 0.98 * params <= distinct <= params


def test_anchor_blocks_are_shared_at_one_offset(build):
    """A front block of demo_s appears in the demo_s file and in every demo_s→ stitch at the same offset."""
    root = build["root"]
    packed = {a.stitch_id: a for a in fp32(build["packed"])}
    anchor = tensor_layout(root / packed["demo_s"].file)
    ranges = {(i["offset"], i["length"]) for i in anchor.values()}
    for stitch_id, art in packed.items():
        if stitch_id.startswith("demo_s:"):
            shared = ranges & {(i["offset"], i["length"]) for i in tensor_layout(root / art.file).values()}
            assert len(shared) >= 4  # patch embedding + at least one block's matrices
    # The two stitches through one stitching layer reference its weight at the same place.
    a, b = (tensor_layout(root / packed[i].file) for i in build["shared_layer"])
    only_a = {(i["offset"], i["length"]) for i in a.values()} - ranges
    only_b = {(i["offset"], i["length"]) for i in b.values()} - ranges
    assert only_a & only_b


def test_offsets_are_aligned(build):
    root = build["root"]
    seen_large = 0
    for art in build["packed"]:
        for info in tensor_layout(root / art.file).values():
            assert info["offset"] % SMALL_ALIGN == 0
            if info["length"] >= ALIGN:
                assert info["offset"] % ALIGN == 0
                seen_large += 1
    assert seen_large > 0


def test_one_weights_file_per_precision(build):
    root = build["root"]
    files = {a.precision: set() for a in build["packed"]}
    for a in build["packed"]:
        files[a.precision].add(a.weights_file)
        assert a.weights_sha256 and a.weights_size_bytes == (root / a.weights_file).stat().st_size
        assert 0 < a.weights_used_bytes <= a.weights_size_bytes
        assert a.file.startswith("engines/pack/") and a.file.endswith(".fp16.onnx") == (a.precision == "fp16")
    assert {k: len(v) for k, v in files.items()} == {"fp32": 1, "fp16": 1}
    assert files["fp32"] != files["fp16"]
    # The name carries the content hash: a packed ONNX can only resolve to the bytes it was packed against.
    for a in build["packed"]:
        assert a.weights_sha256[:16] in a.weights_file
    used = {a.stitch_id: a.weights_used_bytes for a in fp32(build["packed"])}
    assert used["demo_s"] < used["demo_m"] < used["demo_l"]


# -- standalone validity ----------------------------------------------------------------------------------------


def test_every_packed_file_loads_alone_and_matches_its_standalone_file(build, tmp_path):
    root = build["root"]
    x = np.random.default_rng(5).standard_normal((3, 1, 8, 8)).astype(np.float32)
    for packed, art in zip(build["packed"], build["standalone"]):
        assert packed.source_sha256 == art.sha256 and packed.stitch_id == art.stitch_id
        # Alone: the packed ONNX and its weights file, in a directory without the standalone files.
        alone = tmp_path / packed.precision
        alone.mkdir(exist_ok=True)
        shutil.copy(root / packed.file, alone)
        if not (alone / Path(packed.weights_file).name).exists():
            shutil.copy(root / packed.weights_file, alone)
        path = alone / Path(packed.file).name
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)  # the weights are not in it
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert len(external) == packed.validation["pack"]["tensors"] and not any(t.raw_data for t in external)
        np.testing.assert_array_equal(run_onnx(path, x), run_onnx(root / art.file, x))
        figures = packed.validation["pack"]
        assert figures["alone"]["bitwise_equal"] and figures["shared"]["cosine"] > 0.99999


def test_packs_check_against_the_outputs_the_export_recorded(build):
    """The export records each FP32 file's own ORT outputs on the shipped inputs; the pack is checked against them
    (no session of the standalone file). Outputs that are not the file's fail the check; recorded outputs that are
    missing or altered make the check run the standalone file instead."""
    import dataclasses

    from snexport.device.pack import exported_outputs
    from snexport.hashing import sha256_file

    root = build["root"]
    for packed, art in zip(build["packed"], build["standalone"]):
        recorded = exported_outputs(root, art, 2)
        assert (recorded is not None) == (art.precision == "fp32")
        if recorded is not None:  # what the check compared with: this file's outputs, not a run of it here
            np.testing.assert_allclose(run_onnx(root / art.file, recorded[0]), recorded[1], rtol=1e-5, atol=1e-5)
        assert packed.validation["pack"]["compared_with"] == (
            "exported outputs" if art.precision == "fp32" else "standalone file run here")
    art = fp32(build["standalone"])[0]
    inputs, logits = exported_outputs(root, art, 2)
    wrong = root / "engines" / "reference" / "wrong.onnx-logits.npy"
    np.save(wrong, logits + 1.0)
    told = dataclasses.replace(art, reference=dict(art.reference, onnx_logits="engines/reference/wrong.onnx-logits.npy",
                                                   onnx_logits_sha256=sha256_file(wrong)))
    with pytest.raises(ExportValidationError, match="packed file loaded alone"):
        pack_stitches(root, [told], pack_dir="engines/wrong")
    altered = dataclasses.replace(told, reference=dict(told.reference, onnx_logits_sha256="0" * 64))
    assert exported_outputs(root, altered, 2) is None
    again = pack_stitches(root, [altered], pack_dir="engines/fallback")
    assert again[0].validation["pack"]["compared_with"] == "standalone file run here"


def test_rerun_with_the_same_inputs_reuses_the_pack(build):
    root = build["root"]
    before = {p: p.stat().st_mtime_ns for p in (root / "engines" / "pack").iterdir()}
    again = pack_stitches(root, build["standalone"], align=ALIGN)
    assert [a.to_dict() for a in again] == [a.to_dict() for a in build["packed"]]
    assert {p: p.stat().st_mtime_ns for p in (root / "engines" / "pack").iterdir()} == before


def test_stale_or_foreign_inputs_are_refused(build, tmp_path):
    import dataclasses

    art = fp32(build["standalone"])[0]
    changed = dataclasses.replace(art, sha256="0" * 64)
    with pytest.raises(PackError, match="differs from its export record"):
        pack_stitches(build["root"], [changed], pack_dir="engines/other")
    # The export stage vouches for the hashes it just took (verified): the size is still checked.
    with pytest.raises(PackError, match="differs from its export record"):
        pack_stitches(build["root"], [dataclasses.replace(art, size_bytes=art.size_bytes + 1)],
                      pack_dir="engines/other", verified=True)
    with pytest.raises(PackError, match="only ONNX"):
        pack_stitches(build["root"], [dataclasses.replace(art, format="tensorrt")], pack_dir="engines/other")
    with pytest.raises(PackError, match="power of two"):
        write_pack([build["root"] / art.file], tmp_path, align=3000)


def test_a_packed_file_that_disagrees_is_not_committed(build, tmp_path, monkeypatch):
    """Validation runs before the rename: a failing check leaves no packed ONNX behind."""
    import snexport.export.pack as pack

    def failing(*args, **kwargs):
        raise ExportValidationError("x", ["injected disagreement"])

    monkeypatch.setattr(pack, "_compare", failing)
    art = fp32(build["standalone"])[0]
    with pytest.raises(ExportValidationError, match="injected disagreement"):
        pack_stitches(build["root"], [art], pack_dir="engines/failing")
    assert not list((build["root"] / "engines" / "failing").glob("*.onnx"))


# -- selector ---------------------------------------------------------------------------------------------------


def manifest_for(root: Path, plan, arts, name: str, memory=None) -> Path:
    """A manifest listing ``arts``, with measurements set by the test (choose() is a pure function of them)."""
    from snexport.export.deploy import engine_entry

    engines = []
    for i, a in enumerate(arts):
        s = plan.get(a.stitch_id)
        mem = memory[a.stitch_id] if memory else 5.0
        p90 = 1.0 + s.gflops * 1000
        entry = engine_entry(a, plan, {})
        entry["measurements"] = {DEVICE: {
            "latency_ms": {"mean": p90, "std": 0.0, "min": p90, "p50": p90, "p90": p90, "p99": p90,
                           "max": p90, "iterations": 10},
            "throughput_ips": None,
            "memory": {"rss_load_delta_mb": mem, "rss_peak_mb": 100.0, "file_mb": 1.0, "device_delta_mb": None},
            "load_ms": {"cold": 1.0, "switch_p50": None, "switch_p99": None}, "pareto": True}}
        engines.append(entry)
    data = {
        "schema_version": 1,
        "build": {"anchors": [{"name": a.name, "timm_name": a.timm_name, "depth": a.depth, "width": a.width,
                               "gflops": a.gflops, "params": a.params} for a in plan.anchors],
                  "plan": {"window": 2, "stride": 1, "nearest": True, "two_way": False, "hash": plan.hash},
                  "snexport_version": "0.1.0", "created_at": "2026-11-24T05:00:00+00:00"},
        "devices": {DEVICE: {"profile": "x86-cpu", "fingerprint": {"cpu": "test"}, "settings": {"threads": 1},
                             "measured_at": "2026-11-24T05:00:00+00:00"}},
        "engines": engines,
    }
    return write_manifest(root / f"manifest-{name}.json", data)


def test_selector_maps_the_pack_once_and_gives_identical_outputs(build):
    root, plan = build["root"], build["plan"]
    packed = fp32(build["packed"])
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    standalone = {a.stitch_id: a for a in fp32(build["standalone"])}
    path = manifest_for(root, plan, packed, "shared")
    with Selector(path, mode="preload", runner_options={"threads": 1}) as sel:
        maps = sel.mapped_weights()
        assert list(maps) == [(root / packed[0].weights_file).resolve()]
        mapped = next(iter(maps.values())).array
        assert sel.shared_weights() == {packed[0].weights_file: [a.stitch_id for a in packed]}
        pointers: dict[tuple, set] = {}
        for art in packed:
            runner = sel._slots[art.stitch_id].runner
            assert runner.settings["disable_prepacking"] is True
            layout = tensor_layout(root / art.file)
            assert set(runner.shared_initializers) == set(layout)
            for name, view in runner.shared_initializers.items():
                # A view of the one map, at the tensor's offset: no copy anywhere.
                assert np.shares_memory(view, mapped)
                assert view.ctypes.data == mapped.ctypes.data + layout[name]["offset"]
                pointers.setdefault((layout[name]["offset"], layout[name]["length"]), set()).add(art.stitch_id)
            sel.switch(art.stitch_id)
            # Same graph and weights; prepacking off changes the GEMM kernel's summation order only.
            reference = OnnxRuntimeRunner(root / standalone[art.stitch_id].file, threads=1)
            np.testing.assert_allclose(sel.run(x), reference.run(x), rtol=1e-5, atol=1e-6)
            reference.close()
        # Anchor blocks are handed to several sessions as the same buffer.
        assert max(len(ids) for ids in pointers.values()) >= 3
    assert not sel.mapped_weights()


def test_selector_refuses_an_altered_or_missing_weights_file(build, tmp_path):
    root, plan = build["root"], build["plan"]
    packed = fp32(build["packed"])
    (tmp_path / "engines").mkdir()
    shutil.copytree(root / "engines" / "pack", tmp_path / "engines" / "pack")
    path = manifest_for(tmp_path, plan, packed, "altered")
    weights = tmp_path / packed[0].weights_file
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectorWarning)
        with pytest.raises(ManifestError, match=r"missing or altered .*weights-fp32-.*does not match its sha256"):
            Selector(path, mode="preload")
    with pytest.raises(WeightsError, match="does not match its sha256"):
        verify_weights_file(weights, packed[0].weights_sha256, packed[0].weights_size_bytes)
    weights.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectorWarning)
        with pytest.raises(ManifestError, match=r"weights-fp32-.*is missing"):
            Selector(path, mode="on_demand")
    with pytest.raises(WeightsError, match="missing"):
        verify_weights_file(weights, packed[0].weights_sha256)


def test_weights_map_refuses_a_file_from_another_pack(build, tmp_path):
    root = build["root"]
    art = fp32(build["packed"])[0]
    other = tmp_path / "other.bin"
    other.write_bytes((root / art.weights_file).read_bytes())
    with pytest.raises(WeightsError, match="not from the pack's weights file"):
        WeightsFileMap(other).initializers(root / art.file)
    (tmp_path / Path(art.weights_file).name).write_bytes(b"\0" * 128)  # truncated copy under the right name
    shutil.copy(root / art.file, tmp_path)
    with pytest.raises(WeightsError, match="past the end"):
        WeightsFileMap(tmp_path / Path(art.weights_file).name).initializers(tmp_path / Path(art.file).name)


def test_memory_cost_counts_the_shared_file_once(build):
    root, plan = build["root"], build["plan"]
    packed = fp32(build["packed"])
    # Per-engine cost as `snexport bench` measures it alone: its session plus the pages of the file it uses.
    session_mb = 2.0
    memory = {a.stitch_id: session_mb + a.weights_used_bytes / 1e6 for a in packed}
    path = manifest_for(root, plan, packed, "cost", memory)
    with Selector(path, mode="on_demand") as sel:
        ids = [a.stitch_id for a in packed]
        size = packed[0].weights_size_bytes / 1e6
        used = sum(a.weights_used_bytes for a in packed) / 1e6
        assert sel.memory_cost_mb(ids) == pytest.approx(len(ids) * session_mb + min(size, used))
        assert sel.memory_cost_mb(ids) < sum(memory.values())
        one = ids[0]
        assert sel.memory_cost_mb([one]) == pytest.approx(memory[one])  # alone it pays only what it uses
        anchors = [a.stitch_id for a in packed if ">" not in a.stitch_id]
        anchor_used = sum(a.weights_used_bytes for a in packed if ">" not in a.stitch_id) / 1e6
        assert sel.memory_cost_mb(anchors) == pytest.approx(len(anchors) * session_mb + min(size, anchor_used))


# -- device-optimized pack (ONNX Runtime's prepacked weights, shared too) -----------------------------------------


@pytest.fixture(scope="module")
def optimized(build):
    from snexport.device.pack import optimize_pack

    return optimize_pack(build["root"], fp32(build["standalone"]), align=ALIGN)


def prepacked_ranges(path: Path) -> list[tuple]:
    """(offset, length) of every serialized prepacked blob an optimized packed file references."""
    model = onnx.load(str(path), load_external_data=False)
    out = []
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key.startswith("prepacked"):
                for blob in e.value.split("|")[1:]:
                    offset, length, _ = blob.split(";")
                    out.append((int(offset), int(length)))
    return out


def test_optimized_pack_shares_weights_and_prepacked_blobs(build, optimized):
    from snexport.device.pack import ORT_PACK_DIR
    from snexport.device.runtime.onnxruntime_runner import check_ort_pack, ort_pack_identity

    root = build["root"]
    assert len({a.weights_file for a in optimized}) == 1
    summary = read_pack_index(root, ORT_PACK_DIR)["weights"]["fp32"]
    assert summary["dedup_ratio"] > 2  # blobs of shared blocks are identical across stitches, stored once
    blobs_by_file = {a.stitch_id: set(prepacked_ranges(root / a.file)) for a in optimized}
    assert all(blobs_by_file.values())  # ORT's prepacked weights made it into every file
    anchor = blobs_by_file["demo_s"]
    assert any(anchor & blobs for sid, blobs in blobs_by_file.items() if sid.startswith("demo_s:"))
    for a in optimized:
        assert check_ort_pack(root / a.file) == ort_pack_identity()
        assert a.validation["pack"]["alone"]["cosine"] > 0.99999
        assert a.versions["pack"]["kind"] == "onnxruntime-prepacked"
    # A portable pack file is not tied to a machine.
    assert check_ort_pack(root / fp32(build["packed"])[0].file) is None


def test_onnx_runtime_reads_the_prepacked_blobs_from_the_shared_file(build, optimized, tmp_path):
    """Zeroing one relocated blob makes ORT refuse the file (it checks serialized blobs against its own prepack
    of the weights), so the entries point at the right bytes and are really used; intact, outputs match."""
    root = build["root"]
    art = next(a for a in optimized if a.stitch_id == "demo_l")
    shutil.copytree(root / "engines" / "pack-ort", tmp_path / "p")
    path, weights = tmp_path / "p" / Path(art.file).name, tmp_path / "p" / Path(art.weights_file).name
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    standalone = {a.stitch_id: a for a in fp32(build["standalone"])}["demo_l"]
    np.testing.assert_allclose(run_onnx(path, x), run_onnx(root / standalone.file, x), rtol=1e-4, atol=1e-5)
    offset, length = prepacked_ranges(path)[0]
    data = bytearray(weights.read_bytes())
    data[offset:offset + length] = bytes(length)
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match="pre-packed"):
        run_onnx(path, x)


def test_selector_opens_optimized_packs_plainly_and_refuses_another_machine(build, optimized, monkeypatch):
    import json

    import snexport.device.runtime.onnxruntime_runner as rt
    from snexport.errors import BackendUnavailableError

    root, plan = build["root"], build["plan"]
    standalone = {a.stitch_id: a for a in fp32(build["standalone"])}
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    path = manifest_for(root, plan, optimized, "ort")
    with Selector(path, mode="preload", runner_options={"threads": 1}) as sel:
        assert not sel.mapped_weights()  # ORT maps this pack itself
        for art in optimized:
            runner = sel._slots[art.stitch_id].runner
            assert not runner.shared_initializers and runner.settings["disable_prepacking"] is False
            sel.switch(art.stitch_id)
            reference = OnnxRuntimeRunner(root / standalone[art.stitch_id].file, threads=1)
            np.testing.assert_allclose(sel.run(x), reference.run(x), rtol=1e-4, atol=1e-5)
            reference.close()
    elsewhere = dict(rt.ort_pack_identity(), isa=["avx512f"], onnxruntime="0.0.1")
    monkeypatch.setattr(rt, "ort_pack_identity", lambda: elsewhere)
    with pytest.raises(BackendUnavailableError, match="re-run optimize_pack on this device"):
        rt.check_ort_pack(root / optimized[0].file)
    with pytest.raises(BackendUnavailableError, match=json.dumps(elsewhere["onnxruntime"])[1:-1]):
        Selector(path, mode="preload")


def test_a_device_can_optimize_the_shipped_portable_pack(build):
    """Ship the small portable pack, optimize on the device: sources with external data are read through."""
    from snexport.device.pack import optimize_pack

    root = build["root"]
    portable = fp32(build["packed"])[:3]
    arts = optimize_pack(root, portable, align=ALIGN, pack_dir="engines/pack-ort-from-pack")
    x = np.random.default_rng(4).standard_normal((2, 1, 8, 8)).astype(np.float32)
    for art, source in zip(arts, portable):
        assert art.source_sha256 == source.sha256 and prepacked_ranges(root / art.file)
        np.testing.assert_allclose(run_onnx(root / art.file, x), run_onnx(root / source.file, x), rtol=1e-4, atol=1e-5)
