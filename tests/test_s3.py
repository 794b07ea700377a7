"""Object storage for real: a moto S3 server on 127.0.0.1, sources, store and output all on it."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, bigmerge, load_output, synthetic_family
from test_mpi import mpirun

pytestmark = pytest.mark.s3  # a real S3 server (moto) in the test process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets in the process, across servers: each module starts from none
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")).read()
    # and s3fs caches file systems by their arguments: one made for an earlier module's server
    # (its endpoint from the environment) would be handed out again
    s3fs.S3FileSystem.clear_instance_cache()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_family(
    s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Path], dict[str, str]]:
    import s3fs

    local = synthetic_family(tmp_path_factory.mktemp("s3src"), n=2, dtype=torch.bfloat16, shards=2, rows=40)
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir("models-bkt")
    remote = {}
    for name, path in local.items():
        fs.put(str(path), f"models-bkt/zoo/{name}", recursive=True)
        remote[name] = f"s3://models-bkt/zoo/{name}"
    fs.mkdir("out-bkt")
    return local, remote


TIES = "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7, density: 0.4}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.6}}\ndtype: float32\nout_dtype: bfloat16\n"


@pytest.mark.mpi
def test_s3_to_s3_under_mpirun_matches_local(
    s3_env: dict[str, str], s3_family: tuple[dict[str, Path], dict[str, str]], tmp_path: Path
) -> None:
    import s3fs

    local, remote = s3_family
    c_local = tmp_path / "local.yaml"
    c_local.write_text(TIES.format(**{k: str(v) for k, v in local.items()}))
    c_s3 = tmp_path / "s3.yaml"
    c_s3.write_text(TIES.format(**remote))
    bigmerge("merge", str(c_local), str(tmp_path / "ref"), "--block-size", "300", "--quiet", check=True)
    proc = mpirun(2, "merge", str(c_s3), "s3://out-bkt/merged", "--block-size", "300", env=s3_env)
    assert proc.returncode == 0, proc.stderr
    assert "testing-secret" not in proc.stderr + proc.stdout
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.get("out-bkt/merged", str(tmp_path / "got"), recursive=True)
    assert (tmp_path / "got" / "bigmerge-manifest.json").exists()
    assert not fs.exists("out-bkt/merged/.bigmerge-store.zarr")
    assert_bit_identical(load_output(tmp_path / "ref"), load_output(tmp_path / "got"))
    v = bigmerge("verify", "s3://out-bkt/merged", env=s3_env)
    assert v.returncode == 0, v.stderr


def test_missing_bucket_is_a_clear_error(
    s3_env: dict[str, str], s3_family: tuple[dict[str, Path], dict[str, str]], tmp_path: Path
) -> None:
    _, remote = s3_family
    remote = dict(remote, ft2="s3://no-such-bucket-here/zoo/ft2")
    c = tmp_path / "c.yaml"
    c.write_text(TIES.format(**remote))
    proc = bigmerge("merge", str(c), str(tmp_path / "out"), env=s3_env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("bigmerge: error: s3://no-such-bucket-here/zoo/ft2")
    assert "Traceback" not in proc.stderr


def test_export_to_s3_is_assembled_by_the_server(
    s3_env: dict[str, str],
    s3_family: tuple[dict[str, Path], dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Store and output on S3: the output files are multipart uploads whose large parts the
    server copies from the store's shards (UploadPartCopy); small ones go up as bytes. The
    bytes, the manifest's checksums and `verify` are the same as with the streamed export.
    The part-size floor is lowered (here and in the moto server) so the tiny fixture has
    parts of both kinds."""
    import moto.s3.models
    import s3fs

    from bigmerge.engine.comm import SerialComm
    from bigmerge.merge import MergeOptions, run_merge
    from bigmerge.output import layout, zarr_store

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 64)
    monkeypatch.setattr(zarr_store, "S3_MIN_PART", 64)
    monkeypatch.setattr(layout, "S3_MIN_PART", 64)
    local, remote = s3_family
    c_local = tmp_path / "local.yaml"
    c_local.write_text(TIES.format(**{k: str(v) for k, v in local.items()}))
    c_s3 = tmp_path / "s3.yaml"
    c_s3.write_text(TIES.format(**remote))
    opts = MergeOptions(block_bytes=300, quiet=True)
    run_merge(str(c_local), str(tmp_path / "ref"), SerialComm(), opts)
    before = dict(zarr_store.COPY_STATS)
    run_merge(str(c_s3), "s3://out-bkt/copied", SerialComm(), opts)
    copied = zarr_store.COPY_STATS["blocks"] - before["blocks"]
    copied_bytes = zarr_store.COPY_STATS["bytes"]
    monkeypatch.setenv("BIGMERGE_NO_SERVER_COPY", "1")
    run_merge(str(c_s3), "s3://out-bkt/streamed", SerialComm(), opts)
    assert zarr_store.COPY_STATS["blocks"] - before["blocks"] == copied
    out_bytes = sum(v.numel() * v.element_size() for v in load_output(tmp_path / "ref").values())
    assert copied > 10 and copied_bytes - before["bytes"] > out_bytes / 2, (copied, out_bytes)
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    for name in ("copied", "streamed"):
        fs.get(f"out-bkt/{name}", str(tmp_path / name), recursive=True)
        assert_bit_identical(load_output(tmp_path / "ref"), load_output(tmp_path / name))
    manifests = [(tmp_path / n / "bigmerge-manifest.json").read_text() for n in ("copied", "streamed")]
    assert [json.loads(m)["tensors"] for m in manifests][0] == json.loads(manifests[1])["tensors"]
    v = bigmerge("verify", "s3://out-bkt/copied", env=s3_env)
    assert v.returncode == 0, v.stderr


def test_auto_spill_keeps_s3_sources_to_one_read(
    s3_family: tuple[dict[str, Path], dict[str, str]], tmp_path: Path
) -> None:
    """--spill auto (the default): a tensor over the cache whose sources are on object storage
    is spilled to local scratch, so S3 serves each byte once; the same merge from local copies
    reads them again instead (no local write). Both give the bytes of a merge that keeps every
    block in memory."""
    from bigmerge.engine.comm import SerialComm
    from bigmerge.merge import MergeOptions, run_merge

    local, remote = s3_family
    small = dict(block_bytes=256, cache_bytes=512, quiet=True)
    runs = {}
    for name, fam in (("s3", remote), ("local", local)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(TIES.format(**{k: str(v) for k, v in fam.items()}))
        runs[name] = run_merge(str(cfg), str(tmp_path / name), SerialComm(), MergeOptions(**small))  # type: ignore[arg-type]
        kept = run_merge(str(cfg), str(tmp_path / f"{name}-kept"), SerialComm(), MergeOptions(quiet=True))
        assert_bit_identical(load_output(tmp_path / f"{name}-kept"), load_output(tmp_path / name))
        assert kept["bytes_spilled"] == 0
    source_bytes = sum(p.stat().st_size for v in local.values() for p in v.glob("*.safetensors"))
    assert runs["s3"]["bytes_spilled"] > 0 and runs["s3"]["bytes_read"] <= source_bytes
    assert runs["local"]["bytes_spilled"] == 0 and runs["local"]["bytes_read"] > source_bytes
    assert_bit_identical(load_output(tmp_path / "s3"), load_output(tmp_path / "local"))
