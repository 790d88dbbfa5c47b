"""Device bundles: the part of a build a device needs (`snexport bundle`), and its measurements back (`snexport merge`).

A bundle is a folder (optionally also a .tar.gz) laid out like a build directory, so every device command reads it
the same way (``BuildFiles`` sees ``is_bundle``: a manifest and no plan)::

    manifest.json        the engines below with the host's facts (route, accuracy, cost), made for the profile
    deploy.json          the deploy set of the last export (its weights hash, the chosen files)
    exports.json         the export records of that set (for the profile's precision)
    device-profile.toml  a copy of the profile the bundle is for (`snexport bench BUNDLE` uses it)
    engines/pack/...     ONNX Runtime: the portable shared-weight pack (its ONNX files, weights file, pack.json);
                         the standalone ONNX files only where the export made no pack
    engines/*.onnx       TensorRT: the standalone ONNX files the device builds engines from (FP32, plus FP16 where
    engines/reference/   exported) and the FP32 reference logits that validate those engines there

Never in a bundle: the plan, the SN-Net weights (hundreds of MB for DeiT-S/B), training state, evaluation lines.
Every file is copied with its sha256 checked against the record that names it (a file altered or cut short in the
build is refused, not shipped), into a temporary folder renamed into place at the end: a bundle exists complete or
not at all. Paths stay relative, so the folder can be moved or unpacked anywhere.

Measurements come back with ``merge_bundle`` (``snexport merge BUNDLE BUILD``): the bundle's profile.jsonl lines
replace the build's lines of the same devices (so ``snexport select --by latency`` on the host sees them), and each
device's manifest measurements are filed under the host manifest's entry of the same stitch whose file the device
ran or built its own from (same sha256, or an ancestor through ``source_sha256``: TensorRT engine <- ONNX,
optimized pack <- portable pack <- standalone ONNX). Files the device built stay listed in the bundle's own manifest,
which is what the device's selector reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from snexport import buildfiles as files
from snexport.buildfiles import BuildFiles, read_jsonl
from snexport.errors import BuildDirError, ProfileError
from snexport.hashing import TMP_SUFFIX, _umask, atomic_write_json, atomic_write_text, commit, temp_path_for
from snexport.records import Artifact

log = logging.getLogger("snexport")

_CHUNK = 1 << 20


# -------------------------------------------------------------------------------------------------------------
# Writing a bundle


@dataclasses.dataclass
class _Plan:
    """What goes into one bundle: the engine records the manifest lists and every file to copy with its hash."""

    profile: object  # DeviceProfile
    records: list  # export records of the deploy set that travel (exports.json, deploy.json)
    engines: list  # Artifacts the bundle's manifest lists
    copies: dict  # relative path -> expected sha256
    pack_index: Optional[dict] = None  # the pack's pack.json, narrowed to what travels


def _bundle_plan(build: BuildFiles, profile) -> _Plan:
    from snexport.device import deployset
    from snexport.device.pack import read_pack_index

    records = deployset.deploy_records(build)
    if profile.backend == "torch":
        raise ProfileError(f"profile {profile.name} profiles PyTorch modules, which needs the SN-Net weights: run "
                           "`snexport bench` on the build itself, or bundle for an onnxruntime or tensorrt profile")
    if profile.backend == "tensorrt":
        # The device builds its engines from the FP32 ONNX (TensorRT >= 11 builds FP16 from the FP16 ONNX) and
        # validates them against the FP32 reference logits the export shipped.
        precisions = {"fp32", profile.precision}
        onnx = [a for a in records if a.format == "onnx" and a.precision in precisions]
        fp32 = [a for a in onnx if a.precision == "fp32"]
        if not fp32:
            raise BuildDirError(f"the last export of {build.root} has no FP32 ONNX to build TensorRT engines from; "
                                f"re-run `snexport export {build.root}`")
        if profile.precision == "fp16" and not any(a.precision == "fp16" for a in onnx):
            log.warning("the bundle has no FP16 ONNX: TensorRT 10 can still build FP16 engines from the FP32 files, "
                        "TensorRT >= 11 (strongly typed) cannot; export with --fp16 and bundle again for it")
        copies = {a.file: a.sha256 for a in _all_present(build, onnx)}
        for a in fp32:
            ref = a.reference or {}
            if not ref.get("inputs") or not ref.get("logits"):
                raise BuildDirError(f"{a.stitch_id} has no reference logits to validate a device-built engine; "
                                    f"re-run `snexport export {build.root}` (it ships engines/reference)")
            copies[ref["inputs"]] = ref["inputs_sha256"]
            copies[ref["logits"]] = ref["logits_sha256"]
        return _Plan(profile, onnx, fp32, copies)

    # The profile's precision, and the int8 files when the export made them (engines of their own, own pack).
    wanted = set(deployset.ort_precisions(build, profile)) if profile.backend == "onnxruntime" else {profile.precision}
    onnx = [a for a in records if a.format == "onnx" and a.precision in wanted]
    if not any(a.precision == profile.precision for a in onnx):
        fix = f"`snexport export {build.root}" + (" --fp16`" if profile.precision == "fp16" else "`")
        raise BuildDirError(f"the last export of {build.root} has no {profile.precision} ONNX for {profile.name}; "
                            f"re-run {fix}")
    # The FP32 reference logits travel too where they exist (small): a runtime the export did not validate with
    # (OpenVINO) is gated on them by `snexport bench` on the device before its numbers may stand for an engine;
    # the files' own ONNX Runtime outputs are what the device's optimized pack is checked against.
    refs = {a.reference[k]: a.reference[f"{k}_sha256"] for a in onnx if a.precision == "fp32"
            for k in ("inputs", "logits", "onnx_logits")
            if (a.reference or {}).get(k) and (build.root / a.reference[k]).is_file()}
    portable = deployset.complete_pack(build, files.PACK_DIR, onnx)
    if not portable:
        # No pack (exported with --no-pack, or left over from another export): the standalone files travel.
        return _Plan(profile, onnx, onnx, {**{a.file: a.sha256 for a in _all_present(build, onnx)}, **refs})
    copies = {a.file: a.sha256 for a in portable}
    copies.update({a.weights_file: a.weights_sha256 for a in portable})
    copies.update(refs)
    index = dict(read_pack_index(build.root, files.PACK_DIR) or {})
    index["artifacts"] = [a.to_dict() for a in portable]
    if isinstance(index.get("weights"), dict):
        index["weights"] = {k: v for k, v in index["weights"].items() if k in wanted}
    return _Plan(profile, onnx, portable, copies, index)


def _all_present(build: BuildFiles, arts: list) -> list:
    from snexport.device import deployset

    good = deployset.verified(build, arts)
    if len(good) != len(arts):
        bad = sorted({a.stitch_id for a in arts} - {a.stitch_id for a in good})
        raise BuildDirError(f"the exported files of {', '.join(bad[:3])} are missing or altered in {build.root}; "
                            f"re-run `snexport export {build.root}` before bundling")
    return good


def _copy_verified(src: Path, dst: Path, sha256: str) -> int:
    """Copy ``src`` to ``dst`` hashing the bytes as they pass; a mismatch with the record refuses the file."""
    digest = hashlib.sha256()
    size = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            for chunk in iter(lambda: fin.read(_CHUNK), b""):
                digest.update(chunk)
                fout.write(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise BuildDirError(f"{src} is missing; re-run `snexport export` before bundling") from None
    if digest.hexdigest() != sha256:
        raise BuildDirError(f"{src} does not match its recorded sha256 (altered or cut short); re-run "
                            "`snexport export` before bundling")
    return size


def _bundle_manifest(build: BuildFiles, plan: _Plan) -> dict:
    from snexport.device.bench import engine_facts, facts_for
    from snexport.device.manifest import assemble_manifest, engine_entry, read_manifest

    facts = engine_facts(build)
    missing = sorted({a.stitch_id for a in plan.engines if facts_for(facts, a) is None})
    if missing:
        raise BuildDirError(f"{build.manifest_path} does not list {', '.join(missing[:3])}; re-run `snexport export "
                            f"{build.root}` so the manifest matches the exported files")
    section = dict(read_manifest(build.manifest_path)["build"], target_profile=plan.profile.name)
    # Measurements of files that travel unchanged (e.g. the portable pack measured on another device) are kept.
    return assemble_manifest(build.manifest_path, section,
                             [engine_entry(facts_for(facts, a), a) for a in plan.engines])


def write_bundle(build_dir, out_dir, profile=None, *, tar: bool = False, show_progress: bool = True) -> dict:
    """Write the device bundle of ``build_dir`` for ``profile`` (default: the build's target) into ``out_dir``.

    ``out_dir`` must not exist yet (or be empty): a bundle on a device may hold its measurements, and is never
    overwritten. With ``tar``, ``<out_dir>.tar.gz`` is written too (top folder: the bundle's name). Returns
    {"bundle", "tarball", "profile", "engines", "files", "bytes", "left_out_bytes"}.
    """
    from snexport.device import deployset
    from snexport.device.manifest import write_manifest
    from snexport.device.profiles import load_profile
    from snexport.progress import progress_task

    build = BuildFiles(build_dir).require()
    if not build.manifest_path.is_file():
        raise BuildDirError(f"{build.root} has no {files.MANIFEST}; run `snexport export {build.root}` first")
    if profile is None:
        from snexport.device.manifest import read_manifest

        profile = load_profile(build.info().get("target") or read_manifest(build.manifest_path)["build"].get(
            "target_profile") or "x86-cpu")
    out = Path(out_dir).expanduser()
    tarball = out.with_name(out.name + ".tar.gz") if tar else None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildDirError(f"{out} already exists; choose a new folder for the bundle (a bundle is never "
                            "overwritten: it may hold a device's measurements)")
    if tarball is not None and tarball.exists():
        raise BuildDirError(f"{tarball} already exists; remove it or choose another bundle name")
    if out.resolve() == build.root.resolve() or build.root.resolve() in out.resolve().parents:
        raise BuildDirError(f"write the bundle outside the build directory {build.root}")

    plan = _bundle_plan(build, profile)
    manifest = _bundle_manifest(build, plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent))
    root = build.root.resolve()
    try:
        total = 0
        with progress_task(f"bundling {len(plan.engines)} engines for {profile.name}", len(plan.copies),
                           show_progress) as advance:
            for rel, sha in sorted(plan.copies.items()):
                pure = PurePosixPath(rel)
                if (not rel or "\\" in rel or pure.is_absolute() or ".." in pure.parts
                        or root not in (build.root / rel).resolve().parents):  # no link out of the build either
                    raise BuildDirError(f"a record of {build.root} names the file {rel!r}, not a path inside the "
                                        f"build; re-run `snexport export {build.root}`")
                total += _copy_verified(build.root / rel, work / rel, sha)
                advance()
        wanted = [{"stitch_id": a.stitch_id, "precision": a.precision, "sha256": a.sha256} for a in plan.records]
        weights_hash = deployset.deploy_set(build)["weights_hash"]
        atomic_write_json(work / files.DEPLOY, {"weights_hash": weights_hash, "artifacts": wanted})
        atomic_write_json(work / files.EXPORTS, [a.to_dict() for a in plan.records])
        if plan.pack_index is not None:
            atomic_write_json(work / files.PACK_DIR / files.PACK_INDEX, plan.pack_index)
        shutil.copyfile(profile.source, work / files.DEVICE_PROFILE)
        load_profile(work / files.DEVICE_PROFILE)  # the copy must read back as the same profile
        write_manifest(work / files.MANIFEST, manifest)
        os.chmod(work, 0o777 & ~_umask())  # mkdtemp made it private; the bundle gets the usual permissions
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if tarball is not None:
        tmp = temp_path_for(tarball)
        try:
            with tarfile.open(tmp, "w:gz") as tf:
                tf.add(out, arcname=out.name)
            commit(tmp, tarball)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    count = sum(1 for p in out.rglob("*") if p.is_file())
    left_out = sum(p.stat().st_size for p in (build.snnet_path, build.path(files.TRAIN_STATE)) if p.is_file())
    return {"bundle": out, "tarball": tarball, "profile": profile.name, "engines": len(plan.engines),
            "files": count, "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            "copied_engine_bytes": total, "left_out_bytes": left_out}


def bundle_profile(bundle: BuildFiles):
    """The profile a bundle was made for: its TOML copy, under the name the host gave it (the manifest's
    ``target_profile``), so measurements on the device are keyed like those of the same profile elsewhere."""
    from snexport.device.manifest import read_manifest
    from snexport.device.profiles import load_profile

    path = bundle.path(files.DEVICE_PROFILE)
    if not path.is_file():
        raise ProfileError(f"{bundle.root} has no {files.DEVICE_PROFILE}; pass --target, or make the bundle again "
                           "with `snexport bundle`")
    profile = load_profile(path)
    name = read_manifest(bundle.manifest_path)["build"].get("target_profile")
    return dataclasses.replace(profile, name=name) if name else profile


# -------------------------------------------------------------------------------------------------------------
# Merging a device's measurements back into the host build


def _lineage(arts: list) -> Callable[[str], set]:
    """sha256 -> itself and every file it was made from (``source_sha256`` chain), among ``arts``."""
    source = {a.sha256: a.source_sha256 for a in arts if a.source_sha256}

    def walk(sha: str) -> set:
        seen = set()
        while sha and sha not in seen:
            seen.add(sha)
            sha = source.get(sha, "")
        return seen

    return walk


def _records(build: BuildFiles) -> list:
    """Every artifact record a build or bundle keeps: exports, TensorRT engines, both packs."""
    from snexport.device import deployset

    arts: list[Artifact] = []
    if build.exports_path.is_file():
        arts += deployset.read_exports(build)
    arts += deployset.trt_engines(build)
    for pack_dir in (files.PACK_DIR, files.ORT_PACK_DIR):
        arts += deployset.packed_artifacts(build, pack_dir)
    return arts


def merge_bundle(bundle_dir, build_dir) -> dict:
    """Bring a device's measurements from a bundle (or a device's copy of the build) back into the host build.

    Returns {"devices": [keys], "engines": {device key: [host stitch ids]}, "unmatched": [bundle stitch ids],
    "profile_lines": n}. Re-running it is harmless: a device's lines and measurements are replaced, not added.
    """
    from snexport.device.manifest import engine_ids, merge_measurements, read_manifest, write_manifest

    src = BuildFiles(bundle_dir).require_deployable()
    host = BuildFiles(build_dir).require()
    if src.root.resolve() == host.root.resolve():
        raise BuildDirError("the bundle and the build are the same folder; pass the bundle the device measured")
    if not host.manifest_path.is_file():
        raise BuildDirError(f"{host.root} has no {files.MANIFEST}; run `snexport export {host.root}` first")
    theirs, ours = read_manifest(src.manifest_path), read_manifest(host.manifest_path)
    for key in ("weights_hash",):
        if theirs["build"].get(key) != ours["build"].get(key):
            raise BuildDirError(f"{src.root} was made from another export of the weights ({key} "
                                f"{theirs['build'].get(key)} != {ours['build'].get(key)}); bundle the current export "
                                "again and re-run `snexport bench` on the device")
    devices = theirs.get("devices", {})
    if not devices:
        raise BuildDirError(f"{src.root} holds no measurements yet; run `snexport bench {src.root}` on the device")

    their_lineage, our_lineage = _lineage(_records(src)), _lineage(_records(host))
    ours_by_stitch: dict[str, list] = {}  # stitch id -> [(our engine id, lineage)]: a stitch may have several files
    for e, our_id in zip(ours["engines"], engine_ids(ours["engines"])):
        ours_by_stitch.setdefault(e["stitch_id"], []).append((our_id, our_lineage(e["sha256"])))
    merged, matched, unmatched = ours, {}, set()
    for key in sorted(devices):
        measurements, pareto = {}, []
        for e in theirs["engines"]:
            m = e.get("measurements", {}).get(key)
            if m is None:
                continue
            mine = their_lineage(e["sha256"])
            match = [our_id for our_id, lineage in ours_by_stitch.get(e["stitch_id"], ()) if mine & lineage]
            if not match:
                unmatched.add(e["stitch_id"])
                continue
            measurements[match[0]] = m
            if m.get("pareto"):
                pareto.append(match[0])
        if measurements:
            merged = merge_measurements(merged, key, devices[key], measurements, pareto)
            matched[key] = sorted(measurements)
    if unmatched:
        log.warning("not merged (their files come from another export than the host manifest's): %s",
                    ", ".join(sorted(unmatched)))
    if not matched:
        raise BuildDirError(f"none of the engines measured in {src.root} was made from the files the host manifest "
                            f"lists; re-run `snexport export {host.root}`, bundle again and bench on the device")

    keys = set(matched)
    lines = [row for row in read_jsonl(src.profile_path) if row.get("device_key") in keys]
    kept = [row for row in read_jsonl(host.profile_path) if row.get("device_key") not in keys] + lines
    atomic_write_text(host.profile_path, "".join(json.dumps(row) + "\n" for row in kept))
    write_manifest(host.manifest_path, merged)
    return {"devices": sorted(matched), "engines": matched, "unmatched": sorted(unmatched),
            "profile_lines": len(lines)}
