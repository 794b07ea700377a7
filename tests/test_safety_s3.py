"""Issue 16 items 1-3 on object storage (a real local S3 server): OUT is never a source nor
another checkpoint, a resume refuses a replaced source (its ETag), and a failed export leaves
no manifest and reruns only the export. Every source object is hashed before and after."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, bigmerge, load_output, synthetic_family
from test_s3 import s3_env  # noqa: F401 - the module's S3 server fixture
from test_safety import one_line

pytestmark = pytest.mark.s3  # a real S3 server (moto) in the test process

LINEAR = "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\n"
DONE = re.compile(r"bigmerge: done: .* \((\d+) blocks computed, (\d+) resumed")
BUCKET = "safety-bkt"


@pytest.fixture(scope="module")
def s3(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, dict[str, str]]]:  # noqa: F811
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs, s3_env


def upload(fs: object, local: dict[str, Path], prefix: str) -> dict[str, str]:
    remote = {}
    for name, path in local.items():
        fs.put(str(path), f"{BUCKET}/{prefix}/{name}", recursive=True)  # type: ignore[attr-defined]
        remote[name] = f"s3://{BUCKET}/{prefix}/{name}"
    return remote


def digest(fs: object, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()  # type: ignore[attr-defined]
    keys = fs.find(f"{BUCKET}/{prefix}")  # type: ignore[attr-defined]
    return {k: hashlib.sha256(fs.cat_file(k)).hexdigest() for k in keys}  # type: ignore[attr-defined]


def write_cfg(tmp_path: Path, remote: dict[str, str]) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(LINEAR.format(**remote))
    return p


def test_s3_out_overlapping_a_source_or_holding_a_checkpoint_is_refused(
    s3: tuple[object, dict[str, str]], tmp_path: Path
) -> None:
    fs, env = s3
    remote = upload(fs, synthetic_family(tmp_path / "m", n=2, shards=2), "one")
    other = upload(fs, {"other": synthetic_family(tmp_path / "o", n=1, seed=4)["ft1"]}, "one-other")["other"]
    cfg = write_cfg(tmp_path, remote)
    before = {**digest(fs, "one"), **digest(fs, "one-other")}
    for out, rel in [
        (remote["ft2"], "is"),
        (f"s3://{BUCKET}/one", "contains"),
        (remote["ft2"] + "/merged", "lies inside"),
        (f"s3a://{BUCKET}/one/ft2/", "is"),
    ]:
        one_line(bigmerge("merge", str(cfg), out, "--overwrite", env=env), f"{rel} the source model")
    one_line(bigmerge("merge", str(cfg), other, env=env), "did not write")
    one_line(bigmerge("merge", str(cfg), other, "--overwrite", env=env), "even with --overwrite")
    assert {**digest(fs, "one"), **digest(fs, "one-other")} == before


def test_s3_resume_onto_a_replaced_source_is_refused(s3: tuple[object, dict[str, str]], tmp_path: Path) -> None:
    fs, env = s3
    local = synthetic_family(tmp_path / "m", n=2, shards=2, dtype=torch.bfloat16, rows=40)
    remote = upload(fs, local, "two")
    cfg = write_cfg(tmp_path, remote)
    out = f"s3://{BUCKET}/two-out"
    args = ("--block-size", "128")
    proc = bigmerge("merge", str(cfg), out, *args, env={**env, "BIGMERGE_FAULT_INJECT": "0:3:kill"})
    assert proc.returncode == -9, proc.stderr
    newer = synthetic_family(tmp_path / "n", n=2, shards=2, dtype=torch.bfloat16, rows=40, seed=8)["ft2"]
    shard = "model-00001-of-00002.safetensors"
    fs.put(str(newer / shard), f"{BUCKET}/two/ft2/{shard}")  # type: ignore[attr-defined]
    before = digest(fs, "two")
    one_line(bigmerge("merge", str(cfg), out, *args, env=env), f"{remote['ft2']}/{shard}", "ETag", "changed since")
    assert not fs.exists(f"{BUCKET}/two-out/bigmerge-manifest.json")  # type: ignore[attr-defined]
    done = bigmerge("merge", str(cfg), out, *args, "--overwrite", env=env)
    assert done.returncode == 0, done.stderr
    assert digest(fs, "two") == before
    v = bigmerge("verify", out, env=env)
    assert v.returncode == 0 and f"{remote['ft2']}/{shard}" in v.stdout, v.stdout


@pytest.mark.parametrize(
    ("prefix", "fault"),
    [("killed", {"BIGMERGE_FAULT_INJECT": "0:manifest:kill"}), ("full", {"BIGMERGE_FAULT_DISK_FULL_AT": "index"})],
)
def test_s3_failed_export_leaves_no_manifest_and_reruns_only_the_export(
    s3: tuple[object, dict[str, str]], tmp_path: Path, prefix: str, fault: dict[str, str]
) -> None:
    fs, env = s3
    local = synthetic_family(tmp_path / "m", n=2, shards=2, dtype=torch.bfloat16, rows=40)
    remote = upload(fs, local, prefix)
    cfg = write_cfg(tmp_path, remote)
    out = f"s3://{BUCKET}/{prefix}-out"
    args = ("--block-size", "256")
    before = digest(fs, prefix)
    proc = bigmerge("merge", str(cfg), out, *args, env={**env, **fault})
    if "BIGMERGE_FAULT_INJECT" in fault:
        assert proc.returncode == -9, proc.stderr
    else:
        one_line(proc, "no space left on device")
    fs.invalidate_cache()  # type: ignore[attr-defined]
    assert not fs.exists(f"{BUCKET}/{prefix}-out/bigmerge-manifest.json")  # type: ignore[attr-defined]
    again = bigmerge("merge", str(cfg), out, *args, env=env)
    assert again.returncode == 0, again.stderr
    computed, resumed = map(int, DONE.search(again.stderr).groups())  # type: ignore[union-attr]
    assert computed == 0 and resumed > 0, again.stderr
    ref = tmp_path / "ref"
    local_cfg = tmp_path / "local.yaml"
    local_cfg.write_text(LINEAR.format(**{k: str(v) for k, v in local.items()}))
    bigmerge("merge", str(local_cfg), str(ref), *args, "--quiet", check=True)
    fs.get(f"{BUCKET}/{prefix}-out", str(tmp_path / "got"), recursive=True)  # type: ignore[attr-defined]
    assert_bit_identical(load_output(ref), load_output(tmp_path / "got"))
    assert bigmerge("verify", out, env=env).returncode == 0
    assert digest(fs, prefix) == before
