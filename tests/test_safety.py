"""Issue 16, end to end through the CLI on local paths: never destroy a checkpoint, never resume
onto changed sources, never leave a finished-looking half, one line for every failure, and a
verify that checks the index and the config.

Every test that gives bigmerge a source checks that no source byte changed (sha256 of every
file under the sources, before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, bigmerge, load_output, synthetic_family

from bigmerge.output.outdir import LOCK_NAME, RECORD_NAME, process_start_time

pytestmark = pytest.mark.slow  # ~40 bigmerge processes end to end: CI runs them, --fast does not

LINEAR = "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\n"
DONE = re.compile(r"bigmerge: done: .* \((\d+) blocks computed, (\d+) resumed")


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (the sources), by path."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The run failed with exactly one `bigmerge: error:` line holding every needle."""
    assert proc.returncode != 0, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("bigmerge: error:") or "Traceback" in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_not_finished(out: Path) -> None:
    assert not (out / "bigmerge-manifest.json").exists()
    assert not [p for p in out.glob(".bigmerge-tmp.*")], list(out.iterdir())


@pytest.fixture
def fam(tmp_path: Path) -> dict[str, Path]:
    return synthetic_family(tmp_path / "models", n=2, shards=2)


def config(tmp_path: Path, fam: dict[str, Path], text: str = LINEAR, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text.format(**{k: str(v) for k, v in fam.items()}))
    return p


# -- 1. OUT is never a source, never someone else's data --------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    ["same", "single-file", "symlink", "file-url", "inside", "contains", "trailing-dot"],
)
def test_out_overlapping_a_source_is_refused_before_anything_is_written(
    tmp_path: Path, fam: dict[str, Path], spelling: str
) -> None:
    if spelling == "single-file":
        fam = synthetic_family(tmp_path / "single", n=2, shards=1)
    cfg = config(tmp_path, fam)
    ft2 = fam["ft2"]
    os.symlink(ft2, tmp_path / "alias")
    out = {
        "same": str(ft2),
        "single-file": str(ft2),
        "symlink": str(tmp_path / "alias"),
        "file-url": f"file://{ft2}",
        "inside": str(ft2 / "merged"),
        "contains": str(ft2.parent),
        "trailing-dot": f"{ft2}/./",
    }[spelling]
    before = digest(*fam.values())
    listing = sorted(os.listdir(ft2))
    proc = bigmerge("merge", str(cfg), out, "--overwrite")
    rel = {"inside": "lies inside", "contains": "contains"}.get(spelling, "is")
    shown = str(ft2) if spelling in ("file-url", "trailing-dot") else out
    one_line(proc, f"OUT {shown} {rel} the source model")
    assert digest(*fam.values()) == before
    assert sorted(os.listdir(ft2)) == listing  # not even a lock file was left


@pytest.mark.parametrize("what", ["file", "the-config", "a-shard", "dangling-link", "empty"])
def test_out_that_is_a_file_or_empty_is_refused_and_left_as_it_was(
    tmp_path: Path, fam: dict[str, Path], what: str
) -> None:
    """OUT naming a file (the config itself, a shard of a source given by mistake), a dangling
    symbolic link, or "" (an unset variable in quotes, once taken as the current directory):
    one line naming it, exit non-zero, the file's bytes as they were, nothing created."""
    cfg = config(tmp_path, fam)
    shard = sorted(fam["ft1"].glob("*.safetensors"))[0]
    (tmp_path / "notes.txt").write_text("mine")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    out = {
        "file": str(tmp_path / "notes.txt"),
        "the-config": str(cfg),
        "a-shard": str(shard),
        "dangling-link": str(tmp_path / "dangling"),
        "empty": "",
    }[what]
    before = digest(tmp_path)
    proc = bigmerge("merge", str(cfg), out, "--overwrite")
    needle = {"empty": "OUT is empty", "dangling-link": "which does not exist"}.get(what, "is a file, not a directory")
    one_line(proc, needle)
    assert digest(tmp_path) == before
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / LOCK_NAME).exists()


def test_out_holding_another_checkpoint_is_never_replaced(tmp_path: Path, fam: dict[str, Path]) -> None:
    """Another model's directory (not a source): refused, and with --overwrite still refused:
    its shards, index and config.json are not bigmerge's to remove."""
    other = synthetic_family(tmp_path / "other", n=1, shards=2, seed=5)["ft1"]
    cfg = config(tmp_path, fam)
    before = digest(other, *fam.values())
    one_line(bigmerge("merge", str(cfg), str(other)), str(other), "did not write")
    one_line(bigmerge("merge", str(cfg), str(other), "--overwrite"), "did not write", "even with --overwrite")
    assert digest(other, *fam.values()) == before


def test_overwrite_removes_only_what_bigmerge_wrote(tmp_path: Path, fam: dict[str, Path]) -> None:
    cfg = config(tmp_path, fam)
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES.md").write_text("mine")
    # a non-empty OUT that holds no merge: refused without --overwrite
    one_line(bigmerge("merge", str(cfg), str(out)), "not empty", "NOTES.md")
    bigmerge("merge", str(cfg), str(out), "--overwrite", "--quiet", check=True)
    first = load_output(out)
    (out / "results.txt").write_text("also mine")
    one_line(bigmerge("merge", str(cfg), str(out)), "already holds a finished merge")
    cfg2 = config(tmp_path, fam, LINEAR.replace("0.4", "0.5"), "c2.yaml")
    before = digest(*fam.values())
    bigmerge("merge", str(cfg2), str(out), "--overwrite", "--quiet", check=True)
    assert digest(*fam.values()) == before
    assert (out / "NOTES.md").read_text() == "mine" and (out / "results.txt").read_text() == "also mine"
    record = json.loads((out / RECORD_NAME).read_text())
    assert "NOTES.md" not in record["names"] and "model.safetensors.index.json" in record["names"]
    assert not torch.equal(
        first["model.layers.0.mlp.up_proj.weight"], load_output(out)["model.layers.0.mlp.up_proj.weight"]
    )
    assert bigmerge("verify", str(out)).returncode == 0


def test_statistics_directory_and_store_are_inputs_too(tmp_path: Path) -> None:
    from test_data_informed import _config, _family, _stats

    fam = _family(tmp_path / "models")
    stats = _stats(tmp_path / "stats", fam)
    cfg = tmp_path / "fisher.yaml"
    cfg.write_text(_config("fisher", fam, stats))
    before = digest(stats, *fam.values())
    one_line(bigmerge("merge", str(cfg), str(stats)), f"OUT {stats}", "contains", "statistics")
    one_line(bigmerge("merge", str(cfg), str(stats / "m1")), "is the statistics")
    # --store: never an input, never a directory of someone else's (bigmerge may clear it)
    one_line(bigmerge("merge", str(cfg), str(tmp_path / "o1"), "--store", str(fam["m1"])), "--store", "source model")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.bin").write_bytes(b"x")
    one_line(
        bigmerge("merge", str(cfg), str(tmp_path / "o2"), "--writer", "zarr", "--store", str(tmp_path / "busy")),
        "not a bigmerge store",
    )
    assert (tmp_path / "busy" / "data.bin").read_bytes() == b"x"
    assert digest(stats, *fam.values()) == before


# -- 2. sources pinned for the life of a merge --------------------------------------------------------


def test_resume_onto_a_replaced_source_is_refused_naming_the_file(tmp_path: Path, fam: dict[str, Path]) -> None:
    """Killed part-way, ft2 replaced by a newer checkpoint of the same shapes (same headers):
    the rerun refuses, naming the file; --overwrite merges the new sources from scratch."""
    cfg = config(tmp_path, fam)
    out = tmp_path / "out"
    args = ("--block-size", "128")
    proc = bigmerge("merge", str(cfg), str(out), *args, env={"BIGMERGE_FAULT_INJECT": "0:4:kill"})
    assert proc.returncode == -9, proc.stderr
    newer = synthetic_family(tmp_path / "newer", n=2, shards=2, seed=9)["ft2"]
    for f in newer.iterdir():
        (fam["ft2"] / f.name).write_bytes(f.read_bytes())  # same names and shapes: the same headers
    before = digest(*fam.values())
    line = one_line(bigmerge("merge", str(cfg), str(out), *args), "changed since the interrupted merge", "--overwrite")
    assert str(fam["ft2"] / "model-0000") in line
    assert_not_finished(out)
    bigmerge("merge", str(cfg), str(out), *args, "--overwrite", "--quiet", check=True)
    fresh = tmp_path / "fresh"
    bigmerge("merge", str(cfg), str(fresh), "--quiet", check=True)
    assert_bit_identical(load_output(fresh), load_output(out))
    assert digest(*fam.values()) == before
    v = bigmerge("verify", str(out))
    assert v.returncode == 0 and str(fam["ft2"] / "model-00001-of-00002.safetensors") in v.stdout, v.stdout


def test_hash_pins_catch_an_in_place_change_with_the_same_size_and_mtime(tmp_path: Path, fam: dict[str, Path]) -> None:
    cfg = config(tmp_path, fam)
    out = tmp_path / "out"
    args = ("--block-size", "128", "--verify-sources", "hash")
    proc = bigmerge("merge", str(cfg), str(out), *args, env={"BIGMERGE_FAULT_INJECT": "0:4:kill"})
    assert proc.returncode == -9, proc.stderr
    shard = fam["ft1"] / "model-00002-of-00002.safetensors"
    st = shard.stat()
    with open(shard, "r+b") as f:  # one byte of tensor data, in place: size, inode and mtime kept
        f.seek(st.st_size - 2)
        b = f.read(1)
        f.seek(st.st_size - 2)
        f.write(bytes([b[0] ^ 0x40]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    record = json.loads((out / RECORD_NAME).read_text())
    pin = record["sources"][str(shard)]
    assert pin["size"] == shard.stat().st_size and pin["mtime"] == shard.stat().st_mtime  # invisible to stat
    one_line(bigmerge("merge", str(cfg), str(out), *args), str(shard), "content_crc32c")


def test_a_source_replaced_during_the_merge_stops_the_export(
    tmp_path: Path, fam: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sources are pinned again after their last byte is read: a replacement mid-merge
    (a checkpoint uploaded over the one being read) leaves no manifest."""
    import bigmerge.merge as merge_mod
    from bigmerge.cli import main

    real = merge_mod.execute

    def execute_then_replace(*a, **k):  # type: ignore[no-untyped-def]
        stats = real(*a, **k)
        shard = fam["ft1"] / "model-00001-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes() + b"")  # rewritten: a new mtime
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
        return stats

    monkeypatch.setattr(merge_mod, "execute", execute_then_replace)
    out = tmp_path / "out"
    assert main(["merge", str(config(tmp_path, fam)), str(out), "--quiet"]) == 2
    assert_not_finished(out)
    assert not (out / "model.safetensors.index.json").exists()


# -- 3. atomic metadata; a failed export reruns only the export ----------------------------------------


@pytest.mark.parametrize(("writer", "where"), [("direct", "index"), ("direct", "manifest"), ("zarr", "config")])
def test_full_disk_at_a_metadata_file_then_rerun_only_exports(
    tmp_path: Path, fam: dict[str, Path], writer: str, where: str
) -> None:
    cfg = config(tmp_path, fam)
    out = tmp_path / "out"
    args = ("--block-size", "128", "--writer", writer)
    before = digest(*fam.values())
    proc = bigmerge("merge", str(cfg), str(out), *args, env={"BIGMERGE_FAULT_DISK_FULL_AT": where})
    one_line(proc, "no space left on device", "rerun")
    assert_not_finished(out)
    if where == "index":
        assert not (out / "model.safetensors.index.json").exists()  # no partial one under its name
    again = bigmerge("merge", str(cfg), str(out), *args)
    assert again.returncode == 0, again.stderr
    computed, resumed = map(int, DONE.search(again.stderr).groups())  # type: ignore[union-attr]
    assert computed == 0 and resumed > 0, again.stderr  # only the export ran again
    fresh = tmp_path / "fresh"
    bigmerge("merge", str(cfg), str(fresh), "--quiet", check=True)
    assert_bit_identical(load_output(fresh), load_output(out))
    assert bigmerge("verify", str(out)).returncode == 0
    assert digest(*fam.values()) == before


# -- 4. every failure is one line ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["journal", "record"])
def test_full_disk_at_the_journal_or_the_record_is_one_line(tmp_path: Path, fam: dict[str, Path], where: str) -> None:
    cfg = config(tmp_path, fam)
    out = tmp_path / "out"
    proc = bigmerge("merge", str(cfg), str(out), "--writer", "direct", env={"BIGMERGE_FAULT_DISK_FULL_AT": where})
    one_line(proc, "no space left on device")
    assert_not_finished(out)
    again = bigmerge("merge", str(cfg), str(out), "--writer", "direct")
    assert again.returncode == 0, again.stderr


def _safetensors_with_header(path: Path, header: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize("where", ["header", "index", "config"])
def test_deeply_nested_json_is_one_line(tmp_path: Path, where: str) -> None:
    fam = synthetic_family(tmp_path / "models", n=2, shards=2)
    deep = "[" * 100_000 + "]" * 100_000
    if where == "header":
        bad = fam["ft2"] / "model-00001-of-00002.safetensors"
        _safetensors_with_header(bad, ('{"__metadata__": {"x": ' + deep + "}}").encode())
    elif where == "index":
        bad = fam["ft2"] / "model.safetensors.index.json"
        bad.write_text('{"weight_map": ' + deep + "}")
    else:
        bad = fam["ft2"] / "config.json"
        bad.write_text('{"model_type": "llama", "x": ' + "[" * 100 + "]" * 100 + "}")
    proc = bigmerge("merge", str(config(tmp_path, fam)), str(tmp_path / "out"))
    one_line(proc, str(bad), "nests")


def test_billion_laughs_is_refused_in_milliseconds(tmp_path: Path, fam: dict[str, Path]) -> None:
    cfg = tmp_path / "laughs.yaml"
    # a key bigmerge accepts: storage_options takes any mapping
    cfg.write_text(
        LINEAR.format(**{k: str(v) for k, v in fam.items()})
        + "storage_options:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"  {c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    )
    assert len(cfg.read_bytes()) < 1200
    # A small launcher forks the merge and reaps it: a child started straight from pytest (vfork,
    # then exec) inherits pytest's own peak RSS as its ru_maxrss, 1.6 GB late in a full run.
    launcher = (
        "import os, sys\npid = os.fork()\nif pid == 0:\n"
        "    os.execv(sys.executable, [sys.executable, '-m', 'bigmerge', 'merge', sys.argv[1], sys.argv[2]])\n"
        "_, status, usage = os.wait4(pid, 0)\nopen(sys.argv[3], 'w').write(str(usage.ru_maxrss))\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    rss_file = tmp_path / "maxrss"
    proc = subprocess.run(
        [sys.executable, "-c", launcher, str(cfg), str(tmp_path / "out"), str(rss_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr
    assert proc.returncode != 0 and "expands to more than" in err and len(err.strip().splitlines()) == 1, err
    assert int(rss_file.read_text()) < 1_500_000  # KiB: what the imports take, not what the aliases would
    assert not (tmp_path / "out").exists()


def test_the_same_model_twice_is_refused_naming_it(tmp_path: Path, fam: dict[str, Path]) -> None:
    twice = "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft1}\n    parameters: {{weight: 0.2}}\n"
    one_line(bigmerge("merge", str(config(tmp_path, fam, twice)), str(tmp_path / "o")), str(fam["ft1"]), "twice")
    os.symlink(fam["ft1"], tmp_path / "again")
    other = twice.replace(
        "{ft1}\n    parameters: {{weight: 0.2}}", f"{tmp_path / 'again'}/\n    parameters: {{{{weight: 0.2}}}}"
    )
    line = one_line(bigmerge("merge", str(config(tmp_path, fam, other, "c2.yaml")), str(tmp_path / "o")), "duplicate")
    assert str(fam["ft1"]) in line and str(tmp_path / "again") in line


def _lock(out: Path, pid: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": socket.gethostname(), "since": "2026-12-04 10:00:00 UTC", "token": "t"}
    holder["start"] = process_start_time(pid)
    (out / LOCK_NAME).write_text(json.dumps(holder))


def test_a_merge_already_writing_out_is_named_and_a_dead_ones_lock_is_taken_over(
    tmp_path: Path, fam: dict[str, Path]
) -> None:
    cfg = config(tmp_path, fam)
    out = tmp_path / "out"
    sleeper = subprocess.Popen(["sleep", "60"])  # a live process of this host holds the lock
    try:
        _lock(out, sleeper.pid)
        line = one_line(bigmerge("merge", str(cfg), str(out)), "another bigmerge merge is writing here")
        assert f"pid {sleeper.pid} on {socket.gethostname()}" in line and "2026-12-04 10:00:00" in line
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing else was touched
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is dead now: its lock is stale and taken over; the merge runs and lets go
    proc = bigmerge("merge", str(cfg), str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not (out / LOCK_NAME).exists()
    assert bigmerge("verify", str(out)).returncode == 0


# -- 5. verify checks the index and the config ---------------------------------------------------------


def test_verify_checks_index_and_config_against_the_manifest(tmp_path: Path, fam: dict[str, Path]) -> None:
    out = tmp_path / "out"
    bigmerge("merge", str(config(tmp_path, fam)), str(out), "--shard-size", "2K", "--quiet", check=True)
    ok = bigmerge("verify", str(out))
    assert ok.returncode == 0, ok.stderr
    for what in ("tensors in", "model.safetensors.index.json:", "config.json", "sources ("):
        assert what in ok.stdout, ok.stdout
    index, config_json = out / "model.safetensors.index.json", out / "config.json"
    good = {index: index.read_bytes(), config_json: config_json.read_bytes()}

    def moved(doc: dict) -> None:
        files = sorted(set(doc["weight_map"].values()))
        name = next(iter(doc["weight_map"]))
        doc["weight_map"][name] = next(f for f in files if f != doc["weight_map"][name])

    def grown(doc: dict) -> None:
        doc["metadata"]["total_size"] += 2

    def layers(doc: dict) -> None:
        doc["num_hidden_layers"] = 3

    for path, edit, needle in [
        (index, moved, "weight map differs"),
        (index, grown, "total_size"),
        (config_json, layers, "config.json"),
    ]:
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
        bad = bigmerge("verify", str(out))
        assert bad.returncode == 3
        one_line(bad, needle)
        path.write_bytes(good[path])
    assert bigmerge("verify", str(out)).returncode == 0
