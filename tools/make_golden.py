"""Build golden merge outputs with mergekit 0.1.5, so tests can compare bigmerge without mergekit.

Usage::

    python tools/make_golden.py [--mergekit PATH/TO/mergekit-yaml] [--setup] [--verify-repeat]

mergekit lives in its own virtual environment (its pins clash with bigmerge's). Without
``--mergekit`` the script uses, in order: ``$MERGEKIT_PYTHON``'s directory/mergekit-yaml,
``.mkvenv/bin/mergekit-yaml`` in the repository, ``mergekit-yaml`` on PATH. ``--setup`` creates
``.mkvenv`` when it is missing, which is the same as::

    python3 -m venv .mkvenv && .mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5

What it does: reads the cases from ``tests/golden/cases.yaml`` (the fixture families, and the
family each config runs on) and each config template from ``tests/golden/configs/NAME.yaml``;
builds the tiny fixture families with ``tools/toy_models.make_family`` in a temporary
directory, renders each config template (``{base}``, ``{ft1}``, ... placeholders;
no other braces, so ``str.format(**paths)`` works too), runs ``mergekit-yaml CONFIG OUT
--copy-tokenizer --no-cuda --random-seed 0 --quiet`` on CPU, and writes into ``tests/golden/``:

    NAME.safetensors      every output tensor in one file, in mergekit's output dtype
    resolved/NAME.json    per tensor, what mergekit resolved: compute dtype, out dtype, the
                          weight/density/... of every input after gradients and filters, and
                          for magnitude (TIES) sparsification the top-k boundary (see below)
    MANIFEST.json         per config: mergekit and torch versions, the family arguments, the
                          sha256 of every fixture file the config reads, the output's sha256,
                          dtypes and config.json dtype, and a summary of top-k boundary ties

The ``resolved`` data comes from a read-only probe: mergekit-yaml runs inside a small wrapper
that records the arguments of ``MergeMethod._execute_resolved`` (the call every merge goes
through) and then lets mergekit continue unchanged. ``--verify-repeat`` runs every config a
second time with the plain ``mergekit-yaml`` and checks the tensors are bit-identical.

What mergekit 0.1.5 does, as observed with these fixtures (torch 2.13.0, transformers 5.23, CPU):

- Output dtype: ``out_dtype`` if set; else ``dtype`` if set (``dtype: float32`` on bfloat16
  sources writes float32: task_arithmetic_bf16_to_fp32); else the promoted dtype of the
  sources. Every output tensor has that dtype, norms included. The output config.json carries
  it as ``"dtype"`` (transformers 5 spelling, no ``torch_dtype``); the rest of config.json is
  the base model's (or the first model's, without base_model).
- Compute dtype (``compute_dtype`` in resolved/): ``dtype`` if set, else the promoted source
  dtype. ``task_arithmetic``/``ties`` do their arithmetic in it (``dtype: bfloat16`` means
  bf16 arithmetic: ties_bf16_native). The ``linear`` kernel, per its source, always
  accumulates in float32 (float64 for float64 inputs) and casts back to the compute dtype.
- Names: output tensors keep the sources' names exactly (model.embed_tokens.weight,
  model.layers.N.*, model.norm.weight, lm_head.weight); nothing renamed, added or dropped.
  One ``model.safetensors`` at these sizes (``--out-shard-size`` defaults to 5B parameters),
  plus config.json and the base's tokenizer files.
- Tied embeddings (family C: ``tie_word_embeddings: true``, no ``lm_head.weight`` in the
  sources): no ``lm_head.weight`` in the output either (38 tensors; lm_head is optional in
  mergekit's Llama definition) and config.json keeps ``tie_word_embeddings: true``.
- Gradients: layer i of L gets the list interpolated linearly at i/(L-1) of its length, as a
  Python float ([0.2, 0.8, 0.5] over 4 layers: 0.2, 0.6, 0.7000000000000001, 0.5). Tensors
  outside the layers (embeddings, final norm, lm_head) get the list's *first* value.
  Filters match by substring of the tensor name; a filter's value may itself be a gradient;
  the entry without ``filter`` applies to the rest. resolved/NAME.json has every value.
- TIES top-k (``sparsify.magnitude``) is ``torch.argsort(|delta|.float(), descending=True)[:k]``
  with ``k = max(1, int(density * numel))``, delta computed in the compute dtype. That sort
  is not stable: among elements whose ``|delta|`` equals the k-th largest, which ones are
  kept is up to torch's sort (not the lowest indices). The float32 fixtures have no such ties
  at the boundary; with bfloat16 sources they are everywhere (ties_bf16: 30 of 39 tensors,
  ~14,400 tied elements dropped). ``resolved/NAME.json`` gives per tensor and input
  ``threshold``, ``n_at`` (elements at it) and ``kept_at`` (how many of those were kept), and
  the manifest's ``topk_boundary`` lists where ``n_at > kept_at``, so a comparison can allow
  exactly the positions whose |delta| equals a threshold to differ.
- Timing: 6-10 s per config on 2 CPU cores, nearly all start-up (importing transformers and
  mergekit); the tensors themselves take well under a second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from toy_models import GENERATOR_VERSION, family_files, make_family, sha256_file  # noqa: E402

GOLDEN = REPO / "tests" / "golden"
MKVENV = REPO / ".mkvenv"
MERGEKIT_PIN = "mergekit==0.1.5"
TORCH_PIN = "torch==2.13.0"

CASES_FILE = GOLDEN / "cases.yaml"


@dataclass(frozen=True)
class GoldenCase:
    name: str
    family: str
    yaml: str  # block-style YAML with {base}/{ftN} placeholders and no other braces
    refuses: bool = False  # mergekit is expected to refuse it: its error is the golden


def load_cases(golden: Path = GOLDEN) -> tuple[dict[str, dict[str, Any]], tuple[GoldenCase, ...]]:
    """The fixture families (keyword arguments of make_family) and the cases, from
    golden/cases.yaml; each case's config template is golden/configs/NAME.yaml. A case is its
    family's name, or a mapping with `family` and, where mergekit is expected to refuse the
    config, `mergekit: refuses` (its error line is recorded instead of tensors)."""
    spec = yaml.safe_load((golden / "cases.yaml").read_text())
    cases = tuple(
        GoldenCase(
            name,
            case if isinstance(case, str) else case["family"],
            (golden / "configs" / f"{name}.yaml").read_text(),
            refuses=not isinstance(case, str) and case.get("mergekit") == "refuses",
        )
        for name, case in spec["cases"].items()
    )
    return spec["families"], cases


FAMILIES, CASES = load_cases()

PLACEHOLDER = re.compile(r"\{(base|ft\d+)\}")


def placeholders(text: str) -> list[str]:
    """Model names a config template refers to, in order of first use."""
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def render_config(text: str, paths: Mapping[str, str | Path]) -> str:
    """Substitute {base}/{ftN} with model paths (same result as text.format(**paths))."""
    return PLACEHOLDER.sub(lambda m: str(paths[m.group(1)]), text)


def render_back(text: str, paths: Mapping[str, str | Path]) -> str:
    """text with model paths replaced by their {base}/{ftN} placeholders (longest path first)."""
    for name, p in sorted(paths.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(p), "{" + name + "}")
    return text


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Runs inside mergekit's venv: records what mergekit resolved for each output tensor, then
# lets the merge go on untouched. Arguments: LOG_PATH, then mergekit-yaml's own arguments.
PROBE = r"""
import json, sys
import torch
from mergekit.merge_methods import base as mm_base
from mergekit.scripts.run_yaml import main

log_path = sys.argv[1]
records = []
original = mm_base.MergeMethod._execute_resolved


def ident(x):
    model = getattr(x, "model", None)
    return str(getattr(model, "path", x))


def plain(v):
    if isinstance(v, mm_base.PerInputValues):
        return {ident(k): plain(val) for k, val in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def boundary(delta, density):
    # Mirrors mergekit.sparsify.magnitude: k = max(1, int(density * numel)), rank by |delta| as float32.
    n = delta.numel()
    if density >= 1 or density <= 0 or n == 0:
        return None
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1).float()
    v = torch.topk(w, k).values[-1]
    above = int((w > v).sum())
    return {"k": k, "numel": n, "threshold": float(v), "n_above": above, "n_at": int((w == v).sum()), "kept_at": k - above}


def probe(self, groups, parameters, *, dtype=None, out_dtype=None, batch_options=None):
    from mergekit.merge_methods.dtype import promoted_dtype
    for group, params in zip(groups, parameters):
        compute = dtype or (promoted_dtype(group) if group.entries else None)
        rec = {
            "tensor": group.metadata.name,
            "method": self.spec.name,
            "inputs": [ident(e.id) for e in group.entries],
            "base": next((ident(e.id) for e in group.entries if e.is_base), None),
            "input_dtypes": sorted({str(e.tensor.dtype).removeprefix("torch.") for e in group.entries}),
            "compute_dtype": str(compute).removeprefix("torch.") if compute is not None else None,
            "out_dtype": str(out_dtype).removeprefix("torch.") if out_dtype is not None else None,
            "params": {k: plain(v) for k, v in params.items()},
        }
        sparsify = getattr(self, "sparsification_method", None)
        if sparsify is not None and str(getattr(sparsify, "value", sparsify)) == "magnitude" and group.base:
            base = group.base.tensor.to(compute)
            rec["topk"] = {
                ident(e.id): boundary(e.tensor.to(compute) - base, float(params["density"][e.id]))
                for e in group.non_base
            }
        records.append(rec)
    return original(self, groups, parameters, dtype=dtype, out_dtype=out_dtype, batch_options=batch_options)


mm_base.MergeMethod._execute_resolved = probe
sys.argv = ["mergekit-yaml", *sys.argv[2:]]
try:
    main()
finally:
    with open(log_path, "w") as fh:
        json.dump(records, fh)
"""


def find_mergekit(explicit: str | None, *, setup: bool) -> Path:
    """mergekit-yaml: --mergekit, then $MERGEKIT_PYTHON's bin dir, then .mkvenv, then PATH."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SystemExit(f"--mergekit {explicit}: no such file")
        return path
    candidates = []
    if os.environ.get("MERGEKIT_PYTHON"):
        candidates.append(Path(os.environ["MERGEKIT_PYTHON"]).parent / "mergekit-yaml")
    candidates.append(MKVENV / "bin" / "mergekit-yaml")
    for c in candidates:
        if c.is_file():
            return c
    if setup:
        return setup_mkvenv()
    on_path = shutil.which("mergekit-yaml")
    if on_path:
        return Path(on_path)
    raise SystemExit(
        "mergekit-yaml not found. Create its venv with `python tools/make_golden.py --setup`, or:\n"
        f"  python3 -m venv .mkvenv && .mkvenv/bin/pip install {TORCH_PIN} {MERGEKIT_PIN}\n"
        "or pass --mergekit /path/to/mergekit-yaml (or set MERGEKIT_PYTHON)."
    )


def setup_mkvenv() -> Path:
    print(f"creating {MKVENV} with {TORCH_PIN} {MERGEKIT_PIN}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(MKVENV)], check=True)
    pip = [str(MKVENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, TORCH_PIN, MERGEKIT_PIN], check=True)
    return MKVENV / "bin" / "mergekit-yaml"


def mergekit_env() -> dict[str, str]:
    env = dict(os.environ)
    # Offline and on CPU: the fixtures are local paths and goldens must not depend on a GPU.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def mergekit_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch', 'transformers', 'safetensors')}))"
    )
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True, env=mergekit_env())
    return json.loads(out.stdout)


MERGEKIT_ARGS = ["--copy-tokenizer", "--no-cuda", "--random-seed", "0", "--quiet", "--no-write-model-card"]


class MergekitRefused(Exception):
    """mergekit exited non-zero; the message is its last error line."""


def run_mergekit(mergekit: Path, config: Path, out: Path, *, probe_log: Path | None) -> float:
    python = mergekit.parent / "python"
    if len([d for d in yaml.safe_load_all(config.read_text()) if d is not None]) > 1:
        # several documents: mergekit-multi, intermediates beside OUT, the final (unnamed) one in
        # OUT; no probe (the resolved records are left empty)
        multi = mergekit.parent / "mergekit-multi"
        cmd = [str(multi), str(config), "--intermediate-dir", str(out.parent / "inter"), "--out-path", str(out)]
        cmd += MERGEKIT_ARGS
        if probe_log is not None:
            probe_log.write_text("[]")
    elif probe_log is not None:
        probe = out.parent / "probe.py"
        probe.write_text(PROBE)
        cmd = [str(python), str(probe), str(probe_log), str(config), str(out), *MERGEKIT_ARGS]
    else:
        cmd = [str(mergekit), str(config), str(out), *MERGEKIT_ARGS]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=mergekit_env())
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise MergekitRefused(lines[-1] if lines else f"exit status {proc.returncode}")
    if not out.exists():  # mergekit-multi with every merge named: the last one is the final output
        last = [d for d in yaml.safe_load_all(config.read_text()) if d is not None][-1]["name"]
        shutil.move(str(out.parent / "inter" / last), str(out))
    return time.perf_counter() - t0


def load_output(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        part = load_file(str(f))
        dup = set(part) & set(tensors)
        if dup:
            raise SystemExit(f"{out}: tensor(s) {sorted(dup)} in more than one shard")
        tensors.update(part)
    return dict(sorted(tensors.items()))


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        for k in a
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def summarize_resolved(records: list[dict[str, Any]], names: Mapping[str, str]) -> dict[str, Any]:
    """Probe records keyed by tensor, with model paths replaced by their placeholder names."""

    def rename(x: Any) -> Any:
        if isinstance(x, str):
            return names.get(x, x)
        if isinstance(x, list):
            return [rename(v) for v in x]
        if isinstance(x, dict):
            return {names.get(k, k): rename(v) for k, v in x.items()}
        return x

    out: dict[str, Any] = {}
    for rec in records:
        rec = rename(rec)
        out[rec.pop("tensor")] = rec
    return dict(sorted(out.items()))


def topk_boundary_summary(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors/inputs where mergekit's unstable sort had to choose among tied magnitudes."""
    ambiguous: dict[str, dict[str, int]] = {}
    for tensor, rec in resolved.items():
        for model, b in (rec.get("topk") or {}).items():
            # Ties at a zero threshold do not matter: a zero delta contributes nothing either way.
            if b and b["threshold"] > 0 and b["n_at"] > b["kept_at"]:
                ambiguous.setdefault(tensor, {})[model] = b["n_at"] - b["kept_at"]
    return {
        "tensors_with_ambiguous_ties": len(ambiguous),
        "dropped_tied_elements": sum(sum(v.values()) for v in ambiguous.values()),
        "ambiguous": ambiguous,
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", help="path to mergekit-yaml (its venv's python must sit next to it)")
    ap.add_argument("--setup", action="store_true", help=f"create .mkvenv ({TORCH_PIN} {MERGEKIT_PIN}) if missing")
    ap.add_argument("--out", default=str(GOLDEN), help="golden directory (default tests/golden)")
    ap.add_argument(
        "--verify-repeat", action="store_true", help="rerun each config with plain mergekit-yaml and compare"
    )
    ap.add_argument("--keep-temp", action="store_true", help="keep the fixtures and raw mergekit outputs")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="(re)build only these cases (names or prefixes, e.g. slerp); the manifest keeps the others",
    )
    ap.add_argument(
        "--cases",
        help="a case directory other than tests/golden (cases.yaml + configs/; e.g. tests/corpus); "
        "its goldens are written there too unless --out is given",
    )
    a = ap.parse_args(argv)
    families_spec, all_cases = FAMILIES, CASES
    if a.cases:
        families_spec, all_cases = load_cases(Path(a.cases))
        if a.out == str(GOLDEN):
            a.out = a.cases
    cases = [c for c in all_cases if not a.only or any(c.name == o or c.name.startswith(o) for o in a.only)]
    if a.only and not cases:
        raise SystemExit(f"--only {' '.join(a.only)}: no such case")

    mergekit = find_mergekit(a.mergekit, setup=a.setup)
    versions = mergekit_versions(mergekit.parent / "python")
    print(f"mergekit {versions['mergekit']} (torch {versions['torch']}) at {mergekit}")
    golden = Path(a.out)
    (golden / "configs").mkdir(parents=True, exist_ok=True)
    (golden / "resolved").mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="bigmerge-golden-"))
    previous = golden / "MANIFEST.json"
    old_configs = json.loads(previous.read_text())["configs"] if a.only and previous.exists() else {}
    manifest: dict[str, Any] = {
        "about": "golden outputs of mergekit-yaml on tools/toy_models.py fixtures; rebuild with tools/make_golden.py",
        "mergekit": versions,
        "mergekit_args": MERGEKIT_ARGS,
        "families": {},
        "configs": {k: v for k, v in old_configs.items() if k in {c.name for c in all_cases}},
    }
    failed: list[str] = []
    try:
        families: dict[str, dict[str, Path]] = {}
        for fam, kwargs in families_spec.items():
            families[fam] = make_family(tmp / "fixtures" / fam, **kwargs)
            manifest["families"][fam] = {
                "args": kwargs,
                "generator_version": GENERATOR_VERSION,
                "torch": torch.__version__,
                "sha256": {rel: sha256_file(p) for rel, p in family_files(families[fam])},
            }
        for case in cases:
            paths = families[case.family]
            used = placeholders(case.yaml)
            rendered = render_config(case.yaml, paths)
            if rendered != case.yaml.format(**{k: str(v) for k, v in paths.items()}):
                raise SystemExit(f"{case.name}: template must not contain braces other than placeholders")
            work = tmp / "runs" / case.name
            work.mkdir(parents=True)
            cfg = work / "config.yaml"
            cfg.write_text(rendered)
            log = work / "probe.json"
            try:
                seconds = run_mergekit(mergekit, cfg, work / "out", probe_log=log)
            except MergekitRefused as exc:
                if not case.refuses:
                    failed.append(f"{case.name}: {exc}")  # reported at the end; the other cases go on
                    print(f"{case.name:34s} FAILED in mergekit: {exc}")
                    continue
                (golden / f"{case.name}.safetensors").unlink(missing_ok=True)
                (golden / "resolved" / f"{case.name}.json").unlink(missing_ok=True)
                manifest["configs"][case.name] = {
                    "family": case.family,
                    "mergekit_version": versions["mergekit"],
                    "models": used,
                    "config": f"configs/{case.name}.yaml",
                    "config_sha256": sha256_bytes(case.yaml.encode()),
                    "refused": render_back(str(exc), paths)[:300],
                }
                print(f"{case.name:34s} family {case.family}  refused by mergekit: {str(exc)[:120]}")
                continue
            if case.refuses:
                raise SystemExit(f"{case.name}: marked `mergekit: refuses`, but mergekit merged it")
            tensors = load_output(work / "out")
            if a.verify_repeat:
                run_mergekit(mergekit, cfg, work / "out2", probe_log=None)
                if not same_bits(tensors, load_output(work / "out2")):
                    raise SystemExit(f"{case.name}: a second (unprobed) mergekit run gave different tensors")
            out_cfg = json.loads((work / "out" / "config.json").read_text())
            names = {str(p): name for name, p in paths.items()}
            resolved = summarize_resolved(json.loads(log.read_text()), names)

            if golden.resolve() != GOLDEN.resolve() and not a.cases:  # another --out: it gets the templates too
                (golden / "configs" / f"{case.name}.yaml").write_text(case.yaml)
            target = golden / f"{case.name}.safetensors"
            # One metadata key only: safetensors writes its metadata map in random (Rust HashMap)
            # order, so several keys would make the file bytes differ from run to run.
            save_file(tensors, str(target), metadata={"format": "pt"})
            target.chmod(0o644)  # safetensors creates 0600 files
            write_json(golden / "resolved" / f"{case.name}.json", resolved)
            fixture_sha = manifest["families"][case.family]["sha256"]
            entry: dict[str, Any] = {
                "family": case.family,
                "family_args": families_spec[case.family],
                "mergekit_version": versions["mergekit"],
                "models": used,
                "config": f"configs/{case.name}.yaml",
                "config_sha256": sha256_bytes(case.yaml.encode()),
                "fixture_sha256": {rel: h for rel, h in fixture_sha.items() if rel.split("/")[0] in used},
                "output": {
                    "file": target.name,
                    "sha256": sha256_file(target),
                    "n_tensors": len(tensors),
                    "dtypes": dict(Counter(dtype_name(t.dtype) for t in tensors.values())),
                    "config_dtype": out_cfg.get("dtype", out_cfg.get("torch_dtype")),
                    "tie_word_embeddings": out_cfg.get("tie_word_embeddings"),
                    "has_lm_head": "lm_head.weight" in tensors,
                    "files": sorted(p.name for p in (work / "out").iterdir()),
                },
                "compute_dtypes": sorted({r["compute_dtype"] for r in resolved.values() if r["compute_dtype"]}),
            }
            if any("topk" in r for r in resolved.values()):
                entry["topk_boundary"] = topk_boundary_summary(resolved)
            manifest["configs"][case.name] = entry
            ties = entry.get("topk_boundary", {}).get("dropped_tied_elements")
            print(
                f"{case.name:34s} family {case.family}  {seconds:5.1f} s  {len(tensors)} tensors "
                f"{entry['output']['dtypes']}  config dtype {entry['output']['config_dtype']}"
                + (f"  top-k boundary ties dropped: {ties}" if ties is not None else "")
            )
    finally:
        if a.keep_temp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if a.only:
        # Several people may build different cases at once: merge into the manifest as it is
        # now, and leave every other case's files alone.
        if previous.exists():
            current = json.loads(previous.read_text())["configs"]
            manifest["configs"] = {**current, **{c.name: manifest["configs"][c.name] for c in cases}}
    else:
        # Drop goldens of configs that no longer exist, so the directory matches the manifest.
        keep = {c.name for c in all_cases}
        # (with --cases the templates are the input: never removed)
        for pattern in (
            ("*.safetensors", "resolved/*.json") if a.cases else ("*.safetensors", "configs/*.yaml", "resolved/*.json")
        ):
            for f in golden.glob(pattern):
                if f.name.split(".")[0] not in keep:
                    f.unlink()
    write_json(golden / "MANIFEST.json", manifest)
    total = sum(f.stat().st_size for f in golden.rglob("*") if f.is_file())
    print(f"wrote {golden} ({total / 1e6:.2f} MB)")
    if failed:
        print("mergekit failed on cases not marked `mergekit: refuses`:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
