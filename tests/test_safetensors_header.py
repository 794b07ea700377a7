"""The header parser: correct on good files, one clear SourceError on every kind of bad one."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from bigmerge.errors import SourceError
from bigmerge.storage.fs import location
from bigmerge.storage.safetensors import build_header, parse_header, read_header


def _file(
    tmp_path: Path, header: dict, data: bytes = b"", name: str = "x.safetensors", raw_len: int | None = None
) -> Path:
    body = json.dumps(header).encode()
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", raw_len if raw_len is not None else len(body)) + body + data)
    return p


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).to(torch.bfloat16)}
    save_file(t, str(tmp_path / "m.safetensors"))
    tensors, meta, raw = read_header(location(str(tmp_path / "m.safetensors")))
    assert set(tensors) == {"a", "b", "c"}
    assert tensors["a"].shape == (3, 5) and tensors["a"].dtype == "F32"
    data = (tmp_path / "m.safetensors").read_bytes()
    c = tensors["c"]
    assert torch.equal(torch.frombuffer(bytearray(data[c.start : c.end]), dtype=torch.bfloat16).reshape(2, 2), t["c"])


def test_build_header_round_trips() -> None:
    raw = build_header([("w", "F32", (2, 3), 24), ("b", "BF16", (3,), 6)])
    assert len(raw) % 8 == 0
    tensors, meta = parse_header(raw + bytes(30), len(raw) + 30, "mem")
    assert tensors["w"].end - tensors["w"].start == 24
    assert tensors["b"].start == tensors["w"].end


@pytest.mark.parametrize(
    "header,data,raw_len,needle",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "out of range"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, None, "expected 12"),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10**6, "runs past the end"),
    ],
)
def test_bad_headers_name_file_and_tensor(
    tmp_path: Path, header: dict, data: bytes, raw_len: int | None, needle: str
) -> None:
    p = _file(tmp_path, header, data, raw_len=raw_len)
    with pytest.raises(SourceError) as err:
        read_header(location(str(p)))
    assert needle in str(err.value)
    assert str(p) in str(err.value)


def test_not_json(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    with pytest.raises(SourceError, match="not valid JSON"):
        read_header(location(str(p)))


def test_too_short(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(SourceError, match="shorter than the 8-byte"):
        read_header(location(str(p)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_parser_only_raises_source_error(blob: bytes) -> None:
    try:
        parse_header(blob, len(blob), "fuzz")
    except SourceError:
        pass
    except ValueError as exc:  # the caller-contract check: header not wholly passed
        assert "caller must pass" in str(exc)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.dictionaries(
            st.sampled_from(["dtype", "shape", "data_offsets"]),
            st.one_of(st.integers(-3, 40), st.text(max_size=3), st.lists(st.integers(-2, 40), max_size=3)),
        ),
    )
)
def test_fuzz_structured_headers(header: dict) -> None:
    body = json.dumps(header).encode()
    blob = struct.pack("<Q", len(body)) + body + bytes(64)
    try:
        parse_header(blob, len(blob), "fuzz")
    except SourceError:
        pass
