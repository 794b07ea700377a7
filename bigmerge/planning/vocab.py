"""Vocabularies that differ between sources: `tokenizer_source` and the embedding rows it implies.

As mergekit 0.1.5 does it, whenever a config names a `tokenizer_source`:

- the output tokenizer is the base model's (`base`), a given model's (a path), or the union
  (`union`): the base's vocabulary, then every token of the other models it lacks, in model
  order, then their added tokens;
- every vocabulary-indexed tensor (embeddings, LM head) of every source is permuted onto the
  output vocabulary before the merge operator sees it. A row for a token a source lacks is
  the only other source's row that has it; else the base's if the base has it; else the mean
  of the rows of the sources that have it; zeros if none has it.

The permutation lives in the plan as runs of consecutive rows per source plus the list of
filled rows, so the reader assembles any row block with a few ranged reads. mergekit orders
the union's extra tokens by a set's iteration order; bigmerge uses the config's model order.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigmerge.errors import ConfigError, SourceError
from bigmerge.log import warn
from bigmerge.planning.catalog import ModelCatalog
from bigmerge.storage.fs import Location, location

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _local_dir(root: Location, scratch: Path) -> Path:
    """A local directory holding root's tokenizer files (a copy when root is remote)."""
    if root.is_local:
        return Path(root.path)
    scratch.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = root.join(name)
        if src.exists():
            (scratch / name).write_bytes(src.read_bytes())
    return scratch


def _load_tokenizer(root: Location, scratch: Path) -> Any:
    import transformers

    path = _local_dir(root, scratch)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "no usable tokenizer"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"{root.url}: cannot load its tokenizer ({first})") from None


def _vocab_size(cat: ModelCatalog, tok: Any) -> int:
    v = (cat.config or {}).get("vocab_size")
    return v if isinstance(v, int) else len(tok.get_vocab())


_built: dict[tuple[Any, ...], tuple[Any, list[list[int]], list[int]]] = {}


def build_tokenizer(
    tokenizer_source: str, base_ref: str, refs: list[str], catalogs: dict[str, ModelCatalog], storage_options: Any
) -> tuple[Any, list[list[int]], list[int]]:
    """(output tokenizer, per ref the source row of every output token or -1, per ref vocab size).

    (None, [], []) when the base model has no tokenizer and the source is not `union`. Built
    once per process for the same sources (rank 0 needs it for the plan and for the export).
    """
    key = (
        tokenizer_source,
        base_ref,
        tuple((r, catalogs[r].root.url, tuple(sorted(catalogs[r].header_sha256.items()))) for r in refs),
        repr(storage_options),
    )
    if key not in _built:
        _built.clear()  # one merge's tokenizer at a time
        _built[key] = _build_tokenizer(tokenizer_source, base_ref, refs, catalogs, storage_options)
    return _built[key]


def _build_tokenizer(
    tokenizer_source: str, base_ref: str, refs: list[str], catalogs: dict[str, ModelCatalog], storage_options: Any
) -> tuple[Any, list[list[int]], list[int]]:
    with tempfile.TemporaryDirectory(prefix="bigmerge-tok-") as tmp:
        scratch = Path(tmp)
        try:
            toks = {base_ref: _load_tokenizer(catalogs[base_ref].root, scratch / "base")}
        except SourceError as exc:
            if tokenizer_source == "union":
                raise
            # Nothing to align embeddings against: the tokenizer files are copied as they are.
            warn(f"{exc}; the embeddings are merged as they are, without vocabulary alignment")
            return None, [], []
        for i, ref in enumerate(refs):
            if ref in toks:
                continue
            try:
                toks[ref] = _load_tokenizer(catalogs[ref].root, scratch / f"m{i}")
            except SourceError as exc:  # as mergekit: a model without a tokenizer is taken to share the base's
                warn(f"{exc}; assuming it is the same as {base_ref}'s")
                toks[ref] = toks[base_ref]
        sizes = {ref: _vocab_size(catalogs[ref], toks[ref]) for ref in refs}
        base_tok = toks[base_ref]
        if any(idx >= sizes[base_ref] for idx in base_tok.get_vocab().values()):
            raise ConfigError(
                f"{base_ref}: its tokenizer has tokens beyond the model's vocab_size {sizes[base_ref]}; "
                "tokenizer_source with such a base is not supported"
            )
        if tokenizer_source == "base":
            out = base_tok
        elif tokenizer_source == "union":
            out = _union(base_tok, [toks[r] for r in [base_ref] + [r for r in refs if r != base_ref]], scratch)
        else:
            out = (
                toks[tokenizer_source]
                if tokenizer_source in toks
                else _load_tokenizer(location(tokenizer_source, storage_options), scratch / "source")
            )
        vocab_out = out.get_vocab()
        perms: list[list[int]] = []
        for ref in refs:
            vocab = toks[ref].get_vocab()
            p = [-1] * len(vocab_out)
            for tok, new in vocab_out.items():
                old = vocab.get(tok)
                if old is not None and old < sizes[ref]:
                    p[new] = old
            perms.append(p)
        return out, perms, [sizes[r] for r in refs]


def _union(base_tok: Any, toks: list[Any], scratch: Path) -> Any:
    import transformers

    added: dict[str, Any] = {}
    order: dict[str, None] = {}
    for tok in toks:
        specials = tok.added_tokens_decoder
        special_names = {info.content for info in specials.values()}
        for t in tok.get_vocab():
            if t not in special_names:
                order.setdefault(t, None)
        for info in specials.values():
            added.setdefault(info.content, info)
    # a copy of the base tokenizer, so the caller's object is not changed
    copy_dir = scratch / "union"
    base_tok.save_pretrained(str(copy_dir))
    res = transformers.AutoTokenizer.from_pretrained(str(copy_dir), use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in order:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


def vocab_plan(perms: list[list[int]], base_pos: int | None) -> dict[str, Any]:
    """Runs of consecutive rows per source, and the rows some source lacks with how to fill them."""
    n_out = len(perms[0])
    runs: list[list[list[int]]] = []
    for p in perms:
        r: list[list[int]] = []
        for new, old in enumerate(p):
            if old < 0:
                continue
            if r and r[-1][0] + r[-1][2] == new and r[-1][1] + r[-1][2] == old:
                r[-1][2] += 1
            else:
                r.append([new, old, 1])
        runs.append(r)
    fills: list[list[Any]] = []
    for new in range(n_out):
        have = [i for i, p in enumerate(perms) if p[new] >= 0]
        if len(have) == len(perms):
            continue
        if len(have) == 1:
            fills.append([new, "copy", [[have[0], perms[have[0]][new]]]])
        elif not have:
            fills.append([new, "zero", []])
        elif base_pos is not None and perms[base_pos][new] >= 0:
            fills.append([new, "copy", [[base_pos, perms[base_pos][new]]]])
        else:
            fills.append([new, "mean", [[i, perms[i][new]] for i in have]])
    return {"rows": n_out, "runs": runs, "fills": fills}


def is_identity(perms: list[list[int]], sizes: list[int]) -> bool:
    return all(len(p) == n and all(old == new for new, old in enumerate(p)) for p, n in zip(perms, sizes))


def save_tokenizer(tok: Any, write: Callable[[str, bytes], None]) -> None:
    """Hand the output tokenizer's files, by name, to `write` (export records and writes them)."""
    with tempfile.TemporaryDirectory(prefix="bigmerge-tok-") as tmp:
        tok.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                write(f.name, f.read_bytes())
        shutil.rmtree(tmp, ignore_errors=True)
