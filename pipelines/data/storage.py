"""Where prepared data lives: a local folder, or a URI that pyarrow's filesystem layer knows (``file:///...``,
``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``).

Local paths and ``file://`` URIs become absolute ``Path`` objects, so everything that handles local folders keeps
working; any other URI stays a string, reached through ``pyarrow.fs``. Light on purpose (no torch): Ray Data
tasks and the card import it.
"""

from __future__ import annotations

import functools
import re
import uuid
from pathlib import Path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def is_uri(where: str | Path) -> bool:
    """``where`` names a filesystem by its scheme (``s3://``, ``file:///``), not a local path."""
    return isinstance(where, str) and bool(_SCHEME.match(where))


def normalise(where: str | Path) -> Path | str:
    """A local path or ``file://`` URI as an absolute ``Path``; any other URI as its string, without a trailing
    slash. An unknown scheme fails here with the schemes that work."""
    if isinstance(where, Path) or not is_uri(where):
        return Path(where).expanduser().resolve()
    fs, path = _from_uri(where)
    if fs.type_name == "local":
        return Path(path).resolve()
    return where.rstrip("/")


@functools.lru_cache(maxsize=32)
def _from_uri(uri: str):
    """(filesystem, path) of a URI, built once per process: a feed resolves its location several times (card,
    shards, each read), and for an object store each build may ask the service where the bucket is."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{uri} is not a location this platform can use: {exc}; give a local path or a URI "
                         "such as file:///data/prepared or s3://bucket/prepared") from None


def filesystem(where: str | Path):
    """(pyarrow filesystem, path inside it) of a location."""
    import pyarrow.fs as pafs

    where = normalise(where)
    if isinstance(where, Path):
        return pafs.LocalFileSystem(), str(where)
    return _from_uri(where)


def join(where: Path | str, *names: str) -> Path | str:
    """A file inside a location, of the same kind (Path or URI string)."""
    if isinstance(where, Path):
        return where.joinpath(*names)
    return "/".join([where.rstrip("/"), *names])


def renames_atomically(fs) -> bool:
    """Whether a finished folder can be renamed into place in one step. Local (and network-mounted POSIX)
    filesystems can; object stores have no rename, so there the card, written last, marks a finished folder."""
    return fs.type_name == "local"


def read_text(fs, path: str) -> str | None:
    """A small file's text, or None when it does not exist."""
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read().decode("utf-8")


def write_text(fs, path: str, text: str) -> None:
    """Write a small file so that a reader sees all of it or nothing: through a temporary name and a rename where
    the filesystem renames atomically; an object store makes an object visible only when it is complete."""
    data = text.encode("utf-8")
    if not renames_atomically(fs):
        with fs.open_output_stream(path) as fh:
            fh.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as fh:
            fh.write(data)
    except BaseException:  # e.g. a full disk: no stray temporary file is left holding space
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
    fs.move(tmp, path)
