"""`tokenizer.pad_to_multiple_of`: the padding rows are mergekit's, bit for bit, from one read.

mergekit fills each source's padding rows with torch.mean of its permuted rows, on the CPU
(engine/colmean.py reproduces torch's summation order); bigmerge sums them as the blocks stream,
so no source byte is read twice. The goldens (test_vs_mergekit: tokenizer_*_pad) compare the
merged tensors with mergekit's; here: the mean itself against torch, the bytes read, the plan's
one owner per padded tensor, and a resumed merge.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, load_output, merge_tensors
from toy_models import make_family

from bigmerge.engine.colmean import ColumnMean, seq_columns
from bigmerge.engine.comm import SerialComm
from bigmerge.engine.reader import BlockReader
from bigmerge.merge import MergeOptions, plan_merge, run_merge
from bigmerge.planning.config import load_config
from bigmerge.storage.safetensors import DTYPES

EXTRA = {"ft1": ["<|a|>", "<|b|>"], "ft2": ["<|a|>"]}

PADDED = """\
merge_method: linear
tokenizer:
  source: union
  tokens:
    <|c|>:
      source:
        kind: zero
  {pad}
models:
  - model: {base}
    parameters:
      weight: 0.25
  - model: {ft1}
    parameters:
      weight: 0.5
  - model: {ft2}
    parameters:
      weight: 0.25
"""


@pytest.fixture(scope="module")
def vocab_fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("padfam"), preset="tiny", n_finetunes=2, extra_tokens=EXTRA)


def _config(fam: dict[str, Path], pad: bool) -> str:
    return PADDED.format(pad="pad_to_multiple_of: 32" if pad else "", **{k: str(v) for k, v in fam.items()})


@pytest.mark.parametrize("threads", [1, 2])
def test_column_mean_is_torch_mean_bit_for_bit(threads: int) -> None:
    """Fed in blocks of any size, for widths on either side of torch's vector pass (the "seq"
    and the interleaved "ilp" columns), row counts on either side of its chunks, and one large
    enough (V * H >= 32768) that torch splits the columns over threads."""
    rng = random.Random(threads)
    torch.manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, width in [(263, 64), (1, 7), (3, 5), (37, 20), (515, 40), (600, 100), (4100, 36), (20000, 16)]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = (torch.randn(n, width) * torch.rand(n, 1) * 3).to(dtype)
                cm = ColumnMean(n, (width,), dtype)
                r = 0
                while r < n:
                    m = rng.choice([1, 3, 16, 17, 100, 4096])
                    cm.feed(x[r : r + m])
                    r += m
                got, want = cm.mean(), torch.mean(x, dim=0)
                assert got.dtype == want.dtype
                assert torch.equal(got, want), (n, width, dtype, int((got != want).sum()))
    finally:
        torch.set_num_threads(before)
    assert seq_columns(100) == 96 and seq_columns(16) == 0 and seq_columns(6) == 4
    with pytest.raises(ValueError, match="rows fed"):
        ColumnMean(4, (2,), torch.float32).mean()


def _source_bytes(plan: object, t: object) -> int:
    """What the reader must read for a vocabulary tensor: each run of rows once, plus the single
    rows the fills take from a donor (a token some source lacks)."""
    total = 0
    for i, s in enumerate(t.sources):  # type: ignore[attr-defined]
        row_bytes = t.row_elems * DTYPES[s.dtype][1]  # type: ignore[attr-defined]
        total += sum(n for _, _, n in t.vocab["runs"][i]) * row_bytes  # type: ignore[attr-defined]
        for new, kind, donors, *force in t.vocab["fills"]:  # type: ignore[attr-defined]
            present = any(a <= new < a + n for a, _, n in t.vocab["runs"][i])  # type: ignore[attr-defined]
            if kind != "zero" and (force or not present):
                total += sum(t.row_elems * DTYPES[t.sources[j].dtype][1] for j, _ in donors)  # type: ignore[attr-defined]
    return total


def test_padding_rows_are_torch_mean_of_one_read(vocab_fam: dict[str, Path], tmp_path: Path) -> None:
    """Streamed in small blocks (several reads in flight): every source's padding rows are
    torch.mean of its permuted rows bit for bit, and each source byte was read once."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config(vocab_fam, pad=True))
    plan, _ = plan_merge(load_config(str(cfg)), 1, MergeOptions(block_bytes=2048, quiet=True))
    padded = [t for t in plan.tensors if t.vocab is not None and "vocab" in t.vocab]
    assert len(padded) == 2 and all(t.n_blocks > 4 for t in padded)
    for t in padded:
        n_vocab = int(t.vocab["vocab"])  # type: ignore[index]
        assert (n_vocab, t.rows) == (263, 288)
        reader = BlockReader(plan, threads=4, prefetch=3)
        try:
            blocks = list(reader.stream((t, b) for b in range(t.n_blocks)))
            whole = [torch.cat([inputs[i] for _, _, inputs in blocks]) for i in range(len(t.sources))]
            assert reader.bytes_read == _source_bytes(plan, t)
        finally:
            reader.close()
        for x in whole:
            assert x.shape[0] == t.rows
            assert torch.equal(x[n_vocab:], torch.mean(x[:n_vocab], dim=0).expand(t.rows - n_vocab, -1))


def test_padding_costs_no_read(vocab_fam: dict[str, Path], tmp_path: Path) -> None:
    """The same merge with and without padding reads the same bytes, and none twice."""
    summaries = {}
    for pad in (False, True):
        cfg = tmp_path / f"c{pad}.yaml"
        cfg.write_text(_config(vocab_fam, pad))
        summaries[pad] = run_merge(
            str(cfg), str(tmp_path / f"out{pad}"), SerialComm(), MergeOptions(block_bytes=2048, quiet=True)
        )
    source = sum(p.stat().st_size for v in vocab_fam.values() for p in v.glob("*.safetensors"))
    assert summaries[True]["bytes_read"] == summaries[False]["bytes_read"] <= source
    assert load_output(tmp_path / "outTrue")["model.embed_tokens.weight"].shape[0] == 288


def test_padded_tensor_has_one_owner(vocab_fam: dict[str, Path], tmp_path: Path) -> None:
    """Its padding rows need all its rows: on 2 ranks one rank owns (and reads) every block of it."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config(vocab_fam, pad=True))
    plan, _ = plan_merge(load_config(str(cfg)), 2, MergeOptions(block_bytes=2048, quiet=True))
    padded = [t for t in plan.tensors if t.vocab is not None and "vocab" in t.vocab]
    assert padded and all(len(set(t.owners)) == 1 for t in padded)
    assert {o for t in plan.tensors for o in t.owners} == {0, 1}  # the rest is still spread


def test_resumed_padded_merge_is_bit_identical(
    vocab_fam: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped part-way through a padded vocabulary tensor, the rerun reads the finished blocks
    it needs for the padding rows again and ends with the uninterrupted merge's bytes."""
    from bigmerge.engine.faults import FAULT_ENV

    text = _config(vocab_fam, pad=True)
    ref = merge_tensors(text, tmp_path / "ref", block_bytes=2048)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(text)
    opts = MergeOptions(block_bytes=2048, quiet=True)
    plan, _ = plan_merge(load_config(str(cfg)), 1, opts)
    first = next(t for t in plan.tensors if t.vocab is not None)
    stop = sum(t.n_blocks for t in plan.tensors[: first.index]) + first.n_blocks // 2
    monkeypatch.setenv(FAULT_ENV, f"0:{stop}:error")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_merge(str(cfg), str(tmp_path / "res"), SerialComm(), opts)
    monkeypatch.delenv(FAULT_ENV)
    second = run_merge(str(cfg), str(tmp_path / "res"), SerialComm(), opts)
    assert second["blocks_resumed"] > 0
    assert_bit_identical(ref, load_output(tmp_path / "res"))


def test_failed_read_mid_padded_tensor_stops_the_merge(
    vocab_fam: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block whose read fails while the blocks after it wait for its rows in the padding sum:
    the merge stops with that error (no thread left waiting), nothing that looks finished."""
    import threading

    from bigmerge.engine import reader as reader_mod
    from bigmerge.errors import SourceError

    real = reader_mod.BlockReader._permuted_rows

    def failing(self: BlockReader, t: object, i: int, r0: int, r1: int) -> torch.Tensor:
        if t.vocab is not None and "vocab" in t.vocab and r0 == 64:  # type: ignore[attr-defined]
            raise SourceError("injected read failure")
        return real(self, t, i, r0, r1)  # type: ignore[arg-type]

    monkeypatch.setattr(reader_mod.BlockReader, "_permuted_rows", failing)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config(vocab_fam, pad=True))
    caught: list[BaseException] = []

    def run() -> None:
        try:
            run_merge(str(cfg), str(tmp_path / "out"), SerialComm(), MergeOptions(block_bytes=2048, quiet=True))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            caught.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(120)
    assert not th.is_alive(), "the merge hung"
    assert caught and "injected read failure" in str(caught[0])
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
