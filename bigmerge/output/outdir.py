"""OUT: never an input, never someone else's data, one merge at a time.

- **Apart from the inputs.** OUT (and --store) is compared with every input (source models,
  tokenizer_source, the directories of statistics and coefficients files) by resolved location:
  `realpath` locally (symlinks and `file://` included), protocol + normalised bucket/key on
  any other fsspec backend. Equal, inside or containing is refused before anything is written.
- **A record of what bigmerge wrote.** `OUT/.bigmerge-written.json` lists every name bigmerge
  writes in OUT, written (atomically) before the first of them; with it go the plan's
  fingerprint and the sources' pins (pin_sources, below). Names starting with `.bigmerge-`
  are bigmerge's by name. `--overwrite` removes only recorded names; a file bigmerge did not
  write is never removed, and one that a merge would replace (a weight file, config.json, the
  index, a tokenizer file) is refused even with `--overwrite`.
- **A lock.** `OUT/.bigmerge-lock`, created exclusively (O_EXCL locally, a conditional PUT on
  S3), holds pid, host and start time. A lock whose process is dead on this host is taken
  over (serialised on this host by a flock, and only if it is still the lock that was judged
  stale); any other is refused with one line naming its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from bigmerge.errors import OutputExistsError, OutputLockedError, SourceError, UnsafeOutputError
from bigmerge.planning.lora import split_ref
from bigmerge.storage.fs import Location, location, service_error
from bigmerge.storage.jsonio import loads_bounded

RECORD_NAME = ".bigmerge-written.json"
LOCK_NAME = ".bigmerge-lock"
OWN_PREFIX = ".bigmerge-"  # every name bigmerge keeps in OUT beside the checkpoint starts so
STORE_DIR = ".bigmerge-store.zarr"
BIN_CACHE = ".bigmerge-bin-cache"
PARTIAL_DIR = ".bigmerge-partial"
OWN_DIRS = (STORE_DIR, BIN_CACHE, PARTIAL_DIR)
RECORD_FORMAT = "bigmerge-written"
MANIFEST_NAME = "bigmerge-manifest.json"
INDEX_NAME = "model.safetensors.index.json"
# the checkpoint's metadata a merge writes (the tokenizer's names come from bigmerge.planning.vocab)
META_NAMES = ("config.json", "generation_config.json", "chat_template.jinja", INDEX_NAME, MANIFEST_NAME)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".index.json")


# -- where things are ---------------------------------------------------------------------


def resolved(loc: Location) -> tuple[str, str]:
    """(protocol, normalised absolute path) naming the same place whatever the spelling."""
    if loc.is_local:
        return "file", os.path.realpath(loc.path)
    proto = loc.fs.protocol if isinstance(loc.fs.protocol, str) else loc.fs.protocol[0]
    return str(proto), posixpath.normpath("/" + loc.path.strip("/"))


def relation(a: Location, b: Location) -> str | None:
    """How a lies to b: 'is', 'lies inside', 'contains', or None when apart."""
    (pa, ka), (pb, kb) = resolved(a), resolved(b)
    if pa != pb:
        return None
    if ka == kb:
        return "is"
    if ka.startswith(kb.rstrip("/") + "/"):
        return "lies inside"
    if kb.startswith(ka.rstrip("/") + "/"):
        return "contains"
    return None


def check_apart(out: Location, store: Location | None, inputs: list[tuple[str, str]], opts: Any) -> None:
    """Refuse an OUT (or --store) equal to, inside or containing any input: one line naming both;
    and one that is a file (a config, a checkpoint shard), not a directory."""
    outputs = [("OUT", out)]
    if store is not None and relation(store, out) not in ("is", "lies inside"):
        outputs.append(("--store", store))
        if relation(store, out) == "contains":
            raise UnsafeOutputError(f"--store {store.url} contains OUT {out.url}: give the store a place of its own")
    for what_out, o in outputs:
        if o.is_local and os.path.lexists(o.path) and not os.path.isdir(o.path):
            what = (
                f"a symbolic link to {os.readlink(o.path)}, which does not exist"
                if os.path.islink(o.path) and not os.path.exists(o.path)
                else "a file, not a directory"
            )
            raise UnsafeOutputError(
                f"{what_out} {o.url} is {what}: bigmerge writes a model directory there; choose another {what_out}"
            )
        for what, url in inputs:
            rel = relation(o, location(url, opts))
            if rel is not None:
                raise UnsafeOutputError(
                    f"{what_out} {o.url} {rel} the {what} {url}: bigmerge never writes where it reads; choose another {what_out}"
                )


def check_distinct_sources(refs: list[str], opts: Any) -> None:
    """Two spellings of one model (a symlink, ./x and x/) are the same input listed twice."""
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    for ref in refs:
        # BASE+ADAPTER: the same base with another adapter is another model
        key = tuple(resolved(location(part, opts)) for part in split_ref(ref) if part is not None)
        if key in seen:
            raise SourceError(f"{ref}: the same model as {seen[key]} (duplicate merge inputs; list each model once)")
        seen[key] = ref


def check_store(store: Location, plan_file: str) -> None:
    """A --store outside OUT must be new, empty, or a bigmerge store: prepare() may clear it."""
    names = store.listdir()
    if names and plan_file not in names:
        raise UnsafeOutputError(
            f"--store {store.url}: not empty ({sorted(names)[0]}, ...) and not a bigmerge store; "
            "bigmerge may clear its store, so give it an empty or new location"
        )


# -- what bigmerge wrote --------------------------------------------------------------------


def looks_like_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


class OutputDir:
    """OUT's record of what bigmerge wrote there, and what a merge may do with what is there."""

    def __init__(self, out: Location) -> None:
        self.out = out
        self.record: dict[str, Any] = {}

    def _json(self, name: str) -> Any:
        """A JSON file in OUT, or None when it is missing or not JSON (bounded: see jsonio)."""
        loc = self.out.join(name)
        if not loc.exists():
            return None
        try:
            return loads_bounded(loc.read_bytes(), loc.url)
        except SourceError:
            return None

    def read_record(self) -> dict[str, Any] | None:
        if not self.out.join(RECORD_NAME).exists():
            return None
        rec = self._json(RECORD_NAME)
        if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT or not isinstance(rec.get("names"), list):
            raise UnsafeOutputError(
                f"{self.out.join(RECORD_NAME).url}: unreadable record of what bigmerge wrote here; "
                "move OUT's files away yourself"
            )
        return rec

    def _legacy_names(self, present: set[str]) -> set[str]:
        """An output of a bigmerge that kept no record: what its finished manifest vouches for."""
        if MANIFEST_NAME not in present or not self.finished():
            return set()
        from bigmerge.planning.vocab import TOKENIZER_FILES

        files = {f for f in self._json(MANIFEST_NAME).get("files", []) if isinstance(f, str)}
        return (files | set(META_NAMES) | set(TOKENIZER_FILES)) & present

    def finished(self) -> bool:
        """A manifest that bigmerge wrote, whole (it is written atomically, last)."""
        doc = self._json(MANIFEST_NAME)
        return isinstance(doc, dict) and doc.get("format") == "bigmerge-manifest"

    def claim(
        self,
        *,
        plan: str,
        config: str,
        names: set[str],
        pins: dict[str, dict[str, Any]],
        pin_mode: str,
        overwrite: bool,
    ) -> bool:
        """Make OUT this merge's, or refuse; True when an interrupted merge of this plan is resumed.

        `names`: every name this merge will write in OUT. Raises before removing anything.
        """
        present = {n for n in self.out.listdir() if n != LOCK_NAME}
        old = self.read_record() if RECORD_NAME in present else None
        ours = set(old["names"]) if old is not None else self._legacy_names(present)
        ours = (ours & present) | {n for n in present if n.startswith(OWN_PREFIX)}
        finished = MANIFEST_NAME in ours and self.finished()
        # a merge is there: a finished one, a store or partial files, or checkpoint files it wrote
        # (a record alone, temporaries or the bin cache are not a merge)
        merge_there = (
            finished or bool(ours & {STORE_DIR, PARTIAL_DIR}) or any(not n.startswith(OWN_PREFIX) for n in ours)
        )
        foreign = present - ours
        resume = old is not None and old.get("plan") == plan and not finished
        if old is None and not finished and ours & {STORE_DIR, PARTIAL_DIR}:
            resume = True  # a bigmerge that kept no record: its store checks the plan's fingerprint itself
        changed = changed_source(old.get("sources", {}), pins) if resume and old is not None else None
        if changed and not overwrite:
            raise SourceError(
                f"{changed}: changed since the interrupted merge in {self.out.url} began, whose finished blocks "
                "came from the old bytes; rerun with --overwrite to start again from the sources as they are now"
            )
        if changed:
            resume = False  # --overwrite: start again
        clash = sorted(n for n in foreign if n in names or looks_like_weights(n))
        if clash:
            more = f" and {len(clash) - 1} more" if len(clash) > 1 else ""
            raise UnsafeOutputError(
                f"{self.out.url}: holds {clash[0]}{more}, which bigmerge did not write (another checkpoint?); "
                "bigmerge never replaces them, even with --overwrite: choose another OUT or move them away"
            )
        if merge_there and not resume and not overwrite:
            if finished:
                raise OutputExistsError(
                    f"{self.out.url}: already holds a finished merge ({MANIFEST_NAME}); use --overwrite"
                )
            raise OutputExistsError(
                f"{self.out.url}: holds a partial merge of a different config or different sources; "
                "rerun with --overwrite to discard it"
            )
        if foreign and not resume and not overwrite:
            raise UnsafeOutputError(
                f"{self.out.url}: not empty ({sorted(foreign)[0]}, ...) and holds no bigmerge merge; choose an "
                "empty OUT, or --overwrite to merge beside those files (bigmerge removes only what it wrote)"
            )
        if not resume:
            # only what bigmerge wrote; the bin cache was (re)made by this run's planning
            for n in sorted(ours - {RECORD_NAME, BIN_CACHE}):
                self.out.join(n).remove(recursive=n in OWN_DIRS)
        keep = set(old["names"]) & present if resume and old is not None else set()
        self.record = {
            "format": RECORD_FORMAT,
            "version": 1,
            "plan": plan,
            "config": config,
            "names": sorted(names | keep | {RECORD_NAME}),
            "pinned_by": pin_mode,
            "sources": pins if not resume or old is None else old.get("sources", pins),
        }
        self._write_record()
        return resume

    def _write_record(self) -> None:
        from bigmerge.engine.faults import disk_full_at

        data = json.dumps(self.record, indent=1, sort_keys=True).encode()
        self.out.join(RECORD_NAME).write_atomic(data, fault=lambda: disk_full_at("record"))

    def declare(self, name: str) -> None:
        """Record `name` as bigmerge's before writing it (a name the plan did not foresee)."""
        if not self.record or name in self.record["names"]:
            return
        if self.out.join(name).exists():
            raise UnsafeOutputError(
                f"{self.out.join(name).url}: exists and bigmerge did not write it; it is not replaced"
            )
        self.record["names"] = sorted({*self.record["names"], name})
        self._write_record()

    def write(self, name: str, data: bytes, fault: Callable[[], None] | None = None) -> None:
        """A metadata file of the checkpoint: recorded, then written atomically."""
        self.declare(name)
        self.out.join(name).write_atomic(data, fault=fault)


def remove_output(out: Location) -> None:
    """A finished merge bigmerge wrote and no longer needs (an intermediate merge of a
    multi-document config): the names its record lists and bigmerge's own names, the record
    last; the folder itself only when nothing else is left in it."""
    if not out.exists():
        return
    rec = OutputDir(out).read_record()
    present = set(out.listdir())
    ours = (set(rec["names"]) if rec else set()) & present
    ours |= {n for n in present if n.startswith(OWN_PREFIX)}
    for n in sorted(ours - {RECORD_NAME}):
        out.join(n).remove(recursive=n in OWN_DIRS)
    out.join(RECORD_NAME).remove()
    if not out.listdir():
        out.remove(recursive=True)


# -- the lock -------------------------------------------------------------------------------


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or process_start_time(pid) in (None, start)


@contextlib.contextmanager
def _host_mutex(key: str) -> Iterator[None]:
    """One process of this host at a time (takers of one stale lock must not both take it)."""
    path = os.path.join(tempfile.gettempdir(), f"bigmerge-lock-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class OutputLock:
    """The one merge writing into OUT."""

    def __init__(self, out: Location) -> None:
        self.out = out
        self.loc = out.join(LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.held = False

    def _create(self, data: bytes) -> bool:
        """Create the lock file only if there is none: True if this call created it."""
        loc = self.loc

        def create() -> bool:
            if loc.is_local:
                os.makedirs(posixpath.dirname(loc.path), exist_ok=True)
                try:
                    fd = os.open(loc.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return True
            if hasattr(loc.fs, "call_s3"):  # S3: a conditional PUT (If-None-Match: *) is atomic
                bucket, key = loc.fs.split_path(loc.path)[:2]
                try:
                    loc.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                except Exception as exc:  # noqa: BLE001 - s3fs wraps the service's answer
                    service = service_error(exc)
                    if service is not None and (
                        service[0] in ("PreconditionFailed", "ConditionalRequestConflict") or service[1] in (409, 412)
                    ):
                        return False
                    raise
                loc.fs.invalidate_cache(loc.path)
                return True
            if loc.fs.exists(loc.path):  # other backends: no atomic create; check, then write
                return False
            loc.fs.pipe_file(loc.path, data)
            return True

        return loc.call("creation of the lock", create)

    def _holder(self) -> dict[str, Any] | None:
        try:
            raw = self.loc.read_bytes()
        except Exception:  # noqa: BLE001 - gone between the create and the read: try again
            return None
        try:
            doc = loads_bounded(raw, self.loc.url)
        except SourceError:
            doc = None
        return doc if isinstance(doc, dict) else {}

    def acquire(self) -> None:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "start": process_start_time(os.getpid()),
            "token": self.token,
        }
        data = json.dumps(me).encode()
        for _ in range(5):
            if self._create(data):
                self.held = True
                return
            holder = self._holder()
            if holder is None:
                continue
            if not self._stale(holder):
                raise OutputLockedError(self._message(holder))
            with _host_mutex(self.loc.url):
                now = self._holder()
                if now is not None and now.get("token") == holder.get("token"):
                    self.loc.remove()  # still the dead process's lock: nobody else took it
        raise OutputLockedError(f"{self.loc.url}: could not take the lock on OUT (other merges keep taking it)")

    def _stale(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        return not _alive(pid, holder.get("start"))

    def _message(self, holder: dict[str, Any]) -> str:
        pid, host, since = holder.get("pid", "?"), holder.get("host", "?"), holder.get("since", "?")
        msg = f"{self.out.url}: another bigmerge merge is writing here (pid {pid} on {host}, since {since}); wait for it or stop it"
        if host != socket.gethostname():
            msg += f"; if it is no longer running, delete {self.loc.url}"
        return msg

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(Exception):
            holder = self._holder()
            if holder is not None and holder.get("token") == self.token:
                self.loc.remove()


# -- source pins ----------------------------------------------------------------------------

CONTENT_KEY = "content_crc32c"


def changed_source(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> str | None:
    """The first source file whose pin differs (or that is new or gone), with what changed."""
    for url in sorted(set(old) | set(new)):
        a, b = old.get(url), new.get(url)
        if a is None or b is None:
            return f"{url} ({'not' if a is None else 'no longer'} among the sources)"
        keys = set(a) & set(b)
        if CONTENT_KEY in keys:
            keys = {"size", CONTENT_KEY} & keys  # the bytes themselves: a touch or a copy is no change
        for k in sorted(keys):
            if a[k] != b[k]:
                return f"{url} ({k} {a[k]} -> {b[k]})"
    return None


def pin_sources(urls: list[str], opts: Any, mode: str, threads: int = 8) -> dict[str, dict[str, Any]]:
    """Each file's pin: its identity (size, mtime, inode / ETag, version), and with mode 'hash'
    the CRC-32C of all its bytes (read once more: the cost of the option)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(url: str) -> tuple[str, dict[str, Any]]:
        loc = location(url, opts)
        pin = loc.identity()
        if mode == "hash":
            pin[CONTENT_KEY] = loc.content_crc32c()
        return url, pin

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        return dict(pool.map(one, sorted(set(urls))))
