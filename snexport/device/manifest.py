"""The manifest: the one file the on-device selector reads (``<build>/manifest.json``).

Layout and field meanings live in ``manifest.schema.json`` (JSON Schema 2020-12, shipped inside the package).
Standard library only: the selector runs on devices that have Python and an inference runtime and nothing else, so
validation uses the small validator below instead of the ``jsonschema`` package. It implements exactly the schema
keywords our schema uses and refuses any other, so the schema cannot silently grow a keyword this validator
ignores (tests cross-check it against ``jsonschema``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import json
import re
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, NamedTuple, Optional

from snexport.buildfiles import MANIFEST, parse_json, read_limited
from snexport.errors import ManifestError
from snexport.hashing import PathLike, atomic_write_text, sha256_json

SCHEMA_VERSION = 1
MANIFEST_NAME = MANIFEST

_RERUN = "re-run `snexport build` (or `snexport bench` on the device) to write it again"
MAX_MANIFEST_BYTES = 16 << 20  # ~100x the manifest of 32 engines measured on 3 devices


# ---------------------------------------------------------------------------------------------------------------
# Schema validation (the subset of JSON Schema 2020-12 our schema uses)


class Issue(NamedTuple):
    path: str  # JSON path of the offending value, e.g. "engines[3].sha256"; "(root)" for the document
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# Keywords that only describe; 2020-12 treats "format" as an annotation unless a vocabulary asks for assertion.
_ANNOTATIONS = {"$schema", "$id", "$comment", "$defs", "title", "description", "default", "examples", "format"}
_ASSERTIONS = {
    "$ref", "type", "enum", "const", "required", "properties", "additionalProperties", "items", "minItems",
    "minimum", "maximum", "minLength", "pattern", "anyOf", "oneOf", "allOf",
}


def _type_ok(value: Any, name: str) -> bool:
    # bool is an int subclass in Python but a distinct type in JSON; an integral float is a JSON integer.
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise ValueError(f"unknown JSON type '{name}' in schema")


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _type_ok(value, name):
            return name
    return type(value).__name__


def _json_equal(a: Any, b: Any) -> bool:
    # JSON equality: true != 1 (Python says equal), 1 == 1.0.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if _type_ok(a, "number") and _type_ok(b, "number"):
        return a == b
    return type(a) is type(b) and a == b


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def _join(path: str, key: Any) -> str:
    """``engines[3].sha256``; keys that are not identifiers are quoted: ``devices["my box"]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _IDENT.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


class SchemaValidator:
    """Validates instances against one schema document; ``$ref`` resolves JSON pointers within it."""

    def __init__(self, schema: Mapping[str, Any]):
        self.schema = schema
        self._check_keywords(schema, "#")

    def _check_keywords(self, node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                self._check_keywords(item, f"{where}/{i}")
            return
        if not isinstance(node, dict):
            return
        unknown = set(node) - _ANNOTATIONS - _ASSERTIONS
        if unknown:
            raise ValueError(f"schema keyword(s) {sorted(unknown)} at {where} are not supported by this validator")
        for key in ("properties", "$defs"):
            for name, sub in node.get(key, {}).items():
                self._check_keywords(sub, f"{where}/{key}/{name}")
        for key in ("additionalProperties", "items"):
            if isinstance(node.get(key), dict):
                self._check_keywords(node[key], f"{where}/{key}")
        for key in ("anyOf", "oneOf", "allOf"):
            if key in node:
                self._check_keywords(node[key], f"{where}/{key}")

    @functools.lru_cache(maxsize=None)
    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported, got '{ref}'")
        node: Any = self.schema
        for part in ref[1:].split("/")[1:]:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def issues(self, instance: Any) -> list[Issue]:
        """Every problem found, in document order (an empty list means valid)."""
        out: list[Issue] = []
        self._validate(instance, self.schema, "", out)
        return out

    def _validate(self, value: Any, schema: Any, path: str, out: list[Issue]) -> None:
        if schema is True:
            return
        if schema is False:
            out.append(Issue(path or "(root)", "not allowed here"))
            return
        where = path or "(root)"
        if "$ref" in schema:
            self._validate(value, self._resolve(schema["$ref"]), path, out)
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_type_ok(value, t) for t in types):
                out.append(Issue(where, f"expected {' or '.join(types)}, got {_json_type(value)} {_short(value)}"))
                return  # the remaining keywords would only restate the type mismatch
        if "enum" in schema and not any(_json_equal(value, v) for v in schema["enum"]):
            allowed = ", ".join(json.dumps(v) for v in schema["enum"])
            out.append(Issue(where, f"expected one of {allowed}, got {_short(value)}"))
        if "const" in schema and not _json_equal(value, schema["const"]):
            out.append(Issue(where, f"expected {json.dumps(schema['const'])}, got {_short(value)}"))
        if _type_ok(value, "number"):
            if "minimum" in schema and value < schema["minimum"]:
                out.append(Issue(where, f"must be >= {schema['minimum']}, got {value}"))
            if "maximum" in schema and value > schema["maximum"]:
                out.append(Issue(where, f"must be <= {schema['maximum']}, got {value}"))
        if isinstance(value, str):
            if "minLength" in schema and len(value) < schema["minLength"]:
                out.append(Issue(where, f"must have at least {schema['minLength']} character(s)"))
            if "pattern" in schema and not re.search(schema["pattern"], value):
                out.append(Issue(where, f"does not match {schema['pattern']}: {_short(value)}"))
        if isinstance(value, list):
            if "minItems" in schema and len(value) < schema["minItems"]:
                out.append(Issue(where, f"must have at least {schema['minItems']} item(s), got {len(value)}"))
            if "items" in schema:
                for i, item in enumerate(value):
                    self._validate(item, schema["items"], _join(path, i), out)
        if isinstance(value, dict):
            self._validate_object(value, schema, path, out)
        for sub in schema.get("allOf", ()):
            self._validate(value, sub, path, out)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                self._validate_alternatives(value, key, schema[key], path, out)

    def _validate_object(self, value: dict, schema: Mapping[str, Any], path: str, out: list[Issue]) -> None:
        for name in schema.get("required", ()):
            if name not in value:
                out.append(Issue(_join(path, name), "required field is missing"))
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                self._validate(item, props[key], _join(path, key), out)
            elif extra is False:
                known = ", ".join(props) or "none"
                out.append(Issue(_join(path, key), f"unknown field (allowed: {known})"))
            elif extra is not True:
                self._validate(item, extra, _join(path, key), out)

    def _validate_alternatives(self, value: Any, key: str, options: list, path: str, out: list[Issue]) -> None:
        results = []
        for option in options:
            found: list[Issue] = []
            self._validate(value, option, path, found)
            results.append(found)
        passing = sum(1 for r in results if not r)
        if passing == 1 or (key == "anyOf" and passing > 1):
            return
        where = path or "(root)"
        if passing > 1:
            out.append(Issue(where, "matches more than one of the allowed forms"))
            return
        # When exactly one alternative accepts the value's type, its complaints are the useful ones.
        shape_ok = [r for r in results if not any(i.message.startswith("expected ") and i.path == where for i in r)]
        if len(shape_ok) == 1:
            out.extend(shape_ok[0])
            return
        forms = " or ".join(_describe(self._deref(o)) for o in options)
        out.append(Issue(where, f"expected {forms}, got {_json_type(value)} {_short(value)}"))

    def _deref(self, schema: Any) -> Any:
        while isinstance(schema, dict) and "$ref" in schema and "type" not in schema and "enum" not in schema:
            schema = self._resolve(schema["$ref"])
        return schema


def _describe(schema: Any) -> str:
    if isinstance(schema, dict):
        if "enum" in schema:
            return " or ".join(json.dumps(v) for v in schema["enum"])
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            return " or ".join(types)
    return "a value of another form"


def _short(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The manifest schema shipped in the package (a path next to this module is what the wheel contains)."""
    text = resources.files("snexport.device").joinpath("manifest.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _validator() -> SchemaValidator:
    return SchemaValidator(load_schema())


# ---------------------------------------------------------------------------------------------------------------
# Checks the schema language cannot express


def _consistency_issues(data: dict) -> list[Issue]:
    out: list[Issue] = []
    seen: dict[tuple, int] = {}
    devices = data.get("devices", {})
    for i, engine in enumerate(data.get("engines", [])):
        where = f"engines[{i}]"
        key = (engine["stitch_id"], engine["format"], engine["precision"])
        if key in seen:
            out.append(Issue(f"{where}.stitch_id", f"duplicates engines[{seen[key]}] ({'/'.join(key)})"))
        seen[key] = i
        for field in ("file", "weights_file"):
            problem = _relpath_problem(engine.get(field))
            if problem:
                out.append(Issue(f"{where}.{field}", problem))
        if (engine["weights_file"] is None) != (engine["weights_sha256"] is None):
            out.append(Issue(f"{where}.weights_sha256", "must be set exactly when weights_file is set"))
        for dev in engine["measurements"]:
            if dev not in devices:
                out.append(Issue(_join(f"{where}.measurements", dev), "device key is not listed under devices"))
    return out


# POSIX limits every file system we run on shares (NAME_MAX, PATH_MAX): longer names fail with ENAMETOOLONG.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def _relpath_problem(path: Optional[str]) -> str:
    # The selector joins these to the manifest's directory; an absolute or escaping path would let a manifest
    # point outside its build directory, and a backslash path would not resolve on the (POSIX) device. (Symlinks
    # that leave the directory are refused where the files are opened: the selector resolves them.)
    if path is None:
        return ""
    if "\\" in path:
        return f"must use '/' separators, got {_short(path)}"
    if any(ord(ch) < 32 for ch in path):
        return f"must not contain control characters, got {_short(path)}"
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        return f"must be relative to the manifest's directory without '..', got {_short(path)}"
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or any(
            len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in pure.parts):
        return (f"is longer than a file system allows ({MAX_NAME_BYTES} bytes per name, {MAX_PATH_BYTES} in all), "
                f"got {_short(path)}")
    return ""


def validate_manifest(data: Any) -> None:
    """Raise ManifestError listing the first problems (JSON path and what was expected); return if valid."""
    if isinstance(data, dict) and _type_ok(data.get("schema_version"), "integer"):
        version = int(data["schema_version"])
        if version > SCHEMA_VERSION:
            raise ManifestError(
                f"manifest has schema_version {version} but this snexport reads version {SCHEMA_VERSION}; "
                "upgrade snexport on this device (or rebuild with the installed version)"
            )
    issues = _validator().issues(data)
    if not issues:
        issues = _consistency_issues(data)
    if issues:
        shown = "; ".join(str(i) for i in issues[:5])
        more = f" (and {len(issues) - 5} more)" if len(issues) > 5 else ""
        raise ManifestError(f"manifest fails its schema: {shown}{more}")


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing


def read_manifest(path: PathLike) -> dict:
    """Load and validate a manifest (a build directory is accepted and means its manifest.json)."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / MANIFEST_NAME
        raw = read_limited(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {path}; run `snexport build` to create it") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path, or over the size limit
        raise ManifestError(f"cannot read manifest {_short(str(path))}: {exc}") from None
    try:
        # Limits before parsing (size, nesting, 64-bit integers, finite numbers): the manifest is untrusted input.
        data = parse_json(raw, allow_nan=False, max_bytes=MAX_MANIFEST_BYTES)
    except ValueError as exc:
        raise ManifestError(f"manifest {path} is truncated or corrupt ({exc}); {_RERUN}") from None
    try:
        validate_manifest(data)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}; fix the field or {_RERUN}") from None
    return data


def write_manifest(path: PathLike, data: Mapping[str, Any]) -> Path:
    """Validate, then write atomically (temp file in the same directory, fsync, rename). Returns the path."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    validate_manifest(data)
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest for {path} is not plain JSON ({exc}); this is a bug in the writer") from exc
    atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Devices and measurements


_SLUG = re.compile(r"[^a-z0-9]+")
# Fingerprint fields that change between runs on one unchanged device (see profiling.device_fingerprint): left out
# of the key's hash so re-benching the same device replaces its numbers instead of adding a new device. The
# hostname is left out too: identical boxes of a fleet share one profile.
VOLATILE_FINGERPRINT_KEYS = frozenset(
    {"hostname", "thermal_c", "cur_freq_khz", "gpu_cur_freq_hz", "nvmap_used_bytes", "measured_at", "timestamp"}
)
# Only the inference runtimes' versions change what an engine measures; other library upgrades do not.
_RUNTIME_VERSIONS = frozenset({"onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda", "cudnn"})


def _slug(text: str, limit: int) -> str:
    return _SLUG.sub("-", text.lower()).strip("-")[:limit].strip("-")


def _identity(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        keep = {k: v for k, v in value.items() if k not in VOLATILE_FINGERPRINT_KEYS}
        if key == "versions":
            keep = {k: v for k, v in keep.items() if k in _RUNTIME_VERSIONS}
        return {k: _identity(v, k) for k, v in keep.items()}
    return value


def _model_name(fingerprint: Mapping[str, Any]) -> str:
    # The processor the numbers depend on most: the GPU when there is one, then the board (Jetson module
    # name), then the CPU. Fields may be plain strings or dicts with a "name"/"model" entry.
    for key in ("gpu", "board", "cpu"):
        value = fingerprint.get(key)
        if isinstance(value, Mapping):
            value = value.get("name") or value.get("model")
        if value:
            return str(value)
    return ""


def device_key(fingerprint: Mapping[str, Any], profile: Optional[str] = None) -> str:
    """Stable short key for a kind of device, e.g. ``x86-cpu-intel-r-xeon-r-processor-1f3a9c02``.

    Readable part: the profile (argument, or the fingerprint's "profile") and the processor model. The suffix
    hashes the fingerprint without its volatile fields (temperatures, clocks, hostname) and without library
    versions other than the inference runtime's, so re-measuring the same device gives the same key while a
    different power mode, core count or runtime version gives a new one.
    """
    profile = profile or str(fingerprint.get("profile") or "device")
    identity = _identity(dict(fingerprint))
    identity["profile"] = profile
    parts = [_slug(profile, 24), _slug(_model_name(fingerprint), 32), sha256_json(identity)[:8]]
    return "-".join(p for p in parts if p)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def merge_measurements(
    manifest: Mapping[str, Any],
    device_key: str,
    device_info: Mapping[str, Any],
    measurements_by_stitch_id: Mapping[str, Mapping[str, Any]],
    pareto_ids: Iterable[str] = (),
) -> dict:
    """A new manifest whose measurements for ``device_key`` are exactly the given ones; other devices are kept.

    ``device_info`` holds profile, fingerprint, settings (and optionally measured_at, default now). Measurements
    and ``pareto_ids`` are keyed by engine id (``engine_ids``: the stitch id, unless the manifest holds several
    files of that stitch). Each measurement's ``pareto`` flag is set from ``pareto_ids``. Engines absent from
    ``measurements_by_stitch_id`` end up not profiled on this device. The input is not modified; the result is
    validated.
    """
    result = copy.deepcopy(dict(manifest))
    engines = result.get("engines", [])
    keys = engine_ids(engines)
    ids = set(keys)
    unknown = sorted(set(measurements_by_stitch_id) - ids)
    pareto = set(pareto_ids)
    not_measured = sorted(pareto - set(measurements_by_stitch_id))
    if unknown or not_measured:
        problems = []
        if unknown:
            problems.append(f"measurements for stitches not in the manifest: {', '.join(unknown)}")
        if not_measured:
            problems.append(f"pareto ids without a measurement: {', '.join(not_measured)}")
        raise ManifestError(f"cannot merge measurements for {device_key}: {'; '.join(problems)}")
    info = dict(copy.deepcopy(device_info))
    info.setdefault("measured_at", utc_now())
    result.setdefault("devices", {})[device_key] = info
    for engine, eid in zip(engines, keys):
        per_device = engine.setdefault("measurements", {})
        per_device.pop(device_key, None)
        if eid in measurements_by_stitch_id:
            m = copy.deepcopy(dict(measurements_by_stitch_id[eid]))
            m["pareto"] = eid in pareto
            per_device[device_key] = m
    validate_manifest(result)
    return result


def engine_ids(engines: Iterable[Any]) -> list[str]:
    """The id of each engine (manifest entries, or ``Artifact`` records): its stitch id when it is the only file of
    its stitch, else ``"stitch_id#format-precision"`` (e.g. ``deit_s#onnx-int8``) — the names the selector, bench
    and the Pareto step use for the same engines."""
    def field(e, name):
        return e[name] if isinstance(e, Mapping) else getattr(e, name)

    engines = list(engines)
    counts: dict[str, int] = {}
    for e in engines:
        counts[field(e, "stitch_id")] = counts.get(field(e, "stitch_id"), 0) + 1
    return [field(e, "stitch_id") if counts[field(e, "stitch_id")] == 1
            else f"{field(e, 'stitch_id')}#{field(e, 'format')}-{field(e, 'precision')}" for e in engines]


def engine_memory_mb(measurement: Mapping[str, Any]) -> float:
    """What keeping one engine loaded costs: host RSS growth plus accelerator memory (MB).

    Negative RSS deltas (allocator noise on tiny engines) count as zero so they never make a set look cheaper.
    """
    mem = measurement["memory"]
    return max(0.0, float(mem["rss_load_delta_mb"])) + max(0.0, float(mem.get("device_delta_mb") or 0.0))


def latest_device(manifest: Mapping[str, Any]) -> Optional[str]:
    """The device measured most recently (ISO 8601 strings in UTC sort chronologically), or None."""
    devices = manifest.get("devices", {})
    if not devices:
        return None
    return max(devices, key=lambda k: (_parse_time(devices[k].get("measured_at", "")), k))


def _parse_time(text: str) -> _dt.datetime:
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


# ---------------------------------------------------------------------------------------------------------------
# Engine entries: what the host knows of a stitch (route, accuracy, cost) + the file a device runs


# Written by the host at export time (it alone knows the plan and the accuracy); a device that builds or repacks
# an engine copies them from the manifest onto its new file's entry, so the manifest is the merge point.
STATIC_ENGINE_FIELDS = ("stitch_id", "route", "accuracy", "gflops", "params")


def artifact_fields(art) -> dict:
    """The manifest fields of one engine file (an ``Artifact``): where it is, what it takes and gives, its hashes."""
    packed = bool(art.weights_file)
    return {
        "file": art.file,
        "format": art.format,
        "precision": art.precision,
        "sha256": art.sha256,
        "size_bytes": art.size_bytes,
        "input": {"name": art.input_name, "shape": list(art.input_shape), "dtype": art.input_dtype},
        "output": {"name": art.output_name, "shape": list(art.output_shape)},
        # A shared weights file (engine packs): counted once by the selector when sizing a preload set.
        "weights_file": art.weights_file if packed else None,
        "weights_sha256": art.weights_sha256 if packed else None,
        "weights_size_bytes": art.weights_size_bytes if packed else None,
        "weights_used_bytes": art.weights_used_bytes if packed else None,
        "versions": dict(art.versions),
    }


# The fields of each runtime's own file that a measurement's ``by_backend`` records (with ``file``): a device
# without the chosen runtime verifies and opens that file to run the engine on another measured runtime.
BY_BACKEND_FILE_FIELDS = ("file", "sha256", "size_bytes", "weights_file", "weights_sha256", "weights_size_bytes",
                          "weights_used_bytes")


def engine_entry(static: Mapping[str, Any], art) -> dict:
    """A manifest entry, not yet measured: the host's facts of the stitch + the engine file's fields."""
    return {**{k: copy.deepcopy(static[k]) for k in STATIC_ENGINE_FIELDS}, **artifact_fields(art), "measurements": {}}


def assemble_manifest(path: PathLike, build_section: Mapping[str, Any], entries: list[dict]) -> dict:
    """A manifest of ``entries`` that keeps, from the one at ``path``, the measurements of every unchanged file.

    An entry whose file (sha256) is unchanged keeps its measurements of every device; devices no entry refers to
    any more are dropped. ``created_at`` survives from the old manifest. Not written: see ``write_manifest``.
    """
    old: dict[str, dict] = {}
    devices: dict = {}
    section = dict(build_section)
    path = Path(path)
    if path.is_file():
        try:
            prev = read_manifest(path)
            old = {(e["stitch_id"], e["format"], e["precision"]): e for e in prev["engines"]}
            section["created_at"] = prev["build"].get("created_at", section.get("created_at"))
            devices = prev.get("devices", {})
        except ManifestError as exc:
            import logging

            logging.getLogger("snexport").warning("replacing unreadable manifest: %s", exc)
    kept = []
    for entry in entries:
        prev_entry = old.get((entry["stitch_id"], entry["format"], entry["precision"]))
        if prev_entry is not None and prev_entry["sha256"] == entry["sha256"]:
            entry = dict(entry, measurements=prev_entry.get("measurements", {}))
        kept.append(entry)
    used = {k for e in kept for k in e["measurements"]}
    return {
        "schema_version": SCHEMA_VERSION,
        "build": section,
        "devices": {k: v for k, v in devices.items() if k in used},
        "engines": kept,
    }
