"""Fuzz (issue 16): random configs (YAML structures and sizes, aliases, deep nesting) and random
safetensors headers always end in success or one `bigmerge: error:` line, in bounded time and
memory, never a traceback. Hypothesis with a small max_examples: bounded suite time."""

from __future__ import annotations

import contextlib
import io
import json
import resource
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import synthetic_family
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bigmerge.cli import main
from bigmerge.errors import SourceError
from bigmerge.storage.safetensors import parse_header

SECONDS = 30  # per example, on a shared 2-core machine (the kernels are compiled before); a runaway expansion takes far longer
RSS_GROWTH = 1 << 30  # bytes the process's peak may grow by over all examples


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fuzz")
    fam = synthetic_family(tmp / "m", n=2, rows=8)
    # one merge per method first: the kernels' JIT compiles (tens of seconds on a loaded machine,
    # and their memory) belong to no example
    for method in ("ties", "task_arithmetic"):
        doc = base_config(fam, method)
        if method != "ties":
            for m in doc["models"]:
                del m["parameters"]["density"]
        cfg = tmp / f"{method}.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        assert run_cli("merge", str(cfg), str(tmp / f"warm-{method}"), "--quiet")[0] == 0, method
    return fam


def run_cli(*args: str) -> tuple[int, str, float]:
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue(), time.perf_counter() - t0


def assert_success_or_one_line(code: int, err: str, seconds: float) -> None:
    assert seconds < SECONDS, seconds
    assert "Traceback" not in err and "internal error" not in err, err
    if code != 0:
        assert code == 2, (code, err)
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("bigmerge: warning")]
        assert len(lines) == 1 and lines[0].startswith("bigmerge: error: "), err


# -- configs ----------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=25,
)
KEYS = [
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "chat_template",
    "name",
    "storage_options",
    "seed",
    "weight",
    "density",
    "model",
    "layer_range",
    "sources",
]


def base_config(family: dict[str, Path], method: str) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
    }


@st.composite
def mutated(draw: st.DrawFn, family: dict[str, Path]) -> str:
    """A real config with parts replaced by random values, as YAML text; sometimes with an
    alias bomb or deep nesting spliced under a random key."""
    cfg = base_config(family, draw(st.sampled_from(["linear", "ties", "task_arithmetic", "slerp", "nope"])))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["top", "model", "params"]))
        key, value = draw(st.sampled_from(KEYS)), draw(values)
        if where == "top":
            cfg[key] = value
        elif where == "model" and isinstance(cfg.get("models"), list) and cfg["models"]:
            m = cfg["models"][draw(st.integers(0, len(cfg["models"]) - 1))]
            if isinstance(m, dict):
                m[key] = value
        elif isinstance(cfg.get("models"), list) and cfg["models"] and isinstance(cfg["models"][0], dict):
            cfg["models"][0].setdefault("parameters", {})
            if isinstance(cfg["models"][0]["parameters"], dict):
                cfg["models"][0]["parameters"][key] = value
    text = yaml.safe_dump(cfg, allow_unicode=True)
    extra = draw(st.sampled_from(["", "", "bomb", "deep", "deepmap", "garbage"]))
    key = draw(st.sampled_from(["storage_options", "name", "parameters", "zzz"]))
    if extra == "bomb":  # width ** depth values from a few hundred bytes
        width, depth = draw(st.integers(2, 12)), draw(st.integers(2, 12))
        lines = [f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
        lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
        text = (
            "\n".join(ln for ln in text.splitlines() if not ln.startswith(key + ":"))
            + f"\n{key}:\n"
            + "\n".join(lines)
            + "\n"
        )
    elif extra == "deep":
        n = draw(st.integers(10, 3000))
        text += f"{key}: " + "[" * n + "]" * n + "\n"
    elif extra == "deepmap":
        n = draw(st.integers(10, 200))
        text += f"{key}:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(n))
    elif extra == "garbage":
        text = text[: draw(st.integers(0, len(text)))] + draw(st.text(max_size=40))
    return text


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_random_configs_give_success_or_one_line(
    family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    text = data.draw(mutated(family))
    tmp = tmp_path_factory.mktemp("cfg")
    cfg = tmp / "c.yaml"
    cfg.write_text(text)
    code, err, seconds = run_cli("merge", str(cfg), str(tmp / "out"), "--quiet")
    event("merged" if code == 0 else err.split(":")[-1].strip()[:40])
    assert_success_or_one_line(code, err, seconds)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < RSS_GROWTH


# -- safetensors headers ---------------------------------------------------------------------------

DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8", "", "f32"]
ints = st.one_of(
    st.integers(-3, 70), st.integers(-(2**64), 2**64), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3)
)
entry = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(DTYPE_NAMES),
            "shape": st.lists(ints, max_size=4),
            "data_offsets": st.lists(ints, max_size=3),
        }
    ),
    values,
)
headers = st.one_of(
    st.dictionaries(st.text(max_size=12), entry, max_size=6),
    st.dictionaries(st.just("__metadata__"), values, max_size=1),
    values,
)


@st.composite
def header_bytes(draw: st.DrawFn) -> bytes:
    """A file: an 8-byte length (true, or not) + JSON (or bytes) + some data."""
    kind = draw(st.sampled_from(["json", "json", "deep", "bytes"]))
    if kind == "json":
        body = json.dumps(draw(headers), allow_nan=True).encode()
    elif kind == "deep":
        n = draw(st.integers(50, 200_000))
        body = ('{"__metadata__": {"x": ' + "[" * n + "]" * n + "}}").encode()
    else:
        body = draw(st.binary(max_size=200))
    data = draw(st.binary(max_size=256))
    length = len(body) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + body + data


@settings(max_examples=300, deadline=None)
@given(raw=header_bytes())
def test_random_headers_parse_or_raise_source_error(raw: bytes) -> None:
    t0 = time.perf_counter()
    try:
        parse_header(raw, len(raw), "fuzz.safetensors")
    except SourceError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.safetensors")
    except ValueError as exc:  # the caller's contract (a short read), not the file's
        assert "caller must pass the whole header" in str(exc)
    assert time.perf_counter() - t0 < SECONDS


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(raw=header_bytes())
def test_random_headers_through_the_cli_give_one_line(
    family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    tmp = tmp_path_factory.mktemp("hdr")
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(raw)
    (bad / "config.json").write_text('{"model_type": "llama"}')
    cfg = tmp / "c.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {family['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {bad}\n    parameters: {{weight: 0.5}}\n"
    )
    code, err, seconds = run_cli("merge", str(cfg), str(tmp / "out"), "--quiet")
    event("merged" if code == 0 else err.split(":")[-1].strip()[:40])
    assert_success_or_one_line(code, err, seconds)
