"""URL in, bytes out. The core speaks URLs and byte ranges; the scheme picks the file system.

A local path is just `file://`. Credentials never pass through here as literals: fsspec
finds them in the environment (AWS_* variables) or in `storage_options` from the config.

Every call on a Location is retried with exponential backoff and jitter when the error is
transient (timeouts, dropped connections, HTTP 5xx, 503 SlowDown, throttling), on top of
whatever the backend retries itself: a 70B merge makes tens of thousands of requests, and
one unlucky 503 must not cost the run. A missing file or bucket, or access denied, is never
retried: it becomes one StorageError line saying what failed and where.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bigmerge.errors import StorageError
from bigmerge.storage.checksum import crc32c

T = TypeVar("T")

RETRIES_ENV = "BIGMERGE_IO_RETRIES"  # retries after the first attempt (default 5)
RETRY_DELAY_ENV = "BIGMERGE_IO_RETRY_DELAY"  # seconds before the first retry (default 0.2), doubling
DEFAULT_RETRIES = 5
DEFAULT_RETRY_DELAY = 0.2
MAX_RETRY_DELAY = 20.0

# Error codes as S3 (and S3-compatible stores) spell them in the response body or status.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "PriorRequestNotComplete",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "InvalidSecurity",
        "NotSignedUp",
        "403",
    }
)
_MISSING_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "NotFound", "404"})
# Network failures by class name, so that no optional backend (botocore, aiohttp) is imported.
_TRANSIENT_TYPES = frozenset(
    {
        "ConnectionError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ProxyConnectionError",
        "HTTPClientError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "FSTimeoutError",
        "IncompleteRead",
        "RemoteDisconnected",
        "TimeoutError",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EBUSY",
        "EREMOTEIO",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "EAGAIN",
        "ENETUNREACH",
        "ENETDOWN",
        "EHOSTUNREACH",
        "EHOSTDOWN",
    )
    if hasattr(errno, name)
)
# Values that must never reach a log line, should a backend echo them in an error.
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_KEY",
)
_SECRET_OPTION = re.compile(r"secret|token|password|key|credential", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")

TMP_PREFIX = ".bigmerge-tmp."  # temporary names of atomic writes (bigmerge's own, by name)
# fs.info() keys that change when a file's content is replaced: local (size, mtime, inode),
# S3 (ETag, VersionId, LastModified), GCS (generation, md5Hash, crc32c), Azure/HTTP (etag).
IDENTITY_KEYS = ("size", "mtime", "ino", "ETag", "VersionId", "LastModified", "etag", "generation", "md5Hash", "crc32c")

_retry_lock = threading.Lock()
_retries_done = 0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = DEFAULT_RETRIES
    base_delay: float = DEFAULT_RETRY_DELAY
    max_delay: float = MAX_RETRY_DELAY

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(
            _env_number(RETRIES_ENV, DEFAULT_RETRIES, int), _env_number(RETRY_DELAY_ENV, DEFAULT_RETRY_DELAY, float)
        )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based).

        Exponential, with half of it random ("equal jitter"): ranks that hit the same
        throttled prefix at once must not all come back at the same instant.
        """
        cap = min(self.max_delay, self.base_delay * (2.0**attempt))
        return cap / 2 + random.uniform(0.0, cap / 2)


def _env_number(name: str, default: Any, kind: Callable[[str], Any]) -> Any:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if value < 0:
        raise StorageError(f"{name}={text!r}: must be a non-negative number")
    return value


def retries_done() -> int:
    """How many storage calls this process has retried (for the merge summary)."""
    return _retries_done


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes: backends wrap the service's error (s3fs: OSError from ClientError)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(seen) < 16 and all(cur is not s for s in seen):
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def service_error(exc: BaseException) -> tuple[str, int] | None:
    """(error code, HTTP status) of a service response in the chain (botocore's ClientError shape)."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            code = str(response["Error"].get("Code") or "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code, int(status)
        status = getattr(e, "status", None)  # aiohttp's ClientResponseError, HTTP-based backends
        if isinstance(status, int) and 100 <= status < 600:
            return str(status), status
    return None


def classify(exc: BaseException) -> str:
    """'missing', 'denied', 'transient', or 'fatal' (any other error: not worth repeating)."""
    service = service_error(exc)
    if service is not None:
        code, status = service
        if code in _MISSING_CODES or (status == 404 and not code):
            return "missing"
        if code in _DENIED_CODES or (status == 403 and code not in _TRANSIENT_CODES):
            return "denied"
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return "transient"
        return "fatal"
    for e in _chain(exc):
        if isinstance(e, FileNotFoundError):
            return "missing"
        if isinstance(e, PermissionError):
            return "denied"
        names = {c.__name__ for c in type(e).__mro__}
        if any("SSL" in n or "Certificate" in n for n in names):
            return "fatal"  # a bad certificate does not heal by waiting
        if names & _TRANSIENT_TYPES:
            return "transient"
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return "transient"
    return "fatal"


def _bucket(url: str) -> str:
    return urlsplit(url).netloc if "://" in url else ""


def _failure(
    url: str, what: str, exc: BaseException, kind: str, attempts: int, secrets: tuple[str, ...]
) -> StorageError:
    """The one line a user reads: what failed, where, and what to do about it."""
    service = service_error(exc)
    code = service[0] if service else ""
    if kind == "missing":
        if code == "NoSuchBucket" and _bucket(url):
            return StorageError(f"{url}: bucket {_bucket(url)!r} does not exist")
        return StorageError(f"{url}: no such file")
    if kind == "denied":
        if "://" not in url or url.startswith("file://"):
            return StorageError(f"{url}: permission denied ({what})")
        why = f" ({code})" if code and not code.isdigit() else ""
        return StorageError(
            f"{url}: access denied{why} ({what}); check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or storage_options in the config) and the bucket's permissions"
        )
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(exc)):
        return StorageError(
            f"{url}: {what} failed: no space left on device; free some space "
            "and rerun the same command: finished blocks are kept and the merge resumes"
        )
    after = f" after {attempts} attempts" if attempts > 1 else ""
    return StorageError(f"{url}: {what} failed{after}: {describe(exc, secrets)}")


def retry_call(
    fn: Callable[[], T], *, url: str, what: str, secrets: tuple[str, ...] = (), policy: RetryPolicy | None = None
) -> T:
    """fn(), retried with backoff while it fails transiently; every failure ends as a StorageError.

    A StorageError raised inside fn (an inner call that already retried) passes through
    untouched, so nested calls never multiply their retries.
    """
    global _retries_done
    policy = policy or RetryPolicy.from_env()
    attempt = 0
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend raises its own kinds
            kind = classify(exc)
            if kind != "transient" or attempt >= policy.retries:
                raise _failure(url, what, exc, kind, attempt + 1, secrets) from exc
            time.sleep(policy.delay(attempt))
            attempt += 1
            with _retry_lock:
                _retries_done += 1


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

    @property
    def is_far(self) -> bool:
        """Reading it costs a network: object storage (any non-local fsspec file system) or a
        local path on a network or FUSE file system (NFS, Lustre, GPFS, s3fs-fuse ...)."""
        return not self.is_local or network_filesystem(self.path) is not None

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        url = self.url.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, url, self.storage_options)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn() with this location's retries and error messages (for callers outside this class)."""
        secrets = tuple(str(v) for k, v in self.storage_options.items() if _SECRET_OPTION.search(k) and v)
        return retry_call(fn, url=self.url, what=what, secrets=secrets)

    def exists(self) -> bool:
        return self.call("existence check", lambda: bool(self.fs.exists(self.path)))

    def size(self) -> int:
        return self.call("stat", lambda: int(self.fs.size(self.path)))

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        def read() -> bytes:
            if start is None and end is None:
                return bytes(self.fs.cat_file(self.path))
            return bytes(self.fs.cat_file(self.path, start=start, end=end))

        span = (
            "read" if start is None and end is None else f"read of bytes {start or 0}..{end if end is not None else ''}"
        )
        return self.call(span, read)

    def read_into(self, start: int, buf: memoryview) -> None:
        """Fill `buf` with the bytes at [start, start + len(buf)); short reads are errors."""
        want = len(buf)

        def read() -> int:
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
                return got
            data = self.fs.cat_file(self.path, start=start, end=start + want)
            buf[: len(data)] = data
            return len(data)

        got = self.call(f"read of bytes {start}..{start + want}", read)
        if got != want:
            raise StorageError(f"{self.url}: file ends early: wanted bytes {start}..{start + want}, got {got} bytes")

    def write_bytes(self, data: bytes | memoryview) -> None:
        """Write a whole object: one PUT on object storage, a plain file write locally."""

        def write() -> None:
            if self.is_local:
                os.makedirs(posixpath.dirname(self.path), exist_ok=True)
                with open(self.path, "wb") as f:
                    f.write(data)
            else:
                self.fs.pipe_file(self.path, bytes(data))

        self.call("write", write)

    def write_atomic(self, data: bytes, fault: Callable[[], None] | None = None) -> None:
        """Write a whole file so that no partial one ever exists under its name.

        Locally: a temporary name beside it (TMP_PREFIX), fsynced, renamed over the name (rename
        is atomic on POSIX), then the directory fsynced. On object storage one PUT is atomic
        already; the object is read back and compared (size and CRC-32C), so a damaged upload
        never stays under the name. `fault` (tests) runs after the bytes are written, where a
        full disk shows at close or fsync.
        """

        def write() -> None:
            if self.is_local:
                folder, name = posixpath.split(self.path)
                os.makedirs(folder, exist_ok=True)
                tmp = posixpath.join(folder, TMP_PREFIX + name)
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        if fault is not None:
                            fault()
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return
            if fault is not None:
                fault()
            self.fs.pipe_file(self.path, bytes(data))
            self.fs.invalidate_cache(self.path)
            back = bytes(self.fs.cat_file(self.path))
            if len(back) != len(data) or crc32c(back) != crc32c(data):
                with contextlib.suppress(Exception):
                    self.fs.rm(self.path)
                raise StorageError(f"{self.url}: the object read back differs from what was written; it was removed")

        self.call("write", write)

    def identity(self) -> dict[str, Any]:
        """What identifies this file's content cheaply: size and modification time (and inode)
        locally; ETag, version and size on object storage; whatever of those a backend reports."""

        def info() -> dict[str, Any]:
            self.fs.invalidate_cache(self.path)  # a listing cached earlier must not hide a change
            return dict(self.fs.info(self.path))

        d = self.call("stat", info)
        return {
            k: v if isinstance(v, (int, float, str)) else str(v) for k in IDENTITY_KEYS if (v := d.get(k)) is not None
        }

    def content_crc32c(self, chunk: int = 64 * 2**20) -> str:
        """CRC-32C of every byte (hardware CRC: the read, not the checksum, is the cost)."""
        size = self.size()
        crc = 0
        for pos in range(0, size, chunk):
            crc = crc32c(self.read_bytes(pos, min(size, pos + chunk)), crc)
        return f"{crc:08x}"

    def makedirs(self) -> None:
        self.call("directory creation", lambda: self.fs.makedirs(self.path, exist_ok=True))

    def remove(self, recursive: bool = False) -> None:
        def rm() -> None:
            try:
                if self.fs.exists(self.path):
                    self.fs.rm(self.path, recursive=recursive)
            except FileNotFoundError:
                pass  # gone already: what we wanted

        self.call("removal", rm)

    def listdir(self) -> list[str]:
        """Base names under this directory; empty if it does not exist."""

        def ls() -> list[str]:
            try:
                if not self.fs.exists(self.path):
                    return []
                return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)]
            except FileNotFoundError:
                return []

        return self.call("listing", ls)


def describe(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """One line for an exception from any backend, never with credentials in it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _URL_USERINFO.sub(r"\1***@", text)
    for secret in (*secrets, *(os.environ.get(v, "") for v in _SECRET_ENV)):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# File system types (mountinfo's fstype) whose reads cross a network.
NETWORK_FS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
        "9p", "afs", "panfs", "wekafs", "ocfs2", "gfs2", "orangefs", "pvfs2", "davfs", "sshfs",
    }
)  # fmt: skip
_mounts: list[tuple[str, str]] | None = None  # (mount point, fstype), longest first
_mounts_lock = threading.Lock()


def _mount_table() -> list[tuple[str, str]]:
    global _mounts
    with _mounts_lock:
        if _mounts is None:
            table: list[tuple[str, str]] = []
            try:
                with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                    for line in f:
                        left, _, right = line.partition(" - ")
                        fields, rest = left.split(), right.split()
                        if len(fields) >= 5 and rest:
                            point = fields[4].encode().decode("unicode_escape")  # \040 for a space
                            table.append((point, rest[0]))
            except OSError:  # not Linux: every local path counts as local
                pass
            _mounts = sorted(table, key=lambda m: len(m[0]), reverse=True)
        return _mounts


def network_filesystem(path: str) -> str | None:
    """The type of the network or FUSE file system that holds this local path, or None."""
    real = os.path.realpath(path)
    for point, fstype in _mount_table():
        if real == point or real.startswith(point.rstrip("/") + "/"):
            base = fstype.split(".")[0]  # fuse.s3fs, fuse.sshfs ...
            return fstype if base in NETWORK_FS or base == "fuse" or fstype in NETWORK_FS else None
    return None


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
