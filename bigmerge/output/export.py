"""Export: the zarr store becomes a Hugging Face checkpoint.

Output files are spread over the ranks; each rank streams its files block by block from
the store (bounded memory), checking every block's CRC-32C and combining them into each
tensor's checksum. Rank 0 then writes
`config.json`, the tokenizer, `model.safetensors.index.json` and, last of all, the
manifest: a merge is complete only when the manifest exists.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bigmerge import __version__
from bigmerge.engine.comm import Comm
from bigmerge.engine.faults import disk_full_at, fault_point
from bigmerge.errors import SourceError, VerifyError
from bigmerge.output.card import CARD_NAME, CONFIG_NAME, render_card, results_from_config
from bigmerge.output.outdir import MANIFEST_NAME, OutputDir
from bigmerge.output.writer import Writer
from bigmerge.planning.catalog import INDEX_NAME, ModelCatalog
from bigmerge.planning.modules import update_config
from bigmerge.planning.plan import Plan, TensorPlan
from bigmerge.planning.vocab import TOKENIZER_FILES, build_tokenizer, save_tokenizer
from bigmerge.storage.checksum import crc32c, hex32
from bigmerge.storage.fs import Location, location
from bigmerge.storage.jsonio import loads_bounded
from bigmerge.storage.safetensors import DTYPES, read_header

MANIFEST_VERSION = 3  # 3: CRC-32C of the index, config and tokenizer, and the sources' pins; 2: a CRC-32C per tensor
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_SHARD_BYTES = 5 * 1000**3
DTYPE_CONFIG_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def check_tokenizer_source(tokenizer_source: str | None, storage_options: dict[str, Any] | None) -> None:
    """A tokenizer_source path must hold a tokenizer: known before anything is written."""
    if tokenizer_source in (None, "base", "union"):
        return
    root = location(tokenizer_source, storage_options)
    if not any(root.join(f).exists() for f in TOKENIZER_FILES):
        raise SourceError(
            f"{tokenizer_source}: tokenizer_source holds none of the tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"
        )


def clear_finished_markers(out: Location) -> None:
    """Before writing anything: an old index or manifest must not vouch for new files."""
    out.join(MANIFEST_NAME).remove()
    out.join(INDEX_NAME).remove()
    for name in out.listdir():
        if SHARD_RE.fullmatch(name):
            out.join(name).remove()


def export(
    plan: Plan,
    comm: Comm,
    store: Writer,
    out: Location,
    catalogs: list[ModelCatalog] | None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer_source: str | None = None,
    chat_template: str | None = None,
    outdir: OutputDir | None = None,
    add_tokens: tuple[str, ...] = (),
    pins: dict[str, dict[str, Any]] | None = None,
    pin_mode: str = "stat",
    config_text: str | None = None,
    copy_tokenizer: bool = True,
    write_card: bool = True,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {}
    # each writer knows how its blocks become the output files (see Writer.finish_files)
    layout, hashes = store.finish_files(plan, comm, out, shard_bytes)
    if comm.rank == 0:
        manifest = _finish(
            plan,
            out,
            layout.files,
            layout.names,
            hashes,
            catalogs,
            tokenizer_source,
            chat_template,
            outdir,
            (pins or {}, pin_mode),
            config_text,
            copy_tokenizer,
            write_card,
            add_tokens,
        )
    comm.barrier()
    return manifest


def _finish(
    plan: Plan,
    out: Location,
    files: list[list[TensorPlan]],
    names: list[str],
    hashes: dict[str, str],
    catalogs: list[ModelCatalog] | None,
    tokenizer_source: str | None,
    chat_template: str | None,
    outdir: OutputDir | None,
    sources: tuple[dict[str, dict[str, Any]], str],
    config_text: str | None = None,
    copy_tokenizer: bool = True,
    write_card: bool = True,
    add_tokens: tuple[str, ...] = (),
) -> dict[str, Any]:
    """config.json, the tokenizer, the index and, last, the manifest: each written whole under
    its name (a temporary name renamed; on object storage read back and compared) and recorded
    as bigmerge's before it is written. The manifest holds every tensor's CRC-32C, the CRC-32C
    of each of these files and the sources' pins."""
    meta: dict[str, str] = {}

    def write(name: str, data: bytes, when: str) -> None:
        fault_point(0, when)  # rank 0 writes the metadata

        def fault() -> None:
            disk_full_at(when)

        if outdir is not None:
            outdir.write(name, data, fault)
        else:
            out.join(name).write_atomic(data, fault)
        if name != MANIFEST_NAME:
            meta[name] = hex32(crc32c(data))

    by_ref = {c.ref: c for c in catalogs or []}
    base_ref = plan.models[plan.base_index] if plan.base_index is not None else plan.models[0]
    cfg_src = by_ref.get(plan.config_model or base_ref)
    out_dtypes = {t.out_dtype for t in plan.tensors}
    if cfg_src is not None and cfg_src.config is not None:
        cfg = dict(cfg_src.config)
        update_config(cfg, plan.config_updates)  # e.g. the layer count of a slices merge
        if len(out_dtypes) == 1:
            dname = DTYPE_CONFIG_NAMES[next(iter(out_dtypes))]
            keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
            for k in keys:
                cfg[k] = dname
        write("config.json", json.dumps(cfg, indent=2).encode(), "config")
        gen = cfg_src.root.join("generation_config.json")
        if gen.exists():
            write("generation_config.json", gen.read_bytes(), "config")
    tok_ref = base_ref if tokenizer_source in (None, "base") else tokenizer_source
    tok_root = by_ref[tok_ref].root if tok_ref in by_ref else location(tok_ref, out.storage_options)
    if not copy_tokenizer:
        pass  # mergekit's --no-copy-tokenizer
    elif tokenizer_source is not None and (tokenizer_source == "union" or add_tokens) and catalogs:
        # the union (or a vocabulary with added tokens) is built exactly as the plan built it
        tok_base = plan.models[plan.base_index] if plan.base_index is not None else plan.models[0]
        tok, _, _ = build_tokenizer(tokenizer_source, tok_base, plan.models, by_ref, out.storage_options, add_tokens)
        save_tokenizer(tok, lambda name, data: write(name, data, "tokenizer"))
    elif tok_root is not None:
        for fname in TOKENIZER_FILES:
            src = tok_root.join(fname)
            if src.exists():
                write(fname, src.read_bytes(), "tokenizer")
    if chat_template:
        write("chat_template.jinja", chat_template.encode(), "tokenizer")

    weight_map = {t.name: names[i] for i, tensors in enumerate(files) for t in tensors}
    total = sum(t.out_bytes() for t in plan.tensors)
    index = {"metadata": {"total_size": total, "merged_by": f"bigmerge {__version__}"}, "weight_map": weight_map}
    write(INDEX_NAME, json.dumps(index, indent=2).encode(), "index")
    if config_text is not None:  # the recipe: the config as given, and the model card
        base = plan.models[plan.base_index] if plan.base_index is not None else None
        card = render_card(
            method=plan.merge_method,
            sources=list(plan.models),
            base=base,
            config_text=config_text,
            results=results_from_config(config_text),
            version=__version__,
        )
        write(CONFIG_NAME, config_text.encode(), "card")
        if write_card:
            write(CARD_NAME, card.encode(), "card")
    pins, pin_mode = sources
    manifest = {
        "format": "bigmerge-manifest",
        "version": MANIFEST_VERSION,
        "bigmerge": __version__,
        "merge_method": plan.merge_method,
        "plan_fingerprint": plan.fingerprint(),
        "config_fingerprint": plan.config_fingerprint,
        "sources": plan.source_headers,
        "source_files": pins,  # each file read, as pinned when the merge began (verify lists them)
        "pinned_by": pin_mode,
        "metadata": meta,  # CRC-32C of config.json, the tokenizer and the index, as written
        "files": names,
        "tensors": {
            t.name: {"file": weight_map[t.name], "dtype": t.out_dtype, "shape": t.shape, "crc32c": hashes[t.name]}
            for t in plan.tensors
        },
    }
    write(MANIFEST_NAME, json.dumps(manifest, indent=1).encode(), "manifest")
    return manifest


def verify(out: Location, chunk: int = 64 * 1024 * 1024, report: list[str] | None = None) -> int:
    """Re-read every tensor of a finished merge and check it, the index and the config against
    the manifest. `report` receives one line per thing checked (and the sources' pins)."""
    mloc = out.join(MANIFEST_NAME)
    if not mloc.exists():
        raise VerifyError(f"{out.url}: no {MANIFEST_NAME}: not a finished bigmerge output")
    try:
        manifest = loads_bounded(mloc.read_bytes(), mloc.url, "manifest")
        expected: dict[str, Any] = manifest["tensors"]
    except (SourceError, KeyError, TypeError) as exc:
        raise VerifyError(f"{mloc.url}: unreadable manifest: {exc}") from None
    if manifest.get("version") not in (2, MANIFEST_VERSION):
        raise VerifyError(
            f"{mloc.url}: manifest version {manifest.get('version')!r}; this bigmerge checks versions 2 and "
            f"{MANIFEST_VERSION}"
        )
    index_loc = out.join(INDEX_NAME)
    if not index_loc.exists():
        raise VerifyError(f"{out.url}: manifest present but {INDEX_NAME} is missing")
    lines = report if report is not None else []
    seen = 0
    for fname in manifest.get("files", []):
        floc = out.join(fname)
        if not floc.exists():
            raise VerifyError(f"{floc.url}: output file listed in the manifest is missing")
        tensors, _, _ = read_header(floc)
        for name, info in sorted(tensors.items(), key=lambda kv: kv[1].start):
            want = expected.get(name)
            if want is None:
                raise VerifyError(f"{floc.url}: tensor {name!r} is not in the manifest")
            if want["file"] != fname or want["dtype"] != info.dtype or list(want["shape"]) != list(info.shape):
                raise VerifyError(f"{floc.url}: tensor {name!r} has dtype/shape/file other than the manifest says")
            crc = 0
            pos = info.start
            while pos < info.end:
                n = min(chunk, info.end - pos)
                crc = crc32c(floc.read_bytes(pos, pos + n), crc)
                pos += n
            if hex32(crc) != want.get("crc32c"):
                raise VerifyError(f"{floc.url}: tensor {name!r} does not match its checksum in the manifest")
            seen += 1
    if seen != len(expected):
        raise VerifyError(f"{out.url}: {len(expected) - seen} tensor(s) of the manifest are in no output file")
    lines.append(f"{seen} tensors in {len(manifest.get('files', []))} file(s): every byte against its CRC-32C")
    _verify_index(index_loc, expected, manifest, lines)
    meta = manifest.get("metadata")
    if isinstance(meta, dict):
        for name, want_crc in sorted(meta.items()):
            floc = out.join(name)
            if name == INDEX_NAME:
                continue  # checked above, and its CRC below with the rest
            if not floc.exists():
                raise VerifyError(f"{floc.url}: listed in the manifest but missing")
            if hex32(crc32c(floc.read_bytes())) != want_crc:
                raise VerifyError(f"{floc.url}: differs from what the merge wrote (CRC-32C in the manifest)")
        if INDEX_NAME in meta and hex32(crc32c(index_loc.read_bytes())) != meta[INDEX_NAME]:
            raise VerifyError(f"{index_loc.url}: differs from what the merge wrote (CRC-32C in the manifest)")
        others = sorted(n for n in meta if n != INDEX_NAME)
        lines.append(f"{', '.join(others) or 'no other metadata'}: as written (CRC-32C)")
    else:
        lines.append("config and tokenizer: not checked (a version-2 manifest has no CRC for them)")
    pins = manifest.get("source_files")
    if isinstance(pins, dict):
        how = "content CRC-32C" if manifest.get("pinned_by") == "hash" else "size, mtime, inode / ETag, version"
        lines.append(f"sources ({len(pins)} file(s), pinned by {how} when the merge began):")
        for url, pin in sorted(pins.items()):
            lines.append(f"  {url} " + " ".join(f"{k}={v}" for k, v in sorted(pin.items())))
    return seen


def _verify_index(index_loc: Location, expected: dict[str, Any], manifest: dict[str, Any], lines: list[str]) -> None:
    """The index maps exactly the manifest's tensors to their files, with the right total size."""
    try:
        index = loads_bounded(index_loc.read_bytes(), index_loc.url, "index")
        weight_map = index["weight_map"]
        total = index["metadata"]["total_size"]
    except (SourceError, KeyError, TypeError) as exc:
        raise VerifyError(f"{index_loc.url}: unreadable index: {exc}") from None
    want_map = {name: t["file"] for name, t in expected.items()}
    if weight_map != want_map:
        diff = sorted(set(weight_map.items()) ^ set(want_map.items()))
        raise VerifyError(f"{index_loc.url}: weight map differs from the manifest (first: {diff[0][0]!r})")
    want_total = 0
    for t in expected.values():
        n = DTYPES[t["dtype"]][1]
        for d in t["shape"]:
            n *= d
        want_total += n
    if total != want_total:
        raise VerifyError(f"{index_loc.url}: total_size {total}, the manifest's tensors make {want_total}")
    lines.append(f"{INDEX_NAME}: {len(weight_map)} tensors mapped to the manifest's files, total_size {total}")
