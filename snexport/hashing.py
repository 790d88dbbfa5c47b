"""Content hashes and atomic writes: the two things that make every stage resumable.

Standard library only (manifest.py and the on-device selector use it). The rule everywhere: a file appears at its
final path only when it is complete. We write to a temporary file in the *same directory* (``os.replace`` is atomic
only within one filesystem), flush and fsync it, then rename it over the final name and fsync the directory so the
rename itself survives a power cut. A process killed half-way leaves at most a ``*.tmp`` file, never a truncated file
under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Suffix of every temporary file we create; stages may delete stale ones left by a killed run.
TMP_SUFFIX = ".tmp"

_CHUNK = 1 << 20  # 1 MiB reads: large enough to be fast, small enough to hash multi-GB engines in constant memory


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal data always hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able value (settings, records); tuples hash like lists."""
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot hash object of type {type(obj).__name__} as JSON")


def _fsync_dir(directory: Path) -> None:
    # Directory fsync makes the rename durable on POSIX; Windows cannot open directories, and there it is a no-op.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: PathLike) -> Path:
    """A fresh, unused temporary path next to ``path`` (same directory, hidden, ending in ``.tmp``)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600 files; the renamed result should get the usual permissions (0666 minus umask).
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def commit(tmp: PathLike, path: PathLike) -> None:
    """fsync ``tmp`` and atomically rename it to ``path`` (replacing any existing file)."""
    tmp, final = Path(tmp), Path(path)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it into place, on any error delete it.

    For writers that insist on a file name (exporters, ``onnx.save``): they write the temp path, and only a
    complete file ever appears at ``path``.
    """
    tmp = temp_path_for(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    """Pretty JSON for files people read (exports.json, manifest.json); trailing newline for diff tools."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def remove_stale_temps(final: PathLike) -> int:
    """Delete temporary files a killed writer left next to ``final`` (``.<name>.*.tmp``); returns how many.

    Only for files a single writer owns (one build stage at a time per build directory)."""
    final = Path(final)
    stale = list(final.parent.glob(f".{final.name}.*{TMP_SUFFIX}")) if final.parent.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)

