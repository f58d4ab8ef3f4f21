"""Files: atomic, collision-safe writes and up-front checks of output paths.

Every file cna_lens writes goes through :func:`atomic_write_bytes`: the data is written to
a unique temporary file in the target's directory (``tempfile.mkstemp``), flushed, and
moved over the target with :func:`os.replace`. A reader sees the old file or the complete
new one, never a partial one; two writers never share a temporary name; a failed write
leaves no temporary file behind and never touches a user's own ``<name>.tmp``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from cna_lens.errors import CNAError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "check_out_dir",
    "check_writable_file",
    "read_text_file",
]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent directories are created).

    Raises:
        CNAError: ``path`` is a directory, or the file cannot be written (the message names
            the path and the OS error; no temporary file is left behind).
    """
    path = Path(path)
    if path.is_dir():
        raise CNAError(f"cannot write {str(path)!r}: it is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CNAError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if os.name == "posix":
            # mkstemp creates the file 0600; give it the mode a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CNAError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def check_writable_file(path: str | os.PathLike[str]) -> Path:
    """Fail now, before any expensive work, if a file could not be written at ``path``.

    Creates nothing: the nearest existing ancestor must be a writable directory, and the
    path itself must not be a directory.

    Raises:
        CNAError: ``path`` is a directory, a parent is a file, or the directory that would
            hold it is not writable.
    """
    path = Path(path)
    if str(path) == "" or path.name in ("", ".", ".."):
        raise CNAError(f"output path {str(path)!r} is not a file name")
    if path.is_dir():
        raise CNAError(f"output path {str(path)!r} is a directory; give a file path")
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link
            raise CNAError(f"output path {str(path)!r}: {str(ancestor)!r} is a broken link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CNAError(f"output path {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CNAError(f"output path {str(path)!r}: directory {str(ancestor)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(path.parent, os.W_OK):
        raise CNAError(f"output path {str(path)!r} is not writable")
    return path


def check_out_dir(out: Path, *, overwrite: bool, marker: str = "summary.json") -> None:
    """Refuse to write into a directory that holds something other than cna_lens output.

    ``out`` may be missing, empty, or a previous output of cna_lens: a directory whose
    ``marker`` file is a JSON object written by cna_lens (it records the
    ``package_version`` of cna_lens, at the top level or under ``"meta"``, as
    ``reproduce``'s ``summary.json`` does). Anything else is refused unless ``overwrite``
    is true.

    Raises:
        CNAError: ``out`` is a file, or a non-empty directory that is not cna_lens output
            and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CNAError(f"output directory {str(out)!r} is an existing file")
    if not out.exists() or overwrite or not any(out.iterdir()):
        return
    if _is_cna_output(out / marker):
        return
    raise CNAError(
        f"output directory {str(out)!r} is not empty and is not a previous cna_lens output "
        f"(no {marker} written by cna_lens in it); choose a new or empty directory, or pass "
        "overwrite=True (--overwrite) to write into it anyway"
    )


def _is_cna_output(marker: Path) -> bool:
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    meta = data.get("meta")
    return "package_version" in data or (isinstance(meta, dict) and "package_version" in meta)


def read_text_file(path: str | os.PathLike[str], what: str, *, writer: str) -> str:
    """The text of a JSON file cna_lens wrote: UTF-8, or UTF-16 / UTF-8 with a byte-order mark.

    Args:
        path: The file.
        what: What it is, for messages ("circuit file", "steering file").
        writer: What writes such files ("Circuit.save"), for messages.

    Raises:
        CNAError: missing, a directory, unreadable, or not valid text in its encoding.
    """
    path = Path(path)
    if path.is_dir():
        raise CNAError(f"{what} {str(path)!r} is a directory; give the JSON file")
    if not path.is_file():
        raise CNAError(f"{what} {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CNAError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    elif raw.startswith(b"\xef\xbb\xbf"):
        encoding = "utf-8-sig"
    else:
        encoding = "utf-8"
    expected = (
        f"{what}s are UTF-8 JSON as written by {writer} (UTF-16 is read only with a "
        "byte-order mark)"
    )
    nul = raw.find(b"\x00")
    if encoding != "utf-16" and nul >= 0:  # UTF-16 without a BOM, or a binary file
        raise CNAError(
            f"{what} {str(path)!r} is not valid UTF-8 text (a NUL byte at offset {nul}); {expected}"
        )
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CNAError(
            f"{what} {str(path)!r} is not valid {encoding.upper()} text (byte "
            f"{raw[exc.start : exc.start + 1]!r} at offset {exc.start}); {expected}"
        ) from None
