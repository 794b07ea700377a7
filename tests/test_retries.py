"""Storage errors: transient ones are retried with backoff, the others are one clear line.

The S3 tests run bigmerge against a real S3 server (moto) behind a fault policy that
answers 503, or 403, to chosen requests (tests/faulty_s3.py); botocore's own retries are
switched off there so that every injected error reaches bigmerge's retry layer.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from faulty_s3 import Environ, FaultyS3
from fsspec.implementations.memory import MemoryFileSystem
from helpers import assert_bit_identical, load_output, synthetic_family

from bigmerge.cli import main
from bigmerge.engine.comm import SerialComm
from bigmerge.errors import StorageError
from bigmerge.merge import MergeOptions, run_merge
from bigmerge.storage.fs import Location, classify, retries_done

KEY, SECRET = "retry-test-key", "retry-test-secret-value"


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGMERGE_IO_RETRIES", "3")
    monkeypatch.setenv("BIGMERGE_IO_RETRY_DELAY", "0.001")


# -- which errors are transient ---------------------------------------------------------


def client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "from the server"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def s3fs_form(exc: Exception) -> Exception:
    """What s3fs raises for a ClientError: its own translation, with the ClientError as cause."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(exc)


SERVICE_CASES = [
    ("SlowDown", 503, "transient"),
    ("ServiceUnavailable", 503, "transient"),
    ("503", 503, "transient"),  # a HEAD has no body: the code is the status
    ("InternalError", 500, "transient"),
    ("Throttling", 400, "transient"),
    ("RequestTimeout", 400, "transient"),
    ("AccessDenied", 403, "denied"),
    ("403", 403, "denied"),
    ("InvalidAccessKeyId", 403, "denied"),
    ("NoSuchBucket", 404, "missing"),
    ("NoSuchKey", 404, "missing"),
    ("InvalidRange", 416, "fatal"),
]


@pytest.mark.parametrize("translated", [False, True], ids=["botocore", "s3fs"])
@pytest.mark.parametrize(("code", "status", "kind"), SERVICE_CASES)
def test_service_errors_are_classified(code: str, status: int, kind: str, translated: bool) -> None:
    exc = client_error(code, status)
    assert classify(s3fs_form(exc) if translated else exc) == kind


def network_errors() -> list[tuple[BaseException, str]]:
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
    from fsspec.exceptions import FSTimeoutError

    return [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "transient"),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), "transient"),
        (ConnectionClosedError(endpoint_url="http://127.0.0.1:9"), "transient"),
        (aiohttp.ServerDisconnectedError(), "transient"),
        (aiohttp.ClientPayloadError("truncated"), "transient"),
        (FSTimeoutError(), "transient"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "transient"),
        (TimeoutError(), "transient"),
        (FileNotFoundError(errno.ENOENT, "gone"), "missing"),
        (PermissionError(errno.EACCES, "no"), "denied"),
        (OSError(errno.ENOSPC, "disk full"), "fatal"),
        (ValueError("bad"), "fatal"),
    ]


def test_network_and_local_errors_are_classified() -> None:
    for exc, kind in network_errors():
        assert classify(exc) == kind, repr(exc)


# -- every Location call retries (a fault-injecting fsspec file system) ---------------------


class FlakyFS(MemoryFileSystem):
    """memory:// whose calls raise `error` the next `fail_next` times."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.fail_next = 0
        self.failures = 0
        self.error: type[BaseException] = ConnectionResetError

    def _maybe_fail(self) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failures += 1
            raise self.error("injected")

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kw: Any) -> Any:
        self._maybe_fail()
        return super().cat_file(path, start=start, end=end, **kw)

    def pipe_file(self, path: str, value: Any, *args: Any, **kw: Any) -> Any:
        self._maybe_fail()
        return super().pipe_file(path, value, *args, **kw)

    def exists(self, path: str, **kw: Any) -> bool:
        self._maybe_fail()
        return bool(super().exists(path, **kw))

    def size(self, path: str) -> Any:
        self._maybe_fail()
        return super().size(path)

    def ls(self, path: str, detail: bool = True, **kw: Any) -> Any:
        self._maybe_fail()
        return super().ls(path, detail=detail, **kw)


def call(loc: Location, op: str) -> Any:
    if op == "read_into":
        buf = bytearray(4)
        loc.read_into(2, memoryview(buf))
        return bytes(buf)
    if op == "read_range":
        return loc.read_bytes(2, 6)
    if op == "write_bytes":
        return loc.write_bytes(b"0123456789")
    if op == "listdir":
        return Location(loc.fs, loc.path.rsplit("/", 1)[0], "flaky://dir").listdir()
    return getattr(loc, op)()


OPS = {
    "read_bytes": b"0123456789",
    "read_range": b"2345",
    "read_into": b"2345",
    "write_bytes": None,
    "exists": True,
    "size": 10,
    "listdir": ["f"],
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_location_call_retries_transient_errors(op: str, fast_retries: None, tmp_path: Path) -> None:
    fs = FlakyFS(skip_instance_cache=True)
    path = f"/{tmp_path.name}-{op}/f"
    fs.pipe_file(path, b"0123456789")
    loc = Location(fs, path, f"flaky://{path.lstrip('/')}")
    before = retries_done()
    fs.fail_next = 3  # the budget is 3 retries: the fourth attempt succeeds
    assert call(loc, op) == OPS[op]
    assert fs.failures == 3 and retries_done() - before == 3
    fs.fail_next = 4  # one more than the budget
    with pytest.raises(StorageError, match=r"^flaky://.*failed after 4 attempts: ConnectionResetError"):
        call(loc, op)


@pytest.mark.parametrize(
    ("error", "message"), [(FileNotFoundError, "no such file"), (PermissionError, "access denied")]
)
def test_missing_or_forbidden_is_never_retried(error: type[BaseException], message: str, fast_retries: None) -> None:
    fs = FlakyFS(skip_instance_cache=True)
    fs.pipe_file("/never-retried/f", b"x")
    fs.error, fs.fail_next = error, 10
    with pytest.raises(StorageError, match=f"^flaky://never-retried/f: {message}"):
        Location(fs, "/never-retried/f", "flaky://never-retried/f").read_bytes()
    assert fs.failures == 1


def test_retry_settings_must_be_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGMERGE_IO_RETRIES", "many")
    fs = FlakyFS(skip_instance_cache=True)
    with pytest.raises(StorageError, match="BIGMERGE_IO_RETRIES='many'"):
        Location(fs, "/settings/f", "flaky://settings/f").exists()


# -- a real S3 server that fails requests ----------------------------------------------------

# linear: the retry path does not depend on the operator, and linear needs no JIT warm-up.
CONFIG = "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\ndtype: float32\nout_dtype: bfloat16\n"


@pytest.fixture(scope="module")
def flaky_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultyS3, dict[str, Path], dict[str, str]]]:
    import s3fs

    local = synthetic_family(tmp_path_factory.mktemp("retry-src"), n=2, dtype=torch.bfloat16, shards=2, rows=40)
    with FaultyS3() as srv:
        fs = s3fs.S3FileSystem(endpoint_url=srv.url, key=KEY, secret=SECRET, skip_instance_cache=True)
        fs.mkdir("retry-src")
        fs.mkdir("retry-out")
        remote = {}
        for name, path in local.items():
            fs.put(str(path), f"retry-src/zoo/{name}", recursive=True)
            remote[name] = f"s3://retry-src/zoo/{name}"
        yield srv, local, remote


def s3_config(tmp: Path, srv: FaultyS3, remote: dict[str, str]) -> Path:
    """Credentials and endpoint from the config; botocore's retries off, so bigmerge's do the work."""
    cfg = tmp / "s3.yaml"
    cfg.write_text(
        CONFIG.format(**remote)
        + f"storage_options: {{endpoint_url: '{srv.url}', key: {KEY}, secret: {SECRET}, "
        + "config_kwargs: {retries: {total_max_attempts: 1}}}\n"
    )
    return cfg


def fetch(srv: FaultyS3, url: str, dest: Path) -> None:
    import s3fs

    s3fs.S3FileSystem(endpoint_url=srv.url, key=KEY, secret=SECRET, skip_instance_cache=True).get(
        url, str(dest), recursive=True
    )


def exists(srv: FaultyS3, url: str) -> bool:
    import s3fs

    return bool(s3fs.S3FileSystem(endpoint_url=srv.url, key=KEY, secret=SECRET, skip_instance_cache=True).exists(url))


def via_location(environ: Environ) -> bool:
    """Requests that bigmerge makes through Location: ranged reads, HEADs of keys, shard PUTs.

    (zarr's own requests while creating the store are retried as a whole, so failing each of
    them once would need more attempts than the budget.)
    """
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    if path.count("/") < 2 or path.endswith("zarr.json"):
        return False
    return (method == "GET" and "HTTP_RANGE" in environ) or method == "HEAD" or (method == "PUT" and "/c/" in path)


@pytest.mark.s3
def test_merge_through_flaky_s3_is_bit_identical(
    flaky_s3: tuple[FaultyS3, dict[str, Path], dict[str, str]], tmp_path: Path, fast_retries: None
) -> None:
    srv, local, remote = flaky_s3
    ref_cfg = tmp_path / "local.yaml"
    ref_cfg.write_text(CONFIG.format(**{k: str(v) for k, v in local.items()}))
    run_merge(str(ref_cfg), str(tmp_path / "ref"), SerialComm(), MergeOptions(block_bytes=300, quiet=True))

    srv.arm(fail_next=3, match=via_location, fail_each=1)  # every such request fails once
    summary = run_merge(
        str(s3_config(tmp_path, srv, remote)),
        "s3://retry-out/merged",
        SerialComm(),
        MergeOptions(block_bytes=300, quiet=True),
    )
    assert srv.failed > 20
    assert summary["io_retries"] == srv.failed  # each 503 was retried by bigmerge, none was fatal
    fetch(srv, "retry-out/merged", tmp_path / "got")
    assert (tmp_path / "got" / "bigmerge-manifest.json").exists()
    assert_bit_identical(load_output(tmp_path / "ref"), load_output(tmp_path / "got"))


def cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    code = main(["merge", *args, "--block-size", "300", "--quiet"])
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.startswith("bigmerge:")], err


@pytest.mark.s3
def test_errors_beyond_the_retry_budget_are_one_line_exit_2(
    flaky_s3: tuple[FaultyS3, dict[str, Path], dict[str, str]],
    tmp_path: Path,
    fast_retries: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    srv, _, remote = flaky_s3

    def block_reads_of_ft2(environ: Environ) -> bool:
        # Block reads only (not the header at byte 0): the merge fails midway, after the store exists.
        rng = environ.get("HTTP_RANGE", "")
        return "/zoo/ft2/" in environ.get("PATH_INFO", "") and bool(rng) and not rng.startswith("bytes=0-")

    srv.arm(match=block_reads_of_ft2, fail_always=True)
    code, lines, err = cli_error(capsys, str(s3_config(tmp_path, srv, remote)), "s3://retry-out/failed")
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("bigmerge: error: s3://retry-src/zoo/ft2/model-0000")
    assert "failed after 4 attempts" in lines[0] and "injected by the test server" in lines[0]
    assert "Traceback" not in err and SECRET not in err and KEY not in err
    assert exists(srv, "retry-out/failed/.bigmerge-store.zarr/bigmerge-plan.json")  # it failed midway
    assert not exists(srv, "retry-out/failed/model.safetensors.index.json")
    assert not exists(srv, "retry-out/failed/bigmerge-manifest.json")


@pytest.mark.s3
def test_access_denied_is_one_clear_line_and_not_retried(
    flaky_s3: tuple[FaultyS3, dict[str, Path], dict[str, str]],
    tmp_path: Path,
    fast_retries: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    srv, _, remote = flaky_s3
    srv.arm(
        match=lambda environ: "/zoo/ft1" in environ.get("PATH_INFO", ""), fail_always=True, error=(403, "AccessDenied")
    )
    code, lines, err = cli_error(capsys, str(s3_config(tmp_path, srv, remote)), "s3://retry-out/denied")
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("bigmerge: error: s3://retry-src/zoo/ft1/") and "access denied" in lines[0]
    assert "credentials" in lines[0] and SECRET not in err and KEY not in err
    assert sum(1 for key in srv.log if "/zoo/ft1" in key[1]) == 1  # refused once, asked once


@pytest.mark.s3
def test_missing_output_bucket_names_the_bucket(
    flaky_s3: tuple[FaultyS3, dict[str, Path], dict[str, str]], tmp_path: Path
) -> None:
    srv, _, remote = flaky_s3
    srv.arm()
    with pytest.raises(StorageError, match=r"^s3://no-such-out-bucket/.*: bucket 'no-such-out-bucket' does not exist$"):
        run_merge(
            str(s3_config(tmp_path, srv, remote)),
            "s3://no-such-out-bucket/merged",
            SerialComm(),
            MergeOptions(block_bytes=300, quiet=True),
        )
