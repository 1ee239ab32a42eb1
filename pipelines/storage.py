"""Storage by URI: local paths, ``file://``, ``s3://`` (``gs://``, ...) through pyarrow file systems.

    fs, path = filesystem("s3://bucket/runs?endpoint_override=127.0.0.1:8333&scheme=http")
    resolve("outputs/ray")            # -> "/abs/path/outputs/ray" (a local path, made absolute)
    resolve("s3://bucket/runs")       # -> unchanged: never Path.resolve()d into "<cwd>/s3:/bucket/runs"
    upload("models/judge", "s3://bucket/models/judge?...")   # a folder, recursively
    download("s3://bucket/models/judge?...", "models/judge")

Credentials come from the usual AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``); pyarrow (25) does not read
``AWS_ENDPOINT_URL``, so an S3-compatible endpoint goes in the URI query
(``endpoint_override=HOST:PORT&scheme=http``), as Ray's ``storage_path`` takes
it. A store that cannot be reached raises :class:`StorageError` naming the URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["StorageError", "is_uri", "resolve", "filesystem", "exists", "upload", "download", "join"]


class StorageError(OSError):
    """A storage URI could not be read or written; the message names the URI."""


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain local path."""
    s = str(location)
    return "://" in s.split("?", 1)[0]


def resolve(location: str | Path) -> str:
    """A URI unchanged; a local path made absolute (Ray and workers on other nodes need absolute paths)."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """``location`` / parts, keeping a URI's query (``s3://b/p?x=y`` + ``a`` -> ``s3://b/p/a?x=y``)."""
    base, _, query = str(location).partition("?")
    out = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{out}?{query}" if query else out


def filesystem(location: str | Path) -> tuple[Any, str]:
    """(pyarrow file system, path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), resolve(location)
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as e:  # bad scheme, unknown bucket region, ...
        raise StorageError(f"{_shown(location)}: cannot open this storage URI ({type(e).__name__}: {e})") from None


def exists(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise StorageError(f"{_shown(location)}: storage unreachable ({e})") from None


def upload(local_dir: str | Path, location: str) -> str:
    """Copy a local folder to ``location`` (a URI or a path), replacing what is there."""
    return _copy(str(Path(local_dir).resolve()), None, location, to_remote=True)


def download(location: str, local_dir: str | Path) -> Path:
    """Copy the folder at ``location`` to ``local_dir`` (made fresh)."""
    import shutil

    dest = Path(local_dir)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _copy(None, location, str(dest.resolve()), to_remote=False)
    return dest


def _copy(local: str | None, remote_src: str | None, dest: str, *, to_remote: bool) -> str:
    import pyarrow.fs as pafs

    remote = dest if to_remote else remote_src
    fs, path = filesystem(remote)
    try:
        if to_remote:
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir_contents(path, missing_dir_ok=True)
            fs.create_dir(path, recursive=True)
            pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise StorageError(f"{_shown(remote)}: nothing stored there")
            pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"{_shown(remote)}: storage unreachable or refused ({e})") from None
    return dest


def _shown(location: str | Path) -> str:
    """The URI as given (with its endpoint query: credentials never travel in it)."""
    return str(location)
