"""Vocabularies that differ between sources: `tokenizer_source` / `tokenizer:` and the embedding rows they imply.

As mergekit 0.1.5 does it, whenever a config names a `tokenizer_source`:

- the output tokenizer is the base model's (`base`), a given model's (a path), or the union
  (`union`): the base's vocabulary, then every token of the other models it lacks, in model
  order, then their added tokens;
- every vocabulary-indexed tensor (embeddings, LM head) of every source is permuted onto the
  output vocabulary before the merge operator sees it. A row for a token a source lacks is
  the only other source's row that has it; else the base's if the base has it; else the mean
  of the rows of the sources that have it; zeros if none has it.

mergekit's `tokenizer:` block (source `union` by default) adds to this: `tokens` appended to
the output vocabulary where it lacks them, each row taken from a model's row of that token, a
model's own row of another token (`kind: model_token`) or zeros (`kind: zero`), for the sources
that lack it or, with `force`, for all; and `pad_to_multiple_of`, whose padding rows are each
source's mean permuted row (mergekit's torch.mean bit for bit, summed by the reader as the
blocks stream: engine/colmean.py).

The permutation lives in the plan as runs of consecutive rows per source plus the list of
filled rows, so the reader assembles any row block with a few ranged reads. mergekit orders
the union's extra tokens by a set's iteration order; bigmerge uses the config's model order.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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
    tokenizer_source: str,
    base_ref: str,
    refs: list[str],
    catalogs: dict[str, ModelCatalog],
    storage_options: Any,
    add_tokens: tuple[str, ...] = (),
) -> tuple[Any, list[list[int]], list[int]]:
    """(output tokenizer, per ref the source row of every output token or -1, per ref vocab size).

    `add_tokens` (the `tokenizer.tokens` keys) are appended to the output vocabulary where it
    lacks them, as mergekit does. (None, [], []) when the base model has no tokenizer and the
    source is not `union`. Built once per process for the same sources (rank 0 needs it for the
    plan and for the export).
    """
    key = (
        tokenizer_source,
        base_ref,
        tuple((r, catalogs[r].root.url, tuple(sorted(catalogs[r].header_sha256.items()))) for r in refs),
        repr(storage_options),
        add_tokens,
    )
    if key not in _built:
        _built.clear()  # one merge's tokenizer at a time
        _built[key] = _build_tokenizer(tokenizer_source, base_ref, refs, catalogs, storage_options, add_tokens)
    return _built[key]


def original_vocabularies(refs: list[str]) -> dict[str, dict[str, int]]:
    """Each source's own token -> row map, from the last build_tokenizer call (for
    `tokenizer.tokens` rules that name a token of a model's own vocabulary)."""
    return {r: _vocabs[r] for r in refs if r in _vocabs}


_vocabs: dict[str, dict[str, int]] = {}


def _build_tokenizer(
    tokenizer_source: str,
    base_ref: str,
    refs: list[str],
    catalogs: dict[str, ModelCatalog],
    storage_options: Any,
    add_tokens: tuple[str, ...] = (),
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
        missing = [t for t in dict.fromkeys(add_tokens) if t not in out.get_vocab()]
        if missing:
            if out is base_tok or out in toks.values():  # never change a source's own tokenizer object
                out = _copy(out, scratch / "added")
            for t in missing:
                out.add_tokens(t)
        _vocabs.clear()
        _vocabs.update({r: dict(toks[r].get_vocab()) for r in refs})
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


def _copy(tok: Any, where: Path) -> Any:
    import transformers

    tok.save_pretrained(str(where))
    return transformers.AutoTokenizer.from_pretrained(str(where), use_fast=True)


def _union(base_tok: Any, toks: list[Any], scratch: Path) -> Any:
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
    res = _copy(base_tok, scratch / "union")  # the caller's object is not changed
    base_vocab = base_tok.get_vocab()
    for t in order:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


@dataclass(frozen=True)
class TokenRule:
    """A `tokenizer.tokens` entry resolved against the output vocabulary: row `new` of the output
    is `kind` ("zero"; "model": `model`'s row of this token; "model_row": `model`'s own row `row`;
    "none": no source given) for the sources that lack the token, or for all of them if `force`."""

    new: int
    token: str
    kind: str
    force: bool = False
    model: str | None = None
    row: int | None = None


def token_rules(tokens: dict[str, Any] | None, tok_out: Any, refs: list[str], where: str) -> list[TokenRule]:
    """mergekit's `tokenizer.tokens` as TokenRules (`tokens` maps a token to a TokenEmbedding)."""
    if not tokens:
        return []
    vocab_out = tok_out.get_vocab()
    originals = original_vocabularies(refs)
    rules: list[TokenRule] = []
    for token, cfg in tokens.items():
        src = cfg.source
        new = vocab_out[token]
        if src is None:
            rules.append(TokenRule(new, token, "none", cfg.force))
        elif isinstance(src, str):
            rules.append(TokenRule(new, token, "model", cfg.force, src))
        elif getattr(src, "kind", None) == "zero":
            rules.append(TokenRule(new, token, "zero", cfg.force))
        else:
            row = src.token_id
            if row is None:
                row = originals.get(src.model, {}).get(src.token)
                if row is None:
                    raise ConfigError(
                        f"{where}: tokenizer.tokens[{token!r}]: token {src.token!r} not found in {src.model}"
                    )
            rules.append(TokenRule(new, token, "model_row", cfg.force, src.model, row))
    return rules


def vocab_plan(
    perms: list[list[int]],
    base_pos: int | None,
    *,
    refs: list[str] | None = None,
    sizes: list[int] | None = None,
    rules: list[TokenRule] | None = None,
    pad_to: int | None = None,
    where: str = "",
) -> dict[str, Any]:
    """Runs of consecutive rows per source, and the rows some source lacks with how to fill them.

    `refs`/`sizes`: the sources' names and own row counts (for `rules`, which name models);
    `pad_to`: the output's row count when the vocabulary is padded to a multiple (mergekit fills
    each source's padding rows with the mean of its own permuted rows). A fill is
    [row, kind, donors] or, when it applies to every source (`force`), [row, kind, donors, True]."""
    n_vocab = len(perms[0])
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
    by_row = {rule.new: rule for rule in rules or []}
    fills: list[list[Any]] = []
    for new in range(n_vocab):
        have = [i for i, p in enumerate(perms) if p[new] >= 0]
        rule = by_row.get(new)
        if rule is not None:
            if len(have) == len(perms) and not rule.force:
                continue
            fill = _rule_fill(rule, perms, refs or [], sizes or [], where)
            fills.append(fill + [True] if rule.force else fill)
            continue
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
    plan: dict[str, Any] = {"rows": n_vocab, "runs": runs, "fills": fills}
    if pad_to is not None and pad_to > n_vocab:
        plan["rows"] = pad_to
        plan["vocab"] = n_vocab  # rows [vocab, rows): the mean of the source's rows [0, vocab)
    return plan


def _rule_fill(rule: TokenRule, perms: list[list[int]], refs: list[str], sizes: list[int], where: str) -> list[Any]:
    at = f"{where}: tokenizer.tokens[{rule.token!r}]"
    if rule.kind == "zero":
        return [rule.new, "zero", []]
    if rule.kind == "none":
        raise ConfigError(f"{at}: some model lacks this token (or force is set) and no source is given for its row")
    assert rule.model is not None
    if rule.model not in refs:
        raise ConfigError(f"{at}: takes its row from {rule.model}, which is not one of this tensor's sources")
    j = refs.index(rule.model)
    if rule.kind == "model":
        row = perms[j][rule.new]
        if row < 0:
            raise ConfigError(f"{at}: {rule.model} has no such token")
    else:
        row = int(rule.row or 0)
        if not 0 <= row < sizes[j]:
            raise ConfigError(f"{at}: token id {row} out of range for {rule.model} ({sizes[j]} rows)")
    return [rule.new, "copy", [[j, row]]]


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
