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
from bigmerge.errors import SourceError, VerifyError
from bigmerge.output.writer import Writer
from bigmerge.planning.catalog import INDEX_NAME, ModelCatalog
from bigmerge.planning.plan import Plan, TensorPlan
from bigmerge.planning.vocab import TOKENIZER_FILES, build_tokenizer, save_tokenizer
from bigmerge.storage.checksum import crc32c, hex32
from bigmerge.storage.fs import Location, location
from bigmerge.storage.safetensors import read_header

MANIFEST_NAME = "bigmerge-manifest.json"
MANIFEST_VERSION = 2  # 2: a CRC-32C per tensor (1 had a sha256)
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
) -> dict[str, Any]:
    manifest: dict[str, Any] = {}
    # each writer knows how its blocks become the output files (see Writer.finish_files)
    layout, hashes = store.finish_files(plan, comm, out, shard_bytes)
    if comm.rank == 0:
        manifest = _finish(plan, out, layout.files, layout.names, hashes, catalogs, tokenizer_source, chat_template)
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
) -> dict[str, Any]:
    by_ref = {c.ref: c for c in catalogs or []}
    base_ref = plan.models[plan.base_index] if plan.base_index is not None else plan.models[0]
    cfg_src = by_ref.get(plan.config_model or base_ref)
    out_dtypes = {t.out_dtype for t in plan.tensors}
    if cfg_src is not None and cfg_src.config is not None:
        cfg = dict(cfg_src.config)
        cfg.update(plan.config_updates)  # e.g. the layer count of a slices merge
        if len(out_dtypes) == 1:
            dname = DTYPE_CONFIG_NAMES[next(iter(out_dtypes))]
            keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
            for k in keys:
                cfg[k] = dname
        out.join("config.json").write_bytes(json.dumps(cfg, indent=2).encode())
        gen = cfg_src.root.join("generation_config.json")
        if gen.exists():
            out.join("generation_config.json").write_bytes(gen.read_bytes())
    tok_ref = base_ref if tokenizer_source in (None, "base") else tokenizer_source
    tok_root = by_ref[tok_ref].root if tok_ref in by_ref else location(tok_ref, out.storage_options)
    if tokenizer_source == "union" and catalogs:
        # the union is built from every source's tokenizer, exactly as the plan built it
        union_base = plan.models[plan.base_index] if plan.base_index is not None else plan.models[0]
        tok, _, _ = build_tokenizer("union", union_base, plan.models, by_ref, out.storage_options)
        save_tokenizer(tok, out)
    elif tok_root is not None:
        for fname in TOKENIZER_FILES:
            src = tok_root.join(fname)
            if src.exists():
                out.join(fname).write_bytes(src.read_bytes())
    if chat_template:
        out.join("chat_template.jinja").write_bytes(chat_template.encode())

    weight_map = {t.name: names[i] for i, tensors in enumerate(files) for t in tensors}
    total = sum(t.out_bytes() for t in plan.tensors)
    index = {"metadata": {"total_size": total, "merged_by": f"bigmerge {__version__}"}, "weight_map": weight_map}
    out.join(INDEX_NAME).write_bytes(json.dumps(index, indent=2).encode())
    manifest = {
        "format": "bigmerge-manifest",
        "version": MANIFEST_VERSION,
        "bigmerge": __version__,
        "merge_method": plan.merge_method,
        "plan_fingerprint": plan.fingerprint(),
        "config_fingerprint": plan.config_fingerprint,
        "sources": plan.source_headers,
        "files": names,
        "tensors": {
            t.name: {"file": weight_map[t.name], "dtype": t.out_dtype, "shape": t.shape, "crc32c": hashes[t.name]}
            for t in plan.tensors
        },
    }
    out.join(MANIFEST_NAME).write_bytes(json.dumps(manifest, indent=1).encode())
    return manifest


def verify(out: Location, chunk: int = 64 * 1024 * 1024) -> int:
    """Re-read every tensor of a finished merge and check it against the manifest."""
    mloc = out.join(MANIFEST_NAME)
    if not mloc.exists():
        raise VerifyError(f"{out.url}: no {MANIFEST_NAME}: not a finished bigmerge output")
    try:
        manifest = json.loads(mloc.read_bytes())
        expected: dict[str, Any] = manifest["tensors"]
    except (ValueError, KeyError) as exc:
        raise VerifyError(f"{mloc.url}: unreadable manifest: {exc}") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise VerifyError(
            f"{mloc.url}: manifest version {manifest.get('version')!r}; this bigmerge checks version {MANIFEST_VERSION} "
            "(a CRC-32C per tensor)"
        )
    if not out.join(INDEX_NAME).exists():
        raise VerifyError(f"{out.url}: manifest present but {INDEX_NAME} is missing")
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
    return seen
