"""URL in, bytes out. The core speaks URLs and byte ranges; the scheme picks the file system.

A local path is just `file://`. Credentials never pass through here as literals: fsspec
finds them in the environment (AWS_* variables) or in `storage_options` from the config.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bigmerge.errors import StorageError


@dataclass(frozen=True)
class Location:
    """A file system and a path on it, made from a URL or a local path."""

    fs: Any
    path: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        url = self.url.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, url, self.storage_options)

    def exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.path))
        except Exception as exc:  # noqa: BLE001 - every backend raises its own kinds
            raise StorageError(f"{self.url}: cannot check existence: {describe(exc)}") from exc

    def size(self) -> int:
        try:
            return int(self.fs.size(self.path))
        except FileNotFoundError as exc:
            raise StorageError(f"{self.url}: no such file") from exc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{self.url}: cannot stat: {describe(exc)}") from exc

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        try:
            if start is None and end is None:
                return bytes(self.fs.cat_file(self.path))
            return bytes(self.fs.cat_file(self.path, start=start, end=end))
        except FileNotFoundError as exc:
            raise StorageError(f"{self.url}: no such file") from exc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{self.url}: read failed: {describe(exc)}") from exc

    def read_into(self, start: int, buf: memoryview) -> None:
        """Fill `buf` with the bytes at [start, start + len(buf)); short reads are errors."""
        want = len(buf)
        try:
            if self.is_local:
                # os.preadv releases the GIL and copies straight into our buffer.
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    got = 0
                    while got < want:
                        n = os.preadv(fd, [buf[got:]], start + got)
                        if n == 0:
                            break
                        got += n
                finally:
                    os.close(fd)
            else:
                data = self.fs.cat_file(self.path, start=start, end=start + want)
                got = len(data)
                buf[:got] = data
        except FileNotFoundError as exc:
            raise StorageError(f"{self.url}: no such file") from exc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{self.url}: read of bytes {start}..{start + want} failed: {describe(exc)}") from exc
        if got != want:
            raise StorageError(
                f"{self.url}: file ends early: wanted bytes {start}..{start + want}, got {got} bytes"
            )

    def write_bytes(self, data: bytes | memoryview) -> None:
        """Write a whole object: one PUT on object storage, a plain file write locally."""
        try:
            if self.is_local:
                os.makedirs(posixpath.dirname(self.path), exist_ok=True)
                with open(self.path, "wb") as f:
                    f.write(data)
            else:
                self.fs.pipe_file(self.path, bytes(data))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{self.url}: write failed: {describe(exc)}") from exc

    def makedirs(self) -> None:
        try:
            self.fs.makedirs(self.path, exist_ok=True)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{self.url}: cannot create: {describe(exc)}") from exc

    def remove(self, recursive: bool = False) -> None:
        try:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=recursive)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{self.url}: cannot remove: {describe(exc)}") from exc

    def listdir(self) -> list[str]:
        """Base names under this directory; empty if it does not exist."""
        try:
            if not self.fs.exists(self.path):
                return []
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{self.url}: cannot list: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """One line for an exception from any backend, never with credentials in it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def location(url_or_path: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve a local path or any fsspec URL (s3://, gs://, file://, memory://)."""
    opts = dict(storage_options or {})
    if "://" not in url_or_path:
        path = os.path.abspath(os.path.expanduser(url_or_path))
        return Location(fsspec.filesystem("file"), path, path, opts)
    try:
        fs, path = fsspec.core.url_to_fs(url_or_path, **opts)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{url_or_path}: cannot open this URL: {describe(exc)}") from exc
    if isinstance(fs, LocalFileSystem):
        return Location(fs, path, path, opts)
    return Location(fs, path, url_or_path.rstrip("/"), opts)
